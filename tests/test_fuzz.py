"""Seeded fuzzing of every input: corrupted variants of the task files (the small_data slices) and of prediction
files go through the readers in-process; a subset goes through train_multitask.py and evaluate.py.

Every case must end in success (with sane data) or a one-line error naming the file and the line; a run that
fails leaves no output directory behind. Mutations that damage one known line must be reported at that line.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from minbert.data import SPLITS, TASKS, DataError, load_task, read_task_file
from minbert.predict import prediction_path, read_predictions, score_prediction_dir, write_predictions

from .conftest import ROOT

SEED = 20261121
MB = 1 << 20


@dataclass
class Mutated:
    data: bytes
    line: int | None = None  # the line an error must name (None: any line of the file)
    must_fail: bool = False  # without --skip_bad_rows the reader must refuse the file


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
    return Mutated(_join(_set_field(lines, k, col, b'"' + fields[col])), k)


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
        assert line == mutated.line, f"expected line {mutated.line}: {message}"


def check_task_data(data, split: str) -> None:
    spec = data.task
    ids = [ex.id for ex in data.examples]
    assert data.examples and len(set(ids)) == len(ids) and all(i and i == i.strip() for i in ids)
    for ex in data.examples:
        assert all(t.strip() and "\x00" not in t for t in ex.texts)
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
            check_error(str(e), path, mutated)
        else:
            assert skip or not mutated.must_fail, f"{mutation} was accepted"
            check_task_data(data, split)
            for message in data.skipped:
                check_error(message, path, mutated)


def test_clean_mutations_keep_every_row(small_data, data_copy):
    """CRLF line ends, a BOM and blank lines change nothing; line numbers still point at the rows."""
    original = {ex.id: ex.texts for ex in load_task("qqp", "dev", small_data).examples}
    for mutation in ("crlf", "bom", "blank_lines"):
        shutil.copy(small_data / "quora-dev.csv", data_copy / "quora-dev.csv")
        path, _ = mutate_task_file(data_copy, "qqp", "dev", mutation)
        data = read_task_file(TASKS["qqp"], path, "dev")
        assert {ex.id: ex.texts for ex in data.examples} == original
        file_lines = path.read_bytes().decode("utf-8-sig").split("\n")
        assert all(ex.id in file_lines[ex.line - 1] for ex in data.examples)


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


# ---------------------------------------------------------------------------------------------------------
# Through the command line. Each case runs `train_multitask.py` / `evaluate.py` as its own process: a fork of
# one helper that imported minbert once (a fresh interpreter per case would spend most of the test importing
# torch). The child runs the script with runpy exactly as `python script ...` would; its exit status, stdout
# and stderr are the case's.

HELPER = r"""
import json, os, runpy, sys, traceback
import minbert.cli, minbert.train, minbert.predict  # imported once; each case is a fork of this process

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

    def __call__(self, script: str, *argv: str) -> subprocess.CompletedProcess:
        self.n += 1
        out, err = self.workdir / f"{self.n}.out", self.workdir / f"{self.n}.err"
        request = {"script": str(ROOT / script), "argv": list(argv), "stdout": str(out), "stderr": str(err)}
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
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
