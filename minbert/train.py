"""The training loop: one loop for every multitask strategy (the combiner decides how losses become updates).

Schedule (CS224N report §5.3.1 and §4.5): an epoch has ``iterations_multiplier`` x (smallest task's number of
batches) steps; each step draws the next batch of every task's endless stream and hands the per-task losses to
the combiner. Dev evaluation after each epoch; the best epoch by overall score is kept and used for the
prediction files.
"""
from __future__ import annotations

import json
import logging
import math
import os
import random
import shutil
import time
from argparse import Namespace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .combiners import StepContext, build_combiner
from .data import SPLITS, TASKS, TaskData, TaskStream, TaskTensors, load_task, tensorize
from .io import atomic_write_text
from .metrics import overall_score, task_score
from .model import BertModel
from .multitask import MultitaskBert, MultitaskConfig
from .predict import predict_task, prediction_path, write_predictions
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
    """metrics.jsonl in the output directory: one JSON object per line, flushed as written."""

    def __init__(self, path: Path):
        self.path = path
        self._f = open(path, "a", encoding="utf-8")

    def write(self, **record) -> None:
        self._f.write(json.dumps(record) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()


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
    return out


def build_model(args: Namespace) -> MultitaskBert:
    encoder = BertModel.from_pretrained(args.model_name_or_path)
    config = MultitaskConfig(tasks=list(args.tasks), pooling=args.pooling, sts_head=args.sts_head)
    return MultitaskBert(encoder, config)


def evaluate(model: MultitaskBert, dev: dict[str, TaskTensors], args: Namespace, device: torch.device, pad_id: int) -> dict[str, float]:
    scores = {}
    for task, data in dev.items():
        preds = predict_task(model, data, args.per_device_eval_batch_size, device, pad_id, desc=f"dev {task}")
        scores[task] = task_score(task, preds.numpy(), data.labels.numpy())
    scores["overall"] = overall_score(scores)
    return scores


def write_all_predictions(model, tensors: dict[tuple[str, str], TaskTensors], out_dir: Path, args, device, pad_id) -> dict[str, float]:
    """Write the six CS224N prediction files (for the tasks trained); return dev scores."""
    scores = {}
    for (task, split), data in tensors.items():
        if split == "train":
            continue
        preds = predict_task(model, data, args.per_device_eval_batch_size, device, pad_id, desc=f"{split} {task}")
        write_predictions(prediction_path(out_dir, task, split), TASKS[task], data.ids, preds.tolist())
        if split == "dev" and data.labels is not None:
            scores[task] = task_score(task, preds.numpy(), data.labels.numpy())
    if scores:
        scores["overall"] = overall_score(scores)
    return scores


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (BERT's convention)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(args: Namespace, model: torch.nn.Module) -> torch.optim.Optimizer:
    name = args.optim.lower()
    groups = param_groups(model, args.weight_decay)
    if name == "adamw":
        if args.optim_args:
            raise ValueError("--optim_args is only used with --optim mfac")
        # The fused kernel is one pass over each tensor: ~50x faster than the default per-tensor loop on CPU.
        return torch.optim.AdamW(groups, lr=args.learning_rate, weight_decay=args.weight_decay, fused=True)
    from .optim import build_optimizer as build_named, parse_optim_args

    return build_named(name, groups, args.learning_rate, args.weight_decay, parse_optim_args(args.optim_args or ""))


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
                 device: torch.device, tokenizer, out_dir: Path, metrics: MetricsLog):
        self.args, self.model, self.dev, self.device = args, model, dev, device
        self.tokenizer, self.pad_id = tokenizer, pad_token_id(tokenizer)
        self.out_dir, self.metrics = out_dir, metrics
        self.tasks = list(args.tasks)
        self.streams = {t: TaskStream(train[t], args.per_device_train_batch_size, args.seed, i) for i, t in enumerate(self.tasks)}
        self.steps_per_epoch = args.iterations_multiplier * min(s.batches_per_pass for s in self.streams.values())
        if args.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, args.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * args.num_train_epochs
        self.optimizer = build_optimizer(args, model)
        self.scheduler = linear_schedule(self.optimizer, int(args.warmup_ratio * self.total_steps), self.total_steps)
        self.combiner = build_combiner(args.combiner)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shared_params = model.shared_parameters()
        self.bad_steps = 0  # non-finite steps skipped in total
        self.bad_in_a_row = 0
        self.best_score = -math.inf
        self.best_state: dict[str, torch.Tensor] | None = None
        self.smart = None
        if getattr(args, "smart", False):
            from .smart import SmartRegularizer

            self.smart = SmartRegularizer.from_args(args)

    def optimizer_step(self) -> bool:
        """Clip, skip a step whose gradient is not finite (counted), else update; grads are zeroed either way."""
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

    def train_step(self, step: int) -> dict[str, float]:
        batches = {t: {k: v.to(self.device, non_blocking=True) for k, v in self.streams[t].batch(step, self.pad_id).items()} for t in self.tasks}

        def task_loss(task: str) -> torch.Tensor:
            batch = batches[task]
            embeds = self.model.embed_inputs(batch)
            output = self.model.forward_embedded(task, embeds, batch)
            loss = self.model.loss(task, output, batch)
            if self.smart is not None:
                loss = loss + self.smart(self.model, task, embeds, batch, output)
            return loss

        ctx = StepContext(self.tasks, task_loss, self.optimizer_step, self.shared_params, self.model)
        losses = self.combiner.step(ctx)
        self.scheduler.step()
        return losses

    def train(self) -> dict[str, float]:
        args = self.args
        self.model.train()
        log_every = max(1, args.logging_steps)
        best_scores: dict[str, float] = {}
        for epoch in range(args.num_train_epochs):
            t0, examples = time.perf_counter(), 0
            running: dict[str, list[float]] = {t: [] for t in self.tasks}
            bar = tqdm(range(self.steps_per_epoch), desc=f"epoch {epoch + 1}/{args.num_train_epochs}", disable=None)
            for s in bar:
                step = epoch * self.steps_per_epoch + s
                losses = self.train_step(step)
                examples += sum(len(self.streams[t].indices(step)) for t in self.tasks)
                for t, l in losses.items():
                    running[t].append(l)
                if (step + 1) % log_every == 0 or s == self.steps_per_epoch - 1:
                    avg = {f"loss_{t}": float(np.mean(v)) for t, v in running.items() if v}
                    bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in avg.items()})
                    self.metrics.write(step=step + 1, epoch=epoch + 1, **avg, lr=self.scheduler.get_last_lr()[0],
                                       examples_per_s=examples / (time.perf_counter() - t0), bad_steps=self.bad_steps)
                    running = {t: [] for t in self.tasks}
            scores = evaluate(self.model, self.dev, args, self.device, self.pad_id)
            improved = scores["overall"] > self.best_score
            self.metrics.write(epoch=epoch + 1, step=(epoch + 1) * self.steps_per_epoch, dev=scores, best=improved,
                               epoch_seconds=time.perf_counter() - t0)
            log.info("epoch %d dev: %s%s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                     " (best)" if improved else "")
            if improved:
                self.best_score, best_scores = scores["overall"], scores
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
                save_checkpoint(self.model, self.out_dir / "best", self.tokenizer)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return best_scores


class NonFiniteError(RuntimeError):
    pass


def save_checkpoint(model: MultitaskBert, directory: Path, tokenizer) -> None:
    """Write a checkpoint directory beside the old one, then swap, so a crash never leaves a half-written best."""
    partial = directory.with_name(directory.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.save(partial, tokenizer)
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(partial, directory)
    shutil.rmtree(old, ignore_errors=True)


def prepare_output_dir(args: Namespace) -> Path:
    out = Path(args.output_dir)
    if (out / "results.json").exists() and not args.overwrite_output_dir:
        raise ValueError(f"--output_dir {out} holds a finished run; pass --overwrite_output_dir to replace it")
    out.mkdir(parents=True, exist_ok=True)
    return out


def run(args: Namespace) -> dict[str, float]:
    """The main job: train (unless --predict_only), write checkpoints, predictions and scores."""
    set_seed(args.seed)
    device = resolve_device(args.device)
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

    t_start = time.perf_counter()
    tensors = {key: tensorize(d, tokenizer) for key, d in data.items()}
    out = prepare_output_dir(args)
    atomic_write_text(out / "args.json", json.dumps(vars(args), indent=2, default=str) + "\n")
    metrics = MetricsLog(out / "metrics.jsonl")
    try:
        if not args.predict_only:
            train = {t: tensors[(t, "train")] for t in args.tasks}
            dev = {t: tensors[(t, "dev")] for t in args.tasks}
            trainer = Trainer(args, model, train, dev, device, tokenizer, out, metrics)
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
    results = {"dev": scores, "wall_seconds": round(wall, 1), "predictions": str(pred_dir),
               "checkpoint": str(out / "best") if not args.predict_only else args.checkpoint}
    atomic_write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    print_scores(f"dev scores ({'best epoch' if not args.predict_only else 'checkpoint'}); predictions in {pred_dir}", scores)
    return scores
