"""The experiments runner reuses a finished run only if it was made with the row's settings (issue 22, item 1):
another --data_dir or --profile, or a run copied into another row's folder, is one line naming the run and the
setting; results.json is read strictly; --seeds/--rows mistakes are the runner's own one-line errors and leave
nothing behind. Seeded fuzz cases for the damaged results files."""
from __future__ import annotations

import json
import random
import shutil
import sys

import pytest

from minbert.experiments import ROWS, main, row_argv
from minbert.experiments.reuse import RunnerError, preflight, read_run_results, row_config

SEED = 20261203
SMOKE = [r for r in ROWS if r.key in ("baseline", "multitask")]


def _fake_finished(argv, dev=None) -> None:
    """A finished run in the folder of ``argv``: its args.json as the run would record it, and results.json."""
    config = row_config("row", argv)
    out = config.output_dir
    from pathlib import Path

    Path(out).mkdir(parents=True, exist_ok=True)
    (Path(out) / "args.json").write_text(json.dumps(config.to_dict(), default=str))
    scores = dev or {"sst": 0.25, "qqp": 0.5, "sts": 0.1, "overall": 0.43}
    (Path(out) / "results.json").write_text(json.dumps({"dev": scores, "wall_seconds": 1.0}))


def _commands(out, data_dir, profile="smoke"):
    return [(row, None, row_argv(row, profile, str(data_dir), out, "cpu", None, "off")) for row in SMOKE]


