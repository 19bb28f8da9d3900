"""What every file a run writes or reads goes through: `etils.epath.Path`, which keeps a URL
(`gs://bucket/run`, the storage all hosts of a pod share) a URL where `pathlib.Path` would make
it the local folder `gs:/bucket/run`. The two helpers here cover what epath alone gets wrong or
lacks on object stores."""

from __future__ import annotations

import os

from etils import epath


def absolute(path: epath.PathLike) -> epath.Path:
    """`path` made absolute against the working directory, a URL left as it is (epath's own
    `absolute()` and `resolve()` prefix `gs://…` with the working directory)."""
    path = epath.Path(path)
    return path if path.is_absolute() else path.resolve()


def write_atomically(path: epath.PathLike, data: bytes) -> None:
    """Write `data` to `path` under a temporary name, then rename it into place, so a reader (or a
    rerun after a kill) sees the old or the new contents, never half a file."""
    path = epath.Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}")
    partial.write_bytes(data)
    partial.replace(path)
