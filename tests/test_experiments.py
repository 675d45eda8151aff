"""`python -m minbert.experiments paper`: every row of the report's dev table runs through the training path
(smoke profile: bert-tiny on tiny slices), results are tabulated beside the report's, finished rows are reused."""
import json

import pytest

from minbert import experiments
from minbert.experiments import PROFILES, ROWS, main, row_argv


def _args(out) -> dict[str, dict]:
    return {r.key: json.loads((out / r.key / "args.json").read_text()) for r in ROWS}


@pytest.mark.slow
def test_smoke_profile_runs_the_whole_table(small_data, tmp_path, capsys, one_thread):
    out = tmp_path / "paper"
    code = main(["paper", "--profile", "smoke", "--data_dir", str(small_data), "--output_dir", str(out)])
    assert code == 0

    results = json.loads((out / "results.json").read_text())
    assert results["profile"] == "smoke"
    rows = results["rows"]
    assert [r["key"] for r in rows] == [r.key for r in ROWS] and len(rows) == 13
    for r in rows:
        assert r.get("error") is None, r
        assert set(r["dev"]) == {"sst", "qqp", "sts", "overall"}
        assert all(-1.0 <= v <= 1.0 for v in r["dev"].values())
        assert r["command"].startswith("python train_multitask.py ")
    assert rows[0]["report"] == {"sst": 0.512, "qqp": 0.731, "sts": 0.361, "overall": 0.641}
    assert rows[9]["name"] == "SMART Loss w/ GSE" and rows[9]["report"] is None

    # every row really ran with its own flags
    args = _args(out)
    assert args["baseline"]["combiner"] == "individual" and args["baseline"]["pooling"] == "cls"
    assert args["multitask"]["combiner"] == "sum" and args["multitask_gs"]["combiner"] == "pcgrad"
    assert args["cosine_embedding"]["sts_head"] == "cosine_embedding" and args["cosine_embedding"]["combiner"] == "gse"
    assert args["cosine_d"]["sts_head"] == "cosine" and args["cosine_2d1"]["sts_head"] == "cosine_2d1"
    assert args["cosine_2d1_mean"]["pooling"] == "mean"
    assert args["smart"]["smart"] is True and args["smart"]["combiner"] == "individual"
    assert args["smart_gse"]["smart"] is True and args["smart_gse"]["combiner"] == "gse"
    for key in ("gse_3x", "cosine_2d1_3x", "smart_3x"):
        assert args[key]["iterations_multiplier"] == 3 and args[key]["max_steps_per_epoch"] == 3
    assert args["multitask_gse"]["iterations_multiplier"] == 1 and args["multitask_gse"]["max_steps_per_epoch"] == 1
    for a in args.values():
        assert a["model_name_or_path"] == "bert-tiny" and a["para_head"] == "uv"

    printed = capsys.readouterr().out
    assert "| Baseline | " in printed and "0.512" in printed
    md = (out / "results.md").read_text()
    assert md.count("\n| ") == 14  # header + 13 rows

    # a second invocation reuses the finished rows instead of training them again
    calls = []
    original = experiments.run_row

    def counting_run_row(row, argv, overwrite):
        outcome = original(row, argv, overwrite)
        calls.append(outcome.get("reused", False))
        return outcome

    experiments.run_row = counting_run_row
    try:
        assert main(["paper", "--profile", "smoke", "--data_dir", str(small_data), "--output_dir", str(out),
                     "--rows", "baseline,smart_gse"]) == 0
    finally:
        experiments.run_row = original
    assert calls == [True, True]
    again = json.loads((out / "results.json").read_text())["rows"]
    assert [r["dev"] for r in again] == [rows[0]["dev"], rows[9]["dev"]]


def test_profiles_map_to_the_reports_protocol(tmp_path):
    full = {r.key: row_argv(r, "full", "data", tmp_path, "auto") for r in ROWS}
    base = full["baseline"]
    assert base[base.index("--learning_rate") + 1] == "1e-5"
    assert base[base.index("--num_train_epochs") + 1] == "10"
    assert base[base.index("--per_device_train_batch_size") + 1] == "8"
    assert "--max_steps_per_epoch" not in base and "--max_train_samples" not in base
    assert full["gse_3x"][full["gse_3x"].index("--iterations_multiplier") + 1] == "3"
    quick = row_argv(ROWS[0], "quick", "data", tmp_path, "cpu")
    assert quick[quick.index("--model_name_or_path") + 1] == "minilm-l6"
    assert set(PROFILES) == {"full", "quick", "smoke"}


def test_command_line_errors_and_print_commands(small_data, capsys):
    with pytest.raises(SystemExit):
        main(["paper", "--rows", "baseline,nope", "--data_dir", str(small_data)])
    assert "unknown row 'nope'" in " ".join(capsys.readouterr().err.split())  # argparse wraps lines
    with pytest.raises(SystemExit):
        main(["paper", "--data_dir", "/no/such/dir"])
    assert main(["paper", "--profile", "full", "--print_commands", "--data_dir", str(small_data)]) == 0
    printed = capsys.readouterr().out
    assert printed.count("python train_multitask.py ") == 13
    assert "# SMART Loss w/ GSE\n" in printed


@pytest.mark.slow
def test_mfac_cards_smoke_runs_both_optimizers_over_seeds(small_data, tmp_path, capsys, one_thread):
    out = tmp_path / "cards"
    code = main(["mfac", "--setting", "sst2", "--profile", "smoke", "--seeds", "1,2", "--data_dir", str(small_data),
                 "--output_dir", str(out)])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["optimizer"], r["seed"]) for r in results["runs"]] == [("adam", 1), ("mfac", 1), ("adam", 2), ("mfac", 2)]
    for r in results["runs"]:
        args = json.loads((out / r["key"] / "args.json").read_text())
        assert args["tasks"] == ["sst2"] and args["seed"] == r["seed"] and args["pooling"] == "cls"
        assert args["optim"] == ("mfac" if r["optimizer"] == "mfac" else "adamw")
        assert set(r["dev"]) == {"sst2", "overall"}
    for opt in ("adam", "mfac"):
        accs = [r["dev"]["sst2"] for r in results["runs"] if r["optimizer"] == opt]
        summary = results["summary"][opt]["sst2"]
        assert summary["runs"] == 2 and summary["mean"] == pytest.approx(sum(accs) / 2)
        assert summary["std"] == pytest.approx(abs(accs[0] - accs[1]) / 2 ** 0.5)
        assert set(results["summary"][opt]) == {"sst2"}  # one task: its "overall" is the same number
    assert "| mfac | 2 | " in capsys.readouterr().out


def test_mfac_cards_flags():
    from minbert.experiments import CARD_MFAC_ARGS, card_rows
    from minbert.optim import parse_optim_args

    rows = card_rows("sst2", "full", (1234,))
    assert [r.key for r in rows] == ["adam-seed1234", "mfac-seed1234"]
    flags = rows[1].flags
    assert flags[flags.index("--num_train_epochs") + 1] == "3" and flags[flags.index("--learning_rate") + 1] == "1e-4"
    assert parse_optim_args(CARD_MFAC_ARGS) == {"lr": 1e-4, "num_grads": 1024, "damp": 1e-6, "sparsity_k": 0.01}
    with pytest.raises(SystemExit):
        main(["mfac", "--seeds", "a,b", "--print_commands"])
