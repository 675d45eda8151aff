"""benchmarks/throughput.py runs end to end on a tiny config (cross-encoded pairs included); --bf16 and --torch_compile work through the CLI;
skipping padding tokens (a speed lever of the encoder) leaves the real positions unchanged."""
import importlib.util
import re
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from minbert.cli import train_main
from minbert.model.config import BertConfig
from minbert.model.encoder import SKIP_PADDING_FROM, BertModel
from minbert.model.multitask import MultitaskBert
from minbert.model.tokenizer import load_tokenizer
from minbert.tasks.data import load_task, tensorize
from minbert.training.run import build_model
from minbert.training.run_config import RunConfig
from minbert.training.trainer import Trainer

from .conftest import ROOT

BENCH = ROOT / "benchmarks" / "throughput.py"
# Today's three fields first, in this order (scripts read them), then the cross-encoded pipeline's.
RATIOS = re.compile(r"^RATIOS train_vs_hf=(\d+\.\d{3}) infer_vs_hf=(\d+\.\d{3}) e2e_vs_pad128=(\d+\.\d{3}) "
                    r"cross_train_vs_hf=(\d+\.\d{3}) cross_infer_vs_hf=(\d+\.\d{3})$")


def load_benchmark():
    spec = importlib.util.spec_from_file_location("throughput_bench", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_runs_and_ends_with_the_ratios_line(small_data, one_thread, capsys):
    pytest.importorskip("transformers")
    bench = load_benchmark()
    rc = bench.main(["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data), "--batch_size", "8",
                     "--eval_batch_size", "16", "--train_batches", "2", "--eval_batches", "1", "--repeats", "1",
                     "--threads", "1", "--levers"])
    out = capsys.readouterr().out
    assert rc == 0
    lines = out.strip().splitlines()
    m = RATIOS.match(lines[-1])
    assert m, lines[-1]
    assert all(float(x) > 0 for x in m.groups())
    # (a) and (b) really hold the same weights: the benchmark checks it before timing anything
    check = next(l for l in lines if l.startswith("check:"))
    assert float(check.rsplit(" ", 1)[1]) <= 1e-4
    assert any(l.startswith("| (c) run_glue-style") for l in lines)
    assert any(l.startswith("| (a') minbert, qqp cross-encoded") for l in lines)
    assert any(l.startswith("| (b') transformers.BertModel, same joint sequences") for l in lines)
    assert any("length bucketing" in l for l in lines)  # the --levers table


def test_benchmark_without_transformers_says_so_in_one_line(tmp_path):
    fake = tmp_path / "transformers"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    r = subprocess.run([sys.executable, str(BENCH), "--quick"], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": str(tmp_path), "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"})
    assert r.returncode == 1
    assert r.stderr.strip().count("\n") == 0 and r.stderr.startswith("error:") and "pip install" in r.stderr
    assert "RATIOS" not in r.stdout


# ----------------------------------------------------------------------------------------------------------
# --bf16 and --torch_compile


def tiny_args(data_dir, out, *extra):
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "32", "--max_eval_samples", "16", "--per_device_train_batch_size", "8",
            "--max_steps_per_epoch", "2", "--num_train_epochs", "1", "--max_seq_length", "32", "--seed", "3", *extra]


def test_bf16_autocasts_the_training_forward_pass_and_keeps_float32_weights(small_data, tmp_path, one_thread):
    config = RunConfig.from_flags(tiny_args(small_data, tmp_path, "--bf16", "--tasks", "sst"))
    tokenizer = load_tokenizer("bert-tiny", 32)
    train = {"sst": tensorize(load_task("sst", "train", small_data, max_samples=32), tokenizer)}
    model = build_model(config)
    trainer = Trainer(config, model, train, {}, torch.device("cpu"), tokenizer, tmp_path, metrics=None)
    seen = []
    model.encoder.layers[0].qkv.register_forward_hook(lambda mod, inp, out: seen.append(out.dtype))
    model.train()
    losses = trainer.train_step(0)
    assert seen == [torch.bfloat16]
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert torch.isfinite(torch.tensor(losses["sst"]))


def test_bf16_end_to_end(small_data, tmp_path, one_thread):
    assert train_main(tiny_args(small_data, tmp_path, "--bf16")) == 0
    state = load_file(tmp_path / "best" / "model.safetensors")
    assert all(v.dtype == torch.float32 for v in state.values())
    assert len(list((tmp_path / "predictions").iterdir())) == 6


@pytest.mark.slow
def test_torch_compile_end_to_end_saves_clean_checkpoint_keys(small_data, tmp_path, one_thread):
    """Compiling takes about a minute of CPU time on first use (inductor's cache makes reruns faster)."""
    assert train_main(tiny_args(small_data, tmp_path, "--torch_compile", "--tasks", "sst")) == 0
    saved = load_file(tmp_path / "best" / "model.safetensors")
    fresh = build_model(RunConfig.from_flags(["--model_name_or_path", "bert-tiny", "--tasks", "sst"]))
    assert set(saved) == set(fresh.state_dict())  # no "_orig_mod." prefixes
    MultitaskBert.load(tmp_path / "best")
    assert (tmp_path / "predictions" / "sst-dev-output.csv").is_file()


def test_torch_compile_that_cannot_work_is_one_line_error(small_data, tmp_path, monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("no working C++ compiler\nmore details")

    monkeypatch.setattr(torch, "compile", broken)
    out = tmp_path / "run"
    assert train_main(tiny_args(small_data, out, "--torch_compile")) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == "error: --torch_compile: torch.compile does not work here (RuntimeError: no working C++ compiler)"
    assert not (out / "args.json").exists()  # refused before the run wrote anything


# ----------------------------------------------------------------------------------------------------------
# Skipping padding tokens


def _hf_and_ours(config: BertConfig):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    hf_cfg = transformers.BertConfig(**{k: v for k, v in config.__dict__.items() if k != "add_pooling_layer"})
    hf = transformers.BertModel(hf_cfg).eval()
    ours = BertModel(config).eval()
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def test_skipping_padding_keeps_real_positions_and_gradients_equal_to_transformers():
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99)
    hf, ours = _hf_and_ours(cfg)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, 99, (4, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    mask[3, 2:] = 0
    ids = ids * mask
    assert (1 - mask.float().mean()) >= SKIP_PADDING_FROM  # enough padding to be skipped
    real = mask.bool()
    x = ours.embed(ids)
    packed = ours.encode(x, mask)  # the multitask model's path: skips padding
    assert packed.last_hidden_state[~real].abs().max() == 0  # padding rows were not computed
    ref = hf(input_ids=ids, attention_mask=mask).last_hidden_state
    assert (packed.last_hidden_state - ref)[real].abs().max() <= 1e-5
    assert (packed.pooler_output - hf(input_ids=ids, attention_mask=mask).pooler_output).abs().max() <= 1e-5

    def grads(skip: bool) -> list[torch.Tensor]:
        ours.zero_grad()
        out = ours.encode(ours.embed(ids), mask, skip_padding=skip).last_hidden_state
        (out[real] ** 2).sum().backward()
        return [p.grad.clone() for p in ours.parameters() if p.grad is not None]

    for a, b in zip(grads(True), grads(False), strict=True):
        assert (a - b).abs().max() <= 1e-5 * max(1.0, b.abs().max().item())


def test_little_padding_is_not_skipped():
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64, vocab_size=99)
    ours = BertModel(cfg).eval()
    ids = torch.randint(5, 99, (4, 20))
    mask = torch.ones_like(ids)
    mask[0, 19:] = 0  # 1 of 80 positions: below SKIP_PADDING_FROM
    out = ours.encode(ours.embed(ids), mask).last_hidden_state
    assert out[0, 19].abs().max() > 0  # computed, as transformers does
