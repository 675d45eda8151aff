"""Seeded fuzzing of train_multitask.py's settings: hostile flags and --config files (issue #12, class 5).

Every case is a setting a careless or hostile user could pass: a wrong type, null, inf or nan, a value out of
range, an unknown key, an empty string, a huge number, flags that conflict. For each one the run must stop
before training with a non-zero exit status, no traceback, one error line naming the flag (or the config file
and key), and no output directory. The cases run through train_main in this process (fast); a few go through
the real interpreter. A hostile --task_spec file (missing, a FIFO, not JSON, each key of a task wrong) comes in by
the flag and by a --config file, naming the spec file (or the config file's task_spec key) and the task's key.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

from minbert.cli import train_main, train_parser
from minbert.tasks import registry
from minbert.tasks.user_tasks import KEYS
from minbert.training.run_config import RunConfig

from .conftest import ROOT

SEED = 20261201
N_FLAG_CASES, N_CONFIG_CASES, N_SPEC_CASES = 90, 90, 60

INT_POSITIVE = ["max_train_samples", "max_eval_samples", "per_device_train_batch_size", "per_device_eval_batch_size",
                "num_train_epochs", "max_steps_per_epoch", "logging_steps", "iterations_multiplier"]
INT_NONNEG = ["max_bad_steps", "save_steps", "smart_steps"]
FLOAT_NONNEG = ["learning_rate", "head_learning_rate", "weight_decay", "max_grad_norm", "smart_lambda", "smart_eta",
                "smart_epsilon", "smart_sigma", "bregman_mu"]
FLOAT_UNIT = ["warmup_ratio", "bregman_beta"]
CHOICE = ["pooling", "sts_head", "para_head", "combiner", "optim", "report_to", "device"]
BOOL = ["skip_bad_rows", "bf16", "torch_compile", "smart", "bregman", "overwrite_output_dir", "resume", "predict_only"]
NULLABLE = {"max_seq_length", "max_train_samples", "max_eval_samples", "max_steps_per_epoch", "optim_args", "checkpoint"}
HUGE_DIGITS = "9" * 5000  # beyond int()'s digit limit

# Values that no flag of each kind accepts (written as the command line would carry them).
BAD_FLAG_VALUES = {
    "int_positive": ["abc", "", "1.5", "0", "-3", "1e3", "inf", "nan", "0x10", "2,3", HUGE_DIGITS, "true"],
    "int_nonneg": ["abc", "", "-1", "2.5", "inf", "nan", "1e2", HUGE_DIGITS, "none"],
    "float_nonneg": ["abc", "", "-1", "inf", "nan", "1e309", "-inf", "1,5", "-1e-9", "Infinity", "0x", "null"],
    "float_unit": ["1.5", "2", "1e9", "-0.1", "inf", "nan", "abc", "", "1e309"],
    "seed": ["-1", str(2**32), str(2**70), "abc", "1.5", "", HUGE_DIGITS],
    "max_seq_length": ["0", "3", "4", "513", "100000", "abc", "-5", "", "1e3"],
    "pooling": ["", "bogus", "MEAN", " mean", "cls,mean"],
    "sts_head": ["", "cosine-regression", "none"],
    "para_head": ["", "UV", "concat"],
    "combiner": ["", "median", "PCGrad"],
    "optim": ["", "sgd", "adam w"],
    "report_to": ["", "wandb", "TensorBoard"],
    "device": ["", "tpu", "cuda:x", "gpu", "cpu:0:1"],
    "model_name_or_path": ["", "/nonexistent/model", "bert-huge"],
    "data_dir": ["", "/nonexistent/data"],
    "tasks": ["", ",", "mnli", "sst,foo", "SST"],
    "optim_args": ["lr: abc", '{"lr": null}', "lr 1e-4", "lr: inf", "nope: 1", "lr: -1", "[1, 2]", "weight_decay: nan"],
}


def flag_kind(flag: str) -> str:
    for kind, flags in (("int_positive", INT_POSITIVE), ("int_nonneg", INT_NONNEG), ("float_nonneg", FLOAT_NONNEG),
                        ("float_unit", FLOAT_UNIT)):
        if flag in flags:
            return kind
    return flag


def flag_cases() -> list[tuple[str, list[str], list[str]]]:
    """(id, extra argv, flags one of which the error line must name)."""
    rng = random.Random(SEED)
    flags = [*INT_POSITIVE, *INT_NONNEG, *FLOAT_NONNEG, *FLOAT_UNIT, *CHOICE, "seed", "max_seq_length",
             "model_name_or_path", "data_dir", "tasks", "optim_args"]
    cases = []
    for i in range(N_FLAG_CASES):
        flag = rng.choice(flags)
        value = rng.choice(BAD_FLAG_VALUES[flag_kind(flag)])
        cases.append((f"flag{i}-{flag}", [f"--{flag}={value}"], [flag]))
    cases += [  # conflicting or incomplete flags
        ("resume+overwrite", ["--resume", "--overwrite_output_dir"], ["resume", "overwrite_output_dir"]),
        ("resume+predict_only", ["--resume", "--predict_only", "--checkpoint", "x"], ["resume", "predict_only"]),
        ("predict_only-no-checkpoint", ["--predict_only"], ["predict_only", "checkpoint"]),
        ("checkpoint-without-predict_only", ["--checkpoint", str(ROOT)], ["checkpoint", "predict_only"]),
        ("bregman-without-smart", ["--bregman"], ["bregman", "smart"]),
        ("smart-ball+bf16", ["--smart", "--smart_projection", "ball", "--bf16"], ["smart_projection", "bf16"]),
        ("output_dir-empty", ["--output_dir="], ["output_dir"]),
        ("output_dir-cwd", ["--output_dir", "."], ["output_dir"]),
        ("output_dir-parent-of-data", ["--output_dir", "{data}/.."], ["output_dir"]),
        ("output_dir-is-data", ["--output_dir", "{data}"], ["output_dir"]),
        ("output_dir-is-a-file", ["--output_dir", "{data}/sts-dev.csv"], ["output_dir"]),
        ("predict_only-missing-checkpoint", ["--predict_only", "--checkpoint", "/nonexistent/ckpt"], ["checkpoint"]),
        ("unknown-flag", ["--no_such_flag", "1e-4"], ["no_such_flag"]),
        ("flag-without-value", ["--seed"], ["seed"]),
    ]
    return cases


def json_bad_values(key: str, rng: random.Random) -> list:
    """JSON values the config key ``key`` must refuse."""
    kind = flag_kind(key)
    wrong_types = [["a"], {"a": 1}, [1, 2]]
    if key in BOOL:
        return ["yes", 1, 0, None, "true", [True], {"on": True}]
    values = wrong_types + ([] if key in NULLABLE else [None])
    if kind in ("int_positive", "int_nonneg", "seed"):
        values += [True, 1.5, "abc", "", float("inf"), float("nan"), -1 if kind != "int_positive" else 0]
        if kind == "seed":
            values += [2**40, -5]
    elif kind in ("float_nonneg", "float_unit"):
        values += [True, "abc", "", float("inf"), float("-inf"), float("nan"), -1.0]
        if kind == "float_unit":
            values += [1.5, 1e300]
    elif kind == "max_seq_length":
        values += [0, 4, 10**6, True, "abc", 513]
    elif key == "optim_args":
        values = [{"lr": 1}, "lr: abc", "lr 1e-4", ["lr: inf"], 5, True]
    else:  # strings: choices, paths, tasks
        values += [5, 1.5, True, ""] + [v for v in BAD_FLAG_VALUES.get(key, []) if v]
    return values


def config_cases() -> list[tuple[str, dict, str]]:
    """(id, settings that override a valid base config, the key the error line must name)."""
    rng = random.Random(SEED + 1)
    keys = [*INT_POSITIVE, *INT_NONNEG, *FLOAT_NONNEG, *FLOAT_UNIT, *CHOICE, *BOOL, "seed", "max_seq_length",
            "model_name_or_path", "data_dir", "tasks", "optim_args", "output_dir"]
    cases = []
    for i in range(N_CONFIG_CASES):
        key = rng.choice(keys)
        value = rng.choice(json_bad_values(key, rng))
        cases.append((f"config{i}-{key}", {key: value}, key))
    for i in range(6):  # unknown keys, some of them near misses
        name = rng.choice(["learning_rat", "lr", "epochs", "Seed", "output-dir", "max_seq_len", "", "tasks "])
        cases.append((f"config-unknown{i}", {name: 1}, name))
    cases += [
        ("config-bregman-without-smart", {"bregman": True, "smart": False}, "bregman"),
        # (resume and overwrite_output_dir set to true in a config file are ignored: tests/test_output_folder.py)
        ("config-checkpoint-without-predict_only", {"checkpoint": "x"}, "checkpoint"),
        ("config-output_dir-empty", {"output_dir": ""}, "output_dir"),
        ("config-output_dir-cwd", {"output_dir": "."}, "output_dir"),
    ]
    return cases


# --task_spec FILE.json: a hostile spec file, reached through the flag, through a --config file that names it, and
# as a --config file's own content (how args.json holds it). tests/test_user_tasks.py checks the exact messages.
SPEC_PAIR = {"name": "mypair", "input": "pair", "kind": "classification", "num_labels": 2, "label_column": "is_duplicate",
             "files": {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"}}
SPEC_SCORE = {"name": "myscore", "input": "sentence", "kind": "regression", "score_range": [0, 4],
              "label_column": "sentiment",
              "files": {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"}}
MISSING, DIRECTORY, FIFO = "<missing>", "<directory>", "<fifo>"  # the path is no readable file
# Values no task accepts for each key (classification: SPEC_PAIR, regression: SPEC_SCORE).
BAD_SPEC_VALUES = {
    "name": ["", "Sts", "sts", "sst", "sst2", "para", "overall", "a" * 41, "9lives", "my-task", "../x", "a b", 5, None,
             ["x"], True],
    "input": ["", "triple", "Pair", "sentences", None, 1, ["pair"]],
    "kind": ["", "ranking", "Classification", "regress", None, 0, {"k": 1}],
    "num_labels": [1, 0, -2, 2.5, "2", True, None, float("nan"), float("inf"), [2]],
    "score_range": [[4, 0], [1, 1], [0], [0, 1, 2], "0-4", [0, float("inf")], [float("nan"), 1], [True, 2], None,
                    ["0", "4"], {"low": 0, "high": 4}],
    "metric": ["f1", "", None, 5, "pearson", "spearman"],
    "files": [{}, None, "quora-dev.csv", ["quora-dev.csv"], {"train": "quora-train.csv", "dev": "quora-dev.csv"},
              {**SPEC_PAIR["files"], "extra": "x.csv"}, {**SPEC_PAIR["files"], "dev": "nope.csv"},
              {**SPEC_PAIR["files"], "test": "../quora-dev.csv"}, {**SPEC_PAIR["files"], "dev": "sub/x.csv"},
              {**SPEC_PAIR["files"], "train": ""}, {**SPEC_PAIR["files"], "train": ".."}, {**SPEC_PAIR["files"], "dev": 5}],
    "text_columns": [["sentence1"], ["a", "a"], "sentence1", [], ["a", 1], [" a", "b"], ["a\tb", "c"], None],
    "label_column": ["id", "sentence1", "", 5, " x", None, ["label"], 'a"b'],
}
# Whole-file problems: (id, the file (bytes, a JSON value, or MISSING/DIRECTORY/FIFO)).
SPEC_FILE_CASES = [
    ("spec-missing", MISSING), ("spec-directory", DIRECTORY), ("spec-fifo", FIFO),
    ("spec-empty", b""), ("spec-not-utf8", b'{"tasks": [{"name": "caf\xe9"}]}'), ("spec-not-json", b"{tasks: [}"),
    ("spec-nan-bytes", b"NaN"), ("spec-list", [SPEC_PAIR]), ("spec-null", None), ("spec-number", 3),
    ("spec-string", "tasks"), ("spec-no-tasks", {}), ("spec-extra-key", {"tasks": [SPEC_PAIR], "version": 2}),
    ("spec-tasks-not-a-list", {"tasks": SPEC_PAIR}), ("spec-tasks-empty", {"tasks": []}),
    ("spec-tasks-null", {"tasks": None}), ("spec-task-not-an-object", {"tasks": ["mypair"]}),
    ("spec-duplicate-name", {"tasks": [SPEC_PAIR, {**SPEC_SCORE, "name": "mypair"}]}),
]


def spec_cases() -> list[tuple[str, object, str | None]]:
    """(id, the spec file's content, the key the error line must name after the file; None: the file alone)."""
    rng = random.Random(SEED + 2)
    cases = [(name, content, None) for name, content in SPEC_FILE_CASES]
    for i in range(N_SPEC_CASES):
        key = rng.choice(list(BAD_SPEC_VALUES))
        base = SPEC_SCORE if key == "score_range" else rng.choice([SPEC_PAIR, SPEC_SCORE]) if key in (
            "name", "input", "kind", "files", "label_column") else SPEC_PAIR
        task = {**base, key: rng.choice(BAD_SPEC_VALUES[key])}
        others = [SPEC_SCORE if base is SPEC_PAIR else SPEC_PAIR] if rng.random() < 0.5 else []
        position = rng.randrange(len(others) + 1)
        tasks = others[:position] + [task] + others[position:]
        cases.append((f"spec{i}-{key}", {"tasks": tasks}, f"tasks[{position}].{key}"))
    for key in ("name", "input", "kind", "files"):  # a required key left out
        cases.append((f"spec-without-{key}", {"tasks": [{k: v for k, v in SPEC_PAIR.items() if k != key}]}, key))
    cases += [
        ("spec-unknown-key", {"tasks": [{**SPEC_PAIR, "colour": "red"}]}, "colour"),
        ("spec-num_labels-on-regression", {"tasks": [{**SPEC_SCORE, "num_labels": 2}]}, "num_labels"),
        ("spec-score_range-on-classification", {"tasks": [{**SPEC_PAIR, "score_range": [0, 1]}]}, "score_range"),
        ("spec-missing-data-file", {"tasks": [{**SPEC_PAIR, "files": {**SPEC_PAIR["files"], "test": "gone.csv"}}]},
         "files.test"),
    ]
    return cases


def write_spec(path, content) -> str:
    """The spec file at ``path`` as the case has it; its path."""
    if content == DIRECTORY:
        path.mkdir()
    elif content == FIFO:
        os.mkfifo(path)
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content != MISSING:
        path.write_text(json.dumps(content), encoding="utf-8")  # NaN and Infinity as Python's json writes them
    return str(path)


def run_case(argv: list[str], capsys) -> tuple[int, str]:
    try:
        code = train_main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def assert_one_line_naming(code: int, err: str, names: list[str]) -> str:
    assert code not in (0, None), err[-2000:]
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "error: " in line]
    assert len(errors) == 1, err[-2000:]
    assert any(name in errors[0] for name in names), (names, errors[0])
    return errors[0]


