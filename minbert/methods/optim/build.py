"""A training run's optimizer and learning-rate schedule, assembled from its settings.

Param groups follow BERT's convention: no weight decay on biases and LayerNorm weights, and the task heads
get their own learning rate (``--head_learning_rate``). ``--optim_args`` holds the optimizer's options:

- ``lr`` replaces ``--learning_rate`` (the encoder's peak learning rate); the heads keep
  ``--head_learning_rate``, which is set on its own flag;
- ``weight_decay`` replaces ``--weight_decay`` in every group that decays (biases and LayerNorm weights
  never do);
- every other key (``betas``, ``eps``, ``num_grads``, ``damp``, ``momentum``...) applies to all groups.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from minbert.io.settings import setting
from minbert.methods.optim import OPTIMIZERS, build_optimizer, parse_optim_args

# What each option of --optim_args must be: a number >= 0, a number > 0, a positive integer, a pair of
# numbers in [0, 1), true/false, a string. Range checks beyond these are the optimizer's own (e.g. MFAC's).
OPTION_KINDS = {
    "lr": "number >= 0", "weight_decay": "number >= 0", "eps": "number >= 0", "damp": "number > 0",
    "momentum": "number >= 0", "betas": "pair", "amsgrad": "bool", "fused": "bool", "foreach": "bool",
    "shard_window": "bool", "num_grads": "positive integer", "sparsity_k": "number > 0", "window_dtype": "string",
    "dampening": "number >= 0", "decoupled_weight_decay": "bool",
}


def check_optim_args(name: str, text: str | None) -> dict:
    """Parse ``--optim_args`` and check every key and value for optimizer ``name``; a ValueError says what
    is wrong (its message does not name the flag: the caller does)."""
    try:
        options = parse_optim_args(text)
    except ValueError as e:
        raise ValueError(str(e).splitlines()[0]) from None
    _, allowed = OPTIMIZERS[name]
    unknown = [k for k in options if k not in allowed]
    if unknown:
        raise ValueError(f"unknown key {', '.join(map(repr, unknown))} for {name} (allowed keys: {', '.join(allowed)})")
    for key, value in options.items():
        problem = _check_option(OPTION_KINDS.get(key, "any"), value)
        if problem:
            raise ValueError(f"{key}: expected {problem}, got {'null' if value is None else repr(value)}")
    return options


def _check_option(kind: str, value) -> str | None:
    """None if ``value`` is a ``kind``, else the kind as a message says it."""
    def number(v) -> bool:
        return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

    if kind == "bool":
        return None if isinstance(value, bool) else "true or false"
    if kind == "string":
        return None if isinstance(value, str) and value else "a string"
    if kind == "positive integer":
        ok = number(value) and float(value).is_integer() and value >= 1
        return None if ok else "a positive integer"
    if kind == "pair":
        ok = isinstance(value, (list, tuple)) and len(value) == 2 and all(number(v) and 0 <= v < 1 for v in value)
        return None if ok else "two numbers in [0, 1), e.g. (0.9, 0.999)"
    if kind == "number >= 0":
        return None if number(value) and value >= 0 else "a finite number >= 0"
    if kind == "number > 0":
        return None if number(value) and value > 0 else "a finite number > 0"
    return None


def param_groups(model: torch.nn.Module, weight_decay: float, head_lr: float | None = None) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (BERT's convention); the heads get ``head_lr``."""
    head_ids = {id(p) for p in model.heads.parameters()}
    groups: dict[tuple[bool, bool], list] = {}
    for p in model.parameters():
        if p.requires_grad:
            groups.setdefault((id(p) in head_ids, p.ndim < 2), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        group = {"params": params, "weight_decay": 0.0 if no_decay else weight_decay}
        if is_head and head_lr is not None:
            group["lr"] = head_lr
        out.append(group)
    return out


@dataclass
class OptimizerSettings:
    """The optimizer group of flags (the learning rates and weight decay are the training group's)."""

    optim: str = setting("adamw", parse=str.lower, choices=OPTIMIZERS,
                         help="adamw (torch, fused) or mfac (M-FAC, see docs/mfac.md); case-insensitive")
    optim_args: str | None = setting(
        None, nargs="+", parse=str, allow_empty=True,
        help="optimizer options, JSON or 'key: value, ...' as in the M-FAC cards, quoted or not "
             "(e.g. lr: 1e-4, num_grads: 1024, damp: 1e-6); lr replaces --learning_rate (the encoder's; "
             "the heads keep --head_learning_rate), weight_decay replaces --weight_decay in every group "
             "that decays, other keys apply to every group (docs/mfac.md)")

    def __post_init__(self) -> None:
        if isinstance(self.optim_args, list):  # the M-FAC cards pass it unquoted: several shell words
            self.optim_args = " ".join(map(str, self.optim_args))

    def options(self) -> dict:
        """--optim_args parsed and checked for --optim, once (the settings check parses it, the optimizer is
        built from the same result); a ValueError says what is wrong without naming the flag."""
        key = (self.optim, self.optim_args)
        if getattr(self, "_options", (None,))[0] != key:
            self._options = (key, check_optim_args(self.optim, self.optim_args))
        return dict(self._options[1])


def optimizer_for_run(config, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The optimizer of a run over ``model``'s groups (``config``: its run_config.RunConfig; the optimizer group
    and the training group's rates, as the Trainer builds it)."""
    t = config.training
    return build_run_optimizer(config.optimizer, model, t.learning_rate, t.weight_decay, t.head_learning_rate)


def build_run_optimizer(settings: OptimizerSettings, model: torch.nn.Module, learning_rate: float,
                        weight_decay: float, head_learning_rate: float) -> torch.optim.Optimizer:
    """--optim with --optim_args over ``model``'s param groups; ``learning_rate`` and ``weight_decay`` unless
    --optim_args sets them."""
    options = settings.options()
    lr = options.pop("lr", learning_rate)
    weight_decay = options.pop("weight_decay", weight_decay)
    if settings.optim == "adamw":
        # The fused kernel is one pass over each tensor: ~50x faster than the default per-tensor loop on CPU.
        options.setdefault("fused", True)
    groups = param_groups(model, weight_decay, head_learning_rate)
    try:
        return build_optimizer(settings.optim, groups, lr, weight_decay, options)
    except ValueError as e:  # the optimizer's own range checks (e.g. MFAC's momentum < 1)
        if not settings.optim_args:
            raise
        raise ValueError(f"--optim_args {settings.optim_args}: {str(e).splitlines()[0]}") from None


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 then linear decay to 0 (the BERT / run_glue schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
