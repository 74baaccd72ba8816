"""Paths that may be on Cloud Storage: `gs://bucket/...` beside local files, through etils' `epath`.

`epath.Path` (the path type Orbax uses) reads and writes `gs://` through gcsfs and local paths through
`os`, so code that opens, lists and tests paths through `path()` handles both. What cannot work on an
object store (an atomic directory rename, a memory map) checks `is_remote` and refuses by name.
"""
from __future__ import annotations

import os

from etils import epath


def is_remote(p: str | os.PathLike) -> bool:
    """Whether `p` is a URI (`gs://...`) rather than a local path."""
    return "://" in os.fspath(p)


def path(p: str | os.PathLike) -> epath.Path:
    """`p` as an `epath.Path`: a URI as it is, a local path made absolute (Orbax requires absolute paths)."""
    return epath.Path(p if is_remote(p) else os.path.abspath(p))
