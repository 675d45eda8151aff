"""Seeded fuzzing of the data inputs: corrupted variants of the task files (the small_data slices) and of
prediction files go through the readers in-process; a subset goes through train_multitask.py and evaluate.py.
Non-regular files (FIFO, directory, device, broken or looping symbolic link) stand in for each of them. Checkpoint
and model directories are fuzzed in test_fuzz_models.py, flags and --config files in test_fuzz_settings.py.

Every case must end in success (with sane data) or a one-line error naming the file and the line; a run that
fails leaves no output directory behind. Mutations that damage one known line must be reported at that line.
"""
from __future__ import annotations

import json
import os
import random
import re
import select
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from minbert.cli import evaluate_main, train_main
from minbert.tasks.data import SPLITS, TASKS, DataError, id_problem, is_blank, load_task, read_task_file
from minbert.tasks.predict import prediction_path, read_predictions, score_prediction_dir, write_predictions

from .conftest import ROOT, no_hang

SEED = 20261121
MB = 1 << 20


@dataclass
class Mutated:
    data: bytes
    line: int | None = None  # the line an error must name (None: any line of the file)
    must_fail: bool = False  # without --skip_bad_rows the reader must refuse the file
    also: tuple[int, ...] = ()  # further damaged lines, which --skip_bad_rows may list too


# ---------------------------------------------------------------------------------------------------------
# Task-file mutations. `lines` are the file's lines without "\n"; line k of the file is lines[k - 1].

def _join(lines: list[bytes]) -> bytes:
    return b"\n".join(lines) + b"\n"


def _columns(lines: list[bytes]) -> dict[str, int]:
    return {name.decode(): i for i, name in enumerate(lines[0].split(b"\t"))}


def _set_field(lines, k, col, value: bytes) -> list[bytes]:
    fields = lines[k - 1].split(b"\t")
    fields[col] = value
    return lines[: k - 1] + [b"\t".join(fields)] + lines[k:]


def _row(rng, lines) -> int:
    return rng.randint(2, len(lines))


def m_truncate_bytes(rng, lines, spec):
    data = _join(lines)
    return Mutated(data[: rng.randint(1, len(data) - 1)])


def m_truncate_line(rng, lines, spec):
    k = _row(rng, lines)
    fields = lines[k - 1].split(b"\t")
    kept = fields[: rng.randint(1, len(fields) - 1)]
    return Mutated(_join(lines[: k - 1] + [b"\t".join(kept)] + lines[k:]), k, True)


def m_drop_field(rng, lines, spec):
    k = _row(rng, lines)
    fields = lines[k - 1].split(b"\t")
    del fields[rng.randrange(len(fields))]
    return Mutated(_join(lines[: k - 1] + [b"\t".join(fields)] + lines[k:]), k, True)


def m_extra_field(rng, lines, spec):
    k = _row(rng, lines)
    return Mutated(_join(lines[: k - 1] + [lines[k - 1] + b"\textra"] + lines[k:]), k, True)


def m_many_fields(rng, lines, spec):
    k = _row(rng, lines)
    return Mutated(_join(lines[: k - 1] + [lines[k - 1] + b"\t" * 10000] + lines[k:]), k, True)


def m_comma_line(rng, lines, spec):
    k = _row(rng, lines)
    return Mutated(_join(lines[: k - 1] + [lines[k - 1].replace(b"\t", b",")] + lines[k:]), k, True)


def m_comma_file(rng, lines, spec):
    return Mutated(_join([line.replace(b"\t", b",") for line in lines]), 1, True)


def m_nul(rng, lines, spec):
    k = _row(rng, lines)
    line = lines[k - 1]
    i = rng.randint(0, len(line))
    return Mutated(_join(lines[: k - 1] + [line[:i] + b"\x00" + line[i:]] + lines[k:]), k, True)


