"""--optim_args overrides --learning_rate and --weight_decay in every param group (adamw and mfac), the heads
keep --head_learning_rate, and a bad --optim_args is a one-line error naming the flag."""
from __future__ import annotations

import pytest

from minbert.cli import train_main, train_parser
from minbert.methods.optim.build import optimizer_for_run
from minbert.training.run import build_model
from minbert.training.run_config import RunConfig

from .conftest import ROOT


def optimizer(*argv: str):
    args = train_parser().parse_args(["--model_name_or_path", "bert-tiny", *argv])
    config = RunConfig.from_namespace(args).validate()
    model = build_model(config)
    return model, optimizer_for_run(config, model)


def groups_by_kind(model, opt) -> dict[tuple[bool, bool], dict]:
    """(is a head group, decays) -> the param group."""
    head_ids = {id(p) for p in model.heads.parameters()}
    out = {}
    for group in opt.param_groups:
        is_head = {id(p) in head_ids for p in group["params"]}
        decays = {p.ndim >= 2 for p in group["params"]}
        assert len(is_head) == 1 and len(decays) == 1
        out[(is_head.pop(), decays.pop())] = group
    return out


@pytest.mark.parametrize("optim, extra", [("adamw", "betas: (0.8, 0.9)"), ("mfac", "num_grads: 4, momentum: 0.5")])
def test_optim_args_override_lr_and_weight_decay_in_every_group(optim, extra):
    model, opt = optimizer("--optim", optim, "--learning_rate", "1e-4", "--weight_decay", "0.01",
                           "--head_learning_rate", "2e-3", "--optim_args", f"lr: 3e-3, weight_decay: 0.5, {extra}")
    groups = groups_by_kind(model, opt)
    assert set(groups) == {(False, False), (False, True), (True, False), (True, True)}
    for (is_head, decays), group in groups.items():
        assert group["lr"] == (2e-3 if is_head else 3e-3)  # optim_args' lr is the encoder's; heads keep theirs
        assert group["weight_decay"] == (0.5 if decays else 0.0)  # never on biases and LayerNorm weights
        if optim == "adamw":
            assert group["betas"] == (0.8, 0.9)
        else:
            assert group["momentum"] == 0.5


def test_without_optim_args_the_flags_set_the_groups():
    model, opt = optimizer("--learning_rate", "2e-5", "--weight_decay", "0.1")
    for (is_head, decays), group in groups_by_kind(model, opt).items():
        assert group["lr"] == (1e-3 if is_head else 2e-5)
        assert group["weight_decay"] == (0.1 if decays else 0.0)


@pytest.mark.parametrize("optim_args, message", [
    ("lr: abc", "lr: expected a finite number >= 0, got 'abc'"),
    ('{"lr": null}', "lr: expected a finite number >= 0, got null"),
    ("lr: inf", "lr: expected a finite number >= 0, got 'inf'"),
    ('{"lr": Infinity}', "lr: expected a finite number >= 0, got inf"),
    ("lr: -1", "lr: expected a finite number >= 0, got -1"),
    ("weight_decay: nan", "weight_decay: expected a finite number >= 0"),
    ("lr 1e-4", "cannot parse optim_args item 'lr 1e-4'"),
    ("lr: 1e-4 num_grads: 4", "lr: cannot read the value '1e-4 num_grads: 4'"),
    ("num_grads: 4", "unknown key 'num_grads' for adamw"),
    ("betas: (0.9, 2)", "betas: expected two numbers in [0, 1)"),
    ("fused: maybe", "fused: expected true or false, got 'maybe'"),
    ('["lr", 1]', "cannot parse"),
])
def test_bad_optim_args_are_one_line_flag_errors(capsys, optim_args, message):
    with pytest.raises(SystemExit) as e:
        train_main(["--data_dir", str(ROOT / "data"), "--model_name_or_path", "bert-tiny", "--optim_args", optim_args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in err
    assert errors[0].startswith("train_multitask.py: error: --optim_args: ") and message in errors[0], errors[0]


@pytest.mark.parametrize("optim_args, message", [
    ("num_grads: 0", "num_grads: expected a positive integer, got 0"),
    ("damp: 0", "damp: expected a finite number > 0, got 0"),
    ("num_grads: 2.5", "num_grads: expected a positive integer"),
])
def test_bad_mfac_options_are_one_line_flag_errors(capsys, optim_args, message):
    with pytest.raises(SystemExit):
        train_main(["--data_dir", str(ROOT / "data"), "--model_name_or_path", "bert-tiny", "--optim", "mfac",
                    "--optim_args", optim_args])
    errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
    assert len(errors) == 1 and "--optim_args: " in errors[0] and message in errors[0], errors


def test_the_optimizers_own_range_checks_name_the_flag():
    """MFAC's momentum must be < 1: the optimizer's own check, reported with --optim_args."""
    args = train_parser().parse_args(["--model_name_or_path", "bert-tiny", "--optim", "mfac",
                                      "--optim_args", "num_grads: 4, momentum: 1.5"])
    config = RunConfig.from_namespace(args).validate()
    with pytest.raises(ValueError, match=r"^--optim_args num_grads: 4, momentum: 1.5: invalid momentum 1.5"):
        optimizer_for_run(config, build_model(config))
