"""Optimizers for minbert: torch AdamW and M-FAC, plus helpers to build them
from the ``--optimizer`` / ``--optim_args`` strings used by the model cards."""

from __future__ import annotations

import ast
import json
from typing import Any, Iterable

import torch

from .mfac import MFAC, MFACMemoryError, free_memory_bytes

__all__ = ["MFAC", "MFACMemoryError", "free_memory_bytes", "parse_optim_args", "build_optimizer", "OPTIMIZERS"]

# Keyword arguments each optimizer accepts through optim_args.
OPTIMIZERS: dict[str, tuple[type, tuple[str, ...]]] = {
    "adamw": (torch.optim.AdamW, ("lr", "betas", "eps", "weight_decay", "amsgrad", "foreach", "fused")),
    "mfac": (MFAC, ("lr", "num_grads", "damp", "momentum", "weight_decay", "window_dtype", "sparsity_k", "shard_window",
                    "dampening", "decoupled_weight_decay")),
}


def _parse_value(text: str) -> Any:
    """'1e-4' -> 1e-4, '1024' -> 1024, 'true'/'True' -> True, '(0.9, 0.98)' -> tuple, else str."""
    text = text.strip()
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text.strip("'\"")


def _split_top_level(text: str) -> list[str]:
    """Split on commas that are not inside brackets or quotes."""
    parts, depth, quote, current = [], 0, None, []
    for ch in text:
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif ch == "," and depth == 0:
            parts.append("".join(current))
            current = []
            continue
        current.append(ch)
    parts.append("".join(current))
    return [p for p in parts if p.strip()]


def parse_optim_args(text: str | None) -> dict:
    """Parse optimizer arguments as written in the model cards.

    Accepts JSON (``'{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}'``) or a
    comma-separated ``key: value`` / ``key=value`` list (``'lr: 1e-4, num_grads: 1024'``).
    Values become int, float, bool, None, tuple/list or str as appropriate.
    """
    if text is None or not text.strip():
        return {}
    text = text.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError:
            text = text[1:-1] if text.endswith("}") else text[1:]  # '{lr: 1e-4}': not JSON, parse below
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
        if not key:
            raise ValueError(f"cannot parse optim_args item {item.strip()!r}: empty key")
        args[key] = _parse_value(item[cut + 1 :])
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