@pytest.fixture
def base(small_data, tmp_path):
    """Settings of a valid tiny run, and its output directory."""
    out = tmp_path / "out"
    return {"model_name_or_path": "bert-tiny", "data_dir": str(small_data), "output_dir": str(out),
            "max_train_samples": 4, "max_eval_samples": 4, "max_steps_per_epoch": 1, "num_train_epochs": 1,
            "device": "cpu"}, out


def test_there_are_enough_cases():
    assert len(flag_cases()) + len(config_cases()) >= 100
    assert flag_cases() == flag_cases() and [c[0] for c in config_cases()] == [c[0] for c in config_cases()]
    cases = spec_cases()
    assert len(cases) >= 60 and [c[0] for c in cases] == [c[0] for c in spec_cases()]
    assert len({c[0] for c in cases}) == len(cases)
    mutated = {name.split("-", 1)[1] for name, _, _ in cases if name[4:5].isdigit()}
    assert mutated == set(BAD_SPEC_VALUES) == set(KEYS)  # the seeded cases reach every key of a task


def test_every_flag_kind_in_the_fuzzer_is_a_real_flag():
    dests = {a.dest for a in train_parser()._actions}
    assert set(INT_POSITIVE + INT_NONNEG + FLOAT_NONNEG + FLOAT_UNIT + CHOICE + BOOL) <= dests