def m_invalid_utf8(rng, lines, spec):
    k = rng.randint(1, len(lines))
    line = lines[k - 1]
    i = rng.randint(0, len(line))
    return Mutated(_join(lines[: k - 1] + [line[:i] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80"]) + line[i:]] + lines[k:]), k, True)


def m_empty(rng, lines, spec):
    return Mutated(b"", 1, True)


def m_header_only(rng, lines, spec):
    return Mutated(_join(lines[:1]), None, True)


def m_blank_only(rng, lines, spec):
    return Mutated(_join(lines[:1]) + b"\n\n\n", None, True)


def m_no_header(rng, lines, spec):
    return Mutated(_join(lines[1:]), 1, True)


def m_renamed_column(rng, lines, spec):
    names = ["id", *spec.text_columns] + ([spec.label_column] if spec.label_column in _columns(lines) else [])
    name = rng.choice(names).encode()
    header = b"\t".join(b"x" + h if h == name else h for h in lines[0].split(b"\t"))
    return Mutated(_join([header] + lines[1:]), 1, True)


def m_duplicate_id(rng, lines, spec):
    k = rng.randint(3, len(lines))
    j = rng.randint(2, k - 1)
    col = _columns(lines)["id"]
    return Mutated(_join(_set_field(lines, k, col, lines[j - 1].split(b"\t")[col])), k, True)


def m_blank_id(rng, lines, spec):
    k = _row(rng, lines)
    return Mutated(_join(_set_field(lines, k, _columns(lines)["id"], rng.choice([b"", b"   "]))), k, True)


def m_empty_text(rng, lines, spec):
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(spec.text_columns)]
    return Mutated(_join(_set_field(lines, k, col, rng.choice([b"", b" "]))), k, True)


def m_label_out_of_range(rng, lines, spec):
    cols = _columns(lines)
    if spec.label_column not in cols:  # test files: no labels to damage; damage the id instead
        return m_blank_id(rng, lines, spec)
    k = _row(rng, lines)
    bad = [b"7", b"-1", b"2.5", b"5"] if spec.label_kind == "class" else [b"5.5", b"-0.1", b"1e3"]
    return Mutated(_join(_set_field(lines, k, cols[spec.label_column], rng.choice(bad))), k, True)


def m_label_not_a_number(rng, lines, spec):
    cols = _columns(lines)
    if spec.label_column not in cols:
        return m_empty_text(rng, lines, spec)
    k = _row(rng, lines)
    bad = [b"abc", b"", b"nan", b"inf", b"-inf", b"1e999", b"0_1", b"1.0.0", b"\xc2\xa0"]
    return Mutated(_join(_set_field(lines, k, cols[spec.label_column], rng.choice(bad))), k, True)


def m_huge_field(rng, lines, spec):
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(["id", *spec.text_columns])]
    return Mutated(_join(_set_field(lines, k, col, b"word " * (MB // 5))), k, True)


def m_long_sentence(rng, lines, spec):
    """100 kB: under the csv module's field limit, so it is read (and truncated by the tokenizer later)."""
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(spec.text_columns)]
    return Mutated(_join(_set_field(lines, k, col, b"long " * 20_000)))


def m_unbalanced_quote(rng, lines, spec):
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(spec.text_columns)]
    fields = lines[k - 1].split(b"\t")
    return Mutated(_join(_set_field(lines, k, col, b'"' + fields[col])), k, True)


def m_stray_quote(rng, lines, spec):
    """A field opens with a quote that a field of a later line closes: read as csv records, the rows between
    would vanish into one sentence. Every line is one record: the opening line is the error."""
    k = rng.randint(2, len(lines) - 1)
    j = rng.randint(k + 1, min(len(lines), k + 3))
    col = _columns(lines)[rng.choice(spec.text_columns)]
    opened = _set_field(lines, k, col, b'"' + lines[k - 1].split(b"\t")[col])
    closed = _set_field(opened, j, col, opened[j - 1].split(b"\t")[col] + b'"')
    return Mutated(_join(closed), k, True, also=(j,))  # a quoted field at j is damaged by its added quote


def m_quoted_newline(rng, lines, spec):
    """A properly quoted field with a line break inside: a record spanning two lines is refused."""
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(["id", *spec.text_columns])]
    field = lines[k - 1].split(b"\t")[col].strip(b'"')
    i = rng.randint(0, len(field))
    return Mutated(_join(_set_field(lines, k, col, b'"' + field[:i] + b"\n" + field[i:] + b'"')), k, True, also=(k + 1,))


def m_quote_after_closing(rng, lines, spec):
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(spec.text_columns)]
    return Mutated(_join(_set_field(lines, k, col, b'"quoted" and not')), k, True)


def m_quoted_fields(rng, lines, spec):
    """Every text field quoted, inner quotes doubled: the csv convention, read as the same texts."""
    cols = [_columns(lines)[c] for c in spec.text_columns]
    out = [lines[0]]
    for line in lines[1:]:
        fields = line.split(b"\t")
        for c in cols:
            if not fields[c].startswith(b'"'):
                fields[c] = b'"' + fields[c].replace(b'"', b'""') + b'"'
        out.append(b"\t".join(fields))
    return Mutated(_join(out))


def m_repeated_header(rng, lines, spec):
    """Two files joined with cat: the second header becomes a row."""
    k = rng.randint(2, len(lines))
    return Mutated(_join(lines[: k - 1] + [lines[0]] + lines[k - 1:]), k, True)


def m_duplicate_column(rng, lines, spec):
    names = [n for n in _columns(lines) if n]
    a, b = rng.sample(range(len(names)), 2) if len(names) > 1 else (0, 0)
    header = lines[0].split(b"\t")
    header[header.index(names[b].encode())] = names[a].encode()
    return Mutated(_join([b"\t".join(header)] + lines[1:]), 1, True)


INVISIBLE = ["\u200b", "\u200d", "\ufeff", "\x01", "\x7f", "\u00a0", "\u2028", "\u0301", "\u3000", "\x0b", "\u2063"]


def m_invisible_text(rng, lines, spec):
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(spec.text_columns)]
    text = "".join(rng.choice(INVISIBLE) for _ in range(rng.randint(1, 6)))
    return Mutated(_join(_set_field(lines, k, col, text.encode())), k, True)


