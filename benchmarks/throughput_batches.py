"""The real batches that benchmarks/throughput.py times: a few batches at evenly spaced quantiles of padded width
stand for a whole pass of a training file (or of the length-sorted dev batches), and the padding each pipeline
runs per example. Imported by throughput.py; see its docstring for the pipelines (a), (b), (c)."""
from __future__ import annotations

import statistics

import torch

from minbert.tasks.data import Encoded, TaskStream, TaskTensors, sorted_batches

TASKS = ("sst", "qqp")
GLUE_LENGTH = 128  # run_glue's --max_seq_length default, with pad_to_max_length


def quantile_batches(batches: list[list[int]], widths: list[int], k: int) -> list[list[int]]:
    """``k`` batches at evenly spaced quantiles ((j + 0.5) / k) of padded width: a stratified sample of the pass."""
    order = sorted(range(len(batches)), key=lambda i: widths[i])
    return [batches[order[int((j + 0.5) / k * len(order))]] for j in range(k)]


def width(data: TaskTensors, idx: list[int]) -> int:
    """The padded width of a batch: its longest text (a pair task pads each column to its own longest)."""
    return max(len(col.ids[i]) for col in data.columns for i in idx)


def training_batches(data: TaskTensors, batch_size: int, k: int, seed: int, task_index: int) -> tuple[list[list[int]], float]:
    """``k`` batches of one bucketed pass of the task's training stream (full batches only), and the mean padded
    width of the whole pass (to show how well the k batches stand for it)."""
    stream = TaskStream(data, batch_size, seed, task_index)
    full = [b for b in (stream.indices(i) for i in range(stream.batches_per_pass)) if len(b) == batch_size]
    widths = [width(data, b) for b in full]
    return quantile_batches(full, widths, k), statistics.mean(widths)


def eval_subset(data: TaskTensors, batch_size: int, k: int) -> TaskTensors:
    """The examples of ``k`` of the split's length-sorted prediction batches. predict_task re-sorts them and cuts
    exactly these batches again (each is a contiguous, full run of the sorted order)."""
    full = [b for b in sorted_batches(data.lengths(), batch_size) if len(b) == batch_size]
    idx = [i for b in quantile_batches(full, [width(data, b) for b in full], k) for i in b]
    return subset(data, idx)


def subset(data: TaskTensors, idx: list[int]) -> TaskTensors:
    labels = data.labels[idx] if data.labels is not None else None
    return TaskTensors(data.task, [Encoded([c.ids[i] for i in idx]) for c in data.columns], labels,
                       [data.ids[i] for i in idx])


def shuffled_examples(batches: list[list[int]], generator: torch.Generator) -> list[int]:
    """The examples of ``batches`` in random order: random batches of the same examples, for (c) and a lever."""
    idx = [i for b in batches for i in b]
    return [idx[j] for j in torch.randperm(len(idx), generator=generator).tolist()]


class FixedStream:
    """Stands in for a Trainer's TaskStream: batch ``i`` of the stream is the i-th chosen batch (cyclically)."""

    def __init__(self, data: TaskTensors, batches: list[list[int]]):
        self.data, self.batches = data, batches
        self.batch_size = len(batches[0])
        self.lengths = data.lengths()
        self.batches_per_pass = len(batches)

    def indices(self, i: int) -> list[int]:
        return self.batches[i % len(self.batches)]

    def batch(self, i: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
        return self.data.batch(self.indices(i), pad_id)


def padded_tokens_per_example(data: TaskTensors, batches: list[list[int]]) -> float:
    """Token positions the encoder runs per example (padding included) over ``batches``."""
    return sum(width_col * len(b) for b in batches for width_col in
               (max(len(col.ids[i]) for i in b) for col in data.columns)) / sum(len(b) for b in batches)


def padding_table(train: dict[str, TaskTensors], batch_size: int, seed: int) -> list[str]:
    """Positions per example over one pass of each training file: real tokens, length-bucketed batches (ours),
    random batches padded to their longest, and everything padded to 128 (a pair as one sequence)."""
    lines = ["| positions per training example | " + " | ".join(TASKS) + " |", "|---" * (len(TASKS) + 1) + "|"]
    rows = {"real tokens": [], "(a) bucketed batches": [], "random batches, padded to their longest": [],
            f"(c) padded to {GLUE_LENGTH}": []}
    for i, t in enumerate(TASKS):
        data = train[t]
        stream = TaskStream(data, batch_size, seed, i)
        bucketed = [stream.indices(k) for k in range(stream.batches_per_pass)]
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)).tolist()
        random = [order[s:s + batch_size] for s in range(0, len(order), batch_size)]
        rows["real tokens"].append(sum(sum(col.lengths()) for col in data.columns) / len(data))
        rows["(a) bucketed batches"].append(padded_tokens_per_example(data, bucketed))
        rows["random batches, padded to their longest"].append(padded_tokens_per_example(data, random))
        rows[f"(c) padded to {GLUE_LENGTH}"].append(float(GLUE_LENGTH))
    lines += [f"| {name} | " + " | ".join(f"{v:.1f}" for v in values) + " |" for name, values in rows.items()]
    return lines


def glue_inputs(examples, tokenizer, pad_id: int) -> dict[str, torch.Tensor]:
    """run_glue's preprocessing: one sequence per example (pairs as [CLS] a [SEP] b [SEP]), truncated and padded to
    128, as tensors (done once, before timing, like its ``datasets.map``)."""
    texts = [ex.texts if len(ex.texts) == 2 else ex.texts[0] for ex in examples]
    encs = tokenizer.encode_batch(texts, add_special_tokens=True)
    ids = torch.full((len(encs), GLUE_LENGTH), pad_id, dtype=torch.long)
    types = torch.zeros_like(ids)
    mask = torch.zeros_like(ids)
    for r, e in enumerate(encs):
        n = min(len(e.ids), GLUE_LENGTH)
        ids[r, :n] = torch.tensor(e.ids[:n])
        types[r, :n] = torch.tensor(e.type_ids[:n])
        mask[r, :n] = 1
    return {"input_ids": ids, "token_type_ids": types, "attention_mask": mask}
