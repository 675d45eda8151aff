"""Multitask loss combiners: how one training step turns per-task losses into parameter updates.

A combiner is a small strategy object with one method, ``step(ctx)``, called once per training step by the
single training loop in ``minbert.training.trainer`` (torchjd / LibMTL style: no copy of the loop per strategy).
The loop hands it a :class:`StepContext`: a closure computing a task's loss on this step's batch (SMART
included when enabled) and a closure applying one optimizer update (clipping and the non-finite guard
included). The combiner decides which losses to back-propagate and when to step.

Under torchrun (minbert.training.distributed) ``optimizer_step`` first averages the gradients over the ranks, so a combiner
that only back-propagates and steps needs nothing more. One that works on a task's gradient itself (PCGrad)
calls ``ctx.sync_grads(params)`` right after that task's backward, so it projects the gradient of the global
batch, the same on every rank.

Besides the built-in combiners, ``--combiner package.module:ClassName`` loads a user's class with the same
``step(ctx)`` method (:func:`build_combiner`; the interface is documented in docs/multitask.md).
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from minbert.io import first_line, parse_json
from minbert.io.settings import group, setting
from minbert.methods import mtl_methods
from minbert.methods.mtl_methods import METHODS
from minbert.methods.smart import SmartSettings


@dataclass
class StepContext:
    tasks: list[str]
    task_loss: Callable[[str], torch.Tensor]  # forward (+ SMART) on this step's batch of the task
    optimizer_step: Callable[[], bool]  # clip, skip if non-finite, step, zero grads; False if skipped
    shared_params: list[nn.Parameter]  # the encoder's parameters (PCGrad projects these)
    model: nn.Module
    # Average these parameters' .grad over the ranks now (torchrun); the optimizer_step that follows leaves them
    # alone, so no further backward may add to them before it. A no-op in one process.
    sync_grads: Callable[[list[nn.Parameter]], None] = lambda params: None
    # The ranks' mean of a tensor of values (each task's loss): the global batch's value, the same on every rank.
    # In one process the values themselves, as float32.
    mean_over_ranks: Callable[[torch.Tensor], torch.Tensor] = lambda values: values.float()


class Combiner:
    name = "base"

    def __init__(self, seed: int = 0):
        self.seed = seed  # the run's --seed, for combiners that draw random numbers (PCGrad's task order)

    def step(self, ctx: StepContext) -> dict[str, float]:
        """Run one training step; return each task's loss (before the update)."""
        raise NotImplementedError


class Individual(Combiner):
    """The report's baseline (§5.3.1): each task's loss is stepped on its own, in turn (round-robin)."""
    name = "individual"

    def step(self, ctx: StepContext) -> dict[str, float]:
        losses = {}
        for task in ctx.tasks:
            loss = ctx.task_loss(task)
            loss.backward()
            ctx.optimizer_step()
            losses[task] = loss.item()
        return losses


def backward_sum(ctx: StepContext) -> dict[str, float]:
    """Accumulate the gradient of L_sst + L_qqp + L_sts, one task at a time: the same gradient as one backward of
    the sum, but only one task's graph (and SMART's extra passes) is alive at a time, which keeps memory low."""
    losses = {}
    for task in ctx.tasks:
        loss = ctx.task_loss(task)
        loss.backward()
        losses[task] = loss.item()
        del loss
    return losses


class Sum(Combiner):
    """Multitask learning (§4.2): one step on L_sst + L_qqp + L_sts."""
    name = "sum"

    def step(self, ctx: StepContext) -> dict[str, float]:
        losses = backward_sum(ctx)
        ctx.optimizer_step()
        return losses


# ----------------------------------------------------------------------------------------------------------
# PCGrad (Yu et al. 2020, "Gradient Surgery for Multi-Task Learning", Algorithm 1)


PCGRAD_REDUCTIONS = ("mean", "sum")