BAD_IDS = [b"a,b", b"x\x0by", b"\xe2\x80\x8bzero", b"tab\x1fsep", b"ls\xe2\x80\xa8ep", b'"a\tb"', b"\x7f"]


def m_bad_id(rng, lines, spec):
    """Ids that the 'id , value' prediction files could not carry back to evaluate.py."""
    k = _row(rng, lines)
    return Mutated(_join(_set_field(lines, k, _columns(lines)["id"], rng.choice(BAD_IDS))), k, True)


def m_nul_header(rng, lines, spec):
    i = rng.randint(0, len(lines[0]))
    return Mutated(_join([lines[0][:i] + b"\x00" + lines[0][i:]] + lines[1:]), 1, True)


def m_bom_crlf(rng, lines, spec):
    return Mutated(b"\xef\xbb\xbf" + _join(lines).replace(b"\n", b"\r\n"))


def m_carriage_return(rng, lines, spec):
    k = _row(rng, lines)
    col = _columns(lines)[rng.choice(spec.text_columns)]
    field = lines[k - 1].split(b"\t")[col]
    i = rng.randint(1, max(1, len(field) - 1))
    # A line break outside quotes ends the record early; inside a quoted field it is text.
    return Mutated(_join(_set_field(lines, k, col, field[:i] + b"\r" + field[i:])), k, not field.startswith(b'"'))


def m_crlf(rng, lines, spec):
    return Mutated(_join(lines).replace(b"\n", b"\r\n"))


def m_bom(rng, lines, spec):
    return Mutated(b"\xef\xbb\xbf" + _join(lines))


def m_blank_lines(rng, lines, spec):
    out = list(lines)
    for _ in range(3):
        out.insert(rng.randint(1, len(out)), b"")
    return Mutated(_join(out))


def m_garbage(rng, lines, spec):
    return Mutated(bytes(rng.randrange(256) for _ in range(4096)))


def m_byte_flips(rng, lines, spec):
    data = bytearray(_join(lines))
    for _ in range(5):
        data[rng.randrange(len(data))] = rng.randrange(256)
    return Mutated(bytes(data))


TABLE_MUTATIONS: dict[str, Callable] = {name[2:]: fn for name, fn in globals().items() if name.startswith("m_")}
TASK_FILES = [(task, split) for task in TASKS for split in SPLITS]
TABLE_CASES = [(task, split, m) for task, split in TASK_FILES for m in TABLE_MUTATIONS]


def mutate_task_file(data_dir: Path, task: str, split: str, mutation: str, salt: int = 0) -> tuple[Path, Mutated]:
    """Corrupt one file of ``data_dir`` in place (seeded by the case); return its path and the mutation."""
    spec = TASKS[task]
    path = data_dir / spec.files[split]
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    rng = random.Random(f"{SEED}/{task}/{split}/{mutation}/{salt}")
    mutated = TABLE_MUTATIONS[mutation](rng, lines, spec)
    path.write_bytes(mutated.data)
    return path, mutated


ERROR = re.compile(r"(?P<path>.+?):(?P<line>\d+): \S")


def check_error(message: str, path: Path, mutated: Mutated) -> None:
    assert "\n" not in message and len(message) < 500, message[:500]
    m = ERROR.match(message)
    assert m and m["path"] == str(path), f"no file:line in {message!r}"
    line = int(m["line"])
    assert 1 <= line <= mutated.data.count(b"\n") + 2, message
    if mutated.line is not None:
        assert line in (mutated.line, *mutated.also), f"expected line {mutated.line}: {message}"


