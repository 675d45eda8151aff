"""Readers for the CS224N task files, tokenization, and length-bucketed batching.

Files are tab-separated with a header row; columns are found by header name (the first column is an unnamed
row index; the SST test file has two). Every line is one record: a field may be quoted (``"a ""b"" c"``, as the
QQP and STS files do), but a quoted field never runs on into the next line. Every problem is reported as
``file:line: what is wrong``; with ``skip_bad_rows`` malformed rows are skipped and counted instead (never
guessed). What a row must satisfy is checked here and nowhere else (:func:`read_task_file`).
"""
from __future__ import annotations

import csv
import math
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tokenizers import Tokenizer

from minbert.io import DataError, read_text_file
from minbert.tasks.registry import DEFAULT_TASKS, TASKS, TaskSpec  # noqa: F401 (re-exported: their import path before the registry)

SPLITS = ("train", "dev", "test")


def shorten(text: str, limit: int = 40) -> str:
    """``repr`` of a value quoted in an error message, cut to ``limit`` characters (fields can be huge)."""
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


@dataclass
class Example:
    id: str
    texts: tuple[str, ...]
    label: float | int | None
    line: int


@dataclass
class TaskData:
    task: TaskSpec
    split: str
    path: Path
    examples: list[Example]
    skipped: list[str] = field(default_factory=list)  # "file:line: problem" of each skipped row
    skipped_ids: set[str] = field(default_factory=set)  # the ids of skipped rows, where the id itself was usable
    dropped: int = 0  # rows outside a derived task by definition (TaskSpec.label_map), e.g. SST-2's neutral rows

    @property
    def has_labels(self) -> bool:
        return bool(self.examples) and self.examples[0].label is not None


def read_table(path: Path) -> tuple[list[str], list[tuple[int, str]]]:
    """Read a tab-separated file as (header fields, [(line number, line)]); blank lines are left out, a
    ``\r`` before a line's end is dropped. Split a row with :func:`split_record`. Whole-file problems
    (unreadable, not a regular file, invalid UTF-8, empty, bad header) raise DataError."""
    text = read_text_file(path)
    # Lines end at "\n" only, so line numbers are those of editors and grep -n (str.splitlines would also
    # split at form feeds and other separators).
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise DataError(f"{path}:1: empty file (expected a header row)")
    try:
        header = split_record(lines[0])
    except ValueError as e:
        raise DataError(f"{path}:1: header row: {e}") from None
    named: dict[str, int] = {}
    for i, name in enumerate(header):
        if name and name in named:  # the first would win silently: refuse
            raise DataError(f"{path}:1: column {shorten(name)} appears twice (columns {named[name] + 1} and {i + 1})")
        named[name] = i
    return header, [(n, line) for n, line in enumerate(lines[1:], start=2) if line]


def split_record(line: str) -> list[str]:
    """The tab-separated fields of one line (one record). A field may be quoted with doubled inner quotes; a
    quote that opens a field and is not closed on the same line (a stray ``"``, which would swallow the
    following rows), or text after a closing quote, raises ValueError."""
    if "\x00" in line:  # the shipped files have none: a sign of a damaged file
        raise ValueError("NUL byte in the row")
    try:
        return next(csv.reader([line], delimiter="\t", strict=True), [])
    except csv.Error as e:
        message = str(e)
        if "new-line" in message:
            raise ValueError("carriage return (\\r) inside an unquoted field") from None
        if "unexpected end of data" in message:
            raise ValueError('a field opens with a quote (") that is not closed on this line; quote the whole '
                             'field and double the quotes inside it ("a ""b"" c"), or remove the stray quote') from None
        if "expected after" in message:
            raise ValueError('text after the closing quote of a quoted field; a field that starts with a quote '
                             'must end with one (double the quotes inside it: "a ""b"" c")') from None
        if "field limit" in message:
            raise ValueError(f"a field longer than {csv.field_size_limit()} characters (a damaged file?)") from None
        raise ValueError(f"malformed row: {message}") from None


_UNSEEN = {"Cc", "Cf", "Cs", "Co", "Cn", "Zs", "Zl", "Zp", "Mn", "Me"}  # control, format (zero-width), unassigned,
# separators, and marks that combine with a preceding character: text made only of these shows nothing


