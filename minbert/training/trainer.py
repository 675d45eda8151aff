"""The training loop: one loop for every multitask strategy (the combiner decides how losses become updates).

Schedule (CS224N report §5.3.1 and §4.5): an epoch has ``iterations_multiplier`` x (smallest task's number of
batches) steps; each step draws the next batch of every task's endless stream and hands the per-task losses to
the combiner. Dev evaluation after each epoch; the best epoch by overall score is kept and used for the
prediction files. One step, from the batch to the optimizer, is drawn in docs/architecture.md.
"""
from __future__ import annotations

import contextlib
import logging
import math
import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minbert.methods.combiners import StepContext
from minbert.methods.optim.build import build_run_optimizer, linear_schedule
from minbert.methods.user_combiner import checked_step
from minbert.model.multitask import MultitaskBert
from minbert.model.tokenizer import pad_token_id
from minbert.tasks.data import TaskStream, TaskTensors
from minbert.tasks.metrics import overall_score, task_score
from minbert.tasks.user_tasks import run_tasks
from minbert.training import checkpoint_state, distributed
from minbert.training.distributed import predict_task  # under torchrun each rank predicts a share; alone, predict.predict_task
from minbert.training.metrics_log import MetricsLog
from minbert.training.progress import ProgressLog
from minbert.training.run_config import RunConfig
from minbert.training.trainer_state import ResumableState

log = logging.getLogger("minbert")


class NonFiniteError(RuntimeError):
    """The run went wrong: too many non-finite steps in a row, or non-finite weights, predictions or scores."""


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training: raised after `last` was written."""


def evaluate(model: MultitaskBert, dev: dict[str, TaskTensors], batch_size: int, amp: torch.dtype | None,
             device: torch.device, pad_id: int, predictions: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Dev scores of every task, and the overall score (``amp``: the autocast dtype of --bf16, or None);
    ``predictions``, if given, receives each task's predictions (the run writes the best epoch's as its dev
    prediction files instead of predicting again)."""
    scores = {}
    for task, data in dev.items():
        preds = predict_task(model, data, batch_size, device, pad_id, desc=f"dev {task}", amp_dtype=amp)
        if not bool(torch.isfinite(preds).all()):
            raise NonFiniteError(f"dev {task}: the model predicts non-finite values (the run diverged); try a "
                                 "lower --learning_rate")
        scores[task] = task_score(task, preds.numpy(), data.labels.numpy())
        if predictions is not None:
            predictions[task] = preds
    scores["overall"] = overall_score(scores)
    return scores


