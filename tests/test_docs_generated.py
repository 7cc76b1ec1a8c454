"""Every table in the operator docs is written by the script that measured it.

A table typed by hand goes stale the day it is typed (issue 18, point 8): each markdown table
in docs/performance.md, reliability.md, security.md and deployment.md must lie between a
begin/end marker pair that a script writes (the script holding both marker strings), or
follow a `<!-- static: reason -->` comment when it is reference, not measurement (options,
bounds, version pins).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from ctjoint.contracts import repo_root

ROOT = repo_root()
DOCS = ("performance.md", "reliability.md", "security.md", "deployment.md")
# Where the writers live: the benchmark scripts and the package's own report writers.
WRITER_DIRS = ("bench", "export", "ctjoint", "client", "gateway")
COMMENT = re.compile(r"^<!--\s*(.*?)\s*-->$")


def _writers() -> dict[Path, str]:
    return {
        path: path.read_text(encoding="utf-8")
        for folder in WRITER_DIRS
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def _writer_of(marker: str, writers: dict[Path, str]) -> list[Path]:
    return [path for path, text in writers.items() if marker in text]


def problems(text: str, name: str, writers: dict[Path, str]) -> list[str]:
    """What is wrong with the tables of one document: a table outside a generated block
    and not marked static, a begin marker no script writes, or a block never closed."""
    found: list[str] = []
    block: tuple[int, str, Path] | None = None  # begin line, marker, writer
    static = False
    fenced = False
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if line.startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            continue
        comment = COMMENT.match(line)
        if block is not None:
            if comment and line in writers[block[2]] and line != block[1]:
                block = None
            continue
        if comment:
            if comment.group(1).startswith("static:"):
                static = bool(comment.group(1)[len("static:") :].strip())
                if not static:
                    found.append(f"{name}:{number}: a static mark needs its reason")
                continue
            owners = _writer_of(line, writers)
            if len(owners) != 1:
                found.append(
                    f"{name}:{number}: marker {line!r} is written by {len(owners)} scripts "
                    "(expected exactly one)"
                )
                continue
            block = (number, line, owners[0])
            continue
        if line.startswith("|"):
            if not static:
                found.append(
                    f"{name}:{number}: a table outside a generated block and not marked "
                    f"`<!-- static: reason -->`: {line[:60]!r}"
                )
                static = True  # one report per table
            continue
        if line:
            static = False
    if block is not None:
        found.append(f"{name}:{block[0]}: block {block[1]!r} ({block[2].name}) never ends")
    return found


@pytest.mark.parametrize("doc", DOCS)
def test_every_table_is_generated_or_marked_static(doc: str) -> None:
    path = ROOT / "docs" / doc
    assert problems(path.read_text(encoding="utf-8"), doc, _writers()) == []


def test_the_check_catches_a_hand_typed_table_and_an_unknown_marker() -> None:
    writers = {Path("bench/x.py"): 'BEGIN = "<!-- x begin -->"\nEND = "<!-- x end -->"\n'}
    generated = "<!-- x begin -->\n| a | b |\n|---|---|\n<!-- x end -->\n"
    static = "<!-- static: the options -->\n| a | b |\n|---|---|\n\ntext\n"
    assert problems(generated + static, "ok.md", writers) == []
    typed = "Measured today:\n\n| a | b |\n|---|---|\n"
    assert problems(typed, "d.md", writers) == [
        "d.md:3: a table outside a generated block and not marked `<!-- static: reason -->`: "
        "'| a | b |'"
    ]
    after_static = static + "| c | d |\n"  # a paragraph ends the static mark's reach
    assert len(problems(after_static, "d.md", writers)) == 1
    unknown = "<!-- y begin -->\n| a |\n<!-- y end -->\n"
    assert problems(unknown, "d.md", writers)[0].startswith(
        "d.md:1: marker '<!-- y begin -->' is written by 0 scripts"
    )
    assert problems("<!-- x begin -->\n| a |\n", "d.md", writers) == [
        "d.md:1: block '<!-- x begin -->' (x.py) never ends"
    ]
