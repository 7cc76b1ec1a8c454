"""One benchmark's section of a topic file: the text between its two marker lines, rewritten
by the script that measured it (the figures in docs/ come from the run, never by hand)."""

from __future__ import annotations

import sys
from pathlib import Path


class MissingMarkersError(ValueError):
    """The topic file lacks the benchmark's begin or end line."""


def replace_section(path: Path, begin: str, end: str, text: str) -> None:
    """Put `text` between the lines `begin` and `end` of `path`, replacing what was there."""
    doc = path.read_text(encoding="utf-8")
    if begin not in doc or end not in doc:
        raise MissingMarkersError(f"{path}: has no {begin} / {end} lines")
    head, rest = doc.split(begin, 1)
    _, tail = rest.split(end, 1)
    path.write_text(f"{head}{begin}\n{text}\n{end}{tail}", encoding="utf-8")


def publish(text: str, doc: Path | None, begin: str, end: str) -> int:
    """Print a benchmark's `text` and, with `doc`, write it as its section there; the exit
    status (2 with the error printed when the markers are missing)."""
    print(text)
    if doc is None:
        return 0
    try:
        replace_section(doc, begin, end, text)
    except MissingMarkersError as error:
        print(error, file=sys.stderr)
        return 2
    return 0
