"""Data-parallel training under torchrun: one process per device, explicit gradient all-reduce.

``torchrun --nproc_per_node=N train_multitask.py ...`` starts N copies of the training script with ``RANK``,
``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT`` set; :func:`init` joins them into one process
group (NCCL on GPUs, gloo on CPUs). Every rank holds a full replica of the model and draws the same *global*
batch of every task (``TaskStream`` batch i is a pure function of the seed, the task and i); rank r trains on
``indices[r::N]`` of it. The ranks' gradients are then averaged with ``all_reduce`` so that every rank holds the
gradient of the whole global batch when the optimizer steps (see docs/distributed.md for why this is not torch's
``DistributedDataParallel`` module: the combiners need each task's gradient on its own).

Everything here is the identity, a no-op or a plain call in a single process (no torchrun, or ``WORLD_SIZE=1``):
no process group is created and the training loop runs exactly as without this module.
"""
from __future__ import annotations

import atexit
import logging
import os
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from minbert.tasks.data import TaskTensors, sorted_batches

log = logging.getLogger("minbert")

# Gradients are all-reduced in flat buckets of at most this many elements (64 MB of float32): one collective
# per bucket instead of one per parameter, without a second full copy of a large model's gradients.
BUCKET_ELEMENTS = 1 << 24


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def is_main() -> bool:
    """Rank 0, the only process that writes to --output_dir, logs and shows progress bars."""
    return rank() == 0


