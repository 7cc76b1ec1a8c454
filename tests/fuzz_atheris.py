"""Coverage-guided fuzzing of the gateway's file path with atheris (libFuzzer for Python).

`python tests/fuzz_atheris.py CORPUS_DIR [libFuzzer flags]`: the same path as the seeded
mutator (tests/fuzz_harness.py: parse, validate, decode, assemble, preprocess), with the
project's typed errors as the only accepted failures; anything else is reported by atheris as
an uncaught exception, with the input saved as crash-*. CORPUS_DIR is filled with the phantom
seed files first if empty, so the fuzzer starts from valid DICOM instead of random bytes.
tests/test_fuzz_atheris.py runs it briefly in CI; longer runs are in docs/reliability.md.
"""

from __future__ import annotations

import resource
import sys
import warnings
from pathlib import Path

import atheris

with atheris.instrument_imports(include=["ctjoint", "pydicom"]):
    from fuzz_harness import CASE_BYTES, PathUnderTest, mapped_bytes, out_of_memory
    from fuzz_mutator import seed_files, seed_series

    from ctjoint.gateway.errors import CtJointError

_PATH: PathUnderTest | None = None


class CaseTooLargeError(Exception):
    """An input needed more than CASE_BYTES (reported by atheris as a crash, input saved)."""


def test_one_input(data: bytes) -> None:
    """One libFuzzer input through the path; the project's own errors are fine, unless they
    hide a MemoryError: each input may allocate CASE_BYTES beyond what the process maps
    (the seeded harness's bound, by the same soft RLIMIT_AS)."""
    global _PATH
    if _PATH is None:
        _PATH = PathUnderTest()
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (mapped_bytes() + CASE_BYTES, hard))
    try:
        _PATH.run(data)
    except (CtJointError, MemoryError) as err:
        if out_of_memory(err):
            raise CaseTooLargeError(f"an input needed more than {CASE_BYTES} bytes") from err
    finally:
        resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def main() -> None:
    corpus = Path(sys.argv[1])
    corpus.mkdir(parents=True, exist_ok=True)
    if not any(corpus.iterdir()):
        for name, data in seed_files(seed_series()).items():
            (corpus / f"seed_{name}.dcm").write_bytes(data)
    warnings.simplefilter("ignore")
    # Start the decode worker (an interpreter start, seconds on a busy machine) before
    # libFuzzer's per-input timeout applies.
    for seed in corpus.glob("seed_*.dcm"):
        test_one_input(seed.read_bytes())
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