def check_task_data(data, split: str) -> None:
    spec = data.task
    ids = [ex.id for ex in data.examples]
    assert data.examples and len(set(ids)) == len(ids) and all(id_problem(i) is None for i in ids)
    for ex in data.examples:
        assert all(not is_blank(t) and "\x00" not in t for t in ex.texts)
        if split != "test":
            assert ex.label is not None
        if ex.label is not None:
            if spec.label_kind == "class":
                assert isinstance(ex.label, int) and 0 <= ex.label < spec.num_labels
            else:
                assert spec.score_range[0] <= ex.label <= spec.score_range[1]


@pytest.mark.parametrize("task,split,mutation", TABLE_CASES, ids=[f"{t}-{s}-{m}" for t, s, m in TABLE_CASES])
def test_task_file_reader(data_copy, task, split, mutation):
    path, mutated = mutate_task_file(data_copy, task, split, mutation)
    for skip in (False, True):
        try:
            data = read_task_file(TASKS[task], path, split, skip_bad_rows=skip)
        except DataError as e:
            check_error(str(e), path, Mutated(mutated.data, mutated.line, mutated.must_fail))  # the first bad line
        else:
            assert skip or not mutated.must_fail, f"{mutation} was accepted"
            check_task_data(data, split)
            for message in data.skipped:
                check_error(message, path, mutated)


def test_clean_mutations_keep_every_row(small_data, data_copy):
    """CRLF line ends, a BOM and blank lines change nothing; line numbers still point at the rows."""
    original = {ex.id: ex.texts for ex in load_task("qqp", "dev", small_data).examples}
    for mutation in ("crlf", "bom", "blank_lines", "bom_crlf", "quoted_fields"):
        shutil.copy(small_data / "quora-dev.csv", data_copy / "quora-dev.csv")
        path, _ = mutate_task_file(data_copy, "qqp", "dev", mutation)
        data = read_task_file(TASKS["qqp"], path, "dev")
        assert {ex.id: ex.texts for ex in data.examples} == original
        file_lines = path.read_bytes().decode("utf-8-sig").split("\n")
        assert all(ex.id in file_lines[ex.line - 1] for ex in data.examples)


NON_REGULAR = ("fifo", "directory", "dangling_symlink", "symlink_loop", "device")


def make_non_regular(path: Path, kind: str) -> str:
    """Put a non-regular file at ``path``; return what the error must say about it."""
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
        return "FIFO"
    if kind == "directory":
        path.mkdir()
        return "directory"
    if kind == "dangling_symlink":
        path.symlink_to(path.parent / "moved-away.csv")
        return "broken symbolic link"
    if kind == "symlink_loop":
        path.symlink_to(path)
        return "symbolic links"
    path.symlink_to("/dev/zero")  # a device that never ends: reading it whole would never finish
    return "character device"


NON_REGULAR_TASK_CASES = [(task, split, kind) for task, split in TASK_FILES for kind in NON_REGULAR]


@pytest.mark.parametrize("task,split,kind", NON_REGULAR_TASK_CASES,
                         ids=[f"{t}-{s}-{k}" for t, s, k in NON_REGULAR_TASK_CASES])
def test_non_regular_task_file(data_copy, task, split, kind):
    path = data_copy / TASKS[task].files[split]
    what = make_non_regular(path, kind)
    with no_hang(), pytest.raises(DataError) as e:
        load_task(task, split, data_copy)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and what in message and "\n" not in message, message


def test_stray_quote_rows_are_skipped_and_listed(data_copy):
    """The issue's case: a stray quote no longer swallows the next rows; with --skip_bad_rows only its own row
    is skipped, and it is listed."""
    path = data_copy / "quora-dev.csv"
    lines = path.read_bytes().split(b"\n")
    fields = lines[4].split(b"\t")
    fields[2] = b'"' + fields[2]
    lines[4] = b"\t".join(fields)
    fields = lines[6].split(b"\t")
    fields[2] += b'"'
    lines[6] = b"\t".join(fields)
    path.write_bytes(b"\n".join(lines))
    with pytest.raises(DataError, match=r"quora-dev\.csv:5: a field opens with a quote"):
        read_task_file(TASKS["qqp"], path, "dev")
    data = read_task_file(TASKS["qqp"], path, "dev", skip_bad_rows=True)
    assert len(data.examples) == 47 and [m.split(": ")[0] for m in data.skipped] == [f"{path}:5"]
    assert data.examples[4].texts[0].endswith('"') and data.examples[4].line == 7


