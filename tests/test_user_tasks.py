"""Tasks of the user's own (--task_spec, minbert/tasks/user_tasks.py): a fourth task made here from the shipped STS pairs
(binary: similarity above 2.5, examples/sts_binary.py) and a single-sentence regression made from the SST labels
train beside the three CS224N tasks, are predicted into NAME-dev/test-output.csv, scored by evaluate.py beside an
unchanged overall, predicted by minbert.load and minbert-predict, and resumed without the spec file; every
mistake in a spec is one line naming the file and key, with nothing written."""
from __future__ import annotations

import contextlib
import io
import json

import numpy as np
import pytest

import minbert
from minbert.cli import evaluate_main, train_main
from minbert.tasks import registry
from minbert.tasks.data import load_task
from minbert.tasks.metrics import with_overall
from minbert.tasks.predict import read_predictions
from minbert.tasks.user_tasks import parse_task_spec

from .conftest import ROOT
from .test_resume import run_cli

STSBIN = {"name": "stsbin", "input": "pair", "kind": "classification", "num_labels": 2,
          "files": {"train": "stsbin-train.csv", "dev": "stsbin-dev.csv", "test": "stsbin-test.csv"}}
# A single-sentence regression: the SST class id read as a score in 0..4, with the SST files' own columns.
SSTSCORE = {"name": "sstscore", "input": "sentence", "kind": "regression", "score_range": [0, 4],
            "files": {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"},
            "label_column": "sentiment"}


@pytest.fixture(autouse=True)
def registry_restored():
    """Runs in this process declare their tasks in minbert.tasks.registry.TASKS: each test leaves the registry as it was."""
    saved = dict(registry.TASKS)
    yield
    registry.TASKS.clear()
    registry.TASKS.update(saved)


@pytest.fixture
def user_data(data_copy):
    """data_copy (48 rows of every shipped file) with the stsbin files written by examples/sts_binary.py."""
    import runpy

    with contextlib.redirect_stdout(io.StringIO()):
        namespace = runpy.run_path(str(ROOT / "examples" / "sts_binary.py"))
        namespace["main"]([str(data_copy)])
    return data_copy


def write_spec(path, *tasks) -> str:
    path.write_text(json.dumps({"tasks": list(tasks)}), encoding="utf-8")
    return str(path)


def train_argv(data, out, spec, *extra) -> list[str]:
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data), "--output_dir", str(out),
            "--task_spec", str(spec), "--max_train_samples", "16", "--max_eval_samples", "16",
            "--per_device_train_batch_size", "8", "--num_train_epochs", "1", "--max_steps_per_epoch", "1",
            "--max_seq_length", "32", "--seed", "7", "--device", "cpu", "--bf16", "off", *extra]


def scores_of(argv) -> dict:
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert evaluate_main(argv) == 0
    return json.loads(out.getvalue())


