"""Paths that may be on Cloud Storage: `gs://bucket/...` beside local files, through etils' `epath`.

`epath.Path` (the path type Orbax uses) reads and writes `gs://` through gcsfs and local paths through
`os`, so code that opens, lists and tests paths through `path()` handles both. What cannot work on an
object store (an atomic directory rename, a memory map) checks `is_remote` and refuses by name; appending,
which objects do not support either, goes through `open_append`.
"""
from __future__ import annotations

import csv
import io
import os
import time

from etils import epath


def is_remote(p: str | os.PathLike) -> bool:
    """Whether `p` is a URI (`gs://...`) rather than a local path."""
    return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an `epath.Path`: a URI as it is, a local path made absolute (Orbax requires absolute paths)."""
    return epath.Path(p if is_remote(p) else os.path.abspath(p))


def read_csv(p: str | os.PathLike) -> csv.DictReader:
    """A `csv.DictReader` over the whole text of a local or `gs://` CSV file (read at once: they are small)."""
    return csv.DictReader(io.StringIO(path(p).read_text(), newline=""))


def open_append(p: epath.Path) -> io.TextIOBase:
    """`p` opened for appending text: a local file as usual; an object in a bucket as an `_AppendedObject`."""
    return _AppendedObject(p) if is_remote(p) else open(p, "a")


class _AppendedObject(io.StringIO):
    """A text object in Cloud Storage, which cannot be appended to (gcsfs's mode "a" starts a new object): its
    text and what is written after it are kept in memory and the object is rewritten whole on `flush`, at
    most once a minute (GCS takes about one write per second per object), and on `close`."""

    UPLOAD_EVERY_S = 60.0

    def __init__(self, p: epath.Path):
        super().__init__(p.read_text() if p.exists() else "")
        self.seek(0, io.SEEK_END)
        self.path, self.uploaded = p, time.monotonic()

    def flush(self) -> None:
        if time.monotonic() - self.uploaded >= self.UPLOAD_EVERY_S:
            self._upload()

    def close(self) -> None:
        if not self.closed:
            self._upload()
        super().close()

    def _upload(self) -> None:
        self.path.write_text(self.getvalue())
        self.uploaded = time.monotonic()