def is_blank(text: str) -> bool:
    """True when ``text`` has nothing to read: empty, spaces, or only control, zero-width or combining characters
    (the tokenizer's normalizer strips all of them; the model would see ``[CLS] [SEP]``)."""
    return all(ch.isspace() or unicodedata.category(ch) in _UNSEEN for ch in text)


def blank_text_problem(text: str) -> str | None:
    """Why ``text`` cannot be read as a sentence, or None: the one rule for empty texts, shared by the task
    readers, minbert-predict (arguments and --input) and the Python API."""
    if not text.strip():
        return "is empty"
    if is_blank(text):
        return f"{shorten(text)} has only invisible characters (control, zero-width, combining or space)"
    return None


def id_problem(ex_id: str) -> str | None:
    """What makes ``ex_id`` (already stripped) unusable as an example id, or None. Ids are written into the
    ``id , value`` prediction files and read back by evaluate.py, so an id must survive that format: no comma,
    no line break, tab or other control or invisible character, no leading or trailing space."""
    if not ex_id:
        return "empty id"
    if "," in ex_id:
        return f"id {shorten(ex_id)} contains a comma (prediction files are 'id , value' lines)"
    bad = next((ch for ch in ex_id if unicodedata.category(ch) in ("Cc", "Cf", "Cs", "Zl", "Zp")), None)
    if bad is not None:
        return f"id {shorten(ex_id)} contains the control or invisible character U+{ord(bad):04X}"
    if ex_id != ex_id.strip():
        return f"id {shorten(ex_id)} has leading or trailing spaces"
    return None


def _column(path: Path, header: list[str], name: str) -> int:
    try:
        return header.index(name)
    except ValueError:
        shown = ", ".join(shorten(h) for h in header[:20] if h) or "none"
        raise DataError(f"{path}:1: missing column {name!r} (named columns: {shown})") from None


def finite_number(text: str, what: str) -> float:
    """The finite number ``text`` holds (a label, a predicted value); a ValueError ``WHAT 'text' is not a number``
    (or ``... is not finite``) otherwise. Stricter than float(): "0_1" is refused, not read as 1.0, so a mangled
    field never becomes a class."""
    try:
        if "_" in text:
            raise ValueError
        x = float(text)
    except ValueError:
        raise ValueError(f"{what} {shorten(text)} is not a number") from None
    if not math.isfinite(x):
        raise ValueError(f"{what} {shorten(text)} is not finite")
    return x


def _parse_label(spec: TaskSpec, value: str) -> float | int:
    """Parse a label; raises ValueError (malformed, skippable) or DataError-worthy RangeError."""
    value = value.strip()
    if not value:
        raise ValueError("missing label")
    x = finite_number(value, "label")
    if spec.label_kind == "class":
        n = len(spec.label_map) if spec.label_map else spec.num_labels  # classes in the file
        if x != int(x) or not 0 <= x < n:
            raise LabelRangeError(f"label {shorten(value)} is out of range (classes 0..{n - 1})")
        return int(x)
    lo, hi = spec.score_range
    if not lo <= x <= hi:
        raise LabelRangeError(f"label {shorten(value)} is out of range ({lo:g}..{hi:g})")
    return x


class LabelRangeError(ValueError):
    pass


