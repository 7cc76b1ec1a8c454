"""`ctjoint watch`: send every new, complete series folder under a folder to the gateway, once.

A series folder is any folder (at any depth) that holds files directly. It is complete when
its listing (names, sizes, modification times) has not changed for `settle_seconds`: scanners
and PACS write a series file by file and give no end-of-series signal we could rely on.
Polling keeps this dependency-free and works on network shares where inotify does not.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from rich.console import Console

from ctjoint.client.channel import ChannelSecurity
from ctjoint.client.errors import SendError
from ctjoint.client.send import RESULT_JSON, send_series

log = logging.getLogger(__name__)

_UNSAFE: Final = re.compile(r"[^A-Za-z0-9._-]+")

Listing = tuple[tuple[str, int, int], ...]


@dataclass
class _Candidate:
    listing: Listing
    changed_at: float


def series_folders(root: Path, exclude: Path | None = None) -> Iterator[Path]:
    """Folders under `root` (root included) that directly hold non-hidden files."""
    for current, dirs, files in os.walk(root):
        here = Path(current)
        # Skip hidden folders and the results folder when it lives inside the watched one.
        dirs[:] = sorted(
            d for d in dirs if not d.startswith(".") and (exclude is None or here / d != exclude)
        )
        if any(not name.startswith(".") for name in files):
            yield here


def listing(folder: Path) -> Listing:
    """What must stay unchanged for a folder to count as complete."""
    entries = []
    with os.scandir(folder) as it:
        for entry in it:
            if entry.name.startswith(".") or not entry.is_file():
                continue
            stat = entry.stat()
            entries.append((entry.name, stat.st_size, stat.st_mtime_ns))
    return tuple(sorted(entries))


def result_folder(root: Path, folder: Path, out_root: Path) -> Path:
    """Where a series' results go: out_root/<its path under root, flattened>."""
    relative = folder.relative_to(root)
    name = "__".join(relative.parts) if relative.parts else root.name
    return out_root / (_UNSAFE.sub("_", name) or "series")


class FolderWatcher:
    """Finds settled series folders that have not been sent yet (one poll at a time)."""

    def __init__(self, root: Path, out_root: Path, settle_seconds: float) -> None:
        self.root = root
        self.out_root = out_root
        self.settle_seconds = settle_seconds
        self._pending: dict[Path, _Candidate] = {}
        self._done: set[Path] = set()

    def poll(self, now: float | None = None) -> list[Path]:
        """Folders that are complete now; each is returned once (call `mark_done` after)."""
        now = time.monotonic() if now is None else now
        ready = []
        for folder in series_folders(self.root, exclude=self.out_root):
            if folder in self._done:
                continue
            if (result_folder(self.root, folder, self.out_root) / RESULT_JSON).exists():
                # Sent by an earlier run of the watcher: once means once across restarts too.
                self._done.add(folder)
                continue
            try:
                current = listing(folder)
            except OSError:
                continue  # vanished or unreadable while we looked; try again next poll
            seen = self._pending.get(folder)
            if seen is None or seen.listing != current:
                self._pending[folder] = _Candidate(current, now)
            elif now - seen.changed_at >= self.settle_seconds:
                ready.append(folder)
        return ready

    def mark_done(self, folder: Path) -> None:
        self._done.add(folder)
        self._pending.pop(folder, None)

    @property
    def pending(self) -> int:
        return len(self._pending)


def watch_folder(
    root: Path,
    *,
    gateway: str,
    model: str,
    out_root: Path | None = None,
    settle_seconds: float = 5.0,
    poll_seconds: float = 1.0,
    timeout: float = 600.0,
    once: bool = False,
    console: Console | None = None,
    security: ChannelSecurity | None = None,
) -> int:
    """Watch `root` until interrupted (or, with `once`, until nothing is left to send).

    A series the gateway refuses is reported and not retried (it would be refused again);
    an unreachable gateway stops the watcher. Returns the number of series sent.
    """
    out = console or Console(soft_wrap=True, highlight=False)
    if not root.is_dir():
        raise SendError(f"{root}: not a folder", exit_code=2)
    root = root.resolve()
    results = (out_root or root.with_name(root.name + "-results")).resolve()
    watcher = FolderWatcher(root, results, settle_seconds)
    out.print(f"watching {root} (settle {settle_seconds:g} s); results in {results}", markup=False)
    sent = 0
    try:
        while True:
            for folder in watcher.poll():
                target = result_folder(root, folder, results)
                out.print(f"sending {folder}", markup=False)
                try:
                    send_series(
                        folder,
                        gateway=gateway,
                        model=model,
                        out_dir=target,
                        timeout=timeout,
                        show_progress=False,
                        console=out,
                        security=security,
                    )
                    sent += 1
                except SendError as err:
                    # Unreachable or refusing our credentials: every other series would fail too.
                    if err.code in (None, "UNAVAILABLE", "UNAUTHENTICATED"):
                        raise
                    out.print(f"failed {folder}: {err}", markup=False, style="red")
                watcher.mark_done(folder)
            if once and watcher.pending == 0:
                return sent
            time.sleep(poll_seconds)
    except KeyboardInterrupt:
        out.print(f"stopped; {sent} series sent", markup=False)
        return sent
