"""`python -m minbert.experiments paper`: every row of the report's dev table runs through the training path
(smoke profile: bert-tiny on tiny slices), once per seed; results are tabulated beside the report's with mean ± std
and paired differences against Baseline; finished runs are reused; the cpu profile's flags."""
import json

import pytest

from minbert.experiments import PROFILES, ROWS, main, row_argv, runner


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
    original = runner.run_row

    def counting_run_row(row, argv, overwrite):
        outcome = original(row, argv, overwrite)
        calls.append(outcome.get("reused", False))
        return outcome

    runner.run_row = counting_run_row
    try:
        assert main(["paper", "--profile", "smoke", "--data_dir", str(small_data), "--output_dir", str(out),
                     "--rows", "baseline,smart_gse"]) == 0
    finally:
        runner.run_row = original
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
    assert set(PROFILES) == {"full", "quick", "cpu", "smoke"}


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
    with pytest.raises(SystemExit):
        main(["mfac", "--profile", "cpu", "--print_commands", "--data_dir", str(small_data)])
    assert "--profile cpu: the mfac experiment has full, quick, smoke" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["paper", "--seeds", "1,x", "--print_commands", "--data_dir", str(small_data)])
    assert "--seeds '1,x': expected comma-separated integers" in capsys.readouterr().err


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
    printed = capsys.readouterr().out
    assert "| mfac | 2 | " in printed
    paired = results["paired"]
    assert paired["difference"] == "mfac - adam" and paired["metric"] == "sst2"
    d = paired["scores"]["sst2"]
    by_seed = {(r["optimizer"], r["seed"]): r["dev"]["sst2"] for r in results["runs"]}
    diffs = [by_seed[("mfac", s)] - by_seed[("adam", s)] for s in (1, 2)]
    assert d["seeds"] == [1, 2] and d["diff"] == pytest.approx(sum(diffs) / 2)
    assert d["ci"] is not None and d["ci"][0] <= d["diff"] <= d["ci"][1]
    assert "M-FAC − Adam, dev sst2 (points, paired over seeds 1, 2; 95% t-interval" in printed


def test_mfac_cards_flags():
    from minbert.experiments import CARD_MFAC_ARGS, card_rows
    from minbert.methods.optim import parse_optim_args

    rows = card_rows("sst2", "full", (1234,))
    assert [r.key for r in rows] == ["adam-seed1234", "mfac-seed1234"]
    flags = rows[1].flags
    assert flags[flags.index("--num_train_epochs") + 1] == "3" and flags[flags.index("--learning_rate") + 1] == "1e-4"
    assert parse_optim_args(CARD_MFAC_ARGS) == {"lr": 1e-4, "num_grads": 1024, "damp": 1e-6, "sparsity_k": 0.01}
    with pytest.raises(SystemExit):
        main(["mfac", "--seeds", "a,b", "--print_commands"])


