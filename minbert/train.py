"""The training loop: one loop for every multitask strategy (the combiner decides how losses become updates).

Schedule (CS224N report §5.3.1 and §4.5): an epoch has ``iterations_multiplier`` x (smallest task's number of
batches) steps; each step draws the next batch of every task's endless stream and hands the per-task losses to
the combiner. Dev evaluation after each epoch; the best epoch by overall score is kept and used for the
prediction files.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import random
import shutil
import signal
import threading
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .combiners import StepContext, build_combiner
from .data import SPLITS, TASKS, TaskData, TaskStream, TaskTensors, load_task, tensorize
from .distributed import predict_task  # under torchrun each rank predicts a share; alone, predict.predict_task
from .io import AppendLog, atomic_save, atomic_write_text, published_dir, remove_stale_temps, replace_dir
from .metrics import overall_score, task_score
from .model import BertModel
from .multitask import MultitaskBert, MultitaskConfig, load_weights, pair_encoding_of
from .precision import resolve_bf16
from .predict import prediction_path, write_predictions
from .tokenizer import load_tokenizer, pad_token_id

log = logging.getLogger("minbert")


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is available")
    return torch.device(name)


class MetricsLog:
    """metrics.jsonl in the output directory: one JSON object per line, flushed as written.

    With ``report_to="tensorboard"`` every numeric field is also a TensorBoard scalar (event files in
    ``<output_dir>/tensorboard``), keyed by the record's step: ``loss_sst``, ``lr``, ``dev/overall``...
    """

    def __init__(self, path: Path, report_to: str = "none"):
        self.path = path
        self._writer_class = None  # the SummaryWriter is made at the first record (see write)
        self._tb = None
        self._last_step = 0
        if report_to == "tensorboard":
            self._writer_class = self.tensorboard_writer_class()
        elif report_to != "none":
            raise ValueError(f"--report_to {report_to}: choose none or tensorboard")
        self._log = AppendLog(path)  # appended to by a resumed run; a torn last line is dropped

    @staticmethod
    def tensorboard_writer_class():
        """torch's SummaryWriter, or a one-line ValueError naming the package to install."""
        try:
            import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; checked first for a clear message)
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise ValueError("--report_to tensorboard needs the tensorboard package: pip install tensorboard "
                             "(or pip install 'minbert[tensorboard]')") from None
        return SummaryWriter

    def write(self, **record) -> None:
        self._log.write_line(json.dumps(record))
        if self._writer_class is not None and self._tb is None:
            # A resumed run first writes {"resumed_from_step": N}: TensorBoard then hides the killed run's
            # events past step N, which the resumed run logs again.
            resumed = record.get("resumed_from_step")
            self._tb = self._writer_class(log_dir=str(Path(self.path).parent / "tensorboard"),
                                          purge_step=resumed + 1 if isinstance(resumed, int) else None)
            self._last_step = resumed or 0
            if resumed is not None:
                return
        if self._tb is not None:
            # Records without a step (the final one) are plotted at the last step seen, under "final/".
            step = record.get("step", self._last_step)
            self._last_step = step
            prefix = "final/" if record.get("final") else ""
            for name, value in _numeric_fields(record):
                if name not in ("step", "epoch"):
                    self._tb.add_scalar(prefix + name, value, global_step=step)
            self._tb.flush()

    def close(self) -> None:
        self._log.close()
        if self._tb is not None:
            self._tb.close()


