"""Batched prediction and the CS224N leaderboard prediction files (read and write)."""
from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minbert.io import atomic_open, read_text_file
from minbert.tasks.data import (TASKS, DataError, TaskSpec, TaskTensors, finite_number, id_problem, shorten,
                                sorted_batches)


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict_task(model, data: TaskTensors, batch_size: int, device: torch.device, pad_id: int = 0,
                 desc: str | None = None, amp_dtype: torch.dtype | None = None, progress: bool = True) -> torch.Tensor:
    """Predictions (class ids or clipped scores) in the order of ``data``. Batches are sorted by length so
    padding is minimal; the original order is restored at the end. ``progress=False`` hides the progress bar
    (ranks other than 0 under torchrun)."""
    was_training = model.training
    model.eval()
    task = data.task.name
    head = model.heads[task]
    out = [None] * len(data)
    batches = sorted_batches(data.lengths(), batch_size)
    for idx in tqdm(batches, desc=desc or f"predict {task}", leave=False, disable=None if progress else True):
        batch = _to_device(data.batch(idx, pad_id), device)
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            pred = head.predict(model(task, batch).float()).cpu()
        for i, p in zip(idx, pred):
            out[i] = p
    model.train(was_training)
    return torch.stack(out)


def format_value(spec: TaskSpec, value) -> str:
    return f"{float(value):.4f}" if spec.label_kind == "score" else str(int(value))


def write_predictions(path: str | Path, spec: TaskSpec, ids: list[str], preds) -> None:
    """CS224N layout: header ``id \\t Predicted_X``, then one ``id , value`` line per example. The task readers
    refuse ids that this layout cannot carry (:func:`minbert.tasks.data.id_problem`); an id from elsewhere is checked
    here too, before anything is written, so every file written reads back with :func:`read_predictions`."""
    for i in ids:
        problem = id_problem(i)
        if problem:
            raise ValueError(f"{path}: cannot write the prediction of {shorten(i)}: {problem}")
    with atomic_open(path, newline="\n") as f:
        f.write(f"id \t {spec.prediction_header} \n")
        for i, p in zip(ids, preds):
            f.write(f"{i} , {format_value(spec, p)} \n")


def prediction_path(directory: str | Path, task: str, split: str) -> Path:
    return Path(directory) / TASKS[task].prediction_file(split)


def read_predictions(path: str | Path, spec: TaskSpec) -> dict[str, float]:
    """Read a prediction file; malformed lines, duplicate ids and out-of-range values are DataErrors."""
    return _read_prediction_lines(path, spec)[0]


def _read_prediction_lines(path: str | Path, spec: TaskSpec) -> tuple[dict[str, float], dict[str, int]]:
    """(id -> value, id -> line number) of a prediction file."""
    path = Path(path)
    text = read_text_file(path)  # the same checks as the task files: regular file, UTF-8, a BOM dropped
    # Lines end at "\n" only (str.splitlines would also split at form feeds and other separators, and the
    # line numbers in messages would no longer match the file's).
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}:1: empty file (expected header 'id \\t {spec.prediction_header}')")
    header = [h.strip() for h in lines[0].split("\t")]
    if header != ["id", spec.prediction_header]:
        raise DataError(f"{path}:1: header should be 'id \\t {spec.prediction_header}', found {shorten(lines[0].strip())}")
    preds: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        if "\x00" in line:
            raise DataError(f"{path}:{n}: NUL byte in the line")
        parts = line.split(",")
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'id , value', found {len(parts)} comma-separated fields")
        pid, raw = parts[0].strip(), parts[1].strip()
        problem = id_problem(pid)
        if problem:
            raise DataError(f"{path}:{n}: {problem}")
        if pid in preds:
            raise DataError(f"{path}:{n}: duplicate id {shorten(pid)} (first on line {first_line[pid]})")
        try:
            value = finite_number(raw, "value")
        except ValueError as e:
            raise DataError(f"{path}:{n}: {e}") from None
        if spec.label_kind == "class":
            if value != int(value) or not 0 <= value < spec.num_labels:
                raise DataError(f"{path}:{n}: value {shorten(raw)} is not a class in 0..{spec.num_labels - 1}")
        elif not spec.score_range[0] <= value <= spec.score_range[1]:
            lo, hi = spec.score_range
            raise DataError(f"{path}:{n}: value {shorten(raw)} is outside {lo:g}..{hi:g}")
        preds[pid] = value
        first_line[pid] = n
    return preds, first_line