# ---------------------------------------------------------------------------------------------------------
# Prediction files: valid ones for the small_data slices, then one corrupted.

def write_valid_predictions(data_dir: Path, out: Path, seed: int = 0) -> None:
    rng = random.Random(seed)
    for task, spec in TASKS.items():
        for split in ("dev", "test"):
            data = load_task(task, split, data_dir)
            values = [rng.randrange(spec.num_labels) if spec.label_kind == "class" else rng.uniform(0, 5)
                      for _ in data.examples]
            write_predictions(prediction_path(out, task, split), spec, [ex.id for ex in data.examples], values)


def _pred_row(rng, lines) -> int:
    return rng.randint(2, len(lines))


def _replace_line(lines, k, new: bytes) -> bytes:
    return _join(lines[: k - 1] + [new] + lines[k:])


def p_truncate_bytes(rng, lines, spec):
    data = _join(lines)
    return Mutated(data[: rng.randint(1, len(data) - 1)])


def p_drop_comma(rng, lines, spec):
    k = _pred_row(rng, lines)
    return Mutated(_replace_line(lines, k, lines[k - 1].replace(b",", b" ")), k, True)


def p_extra_comma(rng, lines, spec):
    k = _pred_row(rng, lines)
    return Mutated(_replace_line(lines, k, lines[k - 1] + b", 1"), k, True)


def p_tab_delimiter(rng, lines, spec):
    k = _pred_row(rng, lines)
    return Mutated(_replace_line(lines, k, lines[k - 1].replace(b" , ", b"\t")), k, True)


def p_nul(rng, lines, spec):
    k = _pred_row(rng, lines)
    i = rng.randint(0, len(lines[k - 1]))
    return Mutated(_replace_line(lines, k, lines[k - 1][:i] + b"\x00" + lines[k - 1][i:]), k, True)


def p_invalid_utf8(rng, lines, spec):
    k = rng.randint(1, len(lines))
    return Mutated(_replace_line(lines, k, lines[k - 1] + b"\xff"), k, True)


def p_empty(rng, lines, spec):
    return Mutated(b"", 1, True)


def p_header_only(rng, lines, spec):
    return Mutated(_join(lines[:1]), None, True)  # every id is missing: named with its line in the data file


def p_wrong_header(rng, lines, spec):
    return Mutated(_join([rng.choice([b"id,value", b"id \t Predicted_Other ", b""])] + lines[1:]), 1, True)


def p_duplicate_id(rng, lines, spec):
    k = rng.randint(3, len(lines))
    j = rng.randint(2, k - 1)
    return Mutated(_join(lines + [lines[j - 1]]), len(lines) + 1, True)


def p_value_out_of_range(rng, lines, spec):
    k = _pred_row(rng, lines)
    pid = lines[k - 1].split(b",")[0]
    bad = [b"7", b"-1", b"0.5"] if spec.label_kind == "class" else [b"5.01", b"-3"]
    return Mutated(_replace_line(lines, k, pid + b", " + rng.choice(bad)), k, True)


def p_value_not_a_number(rng, lines, spec):
    k = _pred_row(rng, lines)
    pid = lines[k - 1].split(b",")[0]
    bad = [b"abc", b"", b"nan", b"inf", b"-inf", b"0_1", b"1" * MB]
    return Mutated(_replace_line(lines, k, pid + b", " + rng.choice(bad)), k, True)


def p_unknown_id(rng, lines, spec):
    k = _pred_row(rng, lines)
    value = lines[k - 1].split(b",")[1]
    return Mutated(_replace_line(lines, k, rng.choice([b"nosuchid", b"x" * MB]) + b" ," + value), k, True)


def p_missing_line(rng, lines, spec):
    k = _pred_row(rng, lines)
    return Mutated(_join(lines[: k - 1] + lines[k:]), None, True)


def p_crlf(rng, lines, spec):
    return Mutated(_join(lines).replace(b"\n", b"\r\n"))


def p_garbage(rng, lines, spec):
    return Mutated(bytes(rng.randrange(256) for _ in range(2048)))


def p_bom(rng, lines, spec):
    """A BOM is accepted by the prediction reader as by the task-file reader (one shared open helper)."""
    return Mutated(b"\xef\xbb\xbf" + _join(lines))


def p_bad_id(rng, lines, spec):
    k = _pred_row(rng, lines)
    value = lines[k - 1].split(b",")[1]
    return Mutated(_replace_line(lines, k, rng.choice([b"x\x0by", b"\xe2\x80\x8bab", b"a\x1fb"]) + b" ," + value), k, True)


