"""One writer per output folder: an exclusive ``fcntl.flock`` on ``FOLDER/.minbert.lock``, held for the whole run.

Training (``--output_dir``, so each of the experiments runner's runs too) and export (a lock file beside ``--out``,
since export builds its folder elsewhere and renames it into place) take it. The runner's table folder is not
locked: one runner per core on disjoint rows is its documented use, and its table files are written atomically. A second process on the same folder
gets one line naming the folder and the holder's process id, instead of racing on its temporary files. The lock
is the kernel's: a killed holder releases it at once, so a lock file left by a killed run never blocks a re-run
(a finished run removes it). Checks that a folder holds only the package's files ignore LOCK_NAME.
"""
from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Iterator

LOCK_NAME = ".minbert.lock"


class FolderInUse(ValueError):
    """Another process holds the folder's lock (a one-line message naming the folder and its pid)."""


def _holder(fd: int) -> str:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    except OSError:
        text = ""
    return f"pid {text}" if text.isdigit() else "another process"


@contextlib.contextmanager
def locked_file(lock: Path, what: str, remove: bool = False) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (created if needed); ``what`` names the folder in the message.
    ``remove``: delete the lock file when done (a lock beside a folder, not inside it)."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            os.close(fd)
            raise FolderInUse(f"{what} is in use by another minbert process ({holder}); wait for it to finish or "
                              "choose another folder") from None
        # The file may have been removed (and made again) by a holder that finished between our open and flock:
        # then we hold a lock on a file nobody else will open. Try again on the current one.
        try:
            same = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        if remove:
            with contextlib.suppress(OSError):
                os.unlink(lock)
        os.close(fd)  # releases the lock


@contextlib.contextmanager
def folder_lock(folder: str | Path, flag: str = "--output_dir") -> Iterator[None]:
    """Hold ``FOLDER/.minbert.lock`` for the block; the lock file is removed at the end. The folder is created if
    needed; if this call created it and the block leaves nothing in it (a run refused before its first write), it is
    removed again."""
    folder = Path(folder)
    created = not folder.exists()
    lock = folder / LOCK_NAME
    with locked_file(lock, f"{flag} {folder}", remove=True):  # the folder is left as the run found it
        try:
            yield
        finally:  # still holding the lock: a process that opened the file meanwhile sees it gone and starts over
            if created and folder.is_dir() and [p.name for p in folder.iterdir()] in ([], [LOCK_NAME]):
                with contextlib.suppress(OSError):
                    lock.unlink()
                    folder.rmdir()


def lock_beside(target: str | Path, flag: str = "--out"):
    """The lock of a folder that is built elsewhere and renamed into place (export): ``<parent>/.<name>.minbert.lock``,
    removed afterwards."""
    target = Path(target)
    return locked_file(target.parent / f".{target.name}{LOCK_NAME}", f"{flag} {target}", remove=True)