def test_a_fourth_task_trains_predicts_scores_and_loads(user_data, tmp_path, one_thread, capsys):
    spec = write_spec(tmp_path / "my_tasks.json", STSBIN, SSTSCORE)
    run = tmp_path / "run"
    assert train_main(train_argv(user_data, run, spec)) == 0
    files = sorted(p.name for p in (run / "predictions").iterdir())
    assert {"stsbin-dev-output.csv", "stsbin-test-output.csv", "sstscore-dev-output.csv",
            "sstscore-test-output.csv"} <= set(files) and len(files) == 10
    # overall is the three CS224N tasks' alone, in training's results and in evaluate.py's.
    dev = json.loads((run / "results.json").read_text())["dev"]
    assert set(dev) == {"sst", "qqp", "sts", "overall", "stsbin", "sstscore"}
    assert dev["overall"] == pytest.approx(with_overall({t: dev[t] for t in ("sst", "qqp", "sts")})["overall"])
    (tmp_path / "my_tasks.json").unlink()  # from here on, the run's stored spec is all there is
    registry.TASKS.pop("stsbin"), registry.TASKS.pop("sstscore")
    scored = scores_of(["--predictions", str(run / "predictions"), "--data_dir", str(user_data), "--json",
                        "--allow_partial"])["dev"]
    assert scored == pytest.approx(dev, abs=1e-3)  # the files hold scores to 4 decimals
    # the Python API rebuilds the heads from the checkpoint's multitask.json and predicts as the files say
    registry.TASKS.pop("stsbin"), registry.TASKS.pop("sstscore")
    model = minbert.load(run, device="cpu", bf16="off")
    assert model.tasks == ["sst", "sstscore", "qqp", "sts", "stsbin"]
    data = load_task("stsbin", "dev", user_data, max_samples=16)
    ids, pairs = [ex.id for ex in data.examples], [ex.texts for ex in data.examples]
    expected = read_predictions(run / "predictions" / "stsbin-dev-output.csv", registry.TASKS["stsbin"])
    labels, probabilities = model.predict("stsbin", pairs, return_probabilities=True)
    assert labels.tolist() == [expected[i] for i in ids] and probabilities.shape == (16, 2)
    scores = model.predict("sstscore", [ex.texts[0] for ex in load_task("sst", "dev", user_data).examples[:3]])
    assert scores.dtype == np.float32 and ((0 <= scores) & (scores <= 4)).all()
    with pytest.raises(ValueError, match="regression task"):
        model.predict("sstscore", ["a film"], return_probabilities=True)
    # minbert-predict: --task accepts the checkpoint's own tasks
    from minbert.predict_cli import main as predict_main

    capsys.readouterr()
    assert predict_main(["--checkpoint", str(run), "--task", "stsbin", "A man plays.", "A man is playing.",
                         "--device", "cpu", "--bf16", "off"]) == 0
    assert "probabilities: 0 " in capsys.readouterr().out
    assert predict_main(["--checkpoint", str(run), "--task", "sstscore", "a film", "--device", "cpu",
                         "--format", "jsonl"]) == 0
    assert 0 <= json.loads(capsys.readouterr().out)["score"] <= 4


@pytest.mark.parametrize("combiner", ["individual", "sum", "pcgrad", "gse", "upgrad", "uw"])
def test_every_combiner_trains_a_users_task(user_data, tmp_path, one_thread, combiner):
    """From Python: the spec's content (a dict) in the settings, as args.json holds it."""
    from minbert.training.run import run
    from minbert.training.run_config import RunConfig

    config = RunConfig.from_flags(train_argv(user_data, tmp_path / "run", "unused.json", "--tasks", "sts",
                                             "--combiner", combiner, "--skip_test_predictions"))
    config.data.task_spec = {"tasks": [STSBIN]}  # as docs/tasks.md's "From Python" does
    scores = run(config)
    assert set(scores) == {"sts", "stsbin", "overall"} and scores["overall"] == pytest.approx((scores["sts"] + 1) / 2)


def test_resume_rebuilds_the_tasks_without_the_file(user_data, tmp_path):
    """A run killed after step 2 of 3 and resumed from its args.json alone (the spec file gone) ends with the
    predictions of an uninterrupted run, byte for byte."""
    spec = write_spec(tmp_path / "my_tasks.json", STSBIN)
    argv = lambda out: train_argv(user_data, out, spec, "--max_steps_per_epoch", "3", "--save_steps", "1",
                                  "--per_device_train_batch_size", "4", "--skip_test_predictions")
    assert run_cli(argv(tmp_path / "ref")).returncode == 0
    killed = run_cli(argv(tmp_path / "run"), MINBERT_TEST_KILL_AT_STEP="2")
    assert killed.returncode != 0 and not (tmp_path / "run" / "results.json").exists()
    (tmp_path / "my_tasks.json").unlink()
    resumed = run_cli(["--config", str(tmp_path / "run" / "args.json"), "--resume"])
    assert resumed.returncode == 0, resumed.stderr
    for name in ("stsbin-dev-output.csv", "sts-dev-output.csv"):
        assert (tmp_path / "run" / "predictions" / name).read_bytes() == (tmp_path / "ref" / "predictions" / name).read_bytes()


def predict_argv(data, checkpoint, out, *extra) -> list[str]:
    return ["--predict_only", "--checkpoint", str(checkpoint), "--data_dir", str(data), "--output_dir", str(out),
            "--tasks", "sts", "--max_eval_samples", "16", "--max_seq_length", "32", "--device", "cpu",
            "--bf16", "off", *extra]


