"""Writing: write a temporary file in the same directory, flush, fsync, rename. A kill during a write leaves the
previous file intact (rename is atomic on POSIX within one file system). Checkpoint directories are written whole
beside the old one and swapped in (:func:`replace_dir`); the append-only metrics log writes each record with one
``write`` call and drops a torn last line on reopening (:class:`AppendLog`). JSON that minbert writes is strict
(:func:`json_text`: no bare NaN).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator, TextIO

if __package__:
    from minbert.io.disk_full import DiskFullError, no_space_guard
else:  # this file loaded on its own (tests/test_atomic.py's writer process): its sibling, by path
    import importlib.util as _util

    _spec = _util.spec_from_file_location("disk_full", Path(__file__).with_name("disk_full.py"))
    _disk_full = _util.module_from_spec(_spec)
    _spec.loader.exec_module(_disk_full)
    DiskFullError, no_space_guard = _disk_full.DiskFullError, _disk_full.no_space_guard

_UMASK = os.umask(0)
os.umask(_UMASK)
PUBLISHED_MODE = 0o666 & ~_UMASK  # what open() would give a new file: every published file gets it
TEMP_SUFFIX = ".tmp"  # temporary files are ".<name>.<random>.tmp" beside their target


def json_text(value, indent: int | None = 2) -> str:
    """JSON text of ``value`` for a file minbert writes; NaN or infinity is a ValueError, never the bare ``NaN``
    that ``json.dumps`` writes by default (which is not JSON)."""
    try:
        return json.dumps(value, indent=indent, ensure_ascii=False, allow_nan=False)
    except ValueError:
        raise ValueError("refusing to write a non-finite number (NaN or infinity) as JSON") from None


def finite_or_null(value):
    """``value`` with every NaN or infinite float replaced by None (JSON null): for records that may legitimately
    hold one (a skipped step's loss, a one-seed standard deviation), so the file stays strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_null(v) for v in value]
    return value


# ----------------------------------------------------------------------------------------------------------
# Atomic writes


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it is fsynced and renamed onto ``path``."""
    path = Path(path)
    with no_space_guard(path):  # a full disk: one line naming the file, whichever writer hit it
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
        os.close(fd)
    tmp = Path(tmp)
    try:
        with no_space_guard(path):
            yield tmp
            _publish(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _publish(tmp: Path, path: Path) -> None:
    with open(tmp, "rb+") as f:
        f.flush()
        # mkstemp creates 0600, and a writer may replace the temporary file with its own (safetensors
        # does, again 0600): set the usual permissions on whatever is there now, just before publishing.
        os.fchmod(f.fileno(), PUBLISHED_MODE)
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w", newline: str | None = None) -> Iterator[TextIO]:
    with atomic_path(path) as tmp:
        with open(tmp, mode, encoding=None if "b" in mode else "utf-8", newline=newline) as f:
            yield f


def atomic_write_text(path: str | Path, text: str) -> None:
    with atomic_open(path) as f:
        f.write(text)


def atomic_save(path: str | Path, save: Callable[[Path], None]) -> None:
    """Run ``save(tmp_path)`` (e.g. ``safetensors.torch.save_file``) and publish the result atomically."""
    with atomic_path(path) as tmp:
        save(tmp)


def replace_dir(directory: str | Path, write: Callable[[Path], None]) -> None:
    """Run ``write(tmp_dir)`` to fill a fresh ``<name>.partial`` directory, then swap it in for ``directory``.

    Two renames (old -> ``<name>.old``, partial -> name) because a directory cannot atomically replace a
    non-empty one; a kill between them leaves ``<name>.old``, which :func:`published_dir` falls back to. The
    files inside should themselves be written with the atomic helpers above (they fsync their data).
    """
    directory = Path(directory)
    partial, old = _sibling(directory, ".partial"), _sibling(directory, ".old")
    shutil.rmtree(partial, ignore_errors=True)
    with no_space_guard(partial):
        partial.mkdir(parents=True)
    write(partial)
    _fsync_dir(partial)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(partial, directory)
    _fsync_dir(directory.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def build_dir(target: str | Path, ignore: tuple[str, ...] = ()) -> Iterator[Path]:
    """Yield a fresh temporary directory beside ``target`` to fill; on success it takes ``target``'s place (an
    existing ``target`` is moved aside and deleted only after the new one is in place), on any failure it is
    deleted, so an interrupted or failed build (a full disk) leaves nothing that blocks running it again.
    Entries of the old ``target`` named in ``ignore`` (a lock file held by the writer) move into the new one."""
    target = Path(target)
    with no_space_guard(target):
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".partial", dir=target.parent))
    old = None
    try:
        try:
            yield tmp
        except DiskFullError:
            raise DiskFullError(target) from None  # name the folder the user asked for, not the temporary one
        _fsync_dir(tmp)
        if target.exists():
            for name in ignore:
                if os.path.lexists(target / name):
                    os.replace(target / name, tmp / name)
            old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
            os.replace(target, old / target.name)
        try:
            os.replace(tmp, target)
        except BaseException:
            if old is not None:  # put the previous one back
                os.replace(old / target.name, target)
            raise
        _fsync_dir(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def published_dir(directory: str | Path) -> Path | None:
    """The complete directory last published by :func:`replace_dir` at ``directory``, or None: the directory
    itself, else ``<name>.old`` (a kill came between the two renames). ``<name>.partial`` is never used."""
    directory = Path(directory)
    for candidate in (directory, _sibling(directory, ".old")):
        if candidate.is_dir():
            return candidate
    return None


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete what killed writers left in ``directory``: temporary files and ``*.partial`` directories
    (never a published file). Returns what was removed."""
    directory = Path(directory)
    removed = []
    if not directory.is_dir():
        return removed
    for entry in directory.iterdir():
        if entry.name.startswith(".") and entry.name.endswith(TEMP_SUFFIX) and entry.is_file():
            entry.unlink(missing_ok=True)
        elif entry.name.endswith(".partial") and entry.is_dir():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            continue
        removed.append(entry)
    return removed


class AppendLog:
    """An append-only text log (metrics.jsonl): each record is one line, written with a single ``write`` call
    and flushed to disk, so a killed process leaves at most a torn final line; reopening drops that partial
    line and keeps everything before it (the log of a resumed run is appended to, never truncated)."""

    def __init__(self, path: str | Path, fsync: bool = True):
        self.path = Path(path)
        self.fsync = fsync
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        size = os.fstat(self._fd).st_size
        if size and os.pread(self._fd, 1, size - 1) != b"\n":
            os.ftruncate(self._fd, _through_last_newline(self._fd, size))

    def write_line(self, line: str) -> None:
        if "\n" in line:
            raise ValueError("a log record must be one line")
        data = (line + "\n").encode("utf-8")
        with no_space_guard(self.path):
            written = os.write(self._fd, data)
            while written < len(data):  # regular files take the whole buffer in practice; be exact anyway
                written += os.write(self._fd, data[written:])
            if self.fsync:
                os.fsync(self._fd)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _through_last_newline(fd: int, size: int, chunk: int = 1 << 16) -> int:
    """Length of the file up to and including its last newline (0 if it has none)."""
    end = size
    while end > 0:
        start = max(0, end - chunk)
        i = os.pread(fd, end - start, start).rfind(b"\n")
        if i >= 0:
            return start + i + 1
        end = start
    return 0


def _sibling(path: Path, suffix: str) -> Path:
    return path.with_name(path.name + suffix)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