@pytest.mark.parametrize("case", flag_cases(), ids=lambda c: c[0])
def test_hostile_flag(case, base, capsys, small_data):
    _, extra, names = case
    settings, out = base
    argv = [x for k, v in settings.items() for x in (f"--{k}", str(v))]
    argv += [a.replace("{data}", str(small_data)) for a in extra]
    code, err = run_case(argv, capsys)
    assert_one_line_naming(code, err, [f"--{n}" for n in names])
    assert not out.exists()


@pytest.mark.parametrize("case", config_cases(), ids=lambda c: c[0])
def test_hostile_config_file(case, base, capsys, tmp_path):
    _, override, key = case
    settings, out = base
    path = tmp_path / "run.json"
    path.write_text(json.dumps({**settings, **override}))  # NaN and Infinity as Python's json writes them
    code, err = run_case(["--config", str(path)], capsys)
    line = assert_one_line_naming(code, err, [str(path)])
    assert repr(key) in line or f"{key}" in line.split(str(path), 1)[1], line
    assert not out.exists()


@pytest.mark.parametrize("argv, name", [
    (["--warmup_ratio", "inf"], "--warmup_ratio"),
    (["--max_seq_length", "100000"], "--max_seq_length"),
    (["--optim_args", '{"lr": null}'], "--optim_args"),
])
def test_real_interpreter(argv, name, tmp_path, small_data):
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, str(ROOT / "train_multitask.py"), "--model_name_or_path", "bert-tiny",
                        "--data_dir", str(small_data), "--output_dir", str(out), *argv],
                       cwd=tmp_path, capture_output=True, text=True, timeout=300,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
    assert_one_line_naming(r.returncode, r.stderr, [name])
    assert not out.exists()