def pcgrad(grads: list[torch.Tensor], generator: torch.Generator | None = None,
           reduction: str = "mean") -> torch.Tensor:
    """Project conflicting gradients and return their mean (``reduction="sum"``: their sum).

    ``grads`` are the tasks' flat gradients over the shared parameters. For each task i, its copy g_i^PC is
    projected, for every other task j in a random order, onto the normal plane of the ORIGINAL g_j whenever they
    conflict: if g_i^PC . g_j < 0 then g_i^PC -= (g_i^PC . g_j / ||g_j||^2) g_j (Yu et al. 2020, Algorithm 1).
    Algorithm 1 returns sum_i g_i^PC; WeiChengTseng/Pytorch-PCGrad (pcgrad.py at e987ac6), which CS224N projects
    copied, returns their mean (its ``reduction='mean'`` default; its ``'sum'`` branch is unreachable there, since
    ``if self._reduction:`` is true for any name). --pcgrad_reduction chooses; mean is the default.
    """
    if reduction not in PCGRAD_REDUCTIONS:
        raise ValueError(f"pcgrad: unknown reduction {reduction!r} ({', '.join(PCGRAD_REDUCTIONS)})")
    total = torch.zeros_like(grads[0])  # summed as we go: one projected copy alive at a time
    for i, g_i in enumerate(grads):
        g_pc = g_i.clone()
        others = [j for j in range(len(grads)) if j != i]
        for k in torch.randperm(len(others), generator=generator).tolist():
            g_j = grads[others[k]]
            dot = torch.dot(g_pc, g_j)
            if dot < 0:  # conflicting (negative cosine similarity); ||g_j|| > 0 since the dot is non-zero
                g_pc.sub_(g_j, alpha=(dot / torch.dot(g_j, g_j)).item())
        total += g_pc
    return total.mul_(1.0 / len(grads)) if reduction == "mean" else total


def _pop_flat_grad(params: list[nn.Parameter], used: list[int]) -> torch.Tensor:
    """The parameters' gradients as one flat vector (zeros where a parameter got none); their .grad is cleared
    and ``used[k]`` counts the tasks that gave parameter k a gradient."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for k, p in enumerate(params):
        used[k] += p.grad is not None
        p.grad = None
    return flat


def _set_flat_grad(params: list[nn.Parameter], flat: torch.Tensor, used: list[int], scale_all: float = 1.0) -> None:
    """Point each used parameter's .grad at its slice of ``flat`` (views, no copy), scaled by ``scale_all`` where
    every task gave it a gradient. Parameters no task used (e.g. the pooler under mean pooling) keep no gradient,
    so the optimizer leaves them alone, as with ``sum``."""
    offset, n_tasks = 0, max(used, default=0)
    for p, u in zip(params, used):
        if u:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
            if scale_all != 1.0 and u == n_tasks:
                p.grad.mul_(scale_all)
        offset += p.numel()


def projected_shared_grad(ctx: StepContext, generator: torch.Generator, reduction: str = "mean") -> dict[str, float]:
    """Back-propagate each task's loss on its own, then set the shared parameters' .grad to the PCGrad mean
    (``reduction="sum"``: sum) of the task gradients; return the losses. As in Pytorch-PCGrad (e987ac6), the mean
    is taken over parameters every task reaches; one only some tasks reach gets their sum. Task-specific (head)
    parameters keep their own gradients in .grad: each head is used by one task only, so its gradient needs no
    surgery."""
    if reduction not in PCGRAD_REDUCTIONS:
        raise ValueError(f"pcgrad: unknown reduction {reduction!r} ({', '.join(PCGRAD_REDUCTIONS)})")
    losses, flat_grads = {}, []
    used = [0] * len(ctx.shared_params)
    for task in ctx.tasks:
        loss = ctx.task_loss(task)
        loss.backward()  # head grads land in .grad; the encoder's are taken out below
        losses[task] = loss.item()
        del loss
        ctx.sync_grads(ctx.shared_params)  # torchrun: the surgery works on the global batch's task gradients
        flat_grads.append(_pop_flat_grad(ctx.shared_params, used))
    shared = pcgrad(flat_grads, generator, "sum")
    del flat_grads
    _set_flat_grad(ctx.shared_params, shared, used, 1.0 / len(ctx.tasks) if reduction == "mean" else 1.0)
    return losses


class PCGrad(Combiner):
    """Gradient surgery (§4.2 and §5.3.2 1b): one step on the mean (--pcgrad_reduction sum: the sum) of the
    PCGrad-projected task gradients over the shared encoder; each head steps on its own task's gradient."""
    name = "pcgrad"

    def __init__(self, seed: int = 0, reduction: str = "mean"):
        super().__init__(seed)
        self.generator = torch.Generator().manual_seed(seed)  # the random order over the other tasks
        self.reduction = reduction  # --pcgrad_reduction (build_combiner sets it)

    def step(self, ctx: StepContext) -> dict[str, float]:
        losses = projected_shared_grad(ctx, self.generator, self.reduction)
        ctx.optimizer_step()
        return losses


