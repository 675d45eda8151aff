"""Seeded fuzzing of train_multitask.py's settings: hostile flags and --config files (issue #12, class 5).

Every case is a setting a careless or hostile user could pass: a wrong type, null, inf or nan, a value out of
range, an unknown key, an empty string, a huge number, flags that conflict. For each one the run must stop
before training with a non-zero exit status, no traceback, one error line naming the flag (or the config file
and key), and no output directory. The cases run through train_main in this process (fast); a few go through
the real interpreter.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys

import pytest

from minbert.cli import train_main, train_parser

from .conftest import ROOT

SEED = 20261201
N_FLAG_CASES, N_CONFIG_CASES = 90, 90

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
