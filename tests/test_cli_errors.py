"""Flag mistakes end with argparse's usage and one `prog: error: ...` line (exit 2); run-time user errors with
one `error: ...` line (exit 1); never a traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from minbert.cli import evaluate_main, train_main

from .conftest import ROOT


def usage_error(main, argv, capsys) -> str:
    """Run a CLI entry point that must fail in argparse; return the message of its error line."""
    with pytest.raises(SystemExit) as e:
        main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: ") and "Traceback" not in err
    prog = "train_multitask.py" if main is train_main else "evaluate.py"
    assert lines[-1].startswith(f"{prog}: error: ")
    assert all(not line.startswith(f"{prog}: error") for line in lines[:-1])  # one error line, after the usage
    return lines[-1][len(f"{prog}: error: "):]


@pytest.mark.parametrize("argv,message", [
    (["--tasks", "sst,foo"], "argument --tasks: unknown task 'foo' (choose from sst, qqp, sts, sst2)"),
    (["--tasks", ","], "argument --tasks: task list ',': empty item (two commas in a row, or a comma at an end)"),
    (["--tasks", "sst,sst"], "argument --tasks: task list 'sst,sst': sst is listed twice"),
    (["--per_device_train_batch_size", "-4"], "argument --per_device_train_batch_size: must be positive, got -4"),
    (["--per_device_train_batch_size", "0"], "argument --per_device_train_batch_size: must be positive, got 0"),
    (["--per_device_eval_batch_size", "x"], "argument --per_device_eval_batch_size: 'x' is not an integer"),
    (["--learning_rate=-1e-4"], "argument --learning_rate: must be >= 0, got -1e-4"),
    (["--learning_rate", "-1e-4"], "argument --learning_rate: expected one argument"),  # looks like a flag
    (["--learning_rate", "nan"], "argument --learning_rate: must be a finite number, got nan"),
    (["--save_steps", "-1"], "argument --save_steps: must be >= 0, got -1"),
    (["--max_bad_steps", "-1"], "argument --max_bad_steps: must be >= 0, got -1"),
    (["--num_train_epochs", "0"], "argument --num_train_epochs: must be positive, got 0"),
    (["--data_dir", "/nonexistent/data"], "--data_dir /nonexistent/data: no such directory"),
    (["--model_name_or_path", "bert-huge"],
     "--model_name_or_path bert-huge: not a preset (bert-base, bert-mini, bert-tiny, minilm-l6) nor a directory"),
    (["--device", "tpu"], "--device tpu: choose auto, cpu or cuda"),
    (["--predict_only"], "--predict_only needs --checkpoint DIR"),
    (["--resume", "--predict_only", "--checkpoint", "x"], "--resume cannot be combined with --predict_only"),
    (["--no_such_flag"], "unrecognized arguments: --no_such_flag"),
    (["--smart", "--bf16", "--smart_projection", "ball"],
     "--smart_projection ball with --bf16: the ball's perturbation (radius --smart_epsilon, 1e-5 by default) is "
     "below bfloat16's resolution, so the regularizer measures rounding; drop --bf16 or use --smart_projection library"),
])
def test_train_flag_mistakes(capsys, argv, message):
    if "--data_dir" not in argv:
        argv = ["--data_dir", str(ROOT / "data"), *argv]
    assert usage_error(train_main, argv, capsys) == message


def test_unknown_combiner_is_a_flag_error(capsys):
    message = usage_error(train_main, ["--data_dir", str(ROOT / "data"), "--combiner", "median"], capsys)
    assert message.startswith("argument --combiner: invalid choice: 'median'") or \
        message.startswith("--combiner median: choose from")


@pytest.mark.parametrize("argv,message", [
    ([], "the following arguments are required: --predictions"),
    (["--predictions", "p", "--bogus"], "unrecognized arguments: --bogus"),
])
def test_evaluate_flag_mistakes(capsys, argv, message):
    assert usage_error(evaluate_main, argv, capsys) == message


def test_evaluate_missing_prediction_dir_is_one_line(capsys, tmp_path):
    assert evaluate_main(["--predictions", str(tmp_path / "nope")]) == 1
    assert capsys.readouterr().err == f"error: {tmp_path / 'nope'}: no such directory\n"


def test_refused_output_dirs_are_one_line_errors_before_any_work(capsys, tmp_path):
    """The --output_dir rules are checked before data or model are loaded (the data dir here is empty)."""
    empty_data = tmp_path / "data"
    empty_data.mkdir()
    finished, unfinished = tmp_path / "finished", tmp_path / "unfinished"
    finished.mkdir()
    (finished / "results.json").write_text("{}")
    unfinished.mkdir()
    (unfinished / "args.json").write_text(json.dumps({"seed": 1}))
    (unfinished / "metrics.jsonl").write_text('{"step": 1}\n')
    for out, problem in [(finished, "holds a finished run; pass --overwrite_output_dir to replace it"),
                         (unfinished, "holds an unfinished run; pass --resume to continue it or "
                                      "--overwrite_output_dir to start over")]:
        code = train_main(["--model_name_or_path", "bert-tiny", "--data_dir", str(empty_data), "--output_dir", str(out)])
        assert code == 1
        assert capsys.readouterr().err.splitlines()[-1] == f"error: --output_dir {out} {problem}"
    assert sorted(p.name for p in unfinished.iterdir()) == ["args.json", "metrics.jsonl"]  # left as it was
    code = train_main(["--model_name_or_path", "bert-tiny", "--data_dir", str(empty_data), "--output_dir",
                       str(unfinished), "--resume", "--seed", "2"])
    assert code == 1
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: --resume: {unfinished / 'args.json'} was written with other settings: --seed 1 (now 2); "
        "resume with the same flags")


@pytest.mark.slow
def test_real_interpreter_one_line_errors(tmp_path):
    """The same through `python train_multitask.py` itself: argparse's usage + one error line, then a run-time
    error as exactly one line."""
    env = {**os.environ, "MINBERT_DEBUG": "", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, str(ROOT / "train_multitask.py"), "--tasks", "foo"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.startswith("usage: ")
    assert r.stderr.strip().splitlines()[-1] == \
        "train_multitask.py: error: argument --tasks: unknown task 'foo' (choose from sst, qqp, sts, sst2)"
    (tmp_path / "data").mkdir()
    r = subprocess.run([sys.executable, str(ROOT / "train_multitask.py"), "--model_name_or_path", "bert-tiny",
                        "--data_dir", str(tmp_path / "data"), "--output_dir", str(tmp_path / "out")],
                       cwd=ROOT, env=env, capture_output=True, text=True)
    assert r.returncode == 1
    assert r.stderr == f"error: {tmp_path / 'data' / 'ids-sst-train.csv'}: file not found\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("layout, message", [
    ({"multitask.json": "{}", "config.json": "{}", "model.safetensors": ""}, "a minbert checkpoint, not a Hugging Face"),
    ({"config.json": "{}"}, "no model.safetensors nor pytorch_model.bin"),
    ({"args.json": "{}"}, "a minbert run folder, not a Hugging Face"),
])
def test_a_wrong_model_folder_is_named_before_any_data_is_read(tmp_path, capsys, layout, message):
    """--model_name_or_path's folder layout is checked with the other settings: the data folder here is empty,
    so reading it first would have been the error instead."""
    model, data = tmp_path / "model", tmp_path / "data"
    model.mkdir()
    data.mkdir()
    for name, text in layout.items():
        (model / name).write_text(text)
    line = usage_error(train_main, ["--model_name_or_path", str(model), "--data_dir", str(data),
                                    "--output_dir", str(tmp_path / "out")], capsys)
    assert line.startswith(f"--model_name_or_path: {model}: {message}"), line
    assert not (tmp_path / "out").exists()
