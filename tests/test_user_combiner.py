"""Your own combiner: --combiner package.module:Class (or file.py:Class) with --combiner_args; the worked example in
examples/uncertainty_weighting.py trains a tiny run; every mistake in the path or the options is one line."""
from __future__ import annotations

import json

import pytest
import torch

from minbert.cli import train_main
from minbert.methods.combiners import Sum, build_combiner
from minbert.methods.mtl_methods import METHODS

from .conftest import ROOT
from .test_cli_errors import usage_error

EXAMPLE = ROOT / "examples" / "uncertainty_weighting.py"


def tiny_run_args(data_dir, out, combiner, *extra):
    return ["--model_name_or_path", "bert-tiny", "--data_dir", str(data_dir), "--output_dir", str(out),
            "--max_train_samples", "16", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
            "--max_steps_per_epoch", "2", "--max_eval_samples", "8", "--max_seq_length", "32", "--seed", "3",
            "--combiner", combiner, "--trust_combiner_code", *extra]


def learned_log_variances(out) -> torch.Tensor:
    """The example combiner's state, as the run saved it in last/ for --resume."""
    extra = torch.load(out / "last" / "training_state.pt", map_location="cpu", weights_only=True)
    return extra["combiner"]["state"]["log_vars"]


def test_the_worked_example_trains_a_tiny_run_by_import_path(small_data, tmp_path, monkeypatch, one_thread):
    monkeypatch.syspath_prepend(str(EXAMPLE.parent))
    assert train_main(tiny_run_args(small_data, tmp_path, "uncertainty_weighting:UncertaintyWeighting")) == 0
    log_vars = learned_log_variances(tmp_path)
    assert log_vars.shape == (3,) and torch.isfinite(log_vars).all()
    assert (log_vars != 0).all()  # 2 Adam steps from the initial 0 moved every task's weight
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("loss_sst" in r and "loss_qqp" in r and "loss_sts" in r for r in records)
    assert json.loads((tmp_path / "results.json").read_text())["dev"]["overall"] is not None


def test_combiner_args_reach_the_run(small_data, tmp_path, one_thread):
    spec = f"{EXAMPLE}:UncertaintyWeighting"  # the file-path form
    args = tiny_run_args(small_data, tmp_path, spec, "--combiner_args", '{"init_log_variance": 2.0, "lr": 0.001}')
    assert train_main(args) == 0
    assert torch.allclose(learned_log_variances(tmp_path), torch.full((3,), 2.0), atol=0.01)  # 2 steps of 1e-3


class Recording:
    """A minimal user combiner: the sum of the losses, one step; records what it was built with."""

    def __init__(self, scale: float = 1.0, seed: int = 0):
        self.scale, self.seed = scale, seed

    def step(self, ctx):
        return Sum().step(ctx)


class NoStep:
    def __init__(self, **options):
        self.options = options


def test_build_combiner_passes_options_and_the_seed():
    combiner = build_combiner(f"{__name__}:Recording", seed=5, options='{"scale": 0.5}')
    assert isinstance(combiner, Recording) and (combiner.scale, combiner.seed) == (0.5, 5)
    combiner = build_combiner(f"{__name__}:Recording", seed=5, options={"seed": 9})  # an explicit seed wins
    assert combiner.seed == 9
    example = build_combiner(f"{EXAMPLE}:UncertaintyWeighting", seed=1, options={"lr": 0.1})
    assert example.lr == 0.1 and not hasattr(example, "seed")  # its constructor takes no seed


@pytest.mark.parametrize("spec,options,message", [
    ("nosuchpkg.module:Thing", None, "--combiner nosuchpkg.module:Thing: cannot import nosuchpkg.module: "
                                     "ModuleNotFoundError: No module named 'nosuchpkg'"),
    (f"{__name__}:Missing", None, f"--combiner {__name__}:Missing: {__name__} has no attribute Missing"),
    (f"{__name__}:NoStep", None, f"--combiner {__name__}:NoStep: class NoStep has no step(ctx) method "
                                 "(see docs/multitask.md)"),
    (f"{__name__}:tiny_run_args", None, f"--combiner {__name__}:tiny_run_args: tiny_run_args is a function, not a class"),
    ("missing_file.py:Thing", None, "--combiner missing_file.py:Thing: no such file missing_file.py"),
    ("median", None, f"--combiner median: choose from individual, sum, pcgrad, gse, {', '.join(METHODS)}, or give a "
                     "class by its import path (package.module:ClassName)"),
    (f"{__name__}:Recording", "{lr: 1}", "--combiner_args (column 2): invalid JSON: Expecting property name "
                                         "enclosed in double quotes"),
    (f"{__name__}:Recording", "[1, 2]", '--combiner_args: expected a JSON object of keyword options, like '
                                        '{"lr": 0.01}, got list'),
    (f"{__name__}:Recording", '{"lr": 1}', f"--combiner_args: {__name__}:Recording does not take these options: "
                                           "got an unexpected keyword argument 'lr'"),
    ("sum", '{"lr": 1}', "--combiner_args: the built-in combiner sum takes no options"),
])
def test_mistakes_are_one_line_flag_errors(spec, options, message, capsys):
    with pytest.raises(ValueError) as e:
        build_combiner(spec, 0, options)
    assert str(e.value) == message
    argv = ["--data_dir", str(ROOT / "data"), "--combiner", spec, "--trust_combiner_code",
            *(["--combiner_args", options] if options else [])]
    assert usage_error(train_main, argv, capsys) == message


def test_a_module_that_fails_on_import_is_named(tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("import torch\nraise RuntimeError('the module is broken')\n")
    with pytest.raises(ValueError) as e:
        build_combiner(f"{broken}:Thing")
    assert str(e.value) == f"--combiner {broken}:Thing: cannot import {broken}: RuntimeError: the module is broken"


def test_docs_show_the_example_as_it_is():
    example = EXAMPLE.read_text(encoding="utf-8")
    docs = (ROOT / "docs" / "multitask.md").read_text(encoding="utf-8")
    assert example[example.index("import torch"):] in docs


def test_a_user_combiner_module_is_imported_once_per_run(small_data, tmp_path, one_thread):
    """The run checks the class before training and then trains with it: the user's file runs once, not twice."""
    counter = tmp_path / "imports.txt"
    module = tmp_path / "counting_combiner.py"
    module.write_text(f"from pathlib import Path\n_c = Path({str(counter)!r})\n"
                      "_c.write_text(str(int(_c.read_text()) + 1) if _c.exists() else '1')\n"
                      f"exec(open({str(EXAMPLE)!r}).read())\n")
    assert train_main(tiny_run_args(small_data, tmp_path / "run", f"{module}:UncertaintyWeighting")) == 0
    assert counter.read_text() == "1"
