"""Batched prediction and the CS224N leaderboard prediction files (read and write)."""
from __future__ import annotations

from pathlib import Path

import torch
from tqdm.auto import tqdm

from .data import TASKS, DataError, TaskSpec, TaskTensors, sorted_batches
from .io import atomic_open


def _to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.inference_mode()
def predict_task(model, data: TaskTensors, batch_size: int, device: torch.device, pad_id: int = 0,
                 desc: str | None = None, amp_dtype: torch.dtype | None = None) -> torch.Tensor:
    """Predictions (class ids or clipped scores) in the order of ``data``. Batches are sorted by length so
    padding is minimal; the original order is restored at the end."""
    was_training = model.training
    model.eval()
    task = data.task.name
    head = model.heads[task]
    out = [None] * len(data)
    batches = sorted_batches(data.lengths(), batch_size)
    for idx in tqdm(batches, desc=desc or f"predict {task}", leave=False, disable=None):
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
    """CS224N layout: header ``id \\t Predicted_X``, then one ``id , value`` line per example."""
    with atomic_open(path, newline="\n") as f:
        f.write(f"id \t {spec.prediction_header} \n")
        for i, p in zip(ids, preds):
            f.write(f"{i} , {format_value(spec, p)} \n")


def prediction_path(directory: str | Path, task: str, split: str) -> Path:
    return Path(directory) / f"{TASKS[task].output_prefix}-{split}-output.csv"


def read_predictions(path: str | Path, spec: TaskSpec) -> dict[str, float]:
    """Read a prediction file; malformed lines, duplicate ids and out-of-range values are DataErrors."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise DataError(f"{path}: cannot read: {e.strerror}") from None
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise DataError(f"{path}:{line}: invalid UTF-8") from None
    lines = text.splitlines()
    if not lines:
        raise DataError(f"{path}:1: empty file (expected header 'id \\t {spec.prediction_header}')")
    header = [h.strip() for h in lines[0].split("\t")]
    if header != ["id", spec.prediction_header]:
        raise DataError(f"{path}:1: header should be 'id \\t {spec.prediction_header}', found {lines[0].strip()!r}")
    preds: dict[str, float] = {}
    first_line: dict[str, int] = {}
    for n, line in enumerate(lines[1:], start=2):
        if not line.strip():
            continue
        parts = line.split(",")
        if len(parts) != 2:
            raise DataError(f"{path}:{n}: expected 'id , value', found {len(parts)} comma-separated fields")
        pid, raw = parts[0].strip(), parts[1].strip()
        if not pid:
            raise DataError(f"{path}:{n}: empty id")
        if pid in preds:
            raise DataError(f"{path}:{n}: duplicate id {pid!r} (first on line {first_line[pid]})")
        try:
            value = float(raw)
        except ValueError:
            raise DataError(f"{path}:{n}: value {raw[:40]!r} is not a number") from None
        if spec.label_kind == "class":
            if value != int(value) or not 0 <= value < spec.num_labels:
                raise DataError(f"{path}:{n}: value {raw!r} is not a class in 0..{spec.num_labels - 1}")
        elif not spec.score_range[0] <= value <= spec.score_range[1]:
            lo, hi = spec.score_range
            raise DataError(f"{path}:{n}: value {raw!r} is outside {lo:g}..{hi:g}")
        preds[pid] = value
        first_line[pid] = n
    return preds


def score_prediction_dir(pred_dir: str | Path, data_dir: str | Path, allow_partial: bool = False) -> dict[str, dict[str, float]]:
    """Check every prediction file present in ``pred_dir`` against its input file (every id exactly once) and
    score it where gold labels exist. Returns {split: {task: score, "overall": ...}}."""
    from .data import load_task
    from .metrics import overall_score, task_score

    pred_dir = Path(pred_dir)
    if not pred_dir.is_dir():
        raise DataError(f"{pred_dir}: no such directory")
    found = False
    results: dict[str, dict[str, float]] = {}
    for split in ("dev", "test"):
        for task, spec in TASKS.items():
            path = prediction_path(pred_dir, task, split)
            if not path.exists():
                continue
            found = True
            preds = read_predictions(path, spec)
            gold = load_task(task, split, data_dir, skip_bad_rows=True)
            gold_ids = {ex.id for ex in gold.examples}
            unknown = [i for i in preds if i not in gold_ids]
            if unknown:
                raise DataError(f"{path}: {len(unknown)} id(s) not in {gold.path}, e.g. {unknown[0]!r}")
            examples = [ex for ex in gold.examples if ex.id in preds] if allow_partial else gold.examples
            missing = [ex for ex in examples if ex.id not in preds]
            if missing:
                raise DataError(f"{path}: {len(missing)} id(s) of {gold.path} have no prediction, "
                                f"e.g. {missing[0].id!r} ({gold.path}:{missing[0].line})")
            if gold.has_labels and examples:
                results.setdefault(split, {})[task] = task_score(
                    task, [preds[ex.id] for ex in examples], [ex.label for ex in examples])
    if not found:
        raise DataError(f"{pred_dir}: no prediction files (expected names like sst-dev-output.csv)")
    for scores in results.values():
        scores["overall"] = overall_score(scores)
    return results