def p_constant(rng, lines, spec):
    """Every prediction the same value: valid (Pearson r is then undefined: counted as 0 with a warning)."""
    value = b"2.5000" if spec.label_kind == "score" else b"1"
    return Mutated(_join(lines[:1] + [line.split(b",")[0] + b", " + value for line in lines[1:]]))


PRED_MUTATIONS: dict[str, Callable] = {name[2:]: fn for name, fn in globals().items() if name.startswith("p_")}
PRED_FILES = [(task, split) for task in TASKS for split in ("dev", "test")]
PRED_CASES = [(task, split, m) for task, split in PRED_FILES for m in PRED_MUTATIONS]


def mutate_prediction_file(pred_dir: Path, task: str, split: str, mutation: str) -> tuple[Path, Mutated]:
    path = prediction_path(pred_dir, task, split)
    lines = path.read_bytes().rstrip(b"\n").split(b"\n")
    rng = random.Random(f"{SEED}/pred/{task}/{split}/{mutation}")
    mutated = PRED_MUTATIONS[mutation](rng, lines, TASKS[task])
    path.write_bytes(mutated.data)
    return path, mutated


PRED_ERROR = re.compile(r"(?P<path>[^:]+):(?P<line>\d+): \S|(?P<file>[^:]+): .*\((?P<ref>[^()]+):(?P<refline>\d+)\)$")


def check_prediction_error(message: str, path: Path, mutated: Mutated) -> None:
    """``pred:line: problem``, or ``pred: problem ... (file:line)`` for ids missing from or unknown to the data."""
    assert "\n" not in message and len(message) < 600, message[:600]
    m = PRED_ERROR.match(message)
    assert m and (m["path"] or m["file"]) == str(path), f"no file:line in {message!r}"
    if mutated.line is not None:
        line = int(m["line"] or m["refline"])
        assert line == mutated.line, f"expected line {mutated.line}: {message}"


