"""Combiners for the torchjd methods of :mod:`minbert.methods.mtl_methods`, on minbert's one training loop.

``AggregatorCombiner`` back-propagates each task's loss on its own (as ``pcgrad`` does: one task's graph, SMART
included, alive at a time), takes the shared encoder's gradient of each out of ``.grad`` (averaged over the ranks
first under torchrun, so every rank aggregates the global batch's Jacobian), stacks them into the Jacobian J
(tasks x encoder parameters, float32) and sets the encoder's ``.grad`` to the aggregator's vector. Each head keeps
its own task's gradient. This is torchjd's ``autojac`` computation (``jac`` of the losses w.r.t. the shared
parameters) done with one backward per task, which minbert needs anyway for SMART and torchrun.

``ScalarizerCombiner`` back-propagates scalarizer(losses). It evaluates the scalarizer on the global batch's
losses (the ranks' mean, identical on every rank) and back-propagates its derivative dS/dL_i into each rank's
local loss L_i (chain rule: the ranks' averaged gradients are then exactly the one-process gradient, also for the
non-linear scalarizers). Its own parameters (UW's log-variances, IMTL-L's log-scales) are stepped by a small Adam of
their own after each model update that was not skipped; FAMO's logits are updated after the step from the losses
recomputed on the same batch (Liu et al. 2023, Algorithm 1); DWA's epoch averages advance at each epoch's end.

Random methods (GradDrop, RGW, RLW, GradVac's task order) draw from a generator of their own seeded with --seed
and saved in ``last/``: resumed and torchrun runs draw the same numbers as one uninterrupted process.
"""
from __future__ import annotations

import inspect

import numpy as np
import torch
from torch import nn

from minbert.io import first_line
from minbert.methods.mtl_methods import EXTRA, METHODS, Method, missing_solvers


# ---------------------------------------------------------------------------------------------- building
def build_method_combiner(name: str, seed: int, options: dict) -> MethodCombiner:
    """The combiner of ``--combiner name`` (a key of METHODS) with ``--combiner_args`` ``options``; every mistake
    is a one-line ValueError naming the flag (raised by run_config before anything is written)."""
    method = METHODS[name]
    missing = missing_solvers(method)
    if missing:
        raise ValueError(f"--combiner {name} needs {', '.join(missing)}: {EXTRA}")
    options = dict(options)  # --combiner_args, parsed by combiners.build_combiner
    own = {k: options.pop(k) for k in list(options) if k in method.extra}
    ctor_args = _constructor_args(method, options)
    cls = AggregatorCombiner if method.kind == "aggregator" else ScalarizerCombiner
    combiner = cls(method, ctor_args, seed, **{**method.extra, **own})
    combiner.make(3)  # build it once now, so that bad values fail here (rebuilt for the run's number of tasks)
    return combiner


def _torchjd_class(method: Method):
    import torchjd.aggregation
    import torchjd.scalarization

    module = torchjd.aggregation if method.kind == "aggregator" else torchjd.scalarization
    return getattr(module, method.cls)


def _constructor_args(method: Method, options: dict) -> dict:
    """``--combiner_args`` checked against the torchjd constructor: known names, required ones given; JSON lists
    become float tensors (preference vectors, weights)."""
    params = inspect.signature(_torchjd_class(method)).parameters
    allowed = [p for p in params if p not in method.auto] + list(method.extra)
    unknown = [k for k in options if k not in params or k in method.auto]
    if unknown:
        raise ValueError(f"--combiner_args: {method.name} takes no option {unknown[0]!r} "
                         f"(it takes: {', '.join(allowed) or 'none'})")
    absent = [k for k in method.required if k not in options]
    if absent:
        raise ValueError(f"--combiner_args: {method.name} needs {', '.join(absent)}, e.g. "
                         f"'{{\"{absent[0]}\": ...}}' (docs/multitask.md)")
    out = {}
    for k, v in options.items():
        if isinstance(v, list):
            try:
                v = torch.tensor(v, dtype=torch.float32)
            except (TypeError, ValueError):
                raise ValueError(f"--combiner_args: {method.name} option {k} must be a list of numbers") from None
        elif isinstance(v, dict) or (params[k].default is not None and not isinstance(v, (int, float, str, bool))):
            raise ValueError(f"--combiner_args: {method.name} option {k}: unsupported value {v!r}")
        out[k] = v
    return out