def warn(message: str) -> None:
    """A warning for the person running evaluate.py: one line on stderr."""
    print(f"warning: {message}", file=sys.stderr)


def score_prediction_dir(pred_dir: str | Path, data_dir: str | Path, allow_partial: bool = False,
                         skip_bad_rows: bool = False) -> dict[str, dict[str, float]]:
    """Check every prediction file present in ``pred_dir`` against its input file (every id exactly once) and
    score it where gold labels exist. Returns {split: {task: score, "overall": ...}}, "overall" only when SST, QQP and
    STS are all scored (:func:`minbert.tasks.metrics.with_overall`).

    Nothing is scored in silence on fewer rows than the gold file has: a malformed gold row is an error, or with
    ``skip_bad_rows`` a warning that names it (its prediction, if any, is then not scored). A prediction file
    that is there but cannot be read (a broken symbolic link, a FIFO, a directory) is an error, not "absent".
    STS Pearson r is undefined when the predictions (or the gold scores) are all equal: it is counted as r = 0,
    the score of a predictor that carries no information, with a warning naming the file."""
    from minbert.tasks.data import load_task
    from minbert.tasks.metrics import is_constant, task_score, with_overall

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: no such directory")
    found = False
    results: dict[str, dict[str, float]] = {}
    for split in ("dev", "test"):
        for task, spec in TASKS.items():
            path = prediction_path(pred_dir, task, split)
            if not os.path.lexists(path):
                continue
            found = True
            preds, pred_lines = _read_prediction_lines(path, spec)
            if not preds:
                raise DataError(f"{path}:2: no predictions after the header")
            gold = load_task(task, split, data_dir, skip_bad_rows=skip_bad_rows)
            for message in gold.skipped:
                warn(f"{message}: gold row skipped, not scored")
            gold_ids = {ex.id for ex in gold.examples}
            unknown = [i for i in preds if i not in gold_ids and i not in gold.skipped_ids]
            if unknown:
                raise DataError(f"{path}: {len(unknown)} id(s) not in {gold.path}, e.g. {shorten(unknown[0])} "
                                f"({path}:{pred_lines[unknown[0]]})")
            examples = [ex for ex in gold.examples if ex.id in preds] if allow_partial else gold.examples
            missing = [ex for ex in examples if ex.id not in preds]
            if missing:
                raise DataError(f"{path}: {len(missing)} id(s) of {gold.path} have no prediction, "
                                f"e.g. {shorten(missing[0].id)} ({gold.path}:{missing[0].line})")
            if not gold.has_labels:
                continue
            if not examples:  # allow_partial, and every prediction is of a row of gold.skipped
                raise DataError(f"{path}: none of its ids has a usable gold row in {gold.path}: nothing to score")
            if len(examples) < len(gold.examples):  # allow_partial
                warn(f"{path}: scored on {len(examples)} of the {len(gold.examples)} rows of {gold.path} "
                     "(--allow_partial)")
            pred_values, gold_values = [preds[ex.id] for ex in examples], [ex.label for ex in examples]
            if spec.label_kind == "score" and (is_constant(pred_values) or is_constant(gold_values)):
                which = "predictions" if is_constant(pred_values) else f"gold scores of {gold.path}"
                warn(f"{path}: all {len(examples)} {which} are equal: Pearson r is undefined; counted as r = 0 "
                     "(no correlation)")
            results.setdefault(split, {})[task] = task_score(task, pred_values, gold_values)
    known = {spec.prediction_file(split) for spec in TASKS.values() for split in ("dev", "test")}
    for path in sorted(pred_dir.glob("*-*-output.csv")):
        if path.name not in known:  # e.g. a task of the user's own whose spec this process was not given
            warn(f"{path}: no task writes this file; not scored (a task of your own? pass --task_spec)")
    if not found:
        example = TASKS[next(iter(TASKS))].prediction_file("dev")
        raise DataError(f"{pred_dir}: no prediction files (expected names like {example})")
    for split, scores in results.items():
        results[split] = scores = with_overall(scores)  # the leaderboard's overall: only over all three tasks
        bad = [k for k, v in scores.items() if not math.isfinite(v)]
        if bad:  # cannot happen with finite predictions; never let a NaN reach the printed JSON
            raise DataError(f"{pred_dir}: the {', '.join(bad)} score is not finite")
    return results

