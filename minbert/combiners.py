"""Multitask loss combiners: how one training step turns per-task losses into parameter updates.

A combiner is a small strategy object with one method, ``step(ctx)``, called once per training step by the
single training loop in ``minbert.train`` (torchjd / LibMTL style: no copy of the loop per strategy).
The loop hands it a :class:`StepContext`: a closure computing a task's loss on this step's batch (SMART
included when enabled) and a closure applying one optimizer update (clipping and the non-finite guard
included). The combiner decides which losses to back-propagate and when to step.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn


@dataclass
class StepContext:
    tasks: list[str]
    task_loss: Callable[[str], torch.Tensor]  # forward (+ SMART) on this step's batch of the task
    optimizer_step: Callable[[], bool]  # clip, skip if non-finite, step, zero grads; False if skipped
    shared_params: list[nn.Parameter]  # the encoder's parameters (PCGrad projects these)
    model: nn.Module


class Combiner:
    name = "base"

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


class Sum(Combiner):
    """Multitask learning (§4.2): one step on L_sst + L_qqp + L_sts."""
    name = "sum"

    def step(self, ctx: StepContext) -> dict[str, float]:
        losses = {task: ctx.task_loss(task) for task in ctx.tasks}
        torch.stack(list(losses.values())).sum().backward()
        ctx.optimizer_step()
        return {t: l.item() for t, l in losses.items()}


COMBINERS: dict[str, type[Combiner]] = {"individual": Individual, "sum": Sum}


def build_combiner(name: str) -> Combiner:
    if name not in COMBINERS:
        raise ValueError(f"unknown combiner {name!r} (choose from {', '.join(COMBINERS)})")
    return COMBINERS[name]()
