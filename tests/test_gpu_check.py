"""benchmarks/gpu_check.py: --dry-run lists and checks every step on a CPU; the summary and the readers of what
the steps write (run folders, JUnit XML, the RATIOS line) work on fake results."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from .conftest import ROOT

SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_check"]


@pytest.mark.slow  # two subprocesses collect the test suite and import the benchmark: 20-40 s on a busy CPU
def test_dry_run_lists_every_step_and_passes_its_checks(tmp_path):
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out")],
                       capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    names = ["pytest_cuda", "train_individual", "train_sum", "train_pcgrad", "train_gse", "train_mfac", "torchrun",
             "throughput_fp32", "throughput_bf16"]
    for name in names:
        assert f"\n{name}: limit " in out, name
    assert out.count("check: ok") == len([l for l in out.splitlines() if l.startswith("    check: ")]) >= len(names)
    assert "PROBLEM" not in out and "all checks passed" in out
    assert "selects" in out and "tests/test_mfac.py" in out  # the cuda marker selects tests
    assert "--combiner pcgrad" in out and "--optim mfac" in out and "--bf16" in out and "--device cuda" in out
    assert "--nproc_per_node 2" in out
    assert not (tmp_path / "out").exists()  # a dry run writes nothing


def test_dry_run_reports_a_command_that_does_not_parse(gpu_check, tmp_path):
    args = gpu_check.parse_args(["--data_dir", str(tmp_path / "missing")])
    steps = gpu_check.build_steps(args, 1, tmp_path, "")
    train = next(s for s in steps if s.name == "train_sum")
    assert any("--data_dir" in p for p in gpu_check.check_step(train, args, ""))
    assert gpu_check.check_data(args)  # the data files are missing
    bench = next(s for s in steps if s.name == "throughput_bf16")
    assert bench.skip and "--device" in bench.skip  # no help text: no --device flag, the step is skipped
    assert next(s for s in steps if s.name == "torchrun").skip == "1 GPU"


def fake_run(d, dev, losses):
    d.mkdir(parents=True)
    (d / "args.json").write_text(json.dumps({"per_device_train_batch_size": 32, "tasks": ["sst", "qqp", "sts"]}))
    (d / "results.json").write_text(json.dumps({"dev": dev, "wall_seconds": 12.5}))
    lines = [{"step": 10 * (i + 1), "epoch": 1, "loss_sst": l, "examples_per_s": 960.0} for i, l in enumerate(losses)]
    lines.append({"final": True, "dev": dev, "wall_seconds": 12.5})
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_train_figures_read_the_run_and_flag_non_finite_numbers(gpu_check, tmp_path):
    dev = {"sst": 0.25, "qqp": 0.6, "sts": 0.1, "overall": 0.35}
    fake_run(tmp_path / "ok", dev, [1.6, 1.4])
    peak = tmp_path / "ok.peak.json"
    peak.write_text(json.dumps({"max_memory_allocated_gib": 3.5, "max_memory_reserved_gib": 4.0}))
    rank1 = tmp_path / "ok.peak.json.rank1"
    rank1.write_text(json.dumps({"max_memory_allocated_gib": 3.75, "max_memory_reserved_gib": 4.0}))
    fig = gpu_check.train_figures(tmp_path / "ok", [peak, rank1])
    assert fig["problems"] == []
    assert fig["dev"] == dev and fig["steps"] == 20 and fig["train_examples_per_s"] == 960.0
    assert fig["steps_per_s"] == 10.0  # 960 examples/s over 32 x 3 examples a step
    assert fig["peak_allocated_gib"] == 3.75

    fake_run(tmp_path / "nan", dev, [1.6, math.nan])
    assert gpu_check.train_figures(tmp_path / "nan", [])["problems"]
    assert gpu_check.train_figures(tmp_path / "absent", [])["problems"]


def test_pytest_counts_and_ratios_line(gpu_check, tmp_path):
    junit = tmp_path / "j.xml"
    junit.write_text('<?xml version="1.0"?><testsuites><testsuite name="pytest" tests="5" failures="1" errors="1" '
                     'skipped="1"></testsuite></testsuites>')
    assert gpu_check.pytest_counts(junit) == {"passed": 2, "failed": 2, "skipped": 1}
    log = tmp_path / "bench.log"
    log.write_text("warming up\nRATIOS train_vs_hf=1.100 infer_vs_hf=1.050 e2e_vs_pad128=4.000 cross_vs_hf=1.010\n")
    assert gpu_check.ratios_line(log) == "RATIOS train_vs_hf=1.100 infer_vs_hf=1.050 e2e_vs_pad128=4.000 cross_vs_hf=1.010"
    log.write_text("Traceback ...\n")
    assert gpu_check.ratios_line(log) is None


def test_summary_json_and_markdown_from_fake_steps(gpu_check, tmp_path):
    summary = {
        "started": "2026-12-01 10:00:00 UTC", "budget_s": 540, "elapsed_s": 400.2,
        "environment": {"python": "3.12.0", "torch": "2.13.0", "cuda": "12.8", "cuda_available": True,
                        "gpus": [{"name": "NVIDIA H200", "memory_gib": 139.8, "capability": "9.0"}]},
        "steps": [
            {"name": "env", "kind": "env", "status": "passed", "seconds": 1.0, "figures": {}},
            {"name": "pytest_cuda", "kind": "pytest", "status": "passed", "seconds": 20.0,
             "figures": {"passed": 3, "failed": 0, "skipped": 0}},
            {"name": "train_sum", "kind": "train", "status": "passed", "seconds": 40.0,
             "figures": {"dev": {"sst": 0.25, "overall": 0.35}, "steps_per_s": 8.5, "train_examples_per_s": 816.0,
                         "peak_allocated_gib": 3.5, "peak_reserved_gib": 4.0}},
            {"name": "train_mfac", "kind": "train", "status": "failed", "seconds": 9.0, "reason": "exit code 1",
             "figures": {}},
            {"name": "torchrun", "kind": "torchrun", "status": "skipped", "reason": "1 GPU"},
            {"name": "throughput_bf16", "kind": "throughput", "status": "passed", "seconds": 60.0,
             "figures": {"ratios": "RATIOS train_vs_hf=1.200 infer_vs_hf=1.100 e2e_vs_pad128=3.000"}},
        ],
    }
    json_path, md_path = gpu_check.write_summary(tmp_path / "out", summary)
    data = json.loads(json_path.read_text())
    assert data["counts"] == {"passed": 4, "failed": 1, "skipped": 1}
    assert [s["name"] for s in data["steps"]] == [s["name"] for s in summary["steps"]]
    md = md_path.read_text()
    assert "NVIDIA H200 (139.8 GiB)" in md and "budget 540 s, used 400.2 s" in md
    assert "| pytest_cuda | passed | 20.0 | 3 passed, 0 failed, 0 skipped |" in md
    assert "sst 0.2500, overall 0.3500; 8.5 steps/s; 816.0 ex/s; peak 3.50 GiB allocated (4.00 reserved)" in md
    assert "| train_mfac | failed: exit code 1 |" in md
    assert "| torchrun | skipped: 1 GPU | - |" in md
    assert "RATIOS train_vs_hf=1.200" in md
    assert "4 passed, 1 failed, 1 skipped." in md
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["gpu_check.json", "gpu_check.md"]


def test_a_machine_without_cuda_runs_nothing_and_fails(gpu_check, tmp_path, monkeypatch, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    monkeypatch.setattr(gpu_check, "throughput_help", lambda python: gpu_check.start(["true"]))
    monkeypatch.setattr(gpu_check, "run_step", lambda *a: pytest.fail("no step may run without CUDA"))
    assert gpu_check.main(["--out", str(tmp_path / "out")]) == 1
    data = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert data["steps"][0] == {**data["steps"][0], "name": "env", "status": "failed", "reason": "no CUDA device"}
    assert all(s["status"] == "skipped" for s in data["steps"][1:])
    assert "no CUDA device" in capsys.readouterr().out