@pytest.fixture
def registry_restored():
    """A spec that passes declares its tasks in minbert.tasks.registry.TASKS: each case leaves the registry as it was."""
    saved = dict(registry.TASKS)
    yield
    registry.TASKS.clear()
    registry.TASKS.update(saved)


def test_the_spec_cases_start_from_valid_tasks(base, tmp_path, registry_restored):
    """Each hostile spec is one change away from these tasks, which a run accepts (a leading BOM included), so a
    refusal below is the change's."""
    settings, out = base
    path = tmp_path / "my_tasks.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"tasks": [SPEC_PAIR, SPEC_SCORE]}).encode())
    argv = [x for k, v in settings.items() for x in (f"--{k}", str(v))] + ["--task_spec", str(path)]
    config = RunConfig.from_namespace(train_parser().parse_args(argv)).validate()
    assert [t["name"] for t in config.task_spec["tasks"]] == ["mypair", "myscore"] and not out.exists()


def assert_spec_refused(code: int, err: str, source: str, key: str | None, out) -> None:
    """Exit status 2, one line ``error: SOURCE...`` naming ``key`` after the source, no traceback, no output dir."""
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert err.count("\n") == 1 and err.startswith(f"error: {source}"), err
    assert key is None or key in err[len(f"error: {source}"):], (key, err)
    assert not out.exists()
    assert not {"mypair", "myscore"} & set(registry.TASKS)  # a refused spec declares nothing


