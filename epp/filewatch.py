"""Reading a file that someone else may be writing at the same moment.

The endpoints, objectives and config files are edited while the EPP runs. Rewritten in
place, a reader can see them empty (an editor truncates, then writes) or cut mid-write;
applied, such a read replaced the whole endpoint set (a third of picks answered
UNAVAILABLE while a file was rewritten in a loop). The supported way to change a file is an
atomic replace (write a temporary file in the same directory, then rename it over the old
one; a Kubernetes ConfigMap volume does this); `read_settled` copes with the rest:

- an empty (or whitespace-only) file is never a new version: it is a write in progress;
- a file modified within the last `settle` seconds is looked at again after `settle`, and
  is a write in progress if it changed meanwhile;
- a file whose size or identity changed while it was being read is a write in progress.

A write in progress raises `NotReady`; the caller keeps what it had and asks again at its
next poll. What no reader can detect is a writer that stalls longer than `settle` exactly
at a boundary where the cut text is still valid; only an atomic replace avoids that.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

DEFAULT_SETTLE = 0.1


@dataclass(frozen=True, slots=True)
class FileStamp:
    """What changes when a file is written or replaced."""

    mtime_ns: int
    size: int
    inode: int

    @classmethod
    def of(cls, path: str | os.PathLike[str]) -> "FileStamp":
        st = os.stat(path)
        return cls(st.st_mtime_ns, st.st_size, st.st_ino)


class NotReady(Exception):
    """The file is being written (or is empty); keep the last good contents."""

    def __init__(self, message: str, empty: bool = False) -> None:
        super().__init__(message)
        self.empty = empty


def read_settled(path: str | os.PathLike[str], settle: float = DEFAULT_SETTLE) -> tuple[FileStamp, str]:
    """The file's stamp and UTF-8 text once it is complete; blocking (run it in a thread).

    Raises `NotReady` for a write in progress, `OSError` when unreadable and
    `UnicodeDecodeError` when not UTF-8.
    """
    before = FileStamp.of(path)
    if before.size == 0:
        raise NotReady("the file is empty", empty=True)
    age = time.time() - before.mtime_ns / 1e9
    if 0 <= age < settle:
        time.sleep(settle - age)
        if FileStamp.of(path) != before:
            raise NotReady("the file is being written")
    with open(path, "rb") as f:
        data = f.read()
    after = FileStamp.of(path)
    if after != before or len(data) != before.size:
        raise NotReady("the file changed while it was read")
    if not data.strip():
        raise NotReady("the file holds only whitespace", empty=True)
    return before, data.decode("utf-8")


def read_settled_retrying(path: str | os.PathLike[str], timeout: float = 2.0,
                          settle: float = DEFAULT_SETTLE) -> str:
    """For reads at start-up, where there is no last good version to keep: wait up to
    `timeout` for a write in progress to end, then raise `NotReady` (at once for an empty
    file: that is what the file holds, not a moment of a write)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return read_settled(path, settle)[1]
        except NotReady as e:
            if e.empty or time.monotonic() >= deadline:
                raise
            time.sleep(settle)
