"""A tiny end-to-end run through the command line: six CSVs, checkpoint, metrics, determinism, predict-only."""
import json
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from minbert.cli import train_main
from minbert.tasks.predict import score_prediction_dir
from minbert.training.run_config import RunConfig

from .conftest import ROOT

SIX = ["sst-dev-output.csv", "sst-test-output.csv", "para-dev-output.csv", "para-test-output.csv",
       "sts-dev-output.csv", "sts-test-output.csv"]


def tiny_args(data_dir, out, *extra):
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "32", "--per_device_train_batch_size", "8", "--num_train_epochs", "2",
            "--max_seq_length", "32", "--seed", "7", *extra]


@pytest.fixture(scope="module")
def tiny_run(small_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    assert train_main(tiny_args(small_data, out)) == 0
    return out


def test_run_writes_six_csvs_checkpoint_and_metrics(tiny_run, small_data):
    assert sorted(p.name for p in (tiny_run / "predictions").iterdir()) == sorted(SIX)
    for name in ("model.safetensors", "config.json", "multitask.json", "tokenizer.json"):
        assert (tiny_run / "best" / name).is_file()
    records = [json.loads(l) for l in (tiny_run / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_sst" in r and "lr" in r for r in records)
    assert sum("dev" in r and "epoch" in r and not r.get("final") for r in records) == 2  # one per epoch
    assert json.loads((tiny_run / "args.json").read_text())["seed"] == 7
    results = json.loads((tiny_run / "results.json").read_text())
    scored = score_prediction_dir(tiny_run / "predictions", small_data)
    assert scored["dev"]["overall"] == pytest.approx(results["dev"]["overall"], abs=1e-3)


def test_same_seed_same_result(tiny_run, small_data, tmp_path):
    assert train_main(tiny_args(small_data, tmp_path)) == 0
    a, b = load_file(tiny_run / "best" / "model.safetensors"), load_file(tmp_path / "best" / "model.safetensors")
    assert all((a[k] == b[k]).all() for k in a)
    for name in SIX:
        assert (tiny_run / "predictions" / name).read_text() == (tmp_path / "predictions" / name).read_text()


def test_predict_only_from_checkpoint(tiny_run, small_data, tmp_path):
    args = ["--predict_only", "--checkpoint", str(tiny_run / "best"), "--data_dir", str(small_data),
            "--output_dir", str(tmp_path)]
    assert train_main(args) == 0
    for name in SIX:
        assert (tmp_path / "predictions" / name).read_text() == (tiny_run / "predictions" / name).read_text()


def test_dev_is_predicted_once_per_epoch_and_test_can_be_skipped(data_copy, tmp_path, monkeypatch):
    """The dev prediction files are the best epoch's evaluation (not a second prediction: the files equal a
    prediction from best/, test_predict_only_from_checkpoint); --skip_test_predictions reads no test file."""
    import minbert.training.run
    import minbert.training.trainer

    calls = []
    for module in (minbert.training.run, minbert.training.trainer):
        real = module.predict_task
        monkeypatch.setattr(module, "predict_task",
                            lambda *a, real=real, **k: calls.append(k["desc"].split()[0]) or real(*a, **k))
    for path in data_copy.glob("*test*"):
        path.unlink()  # a run that reads a test file fails
    out = tmp_path / "out"
    assert train_main(tiny_args(data_copy, out, "--skip_test_predictions")) == 0
    assert calls == ["dev"] * 3 * 2  # three tasks, two epochs; nothing after training
    assert sorted(p.name for p in (out / "predictions").iterdir()) == sorted(n for n in SIX if "-dev-" in n)
    scored = score_prediction_dir(out / "predictions", data_copy)
    assert scored["dev"] == pytest.approx(json.loads((out / "results.json").read_text())["dev"], abs=1e-4)


def test_single_task_and_max_eval_samples(small_data, tmp_path):
    assert train_main(tiny_args(small_data, tmp_path, "--tasks", "sts", "--max_eval_samples", "10",
                                "--num_train_epochs", "1")) == 0
    files = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert files == ["sts-dev-output.csv", "sts-test-output.csv"]
    assert len((tmp_path / "predictions" / "sts-test-output.csv").read_text().splitlines()) == 11


def test_sst2_single_task(small_data, tmp_path):
    assert train_main(tiny_args(small_data, tmp_path, "--tasks", "sst2", "--num_train_epochs", "1")) == 0
    files = sorted(p.name for p in (tmp_path / "predictions").iterdir())
    assert files == ["sst2-dev-output.csv", "sst2-test-output.csv"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["dev"]) == {"sst2", "overall"} and results["dev"]["overall"] == results["dev"]["sst2"]
    assert score_prediction_dir(tmp_path / "predictions", small_data)["dev"]["sst2"] == pytest.approx(
        results["dev"]["sst2"], abs=1e-4)


def test_finished_output_dir_is_refused(tiny_run, small_data):
    r = subprocess.run([sys.executable, str(ROOT / "train_multitask.py"), *tiny_args(small_data, tiny_run)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode != 0 and "holds a finished run" in r.stderr and "Traceback" not in r.stderr


def test_heads_get_their_own_learning_rate_and_no_decay_on_vectors():
    from minbert.methods.optim.build import optimizer_for_run
    from minbert.training.run import build_model

    config = RunConfig.from_flags(["--model_name_or_path", "bert-tiny", "--learning_rate", "2e-5",
                                   "--head_learning_rate", "3e-3", "--weight_decay", "0.1"])
    model = build_model(config)
    opt = optimizer_for_run(config, model)
    head_ids = {id(p) for p in model.heads.parameters()}
    for group in opt.param_groups:
        is_head = {id(p) in head_ids for p in group["params"]}
        assert len(is_head) == 1  # a group holds heads only or encoder only
        assert group["lr"] == (3e-3 if is_head.pop() else 2e-5)
        assert group["weight_decay"] == (0.0 if all(p.ndim < 2 for p in group["params"]) else 0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
