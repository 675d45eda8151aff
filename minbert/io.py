"""File input and output: safe reads of user files, atomic writes.

Reads: every input file (task data, predictions, configs, vocabularies, weights) is opened through
:func:`open_regular_file`, which refuses a FIFO, device, socket or directory *before* reading (a FIFO would block
forever waiting for a writer) and names a broken symbolic link as such; text files are decoded by
:func:`read_text_file` (UTF-8, an optional BOM dropped, a decoding error named by file and line).

Writes: write a temporary file in the same directory, flush, fsync, rename. A kill during a write leaves the
previous file intact (rename is atomic on POSIX within one file system). Checkpoint directories are written whole
beside the old one and swapped in (:func:`replace_dir`); the append-only metrics log writes each record with one
``write`` call and drops a torn last line on reopening (:class:`AppendLog`).
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, TextIO

if __package__:
    from .disk_full import DiskFullError, no_space_guard
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
BOM = "\ufeff"


class DataError(ValueError):
    """A problem with an input file; the message is one line, ``file:line: problem`` (or ``file: problem``)."""


def first_line(error: BaseException, fallback: str | None = None) -> str:
    """The first non-blank line of an exception's message, for one-line errors; if it has none, ``fallback``
    (default: the exception's type name)."""
    text = str(error).strip()
    if text:
        return text.splitlines()[0]
    return type(error).__name__ if fallback is None else fallback


# ----------------------------------------------------------------------------------------------------------
# Reading user files

_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _missing(path: Path) -> DataError:
    if os.path.islink(path):
        return DataError(f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist)")
    return DataError(f"{path}: file not found")


def check_regular_file(path: str | Path) -> Path:
    """``path`` if it is (a symbolic link to) a regular file, else a one-line DataError saying what it is.
    For readers that open the file by name themselves (safetensors, torch.load): call it just before."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    if not stat.S_ISREG(mode):
        raise DataError(f"{path}: is {_not_regular(mode)}, not a regular file")
    return path


def open_regular_file(path: str | Path) -> BinaryIO:
    """Open a regular file for reading (binary). Anything else is refused without blocking: the file is opened
    with O_NONBLOCK (opening a FIFO does not wait for a writer) and checked with fstat on the open descriptor
    (no window between the check and the read)."""
    path = Path(path)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise _missing(path) from None
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise DataError(f"{path}: is {_not_regular(mode)}, not a regular file")
        if flags & getattr(os, "O_NONBLOCK", 0):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes_file(path: str | Path) -> bytes:
    try:
        with open_regular_file(path) as f:
            return f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror or e}") from None


def read_text_file(path: str | Path) -> str:
    """A UTF-8 text file's content, without a leading byte order mark (editors on Windows write one).
    Invalid UTF-8 is a DataError naming the file and line."""
    raw = read_bytes_file(path)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8 (byte {raw[e.start]:#04x})") from None
    return text[1:] if text.startswith(BOM) else text


def read_json_file(path: str | Path, finite: bool = True):
    """A JSON file's value, read by :func:`parse_json` (strict); a problem is a DataError naming the file and
    line."""
    return parse_json(read_text_file(path), str(path), lines=True, finite=finite)


def load_safetensors(path: str | Path, device: str = "cpu") -> dict:
    """A safetensors file's tensors (the one loader of weights files); anything unreadable is one line naming
    the file."""
    from safetensors.torch import load_file

    check_regular_file(path)  # safetensors opens by name: a FIFO would block it
    try:
        state = load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types (SafetensorError, and others on bad headers)
        raise DataError(f"{path}: cannot read safetensors file: {first_line(e)}") from None
    return check_finite(state, path)


def check_finite(state: dict, source: str | Path) -> dict:
    """``state`` (name -> tensor) if every floating-point tensor is finite, else a one-line DataError naming
    ``source`` and the first bad tensor: NaN weights give a label with NaN probabilities, never a usable answer.
    Every weights loader goes through here (safetensors via :func:`load_safetensors`, .bin archives too)."""
    import torch

    for name, tensor in state.items():
        if isinstance(tensor, torch.Tensor) and tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise DataError(f"{source}: tensor {name} is not finite ({bad} NaN or inf value(s)): the weights are "
                            "damaged or come from a diverged run; refusing to use them")
    return state


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


# ----------------------------------------------------------------------------------------------------------
# The one reading of JSON and list text that users write (files and flags)


def _refuse_duplicates(pairs: list[tuple[str, object]]) -> dict:
    out = {}
    for key, value in pairs:
        if key in out:  # json.loads would keep the last one in silence
            raise ValueError(f"duplicate key {key!r}")
        out[key] = value
    return out


def _refuse_constant(name: str):
    raise ValueError(f"{name} is not JSON (numbers must be finite)")


def parse_json(text: str, where: str, lines: bool = False, finite: bool = True):
    """The JSON value of ``text``, read strictly: a syntax error, trailing text after the value, a duplicate key in
    an object or (``finite``) a NaN/Infinity constant is a DataError ``where[:line]: invalid JSON: ...``. Every JSON a user writes
    (a --config file, --combiner_args, --optim_args, a run's args.json or results.json) is read here. ``lines``:
    name the line of the problem (a file), else the column (a flag). ``finite=False`` lets NaN through (files the
    package writes itself with them, e.g. the losses of skipped steps in trainer_state.json)."""
    try:
        return json.loads(text, object_pairs_hook=_refuse_duplicates,
                          parse_constant=_refuse_constant if finite else None)
    except json.JSONDecodeError as e:
        at = f"{where}:{e.lineno}" if lines else f"{where} (column {e.colno})"
        raise DataError(f"{at}: invalid JSON: {e.msg}") from None
    except RecursionError:
        raise DataError(f"{where}: invalid JSON: nested too deeply") from None
    except ValueError as e:  # _refuse_duplicates / _refuse_constant
        raise DataError(f"{where}: invalid JSON: {e}") from None


def comma_list(text: str, where: str) -> list[str]:
    """The items of a comma-separated list flag (``--tasks sst,qqp``, ``--rows``, ``--seeds``), stripped: an empty
    list, an empty item (``a,,b``, a trailing comma) or an item given twice is a ValueError naming ``where``."""
    items = [item.strip() for item in text.split(",")]
    if not text.strip():
        raise ValueError(f"{where}: empty list")
    if "" in items:
        raise ValueError(f"{where} {text!r}: empty item (two commas in a row, or a comma at an end)")
    twice = next((item for k, item in enumerate(items) if item in items[:k]), None)
    if twice is not None:
        raise ValueError(f"{where} {text!r}: {twice} is listed twice")
    return items