def read_task_file(spec: TaskSpec, path: str | Path, split: str, skip_bad_rows: bool = False) -> TaskData:
    """Read one task file. Labels are required for train/dev and read if present for test."""
    path = Path(path)
    header, rows = read_table(path)
    id_col = _column(path, header, "id")
    text_cols = [_column(path, header, c) for c in spec.text_columns]
    label_col = None
    if split != "test" or spec.label_column in header:
        label_col = _column(path, header, spec.label_column)
    named = [i for i, name in enumerate(header) if name]
    data = TaskData(spec, split, path, [])
    seen: dict[str, int] = {}
    for line, text in rows:
        ex_id = None
        try:
            fields = split_record(text)
            if len(fields) != len(header):
                raise ValueError(f"expected {len(header)} tab-separated fields, found {len(fields)}")
            if all(fields[i].strip() == header[i] for i in named):
                raise ValueError("the header row again (two files joined?)")
            problem = id_problem(fields[id_col].strip())
            if problem:
                raise ValueError(problem)
            ex_id = fields[id_col].strip()
            if ex_id in seen:
                raise ValueError(f"duplicate id {shorten(ex_id)} (first on line {seen[ex_id]})")
            texts = tuple(fields[c] for c in text_cols)
            for name, t in zip(spec.text_columns, texts):
                problem = blank_text_problem(t)
                if problem:
                    raise ValueError(f"{name} {problem}")
            label = _parse_label(spec, fields[label_col]) if label_col is not None else None
        except LabelRangeError as e:
            raise DataError(f"{path}:{line}: {e}") from None
        except ValueError as e:
            if not skip_bad_rows:
                raise DataError(f"{path}:{line}: {e} (use --skip_bad_rows to skip such rows)") from None
            data.skipped.append(f"{path}:{line}: {e}")
            if ex_id is not None and ex_id not in seen:
                data.skipped_ids.add(ex_id)
            continue
        seen[ex_id] = line  # a dropped row's id still counts: a duplicate of it is an error
        if label is not None and spec.label_map is not None:
            label = spec.label_map[label]
            if label is None:
                data.dropped += 1
                continue
        data.examples.append(Example(ex_id, texts, label, line))
    if not data.examples:
        last = rows[-1][0] + 1 if rows else 2
        raise DataError(f"{path}:{last}: no usable rows" + (f" ({len(data.skipped)} skipped, e.g. {data.skipped[0]})"
                                                            if data.skipped else ""))
    return data


def load_task(task: str, split: str, data_dir: str | Path, skip_bad_rows: bool = False,
              max_samples: int | None = None) -> TaskData:
    spec = TASKS[task]
    data = read_task_file(spec, Path(data_dir) / spec.files[split], split, skip_bad_rows)
    if max_samples is not None:
        data.examples = data.examples[:max_samples]
    return data


# ----------------------------------------------------------------------------------------------------------
# Tokenization and batching


@dataclass
class Encoded:
    """Token ids of one text column of a task split (ragged, unpadded); ``type_ids`` (segment 0 or 1 of each token)
    for a pair read as one sequence, None for a single text (all segment 0)."""
    ids: list[list[int]]
    type_ids: list[list[int]] | None = None

    def lengths(self) -> list[int]:
        return [len(x) for x in self.ids]

    def select(self, indices: list[int]) -> "Encoded":
        """The rows ``indices``, in that order."""
        types = [self.type_ids[i] for i in indices] if self.type_ids is not None else None
        return Encoded([self.ids[i] for i in indices], types)


def encode_texts(tokenizer: Tokenizer, texts: list[str]) -> Encoded:
    return Encoded([e.ids for e in tokenizer.encode_batch(texts, add_special_tokens=True)])


def encode_pairs(tokenizer: Tokenizer, pairs: list[tuple[str, str]]) -> Encoded:
    """Each pair as one sequence, ``[CLS] a [SEP] b [SEP]`` with token types 0 for a and 1 for b (the tokenizer's
    pair template, minbert.model.tokenizer). A pair longer than the tokenizer's limit is cut longest-first: a token comes
    off the longer sentence until it fits, so neither sentence vanishes."""
    from minbert.model.tokenizer import PAIR_SPECIAL_TOKENS, has_pair_template

    limit = (tokenizer.truncation or {}).get("max_length")
    if limit is not None and limit < PAIR_SPECIAL_TOKENS + 2:
        raise ValueError(f"--max_seq_length {limit}: a sentence pair read as one sequence (--pair_encoding cross) needs "
                         f"at least {PAIR_SPECIAL_TOKENS + 2} tokens, [CLS] a [SEP] b [SEP]")
    if not has_pair_template(tokenizer):
        raise ValueError("the tokenizer has no [CLS] a [SEP] b [SEP] pair template ([CLS] or [SEP] is missing): "
                         "it cannot read a pair as one sequence (--pair_encoding cross)")
    encs = tokenizer.encode_batch(pairs, add_special_tokens=True)
    return Encoded([e.ids for e in encs], [e.type_ids for e in encs])