def check_finite_weights(model: torch.nn.Module, when: str) -> None:
    """Raise NonFiniteError if a weight is NaN or infinite: a diverged run must not write predictions."""
    bad = [name for name, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        raise NonFiniteError(f"{when}: {len(bad)} weight tensor(s) are not finite ({bad[0]}...): the run diverged; "
                             "try a lower --learning_rate")


class Trainer(ResumableState):
    """The training loop; its resumable state (state_dict, load_state_dict) and checkpoints (save_last,
    save_best, restore) are declared in minbert/training/trainer_state.py."""

    def __init__(self, config: RunConfig, model: MultitaskBert, train: dict[str, TaskTensors],
                 dev: dict[str, TaskTensors], device: torch.device, tokenizer, out_dir: Path,
                 metrics: MetricsLog | None):
        """``config``: the run's RunConfig; each part of the loop reads its own group of it: the loop the training
        group, the optimizer its group, the combiner and SMART theirs. The Trainer keeps none of it whole."""
        self.training, self.save_steps = config.training, config.output.save_steps
        self.model, self.dev, self.device = model, dev, device
        self.tokenizer, self.pad_id = tokenizer, pad_token_id(tokenizer)
        self.out_dir, self.metrics = out_dir, metrics
        self.tasks = run_tasks(config.data)  # --tasks, then the tasks of --task_spec
        t, multitask = config.training, config.multitask
        # Under torchrun the streams yield the global batch (N ranks x the per-device batch), the same on every rank;
        # each rank trains on its share (train_step), so all ranks run the same steps (docs/distributed.md).
        global_batch = t.per_device_train_batch_size * distributed.world_size()
        self.streams = {task: TaskStream(train[task], global_batch, t.seed, i) for i, task in enumerate(self.tasks)}
        self.steps_per_epoch = multitask.iterations_multiplier * min(s.batches_per_pass for s in self.streams.values())
        if t.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, t.max_steps_per_epoch)
        self.total_steps = self.steps_per_epoch * t.num_train_epochs
        self.optimizer = build_run_optimizer(config.optimizer, model, t.learning_rate, t.weight_decay,
                                             t.head_learning_rate)
        self.scheduler = linear_schedule(self.optimizer, int(t.warmup_ratio * self.total_steps), self.total_steps)
        self.combiner = multitask.take_combiner(t.seed)  # the instance the settings check built, if it ran
        self.combiner_step = self.combiner.step if ":" not in multitask.combiner else checked_step(
            self.combiner, multitask.combiner, (NonFiniteError, MemoryError))  # a user's: one line if it misbehaves
        self.amp = t.amp_dtype(multitask.smart_settings.ball)  # --bf16's autocast dtype, or None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.shared_params = model.shared_parameters()
        self.bad_steps = 0  # non-finite steps skipped in total
        self.bad_in_a_row = 0
        self.best_score = -math.inf
        self.best_scores: dict[str, float] = {}
        self.last_scores: dict[str, float] = {}  # the last evaluated epoch's (results.json's dev_last)
        self.best_epoch = self.best_step = 0
        self.best_state: dict[str, torch.Tensor] | None = None
        # The best epoch's dev predictions, made by exactly the weights of best_state (None after a resume that
        # restored an earlier best: the run then predicts dev again).
        self.best_dev_predictions: dict[str, torch.Tensor] | None = None
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
        self.progress: ProgressLog | None = None  # made when training starts (its clock times this process's steps)
        self.smart = None
        if multitask.smart_settings.smart:
            from minbert.methods.smart import SmartRegularizer

            self.smart = SmartRegularizer.from_settings(multitask.smart_settings)

    # ------------------------------------------------------------------------------------------ one step
    def batches(self, step: int):
        """Step ``step``'s batch of every task (this rank's share of it), the weight of each task's loss, and
        SMART's shared noise under torchrun. Every rank draws the same global batch and keeps its share."""
        batches, weights, noise = {}, {}, {}
        for t in self.tasks:
            data, indices = self.streams[t].data, self.streams[t].indices(step)
            mine = distributed.shard(indices)
            batches[t] = {k: v.to(self.device, non_blocking=True) for k, v in data.batch(mine, self.pad_id).items()} if mine else None
            weights[t] = distributed.loss_weight(len(mine), len(indices))
            if self.smart is not None and distributed.world_size() > 1:
                noise[t] = distributed.batch_noise(len(indices), [max(len(c.ids[i]) for i in indices) for c in data.columns])
        return batches, weights, noise

    def task_loss(self, task: str, batch, weight: float, noise=None) -> torch.Tensor:
        """One task's loss on its batch: forward (autocast with --bf16), the head's loss, SMART's term."""
        if batch is None:  # torchrun: a last batch smaller than the number of ranks left none for this one
            return torch.zeros((), device=self.device, requires_grad=True)
        amp = self.amp  # --bf16: autocast the forward pass and loss; backward runs outside it
        with torch.autocast(self.device.type, dtype=amp, enabled=amp is not None):
            embeds = self.model.embed_inputs(batch)
            output = self.model.forward_embedded(task, embeds, batch)
            loss = self.model.loss(task, output, batch).float()
            if self.smart is not None:
                loss = loss + self.smart(self.model, task, embeds, batch, output, noise=noise)
        if weight != 1:  # torchrun, uneven shares: averaging the ranks' gradients gives the global mean's
            loss = loss * weight
        return loss

    def train_step(self, step: int) -> dict[str, float]:
        """One optimizer step (or several: the combiner decides) on step ``step``'s batches; the task losses."""
        batches, weights, noise = self.batches(step)

        def task_loss(task: str) -> torch.Tensor:
            return self.task_loss(task, batches[task], weights[task], noise.get(task))

        ctx = StepContext(self.tasks, task_loss, self.optimizer_step, self.shared_params, self.model, self.sync_grads,
                          distributed.mean_over_ranks)
        losses = self.combiner_step(ctx)
        losses, self._stop_agreed = distributed.average_losses(losses, self.stop_requested)
        if self.smart is not None:
            self.smart.after_step(self.model)  # Bregman proximal point: move the EMA copy θ̃ toward θ
        self.scheduler.step()
        return losses

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
            if self.training.max_grad_norm:
                torch.nn.utils.clip_grads_with_norm_(self.params, self.training.max_grad_norm, norm)
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:
            self.bad_steps += 1
            self.bad_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        if self.bad_in_a_row > self.training.max_bad_steps:
            raise NonFiniteError(
                f"{self.bad_in_a_row} steps in a row had a non-finite loss or gradient (--max_bad_steps "
                f"{self.training.max_bad_steps}); stopping. Try a lower --learning_rate or --max_grad_norm 1.0"
            )
        return ok

    def sync_grads(self, params: list[torch.nn.Parameter]) -> None:
        """StepContext.sync_grads: average these gradients over the ranks now (a combiner needs a task's gradient
        of the global batch, e.g. PCGrad before its projection); optimizer_step then leaves them alone."""
        if distributed.world_size() > 1:
            distributed.all_reduce_grads(params)
            self._averaged.update(id(p) for p in params)

    # ------------------------------------------------------------------------------------------ the epochs
    def train(self) -> dict[str, float]:
        """Train from ``global_step`` (0, or where a restored `last` checkpoint stopped) to the end."""
        self.model.train()
        if self._rng_to_restore is not None:  # the resumed run draws the random numbers the killed one would have
            checkpoint_state.set_rng_state(self._rng_to_restore)
            self._rng_to_restore = None
        with stop_on_sigint(self):
            for epoch in range(self.global_step // self.steps_per_epoch, self.training.num_train_epochs):
                t0 = self.train_epoch(epoch)
                self.end_epoch(epoch, t0)
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)
        return self.best_scores

    def train_epoch(self, epoch: int) -> float:
        """The steps of one epoch (from where a resumed run stopped); returns the epoch's start time."""
        spe = self.steps_per_epoch
        first = self.global_step - epoch * spe  # > 0 when resuming in the middle of this epoch
        if first == 0:
            self.running = {t: [] for t in self.tasks}
            self.epoch_examples, self.epoch_seconds = 0, 0.0
        t0 = time.perf_counter() - self.epoch_seconds
        bar = tqdm(range(first, spe), initial=first, total=spe, desc=f"epoch {epoch + 1}/{self.training.num_train_epochs}",
                   disable=None if distributed.is_main() else True)
        log_every = max(1, self.training.logging_steps)
        if self.progress is None:  # a log file gets a progress line where a terminal gets tqdm's bar
            self.progress = ProgressLog(self.total_steps, self.training.num_train_epochs, start_step=self.global_step,
                                        enabled=None if distributed.is_main() else False)
        for s in bar:
            step = epoch * spe + s
            losses = self.train_step(step)
            self.global_step = step + 1
            self.epoch_examples += sum(len(self.streams[t].indices(step)) for t in self.tasks)
            for t, loss in losses.items():
                self.running[t].append(loss)
            if (step + 1) % log_every == 0 or s == spe - 1:
                self.log_progress(epoch, t0, bar)
            self.epoch_seconds = time.perf_counter() - t0
            self._test_hooks()
            if s < spe - 1:  # the epoch's last step is saved after its evaluation (end_epoch)
                if self.should_stop() or (self.save_steps and self.global_step % self.save_steps == 0):
                    self.save_last()
                if self.should_stop():
                    raise self._interrupted()
        return t0

    def log_progress(self, epoch: int, t0: float, bar) -> None:
        """Every --logging_steps steps and at an epoch's end: the mean losses since the last record (to
        metrics.jsonl and the progress bar), the learning rate, throughput and the skipped-step count."""
        avg = {f"loss_{t}": float(np.mean(v)) for t, v in self.running.items() if v}
        bar.set_postfix({k[5:]: f"{v:.3f}" for k, v in avg.items()})
        examples_per_s = self.epoch_examples / (time.perf_counter() - t0)
        # SMART's term (lambda * R_s) of each task at the last step, so a user can see the regularizer is alive
        smart = {f"smart_{t}": v for t, v in self.smart.last_values.items()} if self.smart is not None else {}
        self.metrics.write(step=self.global_step, epoch=epoch + 1, **avg, **smart, lr=self.scheduler.get_last_lr()[0],
                           examples_per_s=examples_per_s, bad_steps=self.bad_steps)
        self.progress.log(epoch + 1, self.global_step, {k[5:]: v for k, v in avg.items()}, examples_per_s)
        self.running = {t: [] for t in self.tasks}

    def end_epoch(self, epoch: int, t0: float) -> None:
        """Check the weights, evaluate on dev, keep the best epoch, save `last` (and `best`)."""
        getattr(self.combiner, "end_epoch", lambda: None)()  # e.g. DWA: per-epoch loss averages
        diff = distributed.replica_difference(self.model)
        if diff:
            log.warning("epoch %d: the ranks' parameters differ (fingerprints by up to %.3g); their updates "
                        "should be identical", epoch + 1, diff)
        check_finite_weights(self.model, f"epoch {epoch + 1}")
        predictions: dict[str, torch.Tensor] = {}
        scores = evaluate(self.model, self.dev, self.training.per_device_eval_batch_size, self.amp, self.device,
                          self.pad_id, predictions)
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:
            raise NonFiniteError(f"epoch {epoch + 1}: the dev score of {', '.join(bad)} is not finite "
                                 f"({', '.join(f'{k} {scores[k]}' for k in bad)}); the run went wrong")
        improved, self.last_scores = scores["overall"] > self.best_score, scores
        self.metrics.write(epoch=epoch + 1, step=self.global_step, dev=scores, best=improved,
                           epoch_seconds=time.perf_counter() - t0)
        log.info("epoch %d dev: %s%s", epoch + 1, ", ".join(f"{k} {v:.4f}" for k, v in scores.items()),
                 " (best)" if improved else "")
        if improved:
            self.best_score, self.best_scores = scores["overall"], scores
            self.best_epoch, self.best_step = epoch + 1, self.global_step
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.best_dev_predictions = predictions
        # `last` first: it records this best, and a resume rewrites `best` from it if a kill came between.
        self.save_last()
        if improved:
            self.save_best()
        if self.should_stop():
            raise self._interrupted()

    def should_stop(self) -> bool:
        """Ctrl-C seen: in one process at once; under torchrun as all ranks agreed after the last step, so that they
        save and stop together."""
        return self.stop_requested if distributed.world_size() == 1 else self._stop_agreed

    # ------------------------------------------------------------------------------------------ stopping
    def _interrupted(self) -> TrainingInterrupted:
        return TrainingInterrupted(f"stopped after step {self.global_step}; {self.out_dir / 'last'} holds step "
                                   f"{self.last_saved_step}: continue with the same flags and --resume")

    def _test_hooks(self) -> None:
        """Fault injection for tests/test_resume.py: die like a SIGKILLed process at a chosen step (after the
        step, before any checkpoint of it), or slow steps down so a test can interrupt a run in flight."""
        if self._kill_at_step == str(self.global_step):
            os.kill(os.getpid(), signal.SIGKILL)
        if self._step_delay:
            time.sleep(self._step_delay)


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
