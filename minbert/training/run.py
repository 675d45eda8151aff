"""A training run from start to end: check the settings and the output directory, read the data, build the model
and the trainer, train, write the prediction files and results.json.

Everything that can be refused is refused before the first write: the settings (RunConfig.validate), the output
directory (output_dir.check_output_dir), the data files, the model, the optimizer. Under torchrun
(WORLD_SIZE > 1) every process runs :func:`run`: data parallel over the ranks, rank 0 alone writes
(minbert.training.distributed, docs/distributed.md).
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import random
import time
from pathlib import Path

import numpy as np
import torch

from minbert.io import atomic_write_text, first_line, published_dir
from minbert.io.folder_lock import folder_lock
from minbert.io.output_policy import check_run_inputs
from minbert.model.encoder import BertModel
from minbert.model.multitask import MultitaskBert, MultitaskConfig, pair_encoding_of
from minbert.model.tokenizer import load_tokenizer, pad_token_id
from minbert.tasks.data import SPLITS, TASKS, TaskData, TaskTensors, load_task, tensorize
from minbert.tasks.metrics import format_scores, overall_score, task_score
from minbert.tasks.predict import prediction_path, write_predictions
from minbert.tasks.user_tasks import declare, run_tasks
from minbert.training import distributed
from minbert.training.distributed import predict_task  # under torchrun each rank predicts a share; alone, predict.predict_task
from minbert.training.metrics_log import MetricsLog, peak_rss_mb
from minbert.training.output_dir import check_output_dir, clean_failed_start, prepare_output_dir
from minbert.training.precision import resolve_bf16
from minbert.training.run_config import RunConfig
from minbert.training.trainer import NonFiniteError, Trainer

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


def load_datasets(config: RunConfig, tokenizer, splits: tuple[str, ...]) -> dict[tuple[str, str], TaskData]:
    """Read every needed file before anything is written, so bad input leaves no output behind (``config``: the
    run's; its data group says which files and how many rows)."""
    data, out = config.data, {}
    for task in run_tasks(data):
        for split in splits:
            limit = data.max_train_samples if split == "train" else data.max_eval_samples
            out[(task, split)] = load_task(task, split, data.data_dir, data.skip_bad_rows, limit)
    for d in out.values():
        if d.skipped:
            log.warning("%s: skipped %d malformed rows: %s", d.path, len(d.skipped), "; ".join(d.skipped))
        if d.dropped:
            log.info("%s: %d rows whose label is not part of %s dropped (by the task's definition), %d kept",
                     d.path, d.dropped, d.task.name, len(d.examples))
    return out


def build_model(config: RunConfig) -> MultitaskBert:
    """The run's model, before training: the encoder and heads of its model group, for the tasks of its data group."""
    model, tasks = config.model, run_tasks(config.data)
    encoder = BertModel.from_pretrained(model.model_name_or_path)
    mt_config = MultitaskConfig(tasks=tasks, pooling=model.pooling, sts_head=model.sts_head, para_head=model.para_head,
                                pair_encoding=pair_encoding_of(model, tasks), task_spec=config.data.task_spec)
    return MultitaskBert(encoder, mt_config)


def compile_encoder(model: MultitaskBert, device: torch.device) -> None:
    """--torch_compile: compile every encoder layer in place. ``nn.Module.compile`` keeps the module (and so the
    checkpoint keys: no ``_orig_mod.`` prefix); dynamic shapes because length-bucketed batches vary in width."""
    try:  # a backend that cannot build (no C++ compiler, unsupported Python) fails here, in one line
        torch.compile(lambda x: x * 2 + 1)(torch.ones(2, device=device))
    except Exception as e:  # torch raises many error types from its compiler stack
        raise ValueError(f"--torch_compile: torch.compile does not work here ({type(e).__name__}: "
                         f"{first_line(e, '')})") from None
    for layer in model.encoder.layers:
        layer.compile(dynamic=True)


def write_all_predictions(model, tensors: dict[tuple[str, str], TaskTensors], out_dir: Path, config: RunConfig, device,
                          pad_id, dev_predictions: dict[str, torch.Tensor] | None = None) -> dict[str, float]:
    """Write the six CS224N prediction files (for the tasks trained); return dev scores. Every prediction is
    made and checked first: a model that predicts NaN writes no file. ``dev_predictions``: the dev predictions
    the model's current weights already made (the best epoch's evaluation), used instead of predicting again."""
    predictions = {}
    amp = config.training.amp_dtype(config.multitask.smart_settings.ball)
    for (task, split), data in tensors.items():
        if split == "train":
            continue
        if split == "dev" and dev_predictions is not None and task in dev_predictions:
            predictions[(task, split)] = dev_predictions[task]
            continue
        preds = predict_task(model, data, config.training.per_device_eval_batch_size, device, pad_id,
                             desc=f"{split} {task}", amp_dtype=amp)
        if not bool(torch.isfinite(preds).all()):
            raise NonFiniteError(f"{split} {task}: the model predicts non-finite values; no prediction file written")
        predictions[(task, split)] = preds
    scores = {}
    for (task, split), preds in predictions.items():
        data = tensors[(task, split)]
        if distributed.is_main():  # under torchrun only rank 0 writes
            write_predictions(prediction_path(out_dir, task, split), TASKS[task], data.ids, preds.tolist())
        if split == "dev" and data.labels is not None:
            scores[task] = task_score(task, preds.numpy(), data.labels.numpy())
    if scores:
        scores["overall"] = overall_score(scores)
    return scores


def run(config: RunConfig) -> dict[str, float]:
    """The main job: train (unless --predict_only), write checkpoints, predictions and scores; returns the dev
    scores (of the best epoch). ``config`` is checked again here (RunConfig.validate) for callers from Python."""
    config = config.validate()
    output, training = config.output, config.training
    declare(config.data.task_spec)  # tasks of the user's own join the registry (for this process) before any check
    if output.report_to == "tensorboard":
        MetricsLog.tensorboard_writer_class()  # a missing package fails before any data is read
    device = distributed.init(resolve_device(training.device))  # torchrun: join the process group; cuda:LOCAL_RANK
    # auto -> on/off, before args.json is written
    training.bf16 = resolve_bf16(training.bf16, device, config.multitask.smart_settings.ball)
    inputs = {"--checkpoint": output.checkpoint if output.predict_only else None,
              "--model_name_or_path": None if output.predict_only else config.model.model_name_or_path}
    check_run_inputs(output.output_dir, inputs, output.overwrite_output_dir)
    # One run per folder (minbert.io.folder_lock): rank 0 holds --output_dir's lock from the check to the last write.
    with folder_lock(output.output_dir) if distributed.is_main() else contextlib.nullcontext():
        return _run(config, device)


def _run(config: RunConfig, device: torch.device) -> dict[str, float]:
    output, training = config.output, config.training
    resume_from = distributed.on_main(check_output_dir, config)  # a taken --output_dir is refused before any work
    set_seed(training.seed)
    source = output.checkpoint if output.predict_only else config.model.model_name_or_path
    tokenizer = load_tokenizer(source, config.data.max_seq_length)
    pad_id = pad_token_id(tokenizer)
    splits = tuple(s for s in SPLITS if not (s == "train" and output.predict_only)
                   and not (s == "test" and output.skip_test_predictions))
    data = load_datasets(config, tokenizer, splits)
    if output.predict_only:
        model = MultitaskBert.load(output.checkpoint)
        missing = [t for t in run_tasks(config.data) if t not in model.heads]
        if missing:
            raise ValueError(f"--checkpoint {output.checkpoint} has no head for task(s) {', '.join(missing)}")
    else:
        model = build_model(config)
    check_position_limit(tokenizer, model, source)
    model.to(device)
    distributed.broadcast_model(model)  # torchrun: every rank starts from rank 0's weights
    if training.torch_compile:
        compile_encoder(model, device)

    t_start = time.perf_counter()
    tensors = {key: tensorize(d, tokenizer, model.config.encoding(key[0])) for key, d in data.items()}
    trainer = None
    # Built before the output dir exists: an optimizer that cannot fit leaves nothing behind.
    if not output.predict_only:
        train = {t: tensors[(t, "train")] for t in run_tasks(config.data)}
        dev = {t: tensors[(t, "dev")] for t in run_tasks(config.data)}
        trainer = Trainer(config, model, train, dev, device, tokenizer, Path(output.output_dir), metrics=None)
    out = distributed.on_main(prepare_output_dir, config)
    if resume_from is None and distributed.is_main():  # a resumed run keeps the args.json it was checked against
        atomic_write_text(out / "args.json", json.dumps(config.to_dict(), indent=2, default=str) + "\n")
    try:
        return _train_and_predict(config, model, trainer, tensors, out, resume_from, device, pad_id, t_start)
    except Exception:  # before its first checkpoint, a failed run leaves the folder so that the command can start again
        if distributed.is_main():
            clean_failed_start(config)
        raise


def _train_and_predict(config, model, trainer, tensors, out, resume_from, device, pad_id, t_start) -> dict[str, float]:
    output, training = config.output, config.training
    metrics = MetricsLog(out / "metrics.jsonl", report_to=output.report_to, enabled=distributed.is_main())
    try:
        if trainer is not None:
            trainer.metrics = metrics
            if resume_from is not None:
                trainer.restore(resume_from)
                metrics.write(resumed_from_step=trainer.global_step, epoch=trainer.global_step // trainer.steps_per_epoch)
                log.info("resuming from %s: step %d of %d", resume_from, trainer.global_step, trainer.total_steps)
            log.info("training %s on %s: %d steps/epoch x %d epochs, combiner %s, optimizer %s, bf16 %s",
                     config.model.model_name_or_path, ",".join(run_tasks(config.data)), trainer.steps_per_epoch,
                     training.num_train_epochs, config.multitask.combiner, config.optimizer.optim, training.bf16)
            trainer.train()
        pred_dir = out / "predictions"
        scores = write_all_predictions(model, tensors, pred_dir, config, device, pad_id,
                                       trainer.best_dev_predictions if trainer is not None else None)
        check_finite_scores(scores)
        wall = time.perf_counter() - t_start
        metrics.write(final=True, dev=scores, wall_seconds=wall)
    finally:
        metrics.close()
    if not distributed.is_main():
        return scores
    if output.predict_only:
        checkpoint = output.checkpoint
    else:  # name best/ only if this run wrote it (published: complete)
        checkpoint = str(out / "best") if published_dir(out / "best") is not None and trainer.best_state is not None else None
    results = {"dev": scores, "wall_seconds": round(wall, 1), "peak_rss_mb": peak_rss_mb(), "bf16": training.bf16,
               "predictions": str(pred_dir), "checkpoint": checkpoint}
    if trainer is not None:  # "dev" is the best epoch's, chosen on dev: an optimistic score (docs/training.md)
        results.update(dev_best_epoch=trainer.best_epoch, epochs=training.num_train_epochs)
        if trainer.last_scores:  # unknown only if a resume came after the last epoch's evaluation
            results["dev_last"] = trainer.last_scores
    atomic_write_text(out / "results.json", json.dumps(results, indent=2, allow_nan=False) + "\n")
    print(f"dev scores ({'best epoch' if not output.predict_only else 'checkpoint'}); predictions in {pred_dir}")
    print(format_scores({"dev": scores}))
    return scores


def check_position_limit(tokenizer, model: MultitaskBert, source) -> None:
    """The tokenizer must not make inputs longer than the encoder's position embeddings."""
    length = (tokenizer.truncation or {}).get("max_length")
    limit = model.encoder.config.max_position_embeddings
    if length is not None and length > limit:
        raise ValueError(f"{source}: its tokenizer truncates at {length} tokens, beyond the model's {limit} position "
                         "embeddings; pass --max_seq_length")


def check_finite_scores(scores: dict[str, float]) -> None:
    bad = [k for k, v in scores.items() if not math.isfinite(v)]
    if bad:
        raise NonFiniteError(f"the dev score of {', '.join(bad)} is not finite; results.json not written")