@pytest.mark.parametrize("case", spec_cases(), ids=lambda c: c[0])
def test_hostile_task_spec_flag(case, base, capsys, tmp_path, registry_restored):
    _, content, key = case
    settings, out = base
    path = write_spec(tmp_path / "my_tasks.json", content)
    argv = [x for k, v in settings.items() for x in (f"--{k}", str(v))] + ["--task_spec", path]
    code, err = run_case(argv, capsys)
    assert_spec_refused(code, err, path, key, out)


@pytest.mark.parametrize("case", spec_cases(), ids=lambda c: c[0])
def test_hostile_task_spec_in_a_config_file(case, base, capsys, tmp_path, registry_restored):
    """A --config file that names the spec file (the error names the spec file), and one that holds the spec's
    content as args.json does (the error names the config file and its task_spec key)."""
    _, content, key = case
    settings, out = base
    spec = write_spec(tmp_path / "my_tasks.json", content)
    config = tmp_path / "run.json"
    config.write_text(json.dumps({**settings, "task_spec": spec}))
    code, err = run_case(["--config", str(config)], capsys)
    assert_spec_refused(code, err, spec, key, out)
    if content in (None, MISSING, DIRECTORY, FIFO) or isinstance(content, (bytes, str)):
        return  # null is no spec, a string a path: only a JSON object or array stands for the content itself
    config.write_text(json.dumps({**settings, "task_spec": content}))
    code, err = run_case(["--config", str(config)], capsys)
    assert_spec_refused(code, err, f"{config}: task_spec", key, out)