def _numeric_fields(record: dict, prefix: str = ""):
    """(name, number) pairs of a record, nested dicts flattened as ``dev/sst``; booleans are not numbers here."""
    for key, value in record.items():
        if isinstance(value, dict):
            yield from _numeric_fields(value, f"{prefix}{key}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            yield prefix + key, value


def load_datasets(args: Namespace, tokenizer, splits: tuple[str, ...]) -> dict[tuple[str, str], TaskData]:
    """Read every needed file before anything is written, so bad input leaves no output behind."""
    out = {}
    for task in args.tasks:
        for split in splits:
            limit = args.max_train_samples if split == "train" else args.max_eval_samples
            out[(task, split)] = load_task(task, split, args.data_dir, args.skip_bad_rows, limit)
    for d in out.values():
        if d.skipped:
            log.warning("%s: skipped %d malformed rows: %s", d.path, len(d.skipped), "; ".join(d.skipped))
        if d.dropped:
            log.info("%s: %d rows whose label is not part of %s dropped (by the task's definition), %d kept",
                     d.path, d.dropped, d.task.name, len(d.examples))
    return out


def build_model(args: Namespace) -> MultitaskBert:
    encoder = BertModel.from_pretrained(args.model_name_or_path)
    config = MultitaskConfig(tasks=list(args.tasks), pooling=args.pooling, sts_head=args.sts_head,
                             para_head=args.para_head, pair_encoding=pair_encoding_of(args))
    return MultitaskBert(encoder, config)


def amp_dtype(args: Namespace) -> torch.dtype | None:
    """--bf16: bfloat16 autocast for forward passes and losses (weights, gradients and optimizer state stay float32).
    run() resolves ``auto`` before training; here it is resolved for the device --device names."""
    mode = getattr(args, "bf16", "off")
    device = resolve_device(getattr(args, "device", "cpu")) if mode == "auto" else torch.device("cpu")
    return torch.bfloat16 if resolve_bf16(mode, device, getattr(args, "smart", False)) == "on" else None


def compile_encoder(model: MultitaskBert, device: torch.device) -> None:
    """--torch_compile: compile every encoder layer in place. ``nn.Module.compile`` keeps the module (and so the
    checkpoint keys: no ``_orig_mod.`` prefix); dynamic shapes because length-bucketed batches vary in width."""
    try:  # a backend that cannot build (no C++ compiler, unsupported Python) fails here, in one line
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:  # torch raises many error types from its compiler stack
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise ValueError(f"--torch_compile: torch.compile does not work here ({type(e).__name__}: {first})") from None
    for layer in model.encoder.layers:
        layer.compile(dynamic=True)


def evaluate(model: MultitaskBert, dev: dict[str, TaskTensors], args: Namespace, device: torch.device, pad_id: int) -> dict[str, float]:
    scores = {}
    for task, data in dev.items():
        preds = predict_task(model, data, args.per_device_eval_batch_size, device, pad_id, desc=f"dev {task}",
                             amp_dtype=amp_dtype(args))
        scores[task] = task_score(task, preds.numpy(), data.labels.numpy())
    scores["overall"] = overall_score(scores)
    return scores


def write_all_predictions(model, tensors: dict[tuple[str, str], TaskTensors], out_dir: Path, args, device, pad_id) -> dict[str, float]:
    """Write the six CS224N prediction files (for the tasks trained); return dev scores."""
    scores = {}
    for (task, split), data in tensors.items():
        if split == "train":
            continue
        preds = predict_task(model, data, args.per_device_eval_batch_size, device, pad_id, desc=f"{split} {task}",
                             amp_dtype=amp_dtype(args))
        if distributed.is_main():  # under torchrun only rank 0 writes
            write_predictions(prediction_path(out_dir, task, split), TASKS[task], data.ids, preds.tolist())
        if split == "dev" and data.labels is not None:
            scores[task] = task_score(task, preds.numpy(), data.labels.numpy())
    if scores:
        scores["overall"] = overall_score(scores)
    return scores


def param_groups(model: MultitaskBert, weight_decay: float, head_lr: float | None = None) -> list[dict]:
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


def build_optimizer(args: Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    from .optim import build_optimizer as build_named, parse_optim_args

    options = parse_optim_args(args.optim_args)
    if args.optim == "adamw":
        # The fused kernel is one pass over each tensor: ~50x faster than the default per-tensor loop on CPU.
        options.setdefault("fused", True)
    groups = param_groups(model, args.weight_decay, args.head_learning_rate)
    return build_named(args.optim, groups, args.learning_rate, args.weight_decay, options)


def linear_schedule(optimizer: torch.optim.Optimizer, warmup_steps: int, total_steps: int):
    """Linear warmup from 0 then linear decay to 0 (the BERT / run_glue schedule)."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def print_scores(title: str, scores: dict[str, float]) -> None:
    from .cli import format_scores

    print(title)
    print(format_scores({"dev": scores}))


class Trainer:
    def __init__(self, args: Namespace, model: MultitaskBert, train: dict[str, TaskTensors], dev: dict[str, TaskTensors],
                 device: torch.device, tokenizer, out_dir: Path, metrics: MetricsLog | None):
        self.args, self.model, self.dev, self.device = args, model, dev, device
        self.tokenizer, self.pad_id = tokenizer, pad_token_id(tokenizer)
        self.out_dir, self.metrics = out_dir, metrics
        self.tasks = list(args.tasks)
        # Under torchrun the streams yield the global batch (N ranks x the per-device batch), the same on every rank;
        # each rank trains on its share (train_step), so all ranks run the same steps (docs/distributed.md).
        global_batch = args.per_device_train_batch_size * distributed.world_size()
        self.streams = {t: TaskStream(train[t], global_batch, args.seed, i) for i, t in enumerate(self.tasks)}
        self.steps_per_epoch = args.iterations_multiplier * min(s.batches_per_pass for s in self.streams.values())
        if args.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * args.num_train_epochs
        self.optimizer = build_optimizer(args, model)
        self.scheduler = linear_schedule(self.optimizer, int(args.warmup_ratio * self.total_steps), self.total_steps)
        self.combiner = build_combiner(args.combiner, args.seed)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shared_params = model.shared_parameters()
        self.bad_steps = 0  # non-finite steps skipped in total
        self.bad_in_a_row = 0
        self.best_score = -math.inf
        self.best_scores: dict[str, float] = {}
        self.best_epoch = self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        # Position: optimizer steps done. TaskStream batch i is a pure function of i, so this is the sampler state.
        self.global_step = self.last_saved_step = 0
        self.running: dict[str, list[float]] = {t: [] for t in self.tasks}  # losses since the last metrics record
        self.epoch_examples, self.epoch_seconds = 0, 0.0
        self.stop_requested = False  # set by Ctrl-C: stop after the current step, once `last` is saved
        self._stop_agreed = False  # torchrun: a Ctrl-C on any rank, as agreed by all at the end of the last step
        self._averaged: set[int] = set()  # torchrun: parameters whose .grad a combiner already averaged this step
        self._rng_to_restore: dict | None = None
        self._kill_at_step = os.environ.get("MINBERT_TEST_KILL_AT_STEP")  # test-only fault injection
        self._step_delay = float(os.environ.get("MINBERT_TEST_STEP_DELAY") or 0)  # test-only: slow steps down
        self.smart = None
        if getattr(args, "smart", False):
            from .smart import SmartRegularizer

            self.smart = SmartRegularizer.from_args(args)

    def optimizer_step(self) -> bool:
        """Clip, skip a step whose gradient is not finite (counted), else update; grads are zeroed either way.

        Under torchrun the gradients are first averaged over the ranks: every rank then holds the gradient of the
        global batch, computes the same norm (so skips the same steps) and makes the same update."""
        if distributed.world_size() > 1:
            distributed.all_reduce_grads([p for p in self.params if id(p) not in self._averaged])
            self._averaged.clear()
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads) if grads else torch.tensor(0.0)
        ok = bool(torch.isfinite(norm))
        if ok:
            if self.args.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.args.max_grad_norm, norm)
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.bad_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_in_a_row > self.args.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient (--max_bad_steps "
                f"{self.args.max_bad_steps}); stopping. Try a lower --learning_rate or --max_grad_norm 1.0"
            )
        return ok

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """StepContext.sync_grads: average these gradients over the ranks now (a combiner needs a task's gradient
        of the global batch, e.g. PCGrad before its projection); optimizer_step then leaves them alone."""
        if distributed.world_size() > 1:
            distributed.all_reduce_grads(params)
            self._averaged.update(id(p) for p in params)

    def train_step(self, step: int) -> dict[str, float]:
        # Every rank draws the same global batch of each task and keeps its share (all of it in one process).
        batches, weights, noise = {}, {}, {}
        for t in self.tasks:
            data, indices = self.streams[t].data, self.streams[t].indices(step)
            mine = distributed.shard(indices)
            batches[t] = {k: v.to(self.device, non_blocking=True) for k, v in data.batch(mine, self.pad_id).items()} if mine else None
            weights[t] = distributed.loss_weight(len(mine), len(indices))
            if self.smart is not None and distributed.world_size() > 1:
                noise[t] = distributed.batch_noise(len(indices), [max(len(c.ids[i]) for i in indices) for c in data.columns])

        def task_loss(task: str) -> torch.Tensor:
            batch = batches[task]
            if batch is None:  # torchrun: a last batch smaller than the number of ranks left none for this one
                return torch.zeros((), device=self.device, requires_grad=True)
            amp = amp_dtype(self.args)  # --bf16: autocast the forward pass and loss; backward runs outside it
            with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
                embeds = self.model.embed_inputs(batch)
                output = self.model.forward_embedded(task, embeds, batch)
                loss = self.model.loss(task, output, batch).float()
                if self.smart is not None:
                    loss = loss + self.smart(self.model, task, embeds, batch, output, noise=noise.get(task))
            if weights[task] != 1:  # torchrun, uneven shares: averaging the ranks' gradients gives the global mean's
                loss = loss * weights[task]
            return loss

        ctx = StepContext(self.tasks, task_loss, self.optimizer_step, self.shared_params, self.model, self.sync_grads)
        losses = self.combiner.step(ctx)
        losses, self._stop_agreed = distributed.average_losses(losses, self.stop_requested)
        if self.smart is not None:
            self.smart.after_step(self.model)  # Bregman proximal point: move the EMA copy θ̃ toward θ
        self.scheduler.step()
        return losses

    def train(self) -> dict[str, float]:
        """Train from ``global_step`` (0, or where a restored `last` checkpoint stopped) to the end."""
        args, spe = self.args, self.steps_per_epoch
        self.model.train()
        log_every = max(1, args.logging_steps)
        if self._rng_to_restore is not None:  # the resumed run draws the random numbers the killed one would have
            set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        with stop_on_sigint(self):
            for epoch in range(self.global_step // spe, args.num_train_epochs):
                first = self.global_step - epoch * spe  # > 0 when resuming in the middle of this epoch
                if first == 0:
                    self.running = {t: [] for t in self.tasks}
                    self.epoch_examples, self.epoch_seconds = 0, 0.0
                t0 = time.perf_counter() - self.epoch_seconds
                bar = tqdm(range(first, spe), initial=first, total=spe, desc=f"epoch {epoch + 1}/{args.num_train_epochs}",
                           disable=None if distributed.is_main() else True)
                for s in bar:
                    step = epoch * spe + s
                    losses = self.train_step(step)
                    self.global_step = step + 1
                    self.epoch_examples += sum(len(self.streams[t].indices(step)) for t in self.tasks)
                    for t, l in losses.items():
                        self.running[t].append(l)
                    if (step + 1) % log_every == 0 or s == spe - 1:
                        avg = {f"loss_{t}": float(np.mean(v)) for t, v in self.running.items() if v}
                        bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in avg.items()})
                        self.metrics.write(step=step + 1, epoch=epoch + 1, **avg, lr=self.scheduler.get_last_lr()[0],
                                           examples_per_s=self.epoch_examples / (time.perf_counter() - t0),
                                           bad_steps=self.bad_steps)
                        self.running = {t: [] for t in self.tasks}
                    self.epoch_seconds = time.perf_counter() - t0
                    self._test_hooks()
                    if s < spe - 1:  # the epoch's last step is saved after its evaluation, below
                        if self.should_stop() or (args.save_steps and self.global_step % args.save_steps == 0):
                            self.save_last()
                        if self.should_stop():
                            raise self._interrupted()
                diff = distributed.replica_difference(self.model)
                if diff:
                    log.warning("epoch %d: the ranks' parameters differ (fingerprints by up to %.3g); their updates "
                                "should be identical", epoch + 1, diff)
                scores = evaluate(self.model, self.dev, args, self.device, self.pad_id)
                improved = scores["overall"] > self.best_score
                self.metrics.write(epoch=epoch + 1, step=self.global_step, dev=scores, best=improved,
                                   epoch_seconds=time.perf_counter() - t0)
                log.info("epoch %d dev: %s%s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                         " (best)" if improved else "")
                if improved:
                    self.best_score, self.best_scores = scores["overall"], scores
                    self.best_epoch, self.best_step = epoch + 1, self.global_step
                    self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                # `last` first: it records this best, and a resume rewrites `best` from it if a kill came between.
                self.save_last()
                if improved:
                    self.save_best()
                if self.should_stop():
                    raise self._interrupted()
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.best_scores

    def should_stop(self) -> bool:
        """Ctrl-C seen: in one process at once; under torchrun as all ranks agreed after the last step, so that they
        save and stop together."""
        return self.stop_requested if distributed.world_size() == 1 else self._stop_agreed

    # ------------------------------------------------------------------ resumable state (output_dir/last)
    def save_last(self) -> None:
        """Write everything needed to continue bit-identically to ``out_dir/last`` (swapped in whole).

        Skipped while non-finite steps are being skipped, so `last` always follows a good update.
        """
        if self.bad_in_a_row:
            return
        best = None
        if self.best_state is not None:
            best = {"score": self.best_score, "epoch": self.best_epoch, "step": self.best_step, "dev": self.best_scores}
        state = {
            "global_step": self.global_step, "epochs_done": self.global_step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "best": best,
            "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row, "running": self.running,
            "epoch_examples": self.epoch_examples, "epoch_seconds": self.epoch_seconds,
            "world_size": distributed.world_size(),
        }
        extra = {"scheduler": self.scheduler.state_dict(), "rng": rng_state(),
                 "combiner": component_state(self.combiner), "smart": component_state(self.smart)}
        if distributed.world_size() > 1:  # each rank's own random state (dropout), for a bit-identical resume
            extra["rng_per_rank"] = distributed.all_gather_object(extra["rng"])
            if callable(getattr(self.optimizer, "consolidate_state_dict", None)):
                # An optimizer whose state is sharded over the ranks (M-FAC's window, torch's
                # ZeroRedundancyOptimizer) gathers it on rank 0, whose state_dict() then holds all of it.
                self.optimizer.consolidate_state_dict(to=0)
        if not distributed.is_main():  # under torchrun only rank 0 writes; every rank holds the same state
            self.last_saved_step = self.global_step
            return

        def write(d: Path) -> None:
            self.model.save(d, self.tokenizer)
            atomic_save(d / "optimizer.pt", lambda p: torch.save(self.optimizer.state_dict(), p))
            atomic_save(d / "training_state.pt", lambda p: torch.save(extra, p))
            atomic_write_text(d / "trainer_state.json", json.dumps(state, indent=2) + "\n")

        replace_dir(self.out_dir / "last", write)
        self.last_saved_step = self.global_step

    def save_best(self) -> None:
        """Write the best epoch's weights (the model's current ones) to ``out_dir/best``, tagged with its step."""
        if not distributed.is_main():
            return
        tag = {"epoch": self.best_epoch, "step": self.best_step, "dev": self.best_scores}

        def write(d: Path) -> None:
            self.model.save(d, self.tokenizer)
            atomic_write_text(d / "best.json", json.dumps(tag, indent=2) + "\n")

        replace_dir(self.out_dir / "best", write)

    def restore(self, directory: Path) -> None:
        """Continue from a `last` checkpoint: weights, optimizer, scheduler, RNGs (set when train() starts, after
        everything that draws random numbers while building the run), position, best epoch, counters."""
        try:
            state = json.loads((directory / "trainer_state.json").read_text(encoding="utf-8"))
            model_state = load_weights(directory / "model.safetensors", self.device)
            optim_state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
            extra = torch.load(directory / "training_state.pt", map_location="cpu", weights_only=True)
        except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as e:
            raise ValueError(f"--resume: cannot read {directory}: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
        if state.get("world_size", 1) != distributed.world_size():
            raise ValueError(f"--resume: {directory} was written by a run of {state.get('world_size', 1)} process(es), "
                             f"this one has {distributed.world_size()}; resume with the same torchrun --nnodes and "
                             "--nproc_per_node (the global batch depends on them)")
        if (state["steps_per_epoch"], state["total_steps"]) != (self.steps_per_epoch, self.total_steps):
            raise ValueError(f"--resume: {directory} has {state['steps_per_epoch']} steps/epoch and "
                             f"{state['total_steps']} in all, this run {self.steps_per_epoch} and {self.total_steps}; "
                             "resume with the same data and flags")
        self.model.load_state_dict(model_state)
        self.optimizer.load_state_dict(optim_state)
        self.scheduler.load_state_dict(extra["scheduler"])
        load_component_state(self.combiner, extra["combiner"])
        load_component_state(self.smart, extra["smart"])
        per_rank = extra.get("rng_per_rank")  # torchrun: each rank continues its own random stream
        self._rng_to_restore = per_rank[distributed.rank()] if per_rank else extra["rng"]
        self.global_step = self.last_saved_step = state["global_step"]
        self.bad_steps, self.bad_in_a_row = state["bad_steps"], state["bad_in_a_row"]
        self.running = {t: list(state["running"].get(t, [])) for t in self.tasks}
        self.epoch_examples, self.epoch_seconds = state["epoch_examples"], state["epoch_seconds"]
        best = state["best"]
        if best is None:
            return
        self.best_score, self.best_epoch, self.best_step, self.best_scores = best["score"], best["epoch"], best["step"], best["dev"]
        best_dir = published_dir(self.out_dir / "best")
        tag = _read_json(best_dir / "best.json") if best_dir is not None else None
        if best["step"] == self.global_step:  # the best epoch is the one `last` holds
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            if tag is None or tag.get("step") != best["step"]:  # killed between writing `last` and `best`
                self.save_best()
        elif tag is not None and tag.get("step") == best["step"]:
            self.best_state = load_weights(best_dir / "model.safetensors", self.device)
        else:
            raise ValueError(f"--resume: {self.out_dir / 'best'} does not hold the best epoch ({best['epoch']}) "
                             f"recorded in {directory}; start over with --overwrite_output_dir")

    def _interrupted(self) -> "TrainingInterrupted":
        return TrainingInterrupted(f"stopped after step {self.global_step}; {self.out_dir / 'last'} holds step "
                                   f"{self.last_saved_step}: continue with the same flags and --resume")

    def _test_hooks(self) -> None:
        """Fault injection for tests/test_resume.py: die like a SIGKILLed process at a chosen step (after the
        step, before any checkpoint of it), or slow steps down so a test can interrupt a run in flight."""
        if self._kill_at_step == str(self.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._step_delay:
            time.sleep(self._step_delay)


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: raised after `last` was written."""


@contextlib.contextmanager
def stop_on_sigint(trainer: Trainer):
    """The first Ctrl-C (SIGINT) asks the trainer to stop after the current step and save `last`; a second one
    stops at once (KeyboardInterrupt)."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers live in the main thread
        yield
        return

    def handler(signum, frame):
        if trainer.stop_requested:
            raise KeyboardInterrupt
        trainer.stop_requested = True
        log.warning("interrupted: stopping after this step, once %s is saved (Ctrl-C again to stop at once)",
                    trainer.out_dir / "last")

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def rng_state() -> dict:
    """Every global random number generator: Python, NumPy, torch CPU and CUDA (plain types and tensors, so
    the file loads with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def component_state(obj) -> dict:
    """The resumable state of a combiner or regularizer: its torch.Generators (e.g. PCGrad's task order) and
    its ``state_dict()`` if it has one."""
    if obj is None:
        return {}
    out = {"generators": {k: g.get_state() for k, g in vars(obj).items() if isinstance(g, torch.Generator)}}
    if callable(getattr(obj, "state_dict", None)):
        out["state"] = obj.state_dict()
    return out


def load_component_state(obj, state: dict) -> None:
    if obj is None or not state:
        return
    for k, g_state in state.get("generators", {}).items():
        getattr(obj, k).set_state(g_state)
    if "state" in state:
        obj.load_state_dict(state["state"])


def _read_json(path: Path):
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


class NonFiniteError(RuntimeError):
    pass


def save_checkpoint(model: MultitaskBert, directory: Path, tokenizer) -> None:
    """Write a checkpoint directory beside the old one, then swap, so a crash never leaves a half-written one."""
    replace_dir(directory, lambda d: model.save(d, tokenizer))


# What a run writes in --output_dir (--overwrite_output_dir removes these, and nothing else, before starting).
RUN_OUTPUTS = ("args.json", "metrics.jsonl", "results.json", "last", "best", "predictions", "tensorboard")
# Flags that may differ between a run and its --resume (they do not change the trained weights).
RESUME_MAY_CHANGE = {"resume", "overwrite_output_dir", "output_dir", "save_steps", "logging_steps", "device",
                     "per_device_eval_batch_size", "max_bad_steps", "report_to", "config"}


def check_output_dir(args: Namespace) -> Path | None:
    """Apply the --output_dir rules before any work is done; return the `last` checkpoint to resume from.

    A finished run (results.json) or an unfinished one (args.json, metrics.jsonl or last/ but no results) is
    refused unless --overwrite_output_dir (start over) or --resume (continue; a run killed before its first
    checkpoint starts from step 0, which is the same thing) is given.
    """
    out = Path(args.output_dir)
    last = published_dir(out / "last")
    if getattr(args, "resume", False):
        if last is None and ((out / "results.json").is_file() or published_dir(out / "best") is not None):
            raise ValueError(f"--resume: {out} has no last/ checkpoint to continue from (deleted?); pass "
                             "--overwrite_output_dir to start over")
        if last is not None or (out / "args.json").is_file():
            _check_same_settings(args, out / "args.json")
        return last
    if args.overwrite_output_dir:
        return None
    if (out / "results.json").is_file():
        raise ValueError(f"--output_dir {out} holds a finished run; pass --overwrite_output_dir to replace it")
    if last is not None or (out / "args.json").exists() or (out / "metrics.jsonl").exists():
        raise ValueError(f"--output_dir {out} holds an unfinished run; pass --resume to continue it or "
                         "--overwrite_output_dir to start over")
    return None


def _check_same_settings(args: Namespace, saved_args: Path) -> None:
    saved = _read_json(saved_args)
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: cannot read {saved_args}; start over with --overwrite_output_dir")
    now = json.loads(json.dumps(vars(args), default=str))
    # Flags absent from the saved file came with a newer minbert; their defaults cannot have been used.
    diffs = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if diffs:
        shown = ", ".join(f"--{k} {saved[k]} (now {now[k]})" for k in diffs[:3])
        raise ValueError(f"--resume: {saved_args} was written with other settings: {shown}; resume with the same flags")


def prepare_output_dir(args: Namespace) -> Path:
    """Create --output_dir (after :func:`check_output_dir`); clear what killed writers left behind, and on
    --overwrite_output_dir the previous run's outputs."""
    out = Path(args.output_dir)
    check_output_dir(args)
    out.mkdir(parents=True, exist_ok=True)
    if args.overwrite_output_dir and not getattr(args, "resume", False):
        keep = Path(args.checkpoint).resolve() if getattr(args, "checkpoint", None) else None  # --predict_only's
        for name in RUN_OUTPUTS:
            for path in (out / name, out / f"{name}.old", out / f"{name}.partial"):
                if keep is not None and (path.resolve() == keep or path.resolve() in keep.parents):
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    for directory in (out, out / "predictions"):
        remove_stale_temps(directory)
    return out


class _NoMetrics:
    """The metrics log of ranks other than 0 under torchrun: they write nothing."""

    def write(self, **record) -> None:
        pass

    def close(self) -> None:
        pass


def run(args: Namespace) -> dict[str, float]:
    """The main job: train (unless --predict_only), write checkpoints, predictions and scores.

    Under torchrun (WORLD_SIZE > 1) every process runs it: data parallel over the ranks, rank 0 alone writes
    (minbert.distributed, docs/distributed.md)."""
    device = distributed.init(resolve_device(args.device))  # torchrun: join the process group; cuda:LOCAL_RANK
    args.bf16 = resolve_bf16(getattr(args, "bf16", "off"), device, getattr(args, "smart", False))  # auto -> on/off
    resume_from = distributed.on_main(check_output_dir, args)  # a taken --output_dir is refused before any work
    set_seed(args.seed)
    source = args.checkpoint if args.predict_only else args.model_name_or_path
    tokenizer = load_tokenizer(source, args.max_seq_length)
    pad_id = pad_token_id(tokenizer)
    splits = ("dev", "test") if args.predict_only else SPLITS
    data = load_datasets(args, tokenizer, splits)
    if args.predict_only:
        model = MultitaskBert.load(args.checkpoint)
        missing = [t for t in args.tasks if t not in model.heads]
        if missing:
            raise ValueError(f"--checkpoint {args.checkpoint} has no head for task(s) {', '.join(missing)}")
    else:
        model = build_model(args)
    model.to(device)
    distributed.broadcast_model(model)  # torchrun: every rank starts from rank 0's weights
    if getattr(args, "torch_compile", False):
        compile_encoder(model, device)

    t_start = time.perf_counter()
    tensors = {key: tensorize(d, tokenizer, model.config.encoding(key[0])) for key, d in data.items()}
    trainer = None
    if not args.predict_only:  # built before the output dir exists: an optimizer that cannot fit leaves nothing behind
        train = {t: tensors[(t, "train")] for t in args.tasks}
        dev = {t: tensors[(t, "dev")] for t in args.tasks}
        trainer = Trainer(args, model, train, dev, device, tokenizer, Path(args.output_dir), metrics=None)
    out = distributed.on_main(prepare_output_dir, args)
    if resume_from is None and distributed.is_main():  # a resumed run keeps the args.json it was checked against
        atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str) + "\n")
    metrics = (MetricsLog(out / "metrics.jsonl", report_to=getattr(args, "report_to", "none"))
               if distributed.is_main() else _NoMetrics())
    try:
        if trainer is not None:
            trainer.metrics = metrics
            if resume_from is not None:
                trainer.restore(resume_from)
                metrics.write(resumed_from_step=trainer.global_step, epoch=trainer.global_step // trainer.steps_per_epoch)
                log.info("resuming from %s: step %d of %d", resume_from, trainer.global_step, trainer.total_steps)
            log.info("training %s on %s: %d steps/epoch x %d epochs, combiner %s, optimizer %s",
                     args.model_name_or_path, ",".join(args.tasks), trainer.steps_per_epoch, args.num_train_epochs,
                     args.combiner, args.optim)
            trainer.train()
        pred_dir = out / "predictions"
        scores = write_all_predictions(model, tensors, pred_dir, args, device, pad_id)
        wall = time.perf_counter() - t_start
        metrics.write(final=True, dev=scores, wall_seconds=wall)
    finally:
        metrics.close()
    results = {"dev": scores, "wall_seconds": round(wall, 1), "bf16": args.bf16, "predictions": str(pred_dir),
               "checkpoint": str(out / "best") if not args.predict_only else args.checkpoint}
    if not distributed.is_main():
        return scores
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    print_scores(f"dev scores ({'best epoch' if not args.predict_only else 'checkpoint'}); predictions in {pred_dir}", scores)
    return scores