def init(device: torch.device) -> torch.device:
    """Join the process group when started by torchrun with ``WORLD_SIZE`` > 1 (``env://`` rendezvous) and return
    this process's device: ``cuda:LOCAL_RANK`` on GPUs (backend NCCL), the given CPU device otherwise (gloo).
    A single process gets ``device`` back unchanged and no process group.

    The group is made once per process and left at exit (also after an error): several runs in one process share
    it, since joining a second time through torchrun's store is unreliable."""
    joined = dist.is_available() and dist.is_initialized()
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 and not joined:
        return device
    if not dist.is_available():
        raise ValueError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    if device.type == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK {local_rank}: this node has {torch.cuda.device_count()} CUDA device(s); "
                             "start at most that many processes per node (torchrun --nproc_per_node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    if not joined:
        if device.type == "cuda":
            dist.init_process_group("nccl", device_id=device)
        else:
            dist.init_process_group("gloo")
        atexit.register(_leave)
        if not is_main():  # one copy of every message: rank 0's (errors still print on every rank)
            log.setLevel(logging.ERROR)
    return device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def _collective_device() -> torch.device:
    """Where tensors handed to a collective must live: the GPU for NCCL, the CPU for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def on_main(fn: Callable, *args, **kwargs):
    """Run ``fn`` on rank 0 only and give every rank its result, or raise its exception on every rank: for
    decisions about --output_dir, which only rank 0 reads and writes while preparing the run."""
    if world_size() == 1:
        return fn(*args, **kwargs)
    outcome = [None]
    if is_main():
        try:
            outcome = [(True, fn(*args, **kwargs))]
        except Exception as e:  # noqa: BLE001 -- handed to every rank, then raised everywhere
            outcome = [(False, e)]
    dist.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise value
    return value


def all_gather_object(obj) -> list:
    """``obj`` of every rank, in rank order (``[obj]`` in one process)."""
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_model(model: nn.Module) -> None:
    """Copy rank 0's parameters and buffers to every rank. They are equal already (same seed, same files);
    this makes it a fact rather than an assumption. Runs once, before training."""
    if world_size() == 1:
        return
    with torch.no_grad():
        for t in [*model.parameters(), *model.buffers()]:
            dist.broadcast(t.data, src=0)


# ------------------------------------------------------------------------------------------------------------
# Training: shards of the global batch, gradient averaging


def shard(indices: list[int]) -> list[int]:
    """This rank's share of a global batch: every N-th example from the rank-th. The batch is sorted by length
    (data.bucketed_batches), so the shares have nearly equal lengths and the ranks finish a step together."""
    n = world_size()
    return indices if n == 1 else indices[rank()::n]


def loss_weight(local_size: int, global_size: int) -> float:
    """Factor on this rank's mean loss so that averaging the ranks' gradients (sum / N) gives the gradient of the
    global batch's mean loss: Σ_r (n_r / n) ∇mean_r = (1/N) Σ_r ∇(N n_r / n · mean_r). It is 1 when the batch
    splits evenly; the last batch of a pass over a task may not."""
    return world_size() * local_size / global_size


def all_reduce_grads(params: list[nn.Parameter]) -> None:
    """Replace every parameter's ``.grad`` by its average over the ranks (sum / N; the losses carry the
    :func:`loss_weight`), flattened into buckets: a few collectives per call, never one per parameter.

    A parameter without a gradient counts as zeros; it gets the average if any rank had a gradient for it, and
    stays without one if none had (e.g. the heads of the other tasks, or a pooler that mean pooling never uses),
    so the optimizer leaves it alone exactly as in one process. All ranks must pass the same list."""
    n = world_size()
    if n == 1:
        return
    groups: dict[tuple, list[nn.Parameter]] = {}
    for p in params:
        groups.setdefault((p.dtype, p.device), []).append(p)
    for group in groups.values():
        bucket, size = [], 0
        for p in group:
            if bucket and size + p.numel() > BUCKET_ELEMENTS:
                _all_reduce_bucket(bucket, size, n)
                bucket, size = [], 0
            bucket.append(p)
            size += p.numel()
        if bucket:
            _all_reduce_bucket(bucket, size, n)


def _all_reduce_bucket(params: list[nn.Parameter], size: int, n: int) -> None:
    # One flat buffer: the gradients, then one "had a gradient" count per parameter (summed with them).
    flat = torch.empty(size + len(params), dtype=params[0].dtype, device=params[0].device)
    offset = 0
    for p in params:
        part = flat[offset : offset + p.numel()]
        if p.grad is None:
            part.zero_()
        else:
            part.copy_(p.grad.reshape(-1))
        offset += p.numel()
    flat[size:] = torch.tensor([float(p.grad is not None) for p in params], dtype=flat.dtype)
    dist.all_reduce(flat)
    grads = flat[:size].div_(n)
    had_grad = flat[size:].tolist()
    offset = 0
    for p, count in zip(params, had_grad):
        if count > 0:  # views into the reduced buffer: no second copy
            p.grad = grads[offset : offset + p.numel()].view_as(p)
        offset += p.numel()


def average_losses(losses: dict[str, float], stop: bool) -> tuple[dict[str, float], bool]:
    """The global batch's mean loss of every task (the ranks' losses carry their :func:`loss_weight`, so their
    mean is exactly that) and whether any rank asked to stop (Ctrl-C), so that all ranks stop at the same step."""
    n = world_size()
    if n == 1:
        return losses, stop
    values = torch.tensor([*losses.values(), float(stop)], dtype=torch.float64, device=_collective_device())
    dist.all_reduce(values)
    values = values.tolist()
    return {t: v / n for t, v in zip(losses, values)}, values[-1] > 0


def mean_over_ranks(values: torch.Tensor) -> torch.Tensor:
    """The ranks' mean of ``values`` (e.g. each task's loss), the same on every rank; float32 on ``values``' device.
    In one process, ``values`` as float32 (StepContext.mean_over_ranks)."""
    n = world_size()
    if n == 1:
        return values.float()
    out = values.to(_collective_device(), torch.float64)
    dist.all_reduce(out)
    return (out / n).to(values.device, torch.float32)


def batch_noise(global_size: int, widths: list[int]) -> Callable[[list[torch.Tensor]], list[torch.Tensor]]:
    """SMART's initial noise ν ~ N(0, I) (Jiang et al. 2020, Algorithm 1) for this rank's rows of a global batch.

    Every rank draws the noise of the *whole* global batch (``global_size`` rows, padded to the global batch's
    ``widths``, one per sentence column) and keeps its own rows and tokens, so with equal random states the
    ranks perturb their examples exactly as one process training on the global batch would."""
    r, n = rank(), world_size()

    def noise(embeds: list[torch.Tensor]) -> list[torch.Tensor]:
        return [torch.randn(global_size, width, e.shape[-1], dtype=e.dtype, device=e.device)[r::n, : e.shape[1]]
                for e, width in zip(embeds, widths)]

    return noise


def replica_difference(model: nn.Module) -> float:
    """The largest difference between a per-tensor fingerprint (sum and sum of squares, in float64) of this
    rank's parameters and rank 0's: 0.0 when the replicas are in sync, as they must be (the same averaged
    gradient on every rank gives the same update)."""
    if world_size() == 1:
        return 0.0
    with torch.no_grad():
        fingerprint = torch.stack([torch.stack([p.double().sum(), p.double().square().sum()])
                                   for p in model.parameters()]).flatten().to(_collective_device())
    gathered = [torch.empty_like(fingerprint) for _ in range(world_size())]
    dist.all_gather(gathered, fingerprint)
    return max(float((g - gathered[0]).abs().max()) for g in gathered)


# ------------------------------------------------------------------------------------------------------------
# Prediction: each rank predicts a share of the batches, every rank gets all predictions


def subset(data: TaskTensors, indices: list[int]) -> TaskTensors:
    """The examples ``indices`` of ``data``, in that order."""
    columns = [col.select(indices) for col in data.columns]  # a cross-encoded pair keeps its token types
    labels = data.labels[indices] if data.labels is not None else None
    return TaskTensors(data.task, columns, labels, [data.ids[i] for i in indices])


def predict_task(model, data: TaskTensors, batch_size: int, device: torch.device, pad_id: int = 0,
                 desc: str | None = None, **options) -> torch.Tensor:
    """:func:`minbert.tasks.predict.predict_task` over the ranks: the prediction batches of one process (sorted by
    length) are dealt round-robin, each rank predicts its batches, and the predictions are gathered in the
    original order on every rank. Each batch is exactly one of the single process's (same examples, same
    padding), so the predictions are the ones a single process makes. ``options`` (e.g. ``amp_dtype``) are
    passed on."""
    from minbert.tasks.predict import predict_task as predict_local

    n = world_size()
    if n == 1:
        return predict_local(model, data, batch_size, device, pad_id, desc=desc, **options)
    batches = sorted_batches(data.lengths(), batch_size)
    # The rank's batches concatenated stay sorted by length and all but the global last are full, so the
    # local call cuts them back into exactly these batches.
    mine = [i for batch in batches[rank()::n] for i in batch]
    preds = predict_local(model, subset(data, mine), batch_size, device, pad_id, desc=desc, progress=is_main(),
                          **options) if mine else None
    out = None
    for indices, part in all_gather_object((mine, preds)):
        if part is None:
            continue
        if out is None:
            out = torch.empty((len(data), *part.shape[1:]), dtype=part.dtype)
        out[indices] = part
    return out
