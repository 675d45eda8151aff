"""Data-parallel training (minbert.training.distributed): 2 CPU processes (gloo) against 1 process on the same global batch.

Two workers are started with torch.multiprocessing and the environment torchrun gives its workers (RANK,
LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); each runs the command line's ``train_main`` for a list of jobs,
one after the other (a process start costs seconds here). The same jobs also run in one process with the
per-device batch doubled. Dropout is switched off in both (each rank draws its own dropout masks, so with
dropout the runs differ by design); everything else must agree to float rounding: the weights after the last
step, the logged losses, the dev scores. The ranks must stay bit-identical, and rank 1 must not write anything.

The training sets have 17 and 21 rows: with a global batch of 8 the last batch of a pass has 1 example (rank 1
gets none) or 5 (shares 3 and 2), so the weighting of uneven shares is checked too.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from minbert.cli import train_main

WORLD = 2
PER_DEVICE = 4  # x 2 ranks = the single process's batch of 8

# name -> flags beyond the common ones
JOBS = {
    "sum": ["--combiner", "sum", "--max_train_samples", "17", "--save_steps", "1"],  # also resumed from step 1
    "pcgrad": ["--combiner", "pcgrad", "--max_train_samples", "21"],
    "gse": ["--combiner", "gse", "--max_train_samples", "17"],
    # SMART's noise and ascent are scaled up from the defaults (1e-5) so that a wrong perturbation would show.
    "smart": ["--combiner", "individual", "--max_train_samples", "21", "--smart", "--smart_sigma", "0.1",
              "--smart_epsilon", "0.5", "--smart_eta", "0.1"],
}


def common(data_dir: Path, out: Path, batch: int) -> list[str]:
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_eval_samples", "12", "--per_device_eval_batch_size", "4", "--per_device_train_batch_size",
            str(batch), "--num_train_epochs", "1", "--max_seq_length", "16", "--logging_steps", "1",
            "--save_steps", "0", "--warmup_ratio", "0", "--learning_rate", "1e-3", "--device", "cpu", "--seed", "3",
            # Adam's eps raised from 1e-8: an update g / (sqrt(v) + eps) of a gradient near 0 turns float rounding
            # into differences of up to lr; with eps 1e-3 the updates differ as little as the gradients do.
            "--optim_args", "eps: 1e-3", "--bf16", "off"]  # compared to float rounding: float32 whatever the default


def without_dropout(build_model):
    """build_model with every dropout off (a test-only override: the flags have no such switch)."""
    def build(args):
        model = build_model(args)
        for module in model.modules():
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.0
            if hasattr(module, "attn_dropout"):
                module.attn_dropout = 0.0
        return model
    return build


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, jobs: list[tuple[str, list[str]]], port: int, watched: str, dump: str) -> None:
    """One rank: run every job's train_main (they share the process group the first one makes); dump the final
    weights of each job; rank 0 also snapshots the run directory of the "sum" job after its first checkpoint
    (a run killed there, for the resume job)."""
    import minbert.training.run as run
    import minbert.training.trainer as trainer

    torch.set_num_threads(1)
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD), LOCAL_WORLD_SIZE=str(WORLD),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dump = Path(dump)
    writes: list[str] = []
    if rank != 0:
        sys.addaudithook(_write_recorder(watched, writes))
    run.build_model = without_dropout(run.build_model)
    write_all_predictions = run.write_all_predictions
    job = None

    def write_all_and_dump(model, *args, **kwargs):
        torch.save({k: v.clone() for k, v in model.state_dict().items()}, dump / f"{job}-rank{rank}.pt")
        return write_all_predictions(model, *args, **kwargs)

    run.write_all_predictions = write_all_and_dump
    save_last = trainer.Trainer.save_last

    def save_last_and_snapshot(self):
        save_last(self)
        if rank == 0 and job == "sum" and not (dump / "killed-run").exists():
            shutil.copytree(self.out_dir, dump / "killed-run")

    trainer.Trainer.save_last = save_last_and_snapshot
    for job, argv in jobs:
        code = train_main(argv)
        if code != 0:
            raise SystemExit(f"rank {rank}: job {job} exited with {code}")
    (dump / f"writes-rank{rank}.json").write_text(json.dumps(writes))


def _write_recorder(root: str, writes: list[str]):
    """An audit hook recording every file-system change under ``root`` (open for writing, mkdir, rename...)."""
    import os as _os

    write_flags = _os.O_WRONLY | _os.O_RDWR | _os.O_CREAT | _os.O_APPEND | _os.O_TRUNC

    def hook(event: str, args: tuple) -> None:
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool(flags & write_flags)
            paths = [path] if writing else []
        elif event in ("os.mkdir", "os.remove", "os.rmdir", "shutil.rmtree", "os.truncate", "os.chmod"):
            paths = [args[0]]
        elif event == "os.rename":
            paths = [args[0], args[1]]
        else:
            return
        for p in paths:
            if isinstance(p, (str, bytes, os.PathLike)) and os.fsdecode(p).startswith(root):
                writes.append(f"{event} {os.fsdecode(p)}")

    return hook


def weights(directory: Path) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def losses(run: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k.startswith("loss_")}
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "loss_sst" in r]


@pytest.fixture(scope="module")
def runs(small_data, tmp_path_factory):
    """Every job in one process and in two; returns (single-process dir, two-process dir, dump dir)."""
    root = tmp_path_factory.mktemp("distributed")
    single, double, dump = root / "single", root / "double", tmp_path_factory.mktemp("dump")
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    import minbert.training.run as run

    build_model = run.build_model
    run.build_model = without_dropout(build_model)
    try:
        for name, flags in JOBS.items():
            assert train_main(common(small_data, single / name, PER_DEVICE * WORLD) + flags) == 0
    finally:
        run.build_model = build_model
        torch.set_num_threads(torch_threads)
    jobs = [(name, common(small_data, double / name, PER_DEVICE) + flags) for name, flags in JOBS.items()]
    # Continue the "sum" job from its snapshot taken after step 1 (as if killed there) ...
    jobs.append(("resume", common(small_data, dump / "killed-run", PER_DEVICE) + JOBS["sum"] + ["--resume"]))
    # ... and predict with the single process's checkpoint.
    jobs.append(("predict", ["--predict_only", "--checkpoint", str(single / "sum" / "best"), "--data_dir",
                             str(small_data), "--output_dir", str(double / "predict"), "--max_eval_samples", "12",
                             "--per_device_eval_batch_size", "4", "--device", "cpu", "--bf16", "off"]))
    os.environ["OMP_NUM_THREADS"] = "1"
    mp.spawn(_worker, args=(jobs, free_port(), str(double), str(dump)), nprocs=WORLD, join=True)
    return single, double, dump


@pytest.mark.parametrize("name", list(JOBS))
def test_two_processes_train_like_one_on_the_same_global_batch(runs, name):
    single, double, dump = runs
    one, two = weights(single / name / "last"), weights(double / name / "last")
    assert one.keys() == two.keys()
    for key in one:
        torch.testing.assert_close(two[key], one[key], rtol=1e-5, atol=1e-6, msg=lambda m: f"{name} {key}: {m}")
    expected, got = losses(single / name), losses(double / name)
    assert len(got) == len(expected) == 3  # one record per step
    for e, g in zip(expected, got):
        assert g == pytest.approx(e, rel=1e-5)
    dev_one = json.loads((single / name / "results.json").read_text())["dev"]
    dev_two = json.loads((double / name / "results.json").read_text())["dev"]
    assert dev_two == pytest.approx(dev_one, abs=1e-4)


@pytest.mark.parametrize("name", list(JOBS))
def test_ranks_hold_identical_weights(runs, name):
    _, _, dump = runs
    rank0, rank1 = torch.load(dump / f"{name}-rank0.pt"), torch.load(dump / f"{name}-rank1.pt")
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)


def test_only_rank_0_writes(runs):
    single, double, dump = runs
    assert json.loads((dump / "writes-rank1.json").read_text()) == []
    for name in JOBS:  # rank 0 wrote the complete run
        run = double / name
        assert sorted(p.name for p in run.iterdir()) == sorted(p.name for p in (single / name).iterdir())
        assert sorted(p.name for p in (run / "predictions").iterdir()) == sorted(
            p.name for p in (single / name / "predictions").iterdir())
        assert json.loads((run / "last" / "trainer_state.json").read_text())["world_size"] == WORLD


def test_write_recorder_sees_writes_and_ignores_reads(tmp_path):
    writes: list[str] = []
    hook = _write_recorder(str(tmp_path), writes)
    hook("open", (str(tmp_path / "a"), "r", os.O_RDONLY))
    hook("open", (str(tmp_path.parent / "elsewhere"), "w", os.O_WRONLY))
    assert writes == []
    hook("open", (str(tmp_path / "a"), "w", os.O_WRONLY))
    hook("open", (str(tmp_path / ".a.tmp"), None, os.O_RDWR | os.O_CREAT | os.O_EXCL))  # tempfile.mkstemp
    hook("os.rename", (str(tmp_path / ".a.tmp"), str(tmp_path / "a"), None, None))
    assert len(writes) == 4


def test_sharded_prediction_is_exactly_the_single_process_one(runs):
    single, double, _ = runs
    files = sorted((single / "sum" / "predictions").iterdir())
    assert len(files) == 6
    for f in files:
        assert (double / "predict" / "predictions" / f.name).read_text() == f.read_text()


def test_resume_under_two_processes_is_bit_identical(runs):
    _, double, dump = runs
    resumed = dump / "killed-run"
    records = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert {"resumed_from_step": 1, "epoch": 0} in records
    a, b = weights(resumed / "last"), weights(double / "sum" / "last")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert losses(resumed) == losses(double / "sum")


def test_resume_with_another_number_of_processes_is_refused(runs, small_data, capsys):
    _, double, _ = runs
    argv = common(small_data, double / "gse", PER_DEVICE) + JOBS["gse"] + ["--resume"]
    assert train_main(argv) == 1
    assert "was written by a run of 2 process(es), this one has 1" in capsys.readouterr().err