class GSE(PCGrad):
    """The report's "gradient surgery experiment" (§5.3.2 1c): two optimizer steps per training step, in this order:

    1. at the current parameters θ, each task's loss L_t(θ) is computed and back-propagated on its own (SMART term
       included when enabled); the encoder gets the mean of the PCGrad-projected task gradients (as
       Pytorch-PCGrad e987ac6; --pcgrad_reduction sum: their sum, Algorithm 1 of Yu et al.), each head its own
       task's gradient; optimizer step -> θ';
    2. on the same batches, at the updated parameters θ', the plain combined loss L_sst + L_qqp + L_sts (fresh
       forward passes, new dropout masks, SMART recomputed) is back-propagated; optimizer step -> θ''.

    Both steps use the same learning rate (the schedule advances once per training step). The losses returned
    are those of step 1 (before any update).
    """
    name = "gse"

    def step(self, ctx: StepContext) -> dict[str, float]:
        losses = projected_shared_grad(ctx, self.generator, self.reduction)
        ctx.optimizer_step()
        backward_sum(ctx)
        ctx.optimizer_step()
        return losses


COMBINERS: dict[str, type[Combiner]] = {"individual": Individual, "sum": Sum, "pcgrad": PCGrad, "gse": GSE}


def build_combiner(spec: str, seed: int = 0, options: dict | str | None = None,
                   pcgrad_reduction: str = "mean") -> Combiner:
    """The combiner that ``--combiner`` names: a built-in one (``COMBINERS``) or a user's class given by its import
    path, ``package.module:ClassName`` (or ``path/to/file.py:ClassName``). ``options`` (``--combiner_args``, a JSON
    object or its text) are passed to the user class as keyword arguments, with ``seed=`` (the run's --seed, which
    seeds PCGrad's random task order) if its constructor takes a ``seed``. ``pcgrad_reduction``: pcgrad's and gse's
    --pcgrad_reduction (mean or sum of the projected gradients). Mistakes are one-line ValueErrors."""
    options = parse_combiner_args(options)
    if spec in METHODS:  # torchjd's aggregators and scalarizers (minbert.methods.mtl_methods, minbert.methods.mtl_combiners)
        from minbert.methods.mtl_combiners import build_method_combiner

        return build_method_combiner(spec, seed, options)
    if spec in COMBINERS:
        if options:
            raise ValueError(f"--combiner_args: the built-in combiner {spec} takes no options")
        combiner = COMBINERS[spec](seed)
        if isinstance(combiner, PCGrad):
            combiner.reduction = pcgrad_reduction
        return combiner
    if ":" not in spec:
        raise ValueError(f"--combiner {spec}: choose from {', '.join([*COMBINERS, *METHODS])}, or give a class by its import path "
                         "(package.module:ClassName)")
    cls = load_combiner_class(spec)
    try:
        signature = inspect.signature(cls)
    except (TypeError, ValueError):  # not introspectable (some C types): pass the options alone
        signature = None
    kwargs = dict(options)
    if signature is not None and "seed" not in kwargs and (
            "seed" in signature.parameters or any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())):
        kwargs["seed"] = seed
    if signature is not None:
        try:
            signature.bind(**kwargs)
        except TypeError as e:
            raise ValueError(f"--combiner_args: {spec} does not take these options: {e}") from None
    return cls(**kwargs)


def parse_combiner_args(options: dict | str | None) -> dict:
    """``--combiner_args``: a JSON object (keyword options of a user combiner), as text or already parsed."""
    if options is None or options == "":
        return {}
    if isinstance(options, str):
        options = parse_json(options, "--combiner_args")  # strict: no duplicate keys, nothing after the object
    if not isinstance(options, dict):
        raise ValueError(f"--combiner_args: expected a JSON object of keyword options, like {{\"lr\": 0.01}}, "
                         f"got {type(options).__name__}")
    return options


