"""A run that went wrong never exits 0 and never leaves results that lie (issue #12 class 4), and a damaged or
mismatched last/ checkpoint is one line naming the file (class 6)."""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from minbert.cli import train_main


def tiny_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
            "--max_steps_per_epoch", "2", "--num_train_epochs", "1", "--max_seq_length", "32", "--device", "cpu",
            "--seed", "3", *extra]


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, err[-3000:]
    return errors[0]


def strict_json(path: Path):
    """json.loads that refuses NaN and Infinity, which are not JSON."""
    def refuse(token):
        raise ValueError(f"{path}: {token} is not JSON")

    return json.loads(path.read_text(encoding="utf-8"), parse_constant=refuse)


@pytest.fixture(scope="module")
def finished(small_data, tmp_path_factory):
    """One finished tiny run (its last/ is damaged in copies)."""
    out = tmp_path_factory.mktemp("finished") / "run"
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        assert train_main(tiny_argv(small_data, out)) == 0
    finally:
        torch.set_num_threads(torch_threads)
    return out


def test_a_finished_run_writes_strict_json_naming_the_best_checkpoint_it_wrote(finished):
    results = strict_json(finished / "results.json")
    assert all(math.isfinite(v) for v in results["dev"].values())
    assert results["checkpoint"] == str(finished / "best") and (finished / "best" / "model.safetensors").is_file()


def test_a_diverged_run_fails_in_one_line_and_writes_no_results(small_data, tmp_path, capsys, one_thread):
    """lr 1e3 and more allowed bad steps than it makes: the weights blow up without stopping the steps."""
    out = tmp_path / "run"
    argv = tiny_argv(small_data, out, "--learning_rate", "1e3", "--head_learning_rate", "1e3", "--max_grad_norm", "0",
                     "--max_bad_steps", "100", "--max_steps_per_epoch", "4")
    assert train_main(argv) == 1
    line = one_error_line(capsys)
    assert "non-finite" in line or "not finite" in line, line
    assert not (out / "results.json").exists() and not (out / "predictions").exists()
    assert not (out / "best").exists()


def test_predicting_with_a_non_finite_checkpoint_fails_before_writing(finished, tmp_path, small_data, capsys,
                                                                      one_thread):
    checkpoint = tmp_path / "nan-ckpt"
    shutil.copytree(finished / "best", checkpoint)
    weights = load_file(str(checkpoint / "model.safetensors"))
    name = next(iter(weights))
    weights[name] = torch.full_like(weights[name], float("nan"))
    save_file(weights, str(checkpoint / "model.safetensors"))
    out = tmp_path / "predict"
    assert train_main(["--predict_only", "--checkpoint", str(checkpoint), "--data_dir", str(small_data),
                       "--output_dir", str(out), "--max_eval_samples", "8", "--tasks", "sst,qqp,sts"]) == 1
    line = one_error_line(capsys)
    assert str(checkpoint) in line and "not finite" in line
    assert not out.exists()


def _replace_tensor(path: Path) -> None:
    """model.safetensors as another model size would have it: one weight of another shape."""
    weights = load_file(str(path))
    name = next(k for k, v in weights.items() if v.ndim == 2)
    weights[name] = torch.zeros(weights[name].shape[0] * 2, weights[name].shape[1])
    save_file(weights, str(path))


DAMAGES = {
    "trainer_state.json is {}": ("trainer_state.json", lambda p: p.write_text("{}"), "not a trainer state"),
    "trainer_state.json is []": ("trainer_state.json", lambda p: p.write_text("[]"), "not a trainer state"),
    "trainer_state.json has a string step": (
        "trainer_state.json", lambda p: p.write_text(p.read_text().replace('"global_step": 2', '"global_step": "2"')),
        "global_step: unexpected value '2'"),
    "trainer_state.json is cut": ("trainer_state.json", lambda p: p.write_text(p.read_text()[:20]), "cannot read"),
    "model.safetensors of another size": ("model.safetensors", _replace_tensor, "written by another model size"),
    "model.safetensors is cut": ("model.safetensors", lambda p: p.write_bytes(p.read_bytes()[:100]), "cannot read"),
    "optimizer.pt is cut": ("optimizer.pt", lambda p: p.write_bytes(p.read_bytes()[:500]), "cannot read"),
    "optimizer.pt holds something else": ("optimizer.pt", lambda p: torch.save({"x": 1}, p), "not an optimizer state"),
    "optimizer.pt of other groups": (
        "optimizer.pt", lambda p: torch.save({"state": {}, "param_groups": [{"params": [0]}]}, p), "does not fit"),
    "training_state.pt is cut": ("training_state.pt", lambda p: p.write_bytes(p.read_bytes()[:300]), "cannot read"),
    "training_state.pt is {}": ("training_state.pt", lambda p: torch.save({}, p), "not a training state"),
    "training_state.pt has a bad rng": (
        "training_state.pt",
        lambda p: torch.save({**torch.load(p, weights_only=True), "rng": {"python": 1}}, p), "rng"),
}


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_last_checkpoint_is_one_line_naming_the_file(finished, tmp_path, small_data, capsys, one_thread,
                                                              damage):
    name, corrupt, message = DAMAGES[damage]
    out = tmp_path / "run"
    shutil.copytree(finished, out)
    corrupt(out / "last" / name)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    assert train_main(tiny_argv(small_data, out, "--resume")) == 1
    line = one_error_line(capsys)
    assert line.startswith(f"error: --resume: {out / 'last' / name}") and message in line, line
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before  # nothing new written


def test_metrics_log_and_experiment_records_stay_strict_json(tmp_path):
    """A skipped step's NaN loss (or a one-seed std) is written as null: metrics.jsonl and results files stay JSON."""
    from minbert.io import finite_or_null, json_text
    from minbert.training.metrics_log import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl")
    log.write(step=3, loss_sst=float("nan"), loss_qqp=0.5, dev={"sts": float("inf")})
    log.close()
    lines = (tmp_path / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    for line in lines:  # every line strict JSON
        json.loads(line, parse_constant=lambda token: pytest.fail(f"{token} written into metrics.jsonl"))
    assert json.loads(lines[-1]) == {"step": 3, "loss_sst": None, "loss_qqp": 0.5, "dev": {"sts": None}}
    assert json.loads(json_text(finite_or_null({"std": [float("nan"), 1.0]}))) == {"std": [None, 1.0]}