def test_predict_only_takes_the_tasks_from_the_checkpoint(user_data, tmp_path, one_thread, capsys):
    """--predict_only --checkpoint RUN predicts the run's tasks of the user's own without the spec file (they come
    from the checkpoint's multitask.json); a --task_spec that declares other tasks is one line, nothing written."""
    spec = write_spec(tmp_path / "my_tasks.json", STSBIN)
    run = tmp_path / "run"
    assert train_main(train_argv(user_data, run, spec, "--tasks", "sts")) == 0
    (tmp_path / "my_tasks.json").unlink()
    registry.TASKS.pop("stsbin")
    for checkpoint, out in ((run, tmp_path / "predict"), (run / "best", tmp_path / "predict_best")):
        assert train_main(predict_argv(user_data, checkpoint, out)) == 0
        names = sorted(p.name for p in (out / "predictions").iterdir())
        assert names == ["sts-dev-output.csv", "sts-test-output.csv", "stsbin-dev-output.csv",
                         "stsbin-test-output.csv"]
        for name in ("stsbin-dev-output.csv", "stsbin-test-output.csv"):
            assert (out / "predictions" / name).read_bytes() == (run / "predictions" / name).read_bytes()
        # its args.json keeps the spec, so evaluate.py scores the user's task with nothing else
        assert json.loads((out / "args.json").read_text())["task_spec"] == parse_task_spec({"tasks": [STSBIN]})
        assert "stsbin" in scores_of(["--predictions", str(out / "predictions"), "--data_dir", str(user_data),
                                      "--json", "--allow_partial"])["dev"]
    # a --task_spec that agrees with the checkpoint's (its defaults spelled out or not) is accepted
    agreeing = write_spec(tmp_path / "same.json", {**STSBIN, "label_column": "label"})
    assert train_main(predict_argv(user_data, run, tmp_path / "agreeing", "--task_spec", agreeing)) == 0
    capsys.readouterr()
    for task, difference in (({**STSBIN, "num_labels": 3}, "tasks[0].num_labels is 3 here, 2 in the checkpoint"),
                             ({**STSBIN, "name": "stsbin2"}, "tasks stsbin2 here, stsbin in the checkpoint")):
        other = write_spec(tmp_path / "other.json", task)
        out = tmp_path / "refused"
        with pytest.raises(SystemExit) as e:
            train_main(predict_argv(user_data, run, out, "--task_spec", other))
        err = capsys.readouterr().err
        assert e.value.code == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert err == f"error: --task_spec {other}: disagrees with --checkpoint {run / 'best'}: {difference}\n"
        assert not out.exists()
    # the checkpoint's tasks read their dev and test files from --data_dir: one missing is named with the key
    (user_data / "stsbin-test.csv").unlink()
    with pytest.raises(SystemExit) as e:
        train_main(predict_argv(user_data, run, tmp_path / "refused"))
    assert e.value.code == 2 and capsys.readouterr().err == (
        f"error: {run / 'best' / 'multitask.json'}: task_spec: tasks[0].files.test: {user_data / 'stsbin-test.csv'}: "
        "no such file\n")
    assert not (tmp_path / "refused").exists()


def _without(task: dict, key: str) -> dict:
    return {k: v for k, v in task.items() if k != key}