@pytest.fixture(scope="module")
def valid_predictions(small_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("predictions")
    write_valid_predictions(small_data, out)
    return out


@pytest.mark.parametrize("task,split,mutation", PRED_CASES, ids=[f"{t}-{s}-{m}" for t, s, m in PRED_CASES])
def test_prediction_reader(small_data, valid_predictions, tmp_path, task, split, mutation):
    pred_dir = tmp_path / "predictions"
    shutil.copytree(valid_predictions, pred_dir)
    path, mutated = mutate_prediction_file(pred_dir, task, split, mutation)
    try:
        preds = read_predictions(path, TASKS[task])
        score_prediction_dir(pred_dir, small_data)
    except DataError as e:
        check_prediction_error(str(e), path, mutated)
    else:
        assert not mutated.must_fail, f"{mutation} was accepted"
        assert all(isinstance(v, float) for v in preds.values())


NON_REGULAR_PRED_CASES = [(task, split, kind) for task, split in PRED_FILES for kind in NON_REGULAR]


@pytest.mark.parametrize("task,split,kind", NON_REGULAR_PRED_CASES,
                         ids=[f"{t}-{s}-{k}" for t, s, k in NON_REGULAR_PRED_CASES])
def test_non_regular_prediction_file(small_data, valid_predictions, tmp_path, task, split, kind):
    """Not "absent": a prediction file that is there but is no regular file is an error."""
    pred_dir = tmp_path / "predictions"
    shutil.copytree(valid_predictions, pred_dir)
    path = prediction_path(pred_dir, task, split)
    what = make_non_regular(path, kind)
    with no_hang(), pytest.raises(DataError) as e:
        score_prediction_dir(pred_dir, small_data)
    message = str(e.value)
    assert message.startswith(f"{path}: ") and what in message and "\n" not in message, message


# ---------------------------------------------------------------------------------------------------------
# Through the command line. Each case runs `train_multitask.py` / `evaluate.py` as its own process: a fork of
# one helper that imported minbert once (a fresh interpreter per case would spend most of the test importing
# torch). The child runs the script with runpy exactly as `python script ...` would; its exit status, stdout
# and stderr are the case's.

HELPER = r"""
import json, os, runpy, sys, traceback
import minbert.cli, minbert.training.run, minbert.tasks.predict  # imported once; each case is a fork of this process

for request in sys.stdin:
    case = json.loads(request)
    sys.stdout.flush()
    pid = os.fork()
    if pid == 0:
        for fd, name in ((1, "stdout"), (2, "stderr")):
            os.dup2(os.open(case[name], os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
        sys.argv = [case["script"], *case["argv"]]
        code = 0
        try:
            runpy.run_path(case["script"], run_name="__main__")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = 99
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    print(json.dumps({"rc": os.waitstatus_to_exitcode(status)}), flush=True)
"""


class ForkedCli:
    def __init__(self, workdir: Path):
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "MINBERT_DEBUG": ""}
        self.proc = subprocess.Popen([sys.executable, "-c", HELPER], cwd=ROOT, env=env, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        self.workdir, self.n = workdir, 0

    def __call__(self, script: str, *argv: str, timeout: float | None = None) -> subprocess.CompletedProcess:
        """Run one case; with ``timeout``, raise TimeoutError when it has not ended by then (a hang)."""
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        request = {"script": str(ROOT / script), "argv": list(argv), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        # One reply line per request, read whole: nothing is left in the reader's buffer to hide from select.
        if timeout is not None and not select.select([self.proc.stdout], [], [], timeout)[0]:
            raise TimeoutError(f"{script} {' '.join(argv)}: still running after {timeout} s")
        rc = json.loads(self.proc.stdout.readline())["rc"]
        return subprocess.CompletedProcess([script, *argv], rc, out.read_text(errors="replace"),
                                           err.read_text(errors="replace"))

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    runner = ForkedCli(tmp_path_factory.mktemp("cli"))
    yield runner
    runner.close()


def assert_one_line_error(r: subprocess.CompletedProcess, path: Path, mutated: Mutated, check=check_error) -> None:
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
    check(lines[0][len("error: "):], path, mutated)


TINY_RUN = ["--model_name_or_path", "bert-tiny", "--max_train_samples", "8", "--max_eval_samples", "4",
            "--per_device_train_batch_size", "4", "--max_steps_per_epoch", "1", "--num_train_epochs", "1",
            "--max_seq_length", "32", "--device", "cpu"]
# One mutation kind per case, the files taken in turn from a seeded shuffle (label damage on labeled files);
# a run that reads bad input must leave no output directory behind.
_rng = random.Random(SEED)
_files = _rng.sample(TASK_FILES, len(TASK_FILES))
_labeled = [f for f in _files if f[1] != "test"]
TRAIN_CASES = [(*_labeled[i % len(_labeled)], m) if m.startswith("label") else (*_files[i % len(_files)], m)
               for i, m in enumerate((
    "truncate_line", "extra_field", "comma_file", "nul", "invalid_utf8", "empty", "header_only", "no_header",
    "duplicate_id", "label_out_of_range", "label_not_a_number", "huge_field", "carriage_return", "garbage",
    "long_sentence"))]
_pred_files = _rng.sample(PRED_FILES, len(PRED_FILES))
EVAL_CASES = [(*_pred_files[i % len(_pred_files)], m) for i, m in enumerate((
    "drop_comma", "tab_delimiter", "nul", "invalid_utf8", "empty", "header_only", "wrong_header", "duplicate_id",
    "value_out_of_range", "value_not_a_number", "unknown_id", "missing_line"))]


@pytest.mark.slow
@pytest.mark.parametrize("task,split,mutation", TRAIN_CASES, ids=[f"{t}-{s}-{m}" for t, s, m in TRAIN_CASES])
def test_train_cli_on_corrupted_data(cli, data_copy, tmp_path, task, split, mutation):
    path, mutated = mutate_task_file(data_copy, task, split, mutation)
    out = tmp_path / "run"
    r = cli("train_multitask.py", "--data_dir", str(data_copy), "--output_dir", str(out), *TINY_RUN)
    if r.returncode == 0:
        assert not mutated.must_fail, f"{mutation} was accepted"
        assert (out / "results.json").is_file() and "Traceback" not in r.stderr
        return
    assert_one_line_error(r, path, mutated)
    assert not out.exists() or not any(out.iterdir()), sorted(p.name for p in out.iterdir())


@pytest.mark.slow
@pytest.mark.parametrize("task,split,mutation", EVAL_CASES, ids=[f"{t}-{s}-{m}" for t, s, m in EVAL_CASES])
def test_evaluate_cli_on_corrupted_predictions(cli, small_data, valid_predictions, tmp_path, task, split, mutation):
    pred_dir = tmp_path / "predictions"
    shutil.copytree(valid_predictions, pred_dir)
    path, mutated = mutate_prediction_file(pred_dir, task, split, mutation)
    r = cli("evaluate.py", "--predictions", str(pred_dir), "--data_dir", str(small_data))
    assert_one_line_error(r, path, mutated, check=check_prediction_error)


@pytest.mark.slow
def test_evaluate_cli_on_corrupted_gold_data(cli, valid_predictions, data_copy):
    path, mutated = mutate_task_file(data_copy, "sts", "dev", "label_out_of_range")
    r = cli("evaluate.py", "--predictions", str(valid_predictions), "--data_dir", str(data_copy))
    assert_one_line_error(r, path, mutated)


# ---------------------------------------------------------------------------------------------------------
# Ids: every id the task readers accept survives the round trip into a prediction file and back through
# evaluate.py; every other id is refused when the task file is read, at its line.

ID_ALPHABET = list("abcXYZ019-_.:;#'\"/\\ ") + [",", "\t", "\x0b", "\x1f", "\x7f", "\x85", "\u200b", "\ufeff",
                                                  "\u2028", "\u00a0", "é", "字", "\U0001f600", "\r"]


def _random_id(rng: random.Random) -> str:
    return "".join(rng.choice(ID_ALPHABET) for _ in range(rng.randint(1, 12)))


def _quote(field: str) -> str:
    return '"' + field.replace('"', '""') + '"' if any(c in field for c in '"\t\r') else field


@pytest.mark.parametrize("seed", range(12))
def test_ids_round_trip_or_are_refused(tmp_path, seed):
    rng = random.Random(f"{SEED}/ids/{seed}")
    ids = list(dict.fromkeys(_random_id(rng) for _ in range(40)))
    path = tmp_path / "sst.csv"
    path.write_text("\tid\tsentence\tsentiment\n" + "".join(f"{n}\t{_quote(i)}\tsome text\t{n % 5}\n"
                                                          for n, i in enumerate(ids)), encoding="utf-8")
    with no_hang():
        data = read_task_file(TASKS["sst"], path, "dev", skip_bad_rows=True)
    for message in data.skipped:
        assert re.match(re.escape(str(path)) + r":\d+: ", message) and "\n" not in message, message
    accepted = [ex.id for ex in data.examples]
    assert len(accepted) + len(data.skipped) == len(ids)
    for i in ids:
        if i.strip() in accepted:
            assert id_problem(i.strip()) is None
    out = tmp_path / "sst-dev-output.csv"
    write_predictions(out, TASKS["sst"], accepted, [1] * len(accepted))
    assert list(read_predictions(out, TASKS["sst"])) == accepted


def test_ids_survive_train_predict_evaluate(data_copy, tmp_path, capsys):
    """Unusual but valid ids (quotes, spaces, non-ASCII, '#', ';') go through a real run and evaluate.py."""
    rng = random.Random(f"{SEED}/train-ids")
    for task in ("sst", "qqp", "sts"):
        for split in SPLITS:
            path = data_copy / TASKS[task].files[split]
            lines = path.read_bytes().rstrip(b"\n").split(b"\n")
            col = _columns(lines)["id"]
            for k in range(2, len(lines) + 1):
                stem, tail = rng.choice(["é", "q#", "a b", "x;y", "字", "it's", '"q"', "0.5"]), rng.choice(["", "/z", ":"])
                pid = f"{stem}{k}{tail}"
                lines = _set_field(lines, k, col, _quote(pid).encode())
            path.write_bytes(_join(lines))
    out = tmp_path / "run"
    rc = train_main(["--data_dir", str(data_copy), "--output_dir", str(out), *TINY_RUN])
    assert rc == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    rc = evaluate_main(["--predictions", str(out / "predictions"), "--data_dir", str(data_copy),
                        "--allow_partial", "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert set(json.loads(captured.out)["dev"]) == {"sst", "qqp", "sts", "overall"}


@pytest.mark.slow
def test_evaluate_script_refuses_a_fifo_without_blocking(cli, small_data, valid_predictions, tmp_path):
    """The real script in its own process, with a timeout: a FIFO in place of a prediction file."""
    pred_dir = tmp_path / "predictions"
    shutil.copytree(valid_predictions, pred_dir)
    path = prediction_path(pred_dir, "sts", "dev")
    make_non_regular(path, "fifo")
    try:
        r = cli("evaluate.py", "--predictions", str(pred_dir), "--data_dir", str(small_data), timeout=60)
    except TimeoutError:
        os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))  # let the blocked reader go (it sees end of file)
        raise
    assert r.returncode == 1 and r.stderr == f"error: {path}: is a FIFO (named pipe), not a regular file\n", r.stderr