def test_a_finished_run_with_the_rows_settings_is_reused(tmp_path, small_data, capsys):
    out = tmp_path / "paper"
    for _, _, argv in _commands(out, small_data):
        _fake_finished(argv)
    assert main(["paper", "--profile", "smoke", "--rows", "baseline,multitask", "--data_dir", str(small_data),
                 "--output_dir", str(out), "--bf16", "off", "--device", "cpu"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["runs"][0]["reused"] for r in results["rows"]] == [True, True]
    assert results["rows"][0]["dev"]["sst"] == 0.25


def test_another_data_dir_is_refused_naming_the_run_and_the_setting(tmp_path, small_data, capsys):
    out = tmp_path / "paper"
    for _, _, argv in _commands(out, small_data):
        _fake_finished(argv)
    other = tmp_path / "other-data"
    shutil.copytree(small_data, other)
    code = main(["paper", "--profile", "smoke", "--rows", "baseline", "--data_dir", str(other),
                 "--output_dir", str(out), "--bf16", "off", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert err[0].startswith(f"error: baseline: {out / 'baseline'} holds a run made with other settings (--data_dir "
                             f"{small_data} (now {other})")
    assert not (out / "results.json").exists()  # nothing tabulated, nothing trained


def test_another_profile_and_a_copied_run_are_refused(tmp_path, small_data):
    out = tmp_path / "paper"
    for _, _, argv in _commands(out, small_data, "quick"):
        _fake_finished(argv)
    with pytest.raises(RunnerError, match="baseline: .* holds a run made with other settings"):
        preflight(_commands(out, small_data, "smoke"), overwrite=False)
    shutil.rmtree(out)
    for _, _, argv in _commands(out, small_data):
        _fake_finished(argv)
    shutil.rmtree(out / "multitask")
    shutil.copytree(out / "baseline", out / "multitask")  # baseline's run copied into multitask's folder
    with pytest.raises(RunnerError, match=r"multitask: .* other settings \(--combiner individual \(now sum\)"):
        preflight(_commands(out, small_data), overwrite=False)
    preflight(_commands(out, small_data), overwrite=True)  # --overwrite_output_dir re-trains instead


DAMAGE = [
    lambda d: "{",  # torn JSON
    lambda d: json.dumps(d)[:-3],
    lambda d: json.dumps(d) + " x",  # trailing text
    lambda d: '{"dev": {"sst": 0.5, "sst": 0.9}}',  # a duplicate key
    lambda d: json.dumps({**d, "dev": {**d["dev"], "sst": 1.5}}),
    lambda d: json.dumps({**d, "dev": {**d["dev"], "sts": -2}}),
    lambda d: json.dumps({**d, "dev": {**d["dev"], "qqp": "0.5"}}),
    lambda d: json.dumps({**d, "dev": {**d["dev"], "overall": None}}),
    lambda d: json.dumps({**d, "dev": {**d["dev"], "mnli": 0.5}}),
    lambda d: json.dumps({**d, "dev": {}}),
    lambda d: json.dumps({**d, "dev": [0.5]}),
    lambda d: json.dumps({**d, "wall_seconds": -1}),
    lambda d: json.dumps({**d, "peak_rss_mb": 0}),
    lambda d: json.dumps({**d, "peak_rss_mb": "2 GB"}),
    lambda d: json.dumps({**d, "peak_rss_mb": True}),
    lambda d: json.dumps([d]),
    lambda d: '{"dev": {"sst": NaN, "qqp": 0.5, "sts": 0.1, "overall": 0.4}}',
    lambda d: "",
]


@pytest.mark.parametrize("case", range(23))
def test_damaged_results_are_one_line_errors(tmp_path, case):
    rng = random.Random(SEED + case)
    good = {"dev": {"sst": rng.random(), "qqp": rng.random(), "sts": rng.uniform(-1, 1), "overall": rng.random()},
            "wall_seconds": rng.uniform(0, 100)}
    (tmp_path / "results.json").write_text(json.dumps(good))
    assert read_run_results(tmp_path)["dev"] == good["dev"]
    (tmp_path / "results.json").write_text(DAMAGE[case % len(DAMAGE)](good))
    with pytest.raises(RunnerError) as e:
        read_run_results(tmp_path)
    assert str(tmp_path / "results.json") in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("argv,message", [
    (["--seeds", "-1"], "--seeds: -1 is not a seed in [0, 4294967295]"),
    (["--seeds", str(2**32)], f"--seeds: {2**32} is not a seed in [0, 4294967295]"),
    (["--seeds", "1,,2"], "--seeds '1,,2': empty item (two commas in a row, or a comma at an end)"),
    (["--seeds", "1,1"], "--seeds '1,1': 1 is listed twice"),
    (["--seeds", "one"], "--seeds 'one': expected comma-separated integers"),
    (["--rows", "baseline,"], "--rows 'baseline,': empty item (two commas in a row, or a comma at an end)"),
    (["--rows", "nope"], "--rows: unknown row 'nope'"),
])
def test_runner_flag_mistakes_are_its_own_and_create_nothing(tmp_path, small_data, capsys, argv, message):
    out = tmp_path / "paper"
    with pytest.raises(SystemExit) as e:
        main(["paper", "--profile", "smoke", "--data_dir", str(small_data), "--output_dir", str(out), *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and err[0].startswith("usage: python -m minbert.experiments")
    assert err[-1].startswith(f"python -m minbert.experiments: error: {message}")
    assert not out.exists()


def test_a_row_the_training_checks_refuse_is_named_before_anything_is_created(tmp_path, small_data):
    argv = row_argv(SMOKE[0], "smoke", str(small_data), tmp_path / "paper", "cpu", None, "off") + ["--seed", "-5"]
    with pytest.raises(RunnerError, match=r"^baseline: --seed: must be in \[0, 4294967295\], got -5"):
        preflight([(SMOKE[0], None, argv)], overwrite=False)
    assert not (tmp_path / "paper").exists()


def test_two_runners_share_a_table_folder(tmp_path, small_data, capsys):
    """docs/results.md runs one runner per core on disjoint --rows in one --output_dir: the table folder is not
    locked (each run locks its own folder), so a second runner proceeds while another holds the folder."""
    from minbert.io.folder_lock import folder_lock

    out = tmp_path / "paper"
    for _, _, argv in _commands(out, small_data):
        _fake_finished(argv)
    with folder_lock(out):  # stands for another runner's lifetime (flock conflicts across open files)
        assert main(["paper", "--profile", "smoke", "--rows", "baseline", "--data_dir", str(small_data),
                     "--output_dir", str(out), "--bf16", "off", "--device", "cpu"]) == 0
    assert [r["key"] for r in json.loads((out / "results.json").read_text())["rows"]] == ["baseline"]


def test_a_run_folder_in_use_is_one_line(tmp_path, small_data, capsys, caplog):
    """A run another process is training (its folder locked) is that run's one-line error, not a traceback."""
    from minbert.io.folder_lock import folder_lock

    out = tmp_path / "paper"
    (out / "baseline").mkdir(parents=True)
    with folder_lock(out / "baseline"):
        code = main(["paper", "--profile", "smoke", "--rows", "baseline", "--data_dir", str(small_data),
                     "--output_dir", str(out), "--bf16", "off", "--device", "cpu"])
    err = capsys.readouterr().err + caplog.text
    assert code != 0 and "Traceback" not in err
    assert "baseline failed: --output_dir" in err and "in use by another minbert process" in err


def test_the_same_data_folder_spelled_otherwise_is_the_same_setting(tmp_path, small_data, monkeypatch, capsys):
    """--data_dir is compared as a folder, not as text: a run recorded with a relative path is reused when the
    runner names the same folder by its absolute path (and a different folder is still refused, above)."""
    monkeypatch.chdir(small_data.parent)
    out = tmp_path / "paper"
    for _, _, argv in _commands(out, small_data.name):  # recorded as "data0", relative to the current directory
        _fake_finished(argv)
    assert main(["paper", "--profile", "smoke", "--rows", "baseline", "--data_dir", str(small_data.resolve()),
                 "--output_dir", str(out), "--bf16", "off", "--device", "cpu"]) == 0
    assert json.loads((out / "results.json").read_text())["rows"][0]["runs"][0]["reused"] is True


def test_peak_rss_is_none_where_the_platform_has_no_resource_module(monkeypatch):
    from minbert.training.metrics_log import peak_rss_mb

    assert peak_rss_mb() > 50  # MB: this process has imported torch
    monkeypatch.setitem(sys.modules, "resource", None)  # as on Windows: `import resource` raises ImportError
    assert peak_rss_mb() is None