HOSTILE = [
    ("{not json", "my_tasks.json:1: not JSON"),
    ([STSBIN], "my_tasks.json: expected a JSON object {\"tasks\": [...]}"),
    ({"tasks": [_without(STSBIN, "kind")]}, "my_tasks.json: tasks[0]: missing key 'kind'"),
    ({"tasks": [{**STSBIN, "num_labels": "2"}]}, "my_tasks.json: tasks[0].num_labels: must be an integer >= 2"),
    ({"tasks": [{**STSBIN, "num_labels": 1}]}, "my_tasks.json: tasks[0].num_labels: must be an integer >= 2"),
    ({"tasks": [{**STSBIN, "kind": "ranking"}]}, "my_tasks.json: tasks[0].kind: unknown kind \"ranking\""),
    ({"tasks": [{**STSBIN, "metric": "f1"}]}, "my_tasks.json: tasks[0].metric: unknown metric \"f1\""),
    ({"tasks": [{**STSBIN, "metric": "pearson"}]}, "my_tasks.json: tasks[0].metric: pearson does not score"),
    ({"tasks": [{**STSBIN, "colour": 1}]}, "my_tasks.json: tasks[0]: unknown key 'colour'"),
    ({"tasks": [{**STSBIN, "name": "sts"}]}, "my_tasks.json: tasks[0].name: 'sts' is a built-in task"),
    ({"tasks": [{**STSBIN, "name": "para"}]}, "my_tasks.json: tasks[0].name: 'para' is a built-in task"),
    ({"tasks": [{**STSBIN, "name": "../x"}]}, "my_tasks.json: tasks[0].name: must be a word"),
    ({"tasks": [STSBIN, STSBIN]}, "my_tasks.json: tasks[1].name: 'stsbin' is also tasks[0]"),
    ({"tasks": [{**STSBIN, "files": {**STSBIN["files"], "dev": "nope.csv"}}]},
     "my_tasks.json: tasks[0].files.dev: DATA/nope.csv: no such file"),
    ({"tasks": [{**STSBIN, "files": {**STSBIN["files"], "dev": "../stsbin-dev.csv"}}]},
     "my_tasks.json: tasks[0].files.dev: expected a file name in --data_dir"),
    ({"tasks": [{**SSTSCORE, "score_range": [4, 0]}]}, "my_tasks.json: tasks[0].score_range: must be [low, high]"),
    ({"tasks": [{**STSBIN, "text_columns": ["sentence1"]}]}, "my_tasks.json: tasks[0].text_columns: expected 2"),
]


@pytest.mark.parametrize("content,message", HOSTILE, ids=[m.split(": ", 1)[1][:40] for _, m in HOSTILE])
def test_a_wrong_spec_is_one_line_and_writes_nothing(user_data, tmp_path, monkeypatch, capsys, content, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my_tasks.json").write_text(content if isinstance(content, str) else json.dumps(content))
    with pytest.raises(SystemExit) as e:
        train_main(train_argv(user_data, tmp_path / "run", "my_tasks.json"))
    err = capsys.readouterr().err
    message = message.replace("DATA", str(user_data))
    assert e.value.code == 2 and err.startswith("error: " + message) and err.count("\n") == 1, err
    assert "Traceback" not in err and not (tmp_path / "run").exists()
    assert "stsbin" not in registry.TASKS  # a refused spec declares nothing
    if "no such file" not in message:  # evaluate.py reads the spec the same way (it reads no training file)
        assert evaluate_main(["--predictions", str(tmp_path), "--task_spec", "my_tasks.json"]) == 1
        assert capsys.readouterr().err == err


def test_bad_rows_of_a_users_file_are_reported_or_skipped(user_data, tmp_path, capsys):
    path = user_data / "stsbin-train.csv"
    lines = path.read_text().splitlines(keepends=True)
    lines[2] = lines[2].rsplit("\t", 1)[0] + "\tx\n"
    path.write_text("".join(lines))
    spec = write_spec(tmp_path / "my_tasks.json", STSBIN)
    assert train_main(train_argv(user_data, tmp_path / "run", spec)) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {path}:3: label 'x' is not a number (use --skip_bad_rows to skip such rows)"
    assert not (tmp_path / "run").exists()
    data = load_task("stsbin", "train", user_data, skip_bad_rows=True)
    assert data.skipped == [f"{path}:3: label 'x' is not a number"] and len(data.examples) == 47


def test_the_spec_is_checked_content_with_its_defaults():
    content = parse_task_spec({"tasks": [STSBIN, SSTSCORE]}, "x.json")
    first, second = content["tasks"]
    assert first["text_columns"] == ["sentence1", "sentence2"] and first["label_column"] == "label"
    assert first["metric"] == "accuracy" and second["metric"] == "pearson" and second["score_range"] == [0.0, 4.0]
    assert parse_task_spec(content, "y") == content  # stored content reads back as itself