def load_combiner_class(spec: str) -> type:
    """Import ``module:Name`` (a dotted module importable from sys.path, or a .py file) and check that ``Name``
    is a class with a ``step(ctx)`` method."""
    module_name, _, attr = spec.rpartition(":")
    if not module_name or not attr:
        raise ValueError(f"--combiner {spec}: expected an import path package.module:ClassName")
    if module_name.endswith(".py") and not Path(module_name).is_file():
        raise ValueError(f"--combiner {spec}: no such file {module_name}")
    # One import per file version: the run checks the class (RunConfig.validate) and then trains with it, and the
    # user's module must not run twice (a dotted module is cached by sys.modules already).
    key = (spec, Path(module_name).stat().st_mtime_ns if module_name.endswith(".py") else None)
    if key not in _LOADED_CLASSES:
        _LOADED_CLASSES[key] = _import_combiner_class(spec, module_name, attr)
    return _LOADED_CLASSES[key]


_LOADED_CLASSES: dict[tuple, type] = {}


def _import_combiner_class(spec: str, module_name: str, attr: str) -> type:
    try:
        if module_name.endswith(".py"):
            module_spec = importlib.util.spec_from_file_location(Path(module_name).stem, module_name)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(module_name)
    except Exception as e:  # ImportError, or whatever the user's module raised while being imported
        raise ValueError(f"--combiner {spec}: cannot import {module_name}: {type(e).__name__}: "
                         f"{first_line(e, '')}") from None
    obj = module
    for name in attr.split("."):
        if not hasattr(obj, name):
            raise ValueError(f"--combiner {spec}: {module_name} has no attribute {attr}")
        obj = getattr(obj, name)
    if not inspect.isclass(obj):
        raise ValueError(f"--combiner {spec}: {attr} is a {type(obj).__name__}, not a class")
    if not callable(getattr(obj, "step", None)):
        raise ValueError(f"--combiner {spec}: class {attr} has no step(ctx) method (see docs/multitask.md)")
    return obj


@dataclass
class MultitaskSettings:
    """The multitask group of flags: the combiner and its options, the epoch's length, SMART."""

    combiner: str = setting(
        "individual", metavar="COMBINER",
        help="individual (round-robin per-task steps), sum (one step on the summed loss), pcgrad "
             "(gradient surgery), gse (a PCGrad step, then a summed-loss step), or your own class with a "
             "step(ctx) method by its import path (docs/multitask.md); or a torchjd method: "
             + mtl_methods.help_text())
    combiner_args: str | None = setting(
        None, metavar="JSON",
        help='keyword options of your own --combiner class or of a torchjd method, a JSON object, '
             'e.g. \'{"c": 0.5}\' for cagrad')
    iterations_multiplier: int = setting(1, bounds=(1, None), help="an epoch has K x (smallest task's batches) steps")
    smart_settings: SmartSettings = group(SmartSettings)
    trust_combiner_code: bool = setting(
        False, help="import and run the code a --combiner package.module:Class names (command line only: a "
                    "--config file cannot set it; never with --predict_only)")
    pcgrad_reduction: str = setting(
        "mean", choices=PCGRAD_REDUCTIONS,
        help="pcgrad and gse: the encoder's gradient is the mean (default) or the sum of the PCGrad-"
             "projected task gradients. mean = WeiChengTseng/Pytorch-PCGrad (e987ac6), the implementation "
             "CS224N projects copied, and GSE's form since the start; sum = Yu et al. 2020, Algorithm 1")

    def built_combiner(self, seed: int) -> Combiner:
        """The combiner these settings name, built once: the settings check builds it (a user's class is imported,
        built and its step(ctx) checked before any work) and the Trainer trains with that instance
        (:meth:`take_combiner`). Built under a generator seeded with ``seed``, so that a constructor's random
        draws do not depend on what ran before in the process."""
        key = (self.combiner, self.combiner_args, self.pcgrad_reduction, seed)
        if getattr(self, "_built", (None,))[0] != key:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                self._built = (key, build_combiner(self.combiner, seed, self.combiner_args,
                                                   pcgrad_reduction=self.pcgrad_reduction))
        return self._built[1]

    def take_combiner(self, seed: int) -> Combiner:
        """:meth:`built_combiner` for a run to train with: a later call builds a fresh one (a combiner has state)."""
        combiner = self.built_combiner(seed)
        del self._built
        return combiner
