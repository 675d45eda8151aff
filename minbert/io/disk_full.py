"""A full disk is one line, ``PATH: no space left on device``, from every writer.

The writers fail in different ways when the file system is full: Python's ``OSError`` with errno ENOSPC (28, or
EDQUOT for a full quota), safetensors' ``SafetensorError`` whose text carries Rust's ``StorageFull`` / ``os error
28``, and torch.save's ``RuntimeError`` ("PytorchStreamWriter failed writing file ... file write failed"), which
does not say why. :func:`disk_full` recognises all of them (the last by asking the file system whether it is
full), and :func:`no_space_guard` turns them into a :class:`DiskFullError` naming the file being written.
"""
from __future__ import annotations

import contextlib
import errno
import os
from pathlib import Path
from typing import Iterator

_CODES = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}
_TEXTS = ("no space left on device", "storagefull", "os error 28", "disk quota exceeded", "quotaexceeded")


class DiskFullError(OSError):
    """The file system holding ``path`` is full; ``str()`` is the one-line message."""

    def __init__(self, path: str | Path):
        super().__init__(f"{path}: no space left on device (free some space and run the same command again)")
        self.path = Path(path)

    def __str__(self) -> str:
        return self.args[0]


def _free_blocks(path: Path) -> int | None:
    for candidate in (path, *path.parents):
        try:
            return os.statvfs(candidate).f_bavail
        except OSError:
            continue
    return None


def disk_full(error: BaseException, path: str | Path | None = None) -> bool:
    """Whether ``error`` (raised while writing ``path``) means the file system is full."""
    if isinstance(error, DiskFullError):
        return True
    if isinstance(error, OSError) and error.errno in _CODES:
        return True
    text = str(error).lower()
    if any(t in text for t in _TEXTS):
        return True
    # torch.save says only "file write failed": ask the file system (no blocks left for an unprivileged writer).
    if path is not None and isinstance(error, RuntimeError) and "write" in text:
        return _free_blocks(Path(path)) == 0
    return False


@contextlib.contextmanager
def no_space_guard(path: str | Path) -> Iterator[None]:
    """Re-raise a full-disk failure inside the block as a one-line :class:`DiskFullError` naming ``path``."""
    try:
        yield
    except DiskFullError:
        raise
    except Exception as e:
        if disk_full(e, path):
            raise DiskFullError(path) from None
        raise
