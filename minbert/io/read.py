"""Reading what users give minbert: every input file (task data, predictions, configs, vocabularies, weights) is
opened through :func:`open_regular_file`, which refuses a FIFO, device, socket or directory *before* reading (a FIFO
would block forever waiting for a writer) and names a broken symbolic link as such; text files are decoded by
:func:`read_text_file` (UTF-8, an optional BOM dropped, a decoding error named by file and line); JSON and list text
(files and flags) is read strictly by :func:`parse_json` and :func:`comma_list`.
"""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import BinaryIO

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
