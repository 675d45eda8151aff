"""The torchjd methods of ``--combiner`` (minbert.methods.mtl_methods, minbert.methods.mtl_combiners) through the command line:
every name trains end to end on bert-tiny; with --smart, --iterations_multiplier and bf16; the stateful ones
resume bit-identically; two processes train like one; the missing solver extra and bad options are one-line
errors before anything is written; docs/multitask.md lists every method."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minbert.cli import train_main
from minbert.methods.mtl_methods import METHODS, markdown_table
import minbert.training.trainer as trainer_module

from .conftest import ROOT
from .test_cli_errors import usage_error

# the options a method cannot run without (its paper's or a plain value); everything else runs on its defaults
ARGS = {"cagrad": {"c": 0.4}, "fairgrad": {"alpha": 1.0}, "constant": {"weights": [1.0, 2.0, 1.0]},
        "stch": {"mu": 1.0}, "pbi": {"theta": 5.0, "weights": [1.0, 1.0, 1.0]},
        "cosmos": {"lambda_": 1.0, "weights": [1.0, 1.0, 1.0]}}


def argv(data: Path, out: Path, name: str, *extra: str, epochs: int = 1, steps: int = 2) -> list[str]:
    args = ["--combiner_args", json.dumps(ARGS[name])] if name in ARGS else []
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data), "--output_dir", str(out),
            "--max_train_samples", "8", "--max_eval_samples", "4", "--per_device_train_batch_size", "4",
            "--per_device_eval_batch_size", "4", *(["--max_steps_per_epoch", str(steps)] if steps else []),
            "--num_train_epochs", str(epochs), "--max_seq_length", "16", "--logging_steps", "1", "--save_steps", "0", "--device", "cpu",
            "--seed", "5", "--bf16", "off", "--combiner", name, *args, *extra]


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def changed(out: Path, data: Path, name: str, tmp_path: Path) -> None:
    """The encoder and every head moved away from the step-0 weights (same seed, zero steps via a 0 lr)."""
    ref = tmp_path / f"{name}-ref"
    assert train_main(argv(data, ref, "sum", "--learning_rate", "0")) == 0
    before, after = weights(ref / "best"), weights(out / "best")
    for key in ("encoder.layers.0.qkv.weight", "heads.sst.classifier.weight", "heads.qqp.classifier.weight"):
        assert not torch.equal(before[key], after[key]), f"{name}: {key} did not train"


@pytest.mark.parametrize("name", list(METHODS))
def test_every_method_trains_end_to_end(name, small_data, tmp_path, one_thread):
    out = tmp_path / name
    assert train_main(argv(small_data, out, name)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(torch.isfinite(torch.tensor(r["loss_sts"])) for r in records if "loss_sts" in r)
    assert (out / "best" / "model.safetensors").is_file()
    if name in ("upgrad", "uw", "famo"):  # three kinds (aggregator, learned scalarizer, post-step update)
        changed(out, small_data, name, tmp_path)


@pytest.mark.parametrize("name", ["upgrad", "famo"])
def test_with_smart_iterations_and_bf16(name, small_data, tmp_path, one_thread):
    out = tmp_path / name
    assert train_main(argv(small_data, out, name, "--smart", "--iterations_multiplier", "2", "--bf16", "on",
                           steps=0)) == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = max(r.get("step", 0) for r in records)
    assert steps == 4  # 2 x (8 rows / batch 4)
    assert all("smart_sst" in r for r in records if "loss_sst" in r)


@pytest.mark.parametrize("name", ["uw", "dwa", "famo", "gradvac", "nash_mtl"])
def test_stateful_methods_resume_bit_identically(name, small_data, tmp_path, one_thread, monkeypatch):
    """3 epochs x 2 steps (DWA's weights leave 1 after two epochs); `last` copied after step 3 (mid-epoch 2) as
    if the run were killed there, then resumed: the same final weights, bit for bit."""
    full, snap = tmp_path / "full", tmp_path / "killed"
    save_last = trainer_module.Trainer.save_last

    def save_and_snapshot(self):
        save_last(self)
        if self.global_step == 3 and not snap.exists():
            shutil.copytree(self.out_dir, snap)

    monkeypatch.setattr(trainer_module.Trainer, "save_last", save_and_snapshot)
    assert train_main(argv(small_data, full, name, "--save_steps", "1", epochs=3)) == 0
    monkeypatch.setattr(trainer_module.Trainer, "save_last", save_last)
    state = torch.load(snap / "last" / "training_state.pt", weights_only=True)["combiner"]["state"]
    assert state["n_tasks"] == 3
    assert train_main(argv(small_data, snap, name, "--save_steps", "1", "--resume", epochs=3)) == 0
    a, b = weights(full / "last"), weights(snap / "last")
    assert all(torch.equal(a[k], b[k]) for k in a), name


def test_missing_solver_extra_is_one_line_before_anything_is_written(small_data, tmp_path, capsys, monkeypatch):
    import minbert.methods.mtl_methods as methods

    real = methods.importlib.util.find_spec
    monkeypatch.setattr(methods.importlib.util, "find_spec", lambda n, *a: None if n == "cvxpy" else real(n, *a))
    out = tmp_path / "run"
    err = usage_error(train_main, argv(small_data, out, "cagrad"), capsys)
    assert err == "--combiner cagrad needs cvxpy: pip install 'minbert[mtl-solvers]'", err
    assert not out.exists() or not any(out.iterdir())


@pytest.mark.parametrize("args, message", [
    ('{"c": 0.5, "q": 1}', "cagrad takes no option 'q'"),
    ("{}", "cagrad needs c"),
    ('{"c": -1}', "c must be non-negative"),
    ('[0.5]', "expected a JSON object"),
])
def test_bad_options_are_one_line_errors(args, message, small_data, tmp_path, capsys):
    out = tmp_path / "run"
    err = usage_error(train_main, argv(small_data, out, "upgrad")[:-1] + ["cagrad", "--combiner_args", args], capsys)
    assert message in err, err
    assert not out.exists() or not any(out.iterdir())


def test_docs_and_help_list_every_method(capsys):
    assert markdown_table() in (ROOT / "docs" / "multitask.md").read_text()
    with pytest.raises(SystemExit):
        train_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert all(f"{name} (" in text for name in METHODS)


# ------------------------------------------------------------------------------------------------ torchrun
DDP = ["upgrad", "famo"]  # an aggregator; a non-linear scalarizer with state and an update after the step


def test_two_processes_train_like_one(small_data, tmp_path_factory):
    from . import test_distributed as d

    root = tmp_path_factory.mktemp("mtl-ddp")
    single, double, dump = root / "single", root / "double", root / "dump"
    dump.mkdir()
    import minbert.training.run as run

    def flags(name):
        return ["--combiner", name, "--max_train_samples", "21"]

    build_model, threads = run.build_model, torch.get_num_threads()
    run.build_model, _ = d.without_dropout(build_model), torch.set_num_threads(1)
    try:
        for name in DDP:
            assert train_main(d.common(small_data, single / name, d.PER_DEVICE * d.WORLD) + flags(name)) == 0
    finally:
        run.build_model, _ = build_model, torch.set_num_threads(threads)
    jobs = [(name, d.common(small_data, double / name, d.PER_DEVICE) + flags(name)) for name in DDP]
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(d._worker, args=(jobs, d.free_port(), str(double), str(dump)), nprocs=d.WORLD, join=True)
    for name in DDP:
        one, two = weights(single / name / "best"), weights(double / name / "best")
        for key in one:  # the tolerance of tests/test_distributed.py
            torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
        r0 = torch.load(dump / f"{name}-rank0.pt", weights_only=True)
        r1 = torch.load(dump / f"{name}-rank1.pt", weights_only=True)
        assert all(torch.equal(r0[k], r1[k]) for k in r0), name
