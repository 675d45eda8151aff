"""--bf16 auto|on|off: native bfloat16 detection, resolution, the flag, and the resolved value in args.json."""
from __future__ import annotations

import json
import os

import pytest
import torch

from minbert.cli import check_train_args, train_parser
from minbert.training import precision
from minbert.training.precision import DEFAULT_BF16, cpu_flags, native_bf16, parse_bf16, resolve_bf16

from .conftest import ROOT

X86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu sse2 avx2 {extra}\n\nprocessor\t: 1\nflags\t: fpu\n"
ARM = "processor\t: 0\nBogoMIPS\t: 50.00\nFeatures\t: fp asimd {extra}\n"


@pytest.fixture
def no_torch_cpu_checks(monkeypatch):
    """Only /proc/cpuinfo decides (torch's own checks say no)."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


@pytest.mark.parametrize("text,native", [
    (X86.format(extra="avx512f avx512_bf16"), True),
    (X86.format(extra="amx_bf16 amx_tile"), True),
    (X86.format(extra="avx512f avx512bw"), False),  # AVX-512 alone: bfloat16 is emulated
    (ARM.format(extra="sve bf16"), True),
    (ARM.format(extra="sve"), False),
    ("", False),
])
def test_native_bf16_from_cpuinfo(tmp_path, no_torch_cpu_checks, text, native):
    path = tmp_path / "cpuinfo"
    path.write_text(text)
    assert native_bf16(torch.device("cpu"), cpuinfo=path) is native


def test_cpu_flags_reads_the_first_cpu_and_survives_a_missing_file(tmp_path):
    path = tmp_path / "cpuinfo"
    path.write_text(X86.format(extra="avx512_bf16"))
    assert cpu_flags(path) == {"fpu", "sse2", "avx2", "avx512_bf16"}
    assert cpu_flags(tmp_path / "missing") == set()


def test_torch_cpu_check_counts(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: True, raising=False)
    assert native_bf16(torch.device("cpu"), cpuinfo=tmp_path / "missing")


def test_cuda_asks_torch_without_emulation(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: calls.append(including_emulation) or False)
    assert not native_bf16(torch.device("cuda"))
    assert calls == [False]


def test_resolve(monkeypatch):
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    cpu = torch.device("cpu")
    assert [resolve_bf16(m, cpu) for m in ("auto", "on", "off", True, False)] == ["on", "on", "off", "on", "off"]
    assert resolve_bf16("auto", cpu, smart_ball=True) == "off"  # the projected SMART form needs float32
    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    assert resolve_bf16("auto", cpu) == "off" and resolve_bf16("on", cpu) == "on"
    with pytest.raises(ValueError, match="choose auto, on, off"):
        resolve_bf16("half", cpu)
    assert parse_bf16("True") == "on" and parse_bf16("false") == "off" and parse_bf16(" AUTO ") == "auto"


def test_flag_forms():
    p = train_parser()
    assert p.parse_args([]).bf16 == DEFAULT_BF16 == "auto"  # bf16 where native (issue #24)
    assert p.parse_args(["--bf16"]).bf16 == "on"
    assert p.parse_args(["--bf16", "--tasks", "sst"]).bf16 == "on"
    assert p.parse_args(["--bf16", "auto"]).bf16 == "auto"
    assert p.parse_args(["--bf16=off"]).bf16 == "off"
    args = p.parse_args(["--data_dir", str(ROOT / "data"), "--smart", "--bf16", "auto"])
    check_train_args(p, args)  # auto with SMART: resolved to off, not refused


def test_bad_value_is_one_line(capsys):
    from minbert.cli import train_main

    from .test_cli_errors import usage_error

    assert usage_error(train_main, ["--data_dir", str(ROOT / "data"), "--bf16", "half"], capsys) == (
        "argument --bf16: 'half': choose auto, on, off")


def test_config_file_of_an_older_run_with_a_boolean(tmp_path):
    from minbert.cli import apply_config_file

    (tmp_path / "args.json").write_text(json.dumps({"bf16": True}))
    p = train_parser()
    apply_config_file(p, ["--config", str(tmp_path / "args.json")])
    assert p.parse_args([]).bf16 == "on"


def test_auto_is_resolved_before_args_json(small_data, tmp_path, monkeypatch, one_thread):
    from minbert.cli import train_main

    monkeypatch.setattr(precision, "native_bf16", lambda device: False)
    argv = ["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data), "--output_dir", str(tmp_path),
            "--tasks", "sst", "--max_train_samples", "8", "--max_eval_samples", "4", "--num_train_epochs", "1",
            "--max_seq_length", "16", "--bf16", "auto"]
    assert train_main(argv) == 0
    assert json.loads((tmp_path / "args.json").read_text())["bf16"] == "off"
    assert json.loads((tmp_path / "results.json").read_text())["bf16"] == "off"


def test_every_entry_point_defaults_to_auto():
    """Training (and --predict_only, the same parser), minbert-predict, minbert.load and the experiments runner
    share one default."""
    import inspect

    import minbert
    from minbert.api import InferenceModel
    from minbert.experiments import parser as experiments_parser
    from minbert.experiments.runner import PaperRun
    from minbert.predict_cli import predict_parser

    assert train_parser().parse_args([]).bf16 == DEFAULT_BF16
    assert predict_parser().parse_args(["--checkpoint", "x", "--task", "sst", "a"]).bf16 == DEFAULT_BF16
    assert inspect.signature(minbert.load).parameters["bf16"].default == DEFAULT_BF16
    assert inspect.signature(InferenceModel).parameters["bf16"].default == DEFAULT_BF16
    assert experiments_parser().get_default("bf16") == DEFAULT_BF16
    assert PaperRun.__dataclass_fields__["bf16"].default == DEFAULT_BF16


@pytest.mark.parametrize("native", [True, False], ids=["native", "emulated"])
def test_the_default_is_bf16_where_native_and_float32_elsewhere(small_data, tmp_path, monkeypatch, one_thread,
                                                                  native):
    """Detection mocked both ways, so the default is tested on either kind of machine: training and --predict_only
    record the precision that ran; minbert.load and the experiment rows follow the same detection."""
    import minbert
    from minbert.cli import train_main
    from minbert.experiments import ROWS, row_argv

    monkeypatch.setattr(precision, "native_bf16", lambda device: native)
    expected = "on" if native else "off"
    out = tmp_path / "run"
    argv = ["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data), "--output_dir", str(out),
            "--tasks", "sst", "--max_train_samples", "8", "--max_eval_samples", "4", "--num_train_epochs", "1",
            "--max_seq_length", "16", "--skip_test_predictions"]
    assert train_main(argv) == 0
    assert json.loads((out / "args.json").read_text())["bf16"] == expected
    assert json.loads((out / "results.json").read_text())["bf16"] == expected
    again = tmp_path / "predict"
    assert train_main(["--predict_only", "--checkpoint", str(out / "best"), "--data_dir", str(small_data), "--tasks",
                       "sst", "--output_dir", str(again), "--max_eval_samples", "4", "--skip_test_predictions"]) == 0
    assert json.loads((again / "results.json").read_text())["bf16"] == expected
    model = minbert.load(out, device="cpu")
    assert model.amp_dtype == (torch.bfloat16 if native else None)
    argv = row_argv(ROWS[0], "cpu", "data", tmp_path / "rows", "cpu")
    assert argv[argv.index("--bf16") + 1] == expected


def test_a_bf16_run_on_cpu_turns_onednn_primitive_cache_off_unless_the_user_sized_it(monkeypatch):
    """bf16's extra peak memory in training was oneDNN's cache of primitives for every new input shape
    (benchmarks/bf16_memory.py): a run that resolves to bf16 on CPU turns it off before its first matmul; float32
    runs and CUDA runs leave the environment alone, and a size the user chose is kept."""
    monkeypatch.setattr(precision, "native_bf16", lambda device: True)
    monkeypatch.delenv(precision.ONEDNN_CACHE_ENV, raising=False)
    cpu = torch.device("cpu")
    assert resolve_bf16("off", cpu) == "off" and resolve_bf16("auto", cpu, smart_ball=True) == "off"
    assert precision.ONEDNN_CACHE_ENV not in os.environ
    assert resolve_bf16("on", torch.device("cuda")) == "on" and precision.ONEDNN_CACHE_ENV not in os.environ
    assert resolve_bf16("auto", cpu) == "on"
    assert os.environ[precision.ONEDNN_CACHE_ENV] == precision.ONEDNN_CACHE_CAPACITY == "0"
    monkeypatch.setenv(precision.ONEDNN_CACHE_ENV, "64")
    assert resolve_bf16("on", cpu) == "on" and os.environ[precision.ONEDNN_CACHE_ENV] == "64"