@pytest.mark.slow
def test_smoke_profile_over_seeds_writes_every_run_and_the_paired_differences(small_data, tmp_path, capsys, one_thread):
    out = tmp_path / "seeds"
    assert main(["paper", "--profile", "smoke", "--seeds", "1,2", "--rows", "baseline,multitask",
                 "--data_dir", str(small_data), "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["seeds"] == [1, 2] and results["baseline"] == "baseline"
    rows = {r["key"]: r for r in results["rows"]}
    assert list(rows) == ["baseline", "multitask"]
    for key, row in rows.items():
        assert [r["seed"] for r in row["runs"]] == [1, 2] and row["n_runs"] == 2 and row["error"] is None
        for run in row["runs"]:  # both seeds of both rows finished, each in its own folder, with its own seed
            folder = out / key / f"seed{run['seed']}"
            assert json.loads((folder / "results.json").read_text())["dev"] == run["dev"]
            assert json.loads((folder / "args.json").read_text())["seed"] == run["seed"]
            assert f"--seed {run['seed']} " in run["command"]
        overall = [r["dev"]["overall"] for r in row["runs"]]
        assert row["dev"]["overall"] == pytest.approx(sum(overall) / 2)
        assert row["std"]["overall"] == pytest.approx(abs(overall[0] - overall[1]) / 2 ** 0.5)
    assert rows["baseline"]["vs_baseline"] is None
    d = rows["multitask"]["vs_baseline"]
    per_seed = [m["dev"]["overall"] - b["dev"]["overall"]
                for m, b in zip(rows["multitask"]["runs"], rows["baseline"]["runs"])]
    assert d["seeds"] == [1, 2] and d["diff"] == pytest.approx(sum(per_seed) / 2)
    assert d["ci"][0] <= d["diff"] <= d["ci"][1] and d["excludes_zero"] == (d["ci"][0] > 0 or d["ci"][1] < 0)
    printed = capsys.readouterr().out
    assert "| Baseline | 2/2 | " in printed and "(reference)" in printed and " ± " in printed
    assert (out / "results.md").read_text().count("\n| ") == 3  # header + 2 rows

    # started again: all four runs are read back, none is trained
    calls = []
    original = runner.run_row
    runner.run_row = lambda row, argv, overwrite: calls.append(row.key) or original(row, argv, overwrite)
    try:
        assert main(["paper", "--profile", "smoke", "--seeds", "1,2", "--rows", "baseline,multitask",
                     "--data_dir", str(small_data), "--output_dir", str(out)]) == 0
    finally:
        runner.run_row = original
    again = json.loads((out / "results.json").read_text())["rows"]
    assert len(calls) == 4 and all(r["reused"] for row in again for r in row["runs"])

    # --collect_only with a seed not run yet: nothing is trained, the rows say 2 of 3 runs
    assert main(["paper", "--profile", "smoke", "--seeds", "1,2,3", "--rows", "baseline,multitask", "--collect_only",
                 "--data_dir", str(small_data), "--output_dir", str(out)]) == 0
    assert not (out / "baseline" / "seed3").exists() and not (out / "multitask" / "seed3").exists()
    collected = json.loads((out / "results.json").read_text())["rows"]
    assert [[r["seed"] for r in row["runs"]] for row in collected] == [[1, 2], [1, 2]]
    assert "| Multitask Learning | 2/3 | " in (out / "results.md").read_text()
    with pytest.raises(SystemExit):
        main(["paper", "--profile", "smoke", "--collect_only", "--overwrite_output_dir", "--data_dir", str(small_data)])
    with pytest.raises(SystemExit):
        main(["paper", "--profile", "smoke", "--collect_only", "--data_dir", str(small_data),
              "--output_dir", str(out / "no-such-folder")])
    assert not (out / "no-such-folder").exists()


def test_paired_difference_is_a_t_interval_over_seeds():
    from minbert.experiments.stats import format_difference, paired_difference

    d = paired_difference({1: 0.5, 2: 0.6, 3: 0.7, 4: 0.9}, {1: 0.4, 2: 0.45, 3: 0.5})  # seed 4 has no pair
    assert d["seeds"] == [1, 2, 3] and d["diff"] == pytest.approx(0.15)
    half = 4.302652729911275 * 0.05 / 3 ** 0.5  # t(0.975, 2 df) x sd / sqrt(n); differences 0.1, 0.15, 0.2
    assert d["ci"] == pytest.approx([0.15 - half, 0.15 + half]) and d["excludes_zero"]
    assert format_difference(d).endswith(" *")
    noisy = paired_difference({1: 0.5, 2: 0.7}, {1: 0.6, 2: 0.6})
    assert noisy["diff"] == pytest.approx(0.0) and noisy["ci"][0] < 0 < noisy["ci"][1] and not noisy["excludes_zero"]
    one = paired_difference({1: 0.5}, {1: 0.4})
    assert one["ci"] is None and format_difference(one) == "+0.1000 [n/a: 1 seed]"
    assert paired_difference({1: 0.5}, {2: 0.4}) is None


def _flag_values(flags) -> dict:
    out, i = {}, 0
    while i < len(flags):
        takes_value = i + 1 < len(flags) and not flags[i + 1].startswith("--")
        out[flags[i]] = flags[i + 1] if takes_value else True
        i += 2 if takes_value else 1
    return out


def test_cpu_profile_keeps_each_rows_strategy_on_the_default_architecture(tmp_path, monkeypatch):
    from minbert.cli import train_parser
    from minbert.experiments import CPU_STEPS, profiles

    monkeypatch.setattr(profiles, "bf16_native", lambda device="auto": True)  # as on a CPU with AMX
    parser = train_parser()
    args = {r.key: vars(parser.parse_args(row_argv(r, "cpu", "data", tmp_path, "cpu", seed=7))) for r in ROWS}
    defaults = {k: parser.get_default(k) for k in ("pooling", "para_head", "sts_head")}
    assert defaults == {"pooling": "mean", "para_head": "sbert", "sts_head": "cosine_regression"}
    for row in ROWS:
        a = args[row.key]
        assert a["model_name_or_path"] == "minilm-l6" and a["max_eval_samples"] is None and a["seed"] == 7
        assert a["output_dir"] == str(tmp_path / row.key / "seed7")
        assert a["max_steps_per_epoch"] == CPU_STEPS * row.iterations and a["iterations_multiplier"] == row.iterations
        f = _flag_values(row.flags)  # the row's strategy, on the default architecture where it sets nothing
        assert a["combiner"] == f["--combiner"] and a["smart"] == ("--smart" in f)
        assert a["sts_head"] == f.get("--sts_head", "cosine_regression")
        assert a["pooling"] == f.get("--pooling", "mean") and a["para_head"] == "sbert"
        assert (a["bf16"] == "on") == (not a["smart"] or profiles.smart_accepts_bf16())
    assert args["baseline"]["sts_head"] == "cosine_regression" and args["cosine_2d1"]["sts_head"] == "cosine_2d1"
    assert args["smart"]["combiner"] == "individual" and args["smart_gse"]["combiner"] == "gse"

    # mean pooling is the default here: the "+ Mean Pooling" row is the "2d+1" row's run, trained once
    paper = runner.PaperRun("cpu", tmp_path, "data", "cpu", ROWS, seeds=(1, 2))
    assert paper.same_runs() == {("cosine_2d1_mean", 1): "cosine_2d1", ("cosine_2d1_mean", 2): "cosine_2d1"}
    assert runner.PaperRun("quick", tmp_path, "data", "cpu", ROWS, seeds=(1,)).same_runs() == {}

    def bf16(argv: list[str]) -> str:  # rows always pass --bf16 on|off explicitly
        return argv[argv.index("--bf16") + 1]

    # SMART rows get --bf16 on as soon as train_multitask.py accepts --smart --bf16
    monkeypatch.setattr(profiles, "smart_accepts_bf16", lambda: True)
    smart = next(r for r in ROWS if r.key == "smart")
    assert bf16(row_argv(smart, "cpu", "data", tmp_path, "cpu")) == "on"
    monkeypatch.setattr(profiles, "smart_accepts_bf16", lambda: False)
    assert bf16(row_argv(smart, "cpu", "data", tmp_path, "cpu")) == "off"
    assert bf16(row_argv(smart, "cpu", "data", tmp_path, "cpu", bf16="on")) == "off"  # refused: never on
    assert bf16(row_argv(ROWS[0], "quick", "data", tmp_path, "cpu")) == "on"
    assert bf16(row_argv(ROWS[0], "full", "data", tmp_path, "cpu")) == "on"  # every profile, like the main job
    assert bf16(row_argv(ROWS[0], "smoke", "data", tmp_path, "cpu")) == "on"
    assert bf16(row_argv(ROWS[0], "full", "data", tmp_path, "cpu", bf16="off")) == "off"  # the report's fp32
    assert bf16(row_argv(ROWS[0], "full", "data", tmp_path, "cpu", bf16="on")) == "on"
    assert bf16(row_argv(ROWS[0], "cpu", "data", tmp_path, "cpu", bf16="off")) == "off"
    # on a CPU without native bfloat16 (AVX2 only) auto trains in float32: bf16 would be far slower there
    monkeypatch.setattr(profiles, "bf16_native", lambda device="auto": False)
    assert all(bf16(row_argv(r, p, "data", tmp_path, "cpu")) == "off" for r in ROWS for p in PROFILES)


def test_smart_bf16_detection_follows_the_training_checks(monkeypatch):
    from minbert import cli
    from minbert.experiments import profiles

    profiles.smart_accepts_bf16.cache_clear()
    monkeypatch.setattr(cli, "check_train_args", lambda p, args: None)  # checks that accept everything
    assert profiles.smart_accepts_bf16() is True
    profiles.smart_accepts_bf16.cache_clear()
    monkeypatch.setattr(cli, "check_train_args", lambda p, args: p.error("--smart with --bf16: refused"))
    assert profiles.smart_accepts_bf16() is False
    profiles.smart_accepts_bf16.cache_clear()


@pytest.mark.slow
def test_rows_with_identical_flags_are_trained_once(small_data, tmp_path, monkeypatch, capsys, one_thread):
    """Under the default architecture (mean pooling) the "+ Mean Pooling" row is the "2d+1" row: one run, two rows."""
    from minbert.experiments import profiles

    monkeypatch.setitem(profiles.ARCHITECTURES, "smoke", profiles.DEFAULT_ARCHITECTURE)
    out = tmp_path / "same"
    trained = []
    original = runner.run_row
    monkeypatch.setattr(runner, "run_row", lambda row, argv, ow: trained.append(row.key) or original(row, argv, ow))
    assert main(["paper", "--profile", "smoke", "--seeds", "3", "--rows", "cosine_2d1,cosine_2d1_mean",
                 "--data_dir", str(small_data), "--output_dir", str(out)]) == 0
    assert trained == ["cosine_2d1"] and not (out / "cosine_2d1_mean").exists()
    first, second = json.loads((out / "results.json").read_text())["rows"]
    assert second["same_run_as"] == "cosine_2d1" and second["runs"][0]["dev"] == first["runs"][0]["dev"]
    assert "(same run as `cosine_2d1`)" in capsys.readouterr().out
    assert main(["paper", "--profile", "smoke", "--seeds", "3", "--rows", "cosine_2d1,cosine_2d1_mean",
                 "--data_dir", str(small_data), "--output_dir", str(out), "--print_commands"]) == 0
    assert "(the same run as cosine_2d1: trained once)" in capsys.readouterr().out
