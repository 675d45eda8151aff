"""Resuming through the command line: a run SIGKILLed at any step, or stopped with Ctrl-C, and resumed with
--resume ends with weights bit-identical to an uninterrupted run (CPU, same seed); output-dir rules;
non-finite steps.

The kills use the trainer's test-only hook MINBERT_TEST_KILL_AT_STEP=N: the process SIGKILLs itself right
after optimizer step N, before any checkpoint of that step, so the resumed run must redo work from an older
`last` (deterministic, unlike a timer). Ctrl-C is a real SIGINT sent from here while the run is in flight.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from minbert.cli import train_main
from minbert.io.settings import from_flat
from minbert.training.output_dir import check_output_dir, prepare_output_dir
from minbert.training.run_config import RunConfig

from .conftest import ROOT

# 2 epochs x 3 steps, 3 tasks; --save_steps 2 saves `last` after steps 2 and 4 and at both epoch ends (3, 6).
STEPS_PER_EPOCH, EPOCHS = 3, 2


def train_argv(data_dir: Path, out: Path, *extra: str) -> list[str]:
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "16", "--max_eval_samples", "8", "--per_device_train_batch_size", "4",
            "--max_steps_per_epoch", str(STEPS_PER_EPOCH), "--num_train_epochs", str(EPOCHS), "--logging_steps", "1",
            "--save_steps", "2", "--device", "cpu", "--seed", "7", "--max_seq_length", "32", "--bf16", "off", *extra]


def start(argv: list[str], **env: str) -> subprocess.Popen:
    # One thread: tiny models run several times faster on a shared, busy CPU (and every run uses the same).
    environ = {**os.environ, "MINBERT_DEBUG": "", "OMP_NUM_THREADS": "1", **env}
    return subprocess.Popen([sys.executable, str(ROOT / "train_multitask.py"), *argv], cwd=ROOT, env=environ,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def run_cli(argv: list[str], **env: str) -> subprocess.CompletedProcess:
    p = start(argv, **env)
    out, err = p.communicate(timeout=300)
    return subprocess.CompletedProcess(p.args, p.returncode, out, err)


def last_step(out: Path) -> int:
    return json.loads((out / "last" / "trainer_state.json").read_text())["global_step"]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    different = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


# PCGrad's torch.Generator, M-FAC's gradient window and SMART's Bregman EMA copy: state beyond AdamW's.
STATEFUL = ["--combiner", "pcgrad", "--optim", "mfac", "--optim_args", "num_grads: 4", "--smart", "--bregman",
            "--smart_steps", "1"]


@pytest.fixture(scope="module")
def reference(small_data, tmp_path_factory):
    """The uninterrupted run for a set of extra flags (run once per module)."""
    runs: dict[tuple[str, ...], Path] = {}

    def get(*extra: str) -> Path:
        if extra not in runs:
            out = tmp_path_factory.mktemp("reference") / "run"
            r = run_cli(train_argv(small_data, out, *extra))
            assert r.returncode == 0, r.stderr
            leftovers = [p.name for p in out.rglob("*") if p.name.endswith((".tmp", ".partial", ".old"))]
            assert not leftovers
            runs[extra] = out
        return runs[extra]

    return get


@pytest.mark.slow
def test_sigkill_mid_epoch_and_after_epoch_boundary_then_resume_is_bit_identical(small_data, reference, tmp_path):
    reference = reference()
    out = tmp_path / "run"
    # Killed after step 3 (the last of epoch 1, before its evaluation): `last` holds step 2, mid-epoch.
    r = run_cli(train_argv(small_data, out), MINBERT_TEST_KILL_AT_STEP="3")
    assert r.returncode == -signal.SIGKILL
    assert last_step(out) == 2 and not (out / "results.json").exists()

    # Resumed from step 2, killed after step 4: `last` holds step 3, written after epoch 1's evaluation.
    r = run_cli(train_argv(small_data, out, "--resume"), MINBERT_TEST_KILL_AT_STEP="4")
    assert r.returncode == -signal.SIGKILL
    assert last_step(out) == 3 and json.loads((out / "best" / "best.json").read_text())["epoch"] == 1

    r = run_cli(train_argv(small_data, out, "--resume"))
    assert r.returncode == 0, r.stderr
    assert "Traceback" not in r.stderr
    assert_same_weights(out / "best", reference / "best")
    assert_same_weights(out / "last", reference / "last")
    assert (out / "results.json").is_file() and last_step(out) == EPOCHS * STEPS_PER_EPOCH
    for name in ("sst-dev-output.csv", "para-test-output.csv", "sts-dev-output.csv"):
        assert (out / "predictions" / name).read_text() == (reference / "predictions" / name).read_text()

    # metrics.jsonl was appended to: each resume is marked, the killed runs' records are kept.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed_from_step"] for r in records if "resumed_from_step" in r] == [2, 3]
    assert [r["step"] for r in records if "loss_sst" in r] == [1, 2, 3, 3, 4, 4, 5, 6]
    assert sum(1 for r in records if r.get("final")) == 1


@pytest.mark.slow
def test_ctrl_c_saves_last_and_exits_130_then_resume_is_bit_identical(small_data, reference, tmp_path):
    """With PCGrad, M-FAC and SMART + Bregman, whose own state must be saved and restored too."""
    reference = reference(*STATEFUL)
    out = tmp_path / "run"
    # Slow steps down so the run is surely still training when the signal arrives.
    p = start(train_argv(small_data, out, *STATEFUL), MINBERT_TEST_STEP_DELAY="0.5")
    metrics = out / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and '"loss_sst"' in metrics.read_text()):
        assert p.poll() is None and time.monotonic() < deadline, "the run ended before its first step"
        time.sleep(0.05)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err
    step = last_step(out)
    assert 1 <= step < EPOCHS * STEPS_PER_EPOCH
    assert err.strip().splitlines()[-1] == (
        f"interrupted: stopped after step {step}; {out / 'last'} holds step {step}: continue with the same flags "
        "and --resume")
    assert not (out / "results.json").exists() and not list(out.glob("*.partial"))

    r = run_cli(train_argv(small_data, out, *STATEFUL, "--resume"))
    assert r.returncode == 0, r.stderr
    assert_same_weights(out / "best", reference / "best")
    assert_same_weights(out / "last", reference / "last")


def _args(out: Path, **kw) -> RunConfig:
    """A RunConfig writing to ``out``, with these flags; every other flag has its default."""
    return from_flat(RunConfig, {"output_dir": str(out), **kw})


def test_output_dir_rules(tmp_path):
    out = tmp_path / "run"
    assert check_output_dir(_args(out)) is None  # new
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert check_output_dir(_args(out)) is None  # other files are not a run
    (out / "args.json").write_text(json.dumps({"seed": 1, "logging_steps": 5}))
    with pytest.raises(ValueError, match="holds an unfinished run; pass --resume"):
        check_output_dir(_args(out))
    # Killed before its first checkpoint: --resume starts from step 0 (no `last`), with the same settings only.
    assert check_output_dir(_args(out, resume=True, seed=1, logging_steps=9)) is None
    with pytest.raises(ValueError, match=r"--resume: .*args.json was written with other settings: --seed 1 \(now 2\)"):
        check_output_dir(_args(out, resume=True, seed=2))
    (out / "results.json").write_text("{}")
    with pytest.raises(ValueError, match="holds a finished run; pass --overwrite_output_dir"):
        check_output_dir(_args(out))
    # A finished run whose last/ was deleted is not silently trained again from step 0.
    with pytest.raises(ValueError, match="has no last/ checkpoint to continue from"):
        check_output_dir(_args(out, resume=True, seed=1))
    # --overwrite_output_dir removes the previous run's outputs (and leftovers of killed writers), nothing else.
    (out / "best").mkdir()
    (out / "last.old").mkdir()
    (out / ".metrics.jsonl.abc.tmp").write_text("torn")
    prepare_output_dir(_args(out, overwrite_output_dir=True))
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_resume_flag_conflicts(capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        train_main(["--resume", "--overwrite_output_dir", "--data_dir", str(ROOT / "data"), "--output_dir", str(tmp_path)])
    assert e.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: --resume cannot be combined with --overwrite_output_dir")


def test_non_finite_steps_stop_with_one_line_and_keep_last_good_checkpoint(small_data, tmp_path, monkeypatch, capsys,
                                                                          one_thread):
    """A loss that turns NaN from step 3 on: steps are skipped and counted; the run stops with one line after
    more than --max_bad_steps in a row; `last` keeps the state of the last good step."""
    from minbert.model.multitask import MultitaskBert

    calls = {"n": 0}
    loss = MultitaskBert.loss

    def nan_from_step_3(self, task, output, batch):
        calls["n"] += 1  # three tasks per step (individual combiner)
        value = loss(self, task, output, batch)
        return value * float("nan") if calls["n"] > 6 else value

    monkeypatch.setattr(MultitaskBert, "loss", nan_from_step_3)
    out = tmp_path / "run"
    code = train_main(train_argv(small_data, out, "--save_steps", "1", "--max_bad_steps", "4", "--num_train_epochs", "2"))
    err = capsys.readouterr().err
    assert code == 1
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert errors == ["error: 5 steps in a row had a non-finite loss or gradient (--max_bad_steps 4); stopping. "
                      "Try a lower --learning_rate or --max_grad_norm 1.0"]
    assert err.splitlines()[-1] == errors[0] and "Traceback" not in err
    assert last_step(out) == 2 and not (out / "results.json").exists()
    state = weights(out / "last")
    assert all(torch.isfinite(v).all() for v in state.values())
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["bad_steps"] for r in records if "loss_sst" in r] == [0, 0, 3]


def test_overwrite_keeps_the_checkpoint_being_predicted_with(tmp_path):
    out = tmp_path / "run"
    (out / "best").mkdir(parents=True)
    (out / "best" / "model.safetensors").write_text("weights")
    (out / "results.json").write_text("{}")
    prepare_output_dir(_args(out, overwrite_output_dir=True, checkpoint=str(out / "best")))
    assert sorted(p.name for p in out.iterdir()) == ["best"]


def test_damaged_last_checkpoint_is_a_one_line_error(small_data, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    argv = train_argv(small_data, out, "--num_train_epochs", "1", "--max_steps_per_epoch", "1")
    assert train_main(argv) == 0
    state = out / "last" / "optimizer.pt"
    state.write_bytes(state.read_bytes()[:1000])
    capsys.readouterr()
    assert train_main(argv + ["--resume"]) == 1
    err = capsys.readouterr().err
    assert err.splitlines()[-1].startswith(f"error: --resume: {state}: cannot read: ")
    assert "Traceback" not in err