@dataclass
class TaskTensors:
    """A task split ready for batching: one Encoded per text column (a single one for a pair read as one
    sequence), labels, ids."""
    task: TaskSpec
    columns: list[Encoded]
    labels: torch.Tensor | None
    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def lengths(self) -> list[int]:
        # Cost of an example is dominated by its longest text; bucket on that.
        return [max(ls) for ls in zip(*(c.lengths() for c in self.columns))]

    def batch(self, indices: list[int], pad_id: int = 0) -> dict[str, torch.Tensor]:
        """``input_ids``/``attention_mask`` per column (``_b`` for a pair's second sentence) and
        ``token_type_ids`` where the column has token types (a cross-encoded pair)."""
        out: dict[str, torch.Tensor] = {}
        for k, col in enumerate(self.columns):
            ids, mask = pad([col.ids[i] for i in indices], pad_id)
            suffix = "" if k == 0 else "_b"
            out["input_ids" + suffix], out["attention_mask" + suffix] = ids, mask
            if col.type_ids is not None:
                out["token_type_ids" + suffix] = pad([col.type_ids[i] for i in indices], 0)[0]
        if self.labels is not None:
            out["labels"] = self.labels[indices]
        return out


PAIR_ENCODINGS = ("bi", "cross")


def tensorize(data: TaskData, tokenizer: Tokenizer, pair_encoding: str = "bi") -> TaskTensors:
    """Tokenize a task split. A pair task is read as two sentences (``bi``: each encoded on its own) or as one
    joint sequence (``cross``, see :func:`encode_pairs`); ``pair_encoding`` does not apply to single texts."""
    if pair_encoding not in PAIR_ENCODINGS:
        raise ValueError(f"unknown pair encoding {pair_encoding!r} (choose from {', '.join(PAIR_ENCODINGS)})")
    if data.task.is_pair and pair_encoding == "cross":
        columns = [encode_pairs(tokenizer, [ex.texts for ex in data.examples])]
    else:
        columns = [encode_texts(tokenizer, [ex.texts[k] for ex in data.examples])
                   for k in range(len(data.task.text_columns))]
    labels = None
    if data.has_labels:
        dtype = torch.long if data.task.label_kind == "class" else torch.float32
        labels = torch.tensor([ex.label for ex in data.examples], dtype=dtype)
    return TaskTensors(data.task, columns, labels, [ex.id for ex in data.examples])


def pad(seqs: list[list[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Pad to the longest sequence in the batch (per-batch padding)."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        mask[i, : len(s)] = 1
    return ids, mask


def bucketed_batches(lengths: list[int], batch_size: int, generator: torch.Generator, chunk_batches: int = 50) -> list[list[int]]:
    """Shuffle, then sort by length within chunks of ``chunk_batches`` batches, cut into batches and shuffle
    the batch order: batches of similar lengths (little padding) in a random order."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    chunk = batch_size * chunk_batches
    batches: list[list[int]] = []
    for start in range(0, len(order), chunk):
        part = sorted(order[start : start + chunk], key=lambda i: lengths[i])
        batches += [part[i : i + batch_size] for i in range(0, len(part), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


def sorted_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Prediction batches: sorted by length (least padding); callers restore the original order by index."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class TaskStream:
    """An endless, deterministic stream of training batches for one task.

    Pass ``p`` over the data uses its own bucketed shuffle seeded by (seed, task, p), so batch ``i`` of the
    stream is a pure function of ``i``: resuming needs only the step count, and a task larger than the epoch
    keeps drawing unseen examples in the next epoch (the report's §4.5 "iterations" semantics).
    """

    def __init__(self, data: TaskTensors, batch_size: int, seed: int, task_index: int):
        self.data, self.batch_size, self.seed, self.task_index = data, batch_size, seed, task_index
        self.lengths = data.lengths()
        self.batches_per_pass = math.ceil(len(data) / batch_size)
        self._plan: tuple[int, list[list[int]]] | None = None

    def indices(self, i: int) -> list[int]:
        p, k = divmod(i, self.batches_per_pass)
        if self._plan is None or self._plan[0] != p:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.task_index * 7_919 + p)
            self._plan = (p, bucketed_batches(self.lengths, self.batch_size, g))
        return self._plan[1][k]

    def batch(self, i: int, pad_id: int = 0) -> dict[str, torch.Tensor]:
        return self.data.batch(self.indices(i), pad_id)

