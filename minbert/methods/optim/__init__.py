"""Optimizers for minbert: torch AdamW and M-FAC, plus helpers to build them
from the ``--optimizer`` / ``--optim_args`` strings used by the model cards."""

from __future__ import annotations

import ast
import re
from typing import Any, Iterable

import torch

from minbert.io import parse_json
from minbert.methods.optim.mfac import MFAC, MFACMemoryError, free_memory_bytes

__all__ = ["MFAC", "MFACMemoryError", "free_memory_bytes", "parse_optim_args", "build_optimizer", "OPTIMIZERS"]

# Keyword arguments each optimizer accepts through optim_args.
OPTIMIZERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "adamw": (torch.optim.AdamW, ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused")),
    "mfac": (MFAC, ("lr", "num_grads", "damp", "momentum", "weight_decay", "window_dtype", "sparsity_k", "shard_window",
                    "dampening", "decoupled_weight_decay")),
}


_WORD = re.compile(r"[A-Za-z_][A-Za-z0-9_.\-]*")


def _parse_value(text: str, key: str) -> Any:
    """'1e-4' -> 1e-4, '1024' -> 1024, 'true'/'True' -> True, '(0.9, 0.98)' -> tuple, a bare word (float16) -> str;
    anything else (an unclosed bracket, stray text) is a ValueError: it is never kept as a string in silence."""
    text = text.strip()
    if not text:
        raise ValueError(f"{key}: no value after the separator")
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return parse_json(text, key, finite=False)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
        pass
    if _WORD.fullmatch(text):
        return text
    raise ValueError(f"{key}: cannot read the value {text!r} (a number, true/false, a quoted string, "
                     "a bracketed list or a bare word)")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes; unbalanced brackets or quotes and empty items
    (two commas in a row, a comma at an end) are ValueErrors."""
    parts, stack, quote, current = [], [], None, []
    closing = {")": "(", "]": "[", "}": "{"}
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            stack.append(ch)
        elif ch in closing:
            if not stack or stack.pop() != closing[ch]:
                raise ValueError(f"unbalanced {ch!r} in {text!r}")
        elif ch == "," and not stack:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    if quote or stack:
        raise ValueError(f"unclosed {quote or stack[-1]!r} in {text!r}")
    parts.append("".join(current))
    if any(not p.strip() for p in parts):
        raise ValueError(f"empty item in {text!r} (two commas in a row, or a comma at an end)")
    return parts


def parse_optim_args(text: str | None) -> dict:
    """Parse optimizer arguments as written in the model cards, strictly.

    Accepts JSON (``'{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}'``, read by :func:`minbert.io.parse_json`: no
    duplicate keys, nothing after the object) or a comma-separated ``key: value`` / ``key=value`` list
    (``'lr: 1e-4, num_grads: 1024'``, also inside braces). Values become int, float, bool, None, tuple/list or str.
    Malformed text (an unbalanced brace or bracket, an empty item, a key given twice, a value that is not one of
    those) is a ValueError, never read as fewer arguments.
    """
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{") or text.endswith("}"):
        if not (text.startswith("{") and text.endswith("}")):
            raise ValueError(f"unbalanced brace in {text!r}")
        try:
            parsed = parse_json(text, "JSON", finite=False)  # a NaN is named by check_optim_args
        except ValueError as e:
            if "duplicate key" in str(e):
                raise
            text = text[1:-1]  # '{lr: 1e-4}': not JSON, parse below
            if not text.strip():
                raise ValueError("'{': expected a JSON object or 'key: value' items inside the braces") from None
        else:
            if not isinstance(parsed, dict):
                raise ValueError(f"optim_args JSON must be an object, got {text!r}")
            return parsed
    args = {}
    for item in _split_top_level(text):
        seps = [i for i in (item.find(":"), item.find("=")) if i >= 0]
        if not seps:
            raise ValueError(f"cannot parse optim_args item {item.strip()!r}: expected 'key: value' or 'key=value'")
        cut = min(seps)
        key = item[:cut].strip().strip("'\"")
        if not _WORD.fullmatch(key):
            raise ValueError(f"cannot parse optim_args item {item.strip()!r}: "
                             f"{'empty key' if not key else f'{key!r} is not a key name'}")
        if key in args:
            raise ValueError(f"{key} is given twice")
        args[key] = _parse_value(item[cut + 1 :], key)
    return args


def build_optimizer(
    name: str,
    params: Iterable,
    lr: float,
    weight_decay: float,
    optim_args: dict | None = None,
) -> torch.optim.Optimizer:
    """Build ``adamw`` (torch.optim.AdamW) or ``mfac`` (MFAC); ``name`` is case-insensitive.

    ``params`` may be parameters or param-group dicts (e.g. no weight decay for
    biases / LayerNorm); groups without their own ``lr``/``weight_decay`` use
    the given defaults. Keys in ``optim_args`` override ``lr`` / ``weight_decay``.
    """
    key = name.strip().lower()
    if key not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    cls, allowed = OPTIMIZERS[key]
    optim_args = dict(optim_args or {})
    unknown = sorted(set(optim_args) - set(allowed))
    if unknown:
        raise ValueError(f"unknown optim_args for {key}: {', '.join(unknown)}; allowed keys: {', '.join(allowed)}")
    if key == "adamw" and isinstance(optim_args.get("betas"), list):
        optim_args["betas"] = tuple(optim_args["betas"])
    kwargs = {"lr": lr, "weight_decay": weight_decay, **optim_args}
    return cls(list(params), **kwargs)