class MethodCombiner:
    """What both kinds share: the torchjd object (built for the run's number of tasks), its seeded random
    numbers and its resumable state. A combiner as minbert.methods.combiners defines it (one ``step(ctx)`` with a
    ``combiners.StepContext``); not a subclass, so that this module and combiners.py import each other in one
    direction only (build_combiner imports this module)."""

    def __init__(self, method: Method, ctor_args: dict, seed: int = 0):
        self.seed = seed
        self.name, self.method, self.ctor_args = method.name, method, ctor_args
        self.generator = torch.Generator().manual_seed(seed)  # saved in last/ by checkpoint_state
        self.fn = None
        self.n_tasks = 0

    def make(self, n_tasks: int) -> None:
        if self.fn is not None and self.n_tasks == n_tasks:
            return
        auto = {k: n_tasks for k in self.method.auto}
        try:
            self.fn = _torchjd_class(self.method)(**self.ctor_args, **auto)
        except (ValueError, TypeError, ImportError, RuntimeError) as e:
            raise ValueError(f"--combiner_args: {self.name}: {first_line(e, type(e).__name__)}") from None
        self.n_tasks = n_tasks
        self.made()

    def made(self) -> None:
        """Hook: the torchjd object was (re)built."""

    def seeded(self, fn, *args):
        """Call ``fn`` with the global torch RNG seeded from this combiner's generator (restored afterwards), so
        the method's random draws are reproducible, resumable and the same on every rank."""
        seed = int(torch.randint(0, 2**62, (1,), generator=self.generator))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return fn(*args)

    # --- resumable state (checkpoint_state.component_state/load_component_state call these) ---
    def state_dict(self) -> dict:
        return {"n_tasks": self.n_tasks, "plain": {name: _plain_state(m) for name, m in self.fn.named_modules()},
                "module": self.fn.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.make(state["n_tasks"])
        modules = dict(self.fn.named_modules(remove_duplicate=False))  # GramianWeightedAggregator: 2 names
        for key, value in state["module"].items():  # not load_state_dict: torchjd registers lazy buffers as None
            owner, _, attr = key.rpartition(".")
            if attr in modules[owner]._buffers:
                modules[owner]._buffers[attr] = value.clone()
            else:
                with torch.no_grad():
                    modules[owner]._parameters[attr].copy_(value)
        for name, plain in state["plain"].items():
            _load_plain_state(modules[name], plain)


_MODULE_INTERNALS = set(vars(nn.Module()))


def _plain_state(obj) -> dict:
    """The attributes of a torchjd object that change while training (EMAs, step counters, loss histories,
    Nash-MTL's previous weights, FAMO's Adam) in a form torch.load(weights_only=True) reads back; solver objects
    (cvxpy problems) and callables are left out: they are rebuilt."""
    out = {}
    for k, v in vars(obj).items():
        if k in _MODULE_INTERNALS:
            continue
        if isinstance(v, np.ndarray):
            out[k] = {"ndarray": torch.from_numpy(v.copy())}
        elif isinstance(v, torch.optim.Optimizer):
            out[k] = {"adam": v.state_dict()}
        elif v is None or isinstance(v, (bool, int, float, str, torch.Tensor, torch.dtype, torch.device)):
            out[k] = v
        elif isinstance(v, (list, tuple)) and all(
                x is None or isinstance(x, (int, float, torch.Tensor, torch.dtype, torch.device)) for x in v):
            out[k] = v
    return out


def _load_plain_state(obj, plain: dict) -> None:
    for k, v in plain.items():
        if isinstance(v, dict) and "ndarray" in v:
            v = v["ndarray"].numpy().copy()
        elif isinstance(v, dict) and "adam" in v:  # FAMO's own Adam on its logits (built lazily by torchjd)
            optimizer = torch.optim.Adam([obj._w], lr=obj.lr, weight_decay=obj.weight_decay)
            optimizer.load_state_dict(v["adam"])
            v = optimizer
        object.__setattr__(obj, k, v) if k.startswith("_") else setattr(obj, k, v)
    if hasattr(obj, "_init_optim_problem") and getattr(obj, "step", 0) > 0:
        # Nash-MTL's weighting builds its cvxpy problem at step 0: rebuild it (from the restored prvs_alpha)
        obj._init_optim_problem()


# ---------------------------------------------------------------------------------------------- aggregators
def pop_flat_grad(params: list[nn.Parameter], used: list[bool]) -> torch.Tensor:
    """One task's row of J: the parameters' gradients as one flat vector (zeros where a parameter got none),
    their .grad cleared; ``used[k]`` records that parameter k got a gradient from some task (as in combiners)."""
    flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
    for k, p in enumerate(params):
        used[k] = used[k] or p.grad is not None
        p.grad = None
    return flat


def set_flat_grad(params: list[nn.Parameter], flat: torch.Tensor, used: list[bool]) -> None:
    """Each used parameter's .grad = its slice of ``flat``; a parameter no task used (the pooler under mean
    pooling) keeps none, so the optimizer leaves it alone, as under ``sum``."""
    offset = 0
    for p, u in zip(params, used):
        if u:
            p.grad = flat[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


class AggregatorCombiner(MethodCombiner):
    """A torchjd aggregator on the shared encoder's Jacobian; heads keep their own task's gradient."""

    def step(self, ctx) -> dict[str, float]:
        self.make(len(ctx.tasks))
        losses, jacobian = {}, None
        used = [False] * len(ctx.shared_params)
        for i, task in enumerate(ctx.tasks):
            loss = ctx.task_loss(task)
            loss.backward()  # head grads stay in .grad; the encoder's are taken out as this task's row of J
            losses[task] = loss.item()
            del loss
            ctx.sync_grads(ctx.shared_params)  # torchrun: the Jacobian of the global batch, the same on every rank
            row = pop_flat_grad(ctx.shared_params, used)
            if jacobian is None:  # filled row by row: no second copy of J (torch.stack of the rows would make one)
                jacobian = row.new_empty(len(ctx.tasks), row.numel())
            jacobian[i] = row
            del row
        if bool(torch.isfinite(jacobian).all()):
            shared = self.seeded(self.fn, jacobian)
        else:  # leave a non-finite gradient: optimizer_step skips the step (and the solvers never see NaN)
            shared = jacobian.sum(0)
        del jacobian
        set_flat_grad(ctx.shared_params, shared, used)
        ctx.optimizer_step()
        return losses


# ---------------------------------------------------------------------------------------------- scalarizers
class ScalarizerCombiner(MethodCombiner):
    """A torchjd scalarizer of the task losses (see the module docstring for torchrun and the state)."""

    def __init__(self, method: Method, ctor_args: dict, seed: int = 0, weights_lr: float | None = None):
        if weights_lr is not None and not (isinstance(weights_lr, (int, float)) and weights_lr > 0):
            raise ValueError(f"--combiner_args: {method.name} option weights_lr must be a positive number")
        super().__init__(method, ctor_args, seed)
        self.weights_lr = weights_lr
        self.optimizer: torch.optim.Optimizer | None = None

    def made(self) -> None:
        own = [p for p in self.fn.parameters() if p.requires_grad] if self.method.cls != "FAMO" else []
        self.optimizer = torch.optim.Adam(own, lr=self.weights_lr) if own and self.weights_lr else None

    def step(self, ctx) -> dict[str, float]:
        self.make(len(ctx.tasks))
        local = torch.stack([ctx.task_loss(task) for task in ctx.tasks])  # every task's graph alive till backward
        values = ctx.mean_over_ranks(local.detach())
        losses = dict(zip(ctx.tasks, values.tolist()))
        if not bool(torch.isfinite(values).all()):  # a non-finite step is skipped; keep it out of the method's state
            local.sum().backward()
            ctx.optimizer_step()
            return losses
        v = values.cpu().clone().requires_grad_(True)  # the scalarizer and its parameters live on the CPU
        self.seeded(lambda: self.fn(v).backward())  # dS/dL_i into v.grad; the scalarizer's own parameters' grads
        torch.autograd.backward(local, v.grad.to(local.device))
        ok = ctx.optimizer_step()
        if ok and self.optimizer is not None:
            self.optimizer.step()
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        if ok and self.method.cls == "FAMO":  # Algorithm 1: the losses after the update, on the same batch
            # (with autograd on: SMART's ascent inside task_loss needs it; each graph is dropped at once)
            after = torch.stack([ctx.task_loss(task).detach() for task in ctx.tasks])
            after = ctx.mean_over_ranks(after).cpu()
            if bool(torch.isfinite(after).all()):
                self.fn.update(after)
        return losses

    def end_epoch(self) -> None:
        """DWA: the epoch's mean losses join the last two epochs' that set the next epoch's weights."""
        if callable(getattr(self.fn, "step", None)) and self.method.cls == "DWA":
            self.fn.step()

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
        return state

    def load_state_dict(self, state: dict) -> None:
        super().load_state_dict(state)
        self.made()
        if state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
