"""The value types of the command-line flags (argparse ``type=``): each parses one flag's text once, or raises
argparse.ArgumentTypeError with what is wrong. Shared by the training, prediction and evaluation parsers and by
``--config`` files (minbert.config_file), which run a file's values through the same types."""
from __future__ import annotations

import argparse
import math

from .data import TASKS
from .io import comma_list


def _integer(text: str, least: int) -> int:
    """An integer flag's value, at least ``least``."""
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if v < least:
        raise argparse.ArgumentTypeError(f"must be positive, got {v}" if least == 1 else f"must be >= {least}, got {v}")
    return v


def _positive_int(text: str) -> int:
    return _integer(text, 1)


def _nonneg_int(text: str) -> int:
    return _integer(text, 0)


def _nonneg_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return v


def _tasks(text: str) -> list[str]:
    try:
        tasks = comma_list(text, "task list")  # the one rule of list flags: no empty or repeated item
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise argparse.ArgumentTypeError(f"unknown task {', '.join(bad)!r} (choose from {', '.join(TASKS)})")
    return tasks


def _pair_encoding(text: str) -> str:
    from .multitask import format_pair_encoding, parse_pair_encoding

    try:
        return format_pair_encoding(parse_pair_encoding(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _smart_projection(text: str) -> str:
    """--smart_projection: the legacy name ``none`` (MT-DNN 0d6201e, minbert's default before 2026-12) is
    library_early; any other value goes to argparse's choices check unchanged."""
    from .smart import LEGACY_PROJECTIONS

    return LEGACY_PROJECTIONS.get(text, text)


def _bf16(text: str) -> str:
    from .precision import parse_bf16

    try:
        return parse_bf16(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
