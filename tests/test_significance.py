"""evaluate.py --ci and --compare (minbert/tasks/significance.py) on constructed predictions whose answer is known."""
import json
import math
import shutil
import subprocess
import sys

import numpy as np
import pytest

from minbert.tasks.data import DEFAULT_TASKS, TASKS, load_task
from minbert.tasks.predict import prediction_path, write_predictions
from minbert.tasks.significance import confidence_intervals, paired_comparison, read_dev_predictions

from .conftest import DATA, ROOT


def write_dev(data_dir, out, flip=0.0, only=None):
    """Dev prediction files equal to the gold labels, except that the first ``flip`` of every 10 examples get a
    wrong class (SST: the next class, QQP: the other one) and, for STS, a score moved by 2.5 (mod 5)."""
    out.mkdir(parents=True, exist_ok=True)
    for task in DEFAULT_TASKS:
        spec = TASKS[task]
        examples = load_task(task, "dev", data_dir).examples[:only]
        values = []
        for i, ex in enumerate(examples):
            wrong = i % 10 < round(10 * flip)
            if task == "sts":
                values.append((ex.label + 2.5) % 5.0 if wrong else ex.label)
            else:
                values.append((ex.label + 1) % spec.num_labels if wrong else ex.label)
        write_predictions(prediction_path(out, task, "dev"), spec, [ex.id for ex in examples], values)
    return out


def cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *map(str, args)], capture_output=True,
                          text=True, cwd=ROOT)


def test_identical_folders_differ_by_zero(small_data, tmp_path):
    a = write_dev(small_data, tmp_path / "a", flip=0.3)
    b = tmp_path / "b"
    shutil.copytree(a, b)
    comparison = paired_comparison(read_dev_predictions(a, small_data), read_dev_predictions(b, small_data))
    assert set(comparison) == {"sst", "qqp", "sts", "overall"}
    for c in comparison.values():
        assert c["diff"] == 0.0 and c["ci"][0] <= 0.0 <= c["ci"][1] and c["p"] == 1.0


def test_thirty_percent_flipped_is_a_real_difference(small_data, tmp_path):
    gold = read_dev_predictions(write_dev(small_data, tmp_path / "gold"), small_data)
    noisy = read_dev_predictions(write_dev(small_data, tmp_path / "noisy", flip=0.3), small_data)
    comparison = paired_comparison(gold, noisy)
    for key in ("sst", "qqp"):  # 48 rows, 15 of them flipped (i % 10 < 3)
        assert comparison[key]["diff"] == pytest.approx(15 / 48)
    for key, c in comparison.items():
        low, high = c["ci"]
        assert 0 < low <= c["diff"] <= high, key  # the interval excludes 0, on the side of the better run
        assert c["p"] < 0.01, key
    reverse = paired_comparison(noisy, gold)["overall"]
    assert reverse["diff"] == pytest.approx(-comparison["overall"]["diff"]) and reverse["ci"][1] < 0


def test_interval_contains_the_score_and_matches_the_binomial_error(tmp_path):
    """On the full SST dev set (1,101 sentences) with every other prediction wrong, the accuracy is about 0.5 and
    its standard error sqrt(p (1 - p) / n) about 0.015 (issue #11): the 95% interval is about ±1.96 of it."""
    a = write_dev(DATA, tmp_path / "half", flip=0.5)
    dev = read_dev_predictions(a, DATA)
    intervals = confidence_intervals(dev)
    assert set(intervals) == {"sst", "qqp", "sts", "overall"}
    scores = {t: float(np.mean(d.pred == d.gold)) for t, d in dev.items() if t != "sts"}
    for task, p in scores.items():
        n = len(dev[task].ids)
        half = (intervals[task][1] - intervals[task][0]) / 2
        assert intervals[task][0] < p < intervals[task][1]
        assert half == pytest.approx(1.96 * math.sqrt(p * (1 - p) / n), rel=0.12), task
    assert intervals["overall"][0] < intervals["overall"][1]
    assert confidence_intervals(dev) == intervals  # fixed seed


def test_cli_ci_json_keeps_dev_and_adds_dev_ci(small_data, tmp_path):
    a = write_dev(small_data, tmp_path / "a", flip=0.2)
    plain = cli("--predictions", a, "--data_dir", small_data, "--json")
    r = cli("--predictions", a, "--data_dir", small_data, "--json", "--ci")
    assert plain.returncode == 0 and r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dev"] == json.loads(plain.stdout)["dev"]
    assert set(out["dev_ci"]) == set(out["dev"]) == {"sst", "qqp", "sts", "overall"}
    for key, (low, high) in out["dev_ci"].items():
        assert low <= out["dev"][key] <= high and low < high, key


def test_cli_compare_json_and_markdown(small_data, tmp_path):
    a = write_dev(small_data, tmp_path / "a")
    b = write_dev(small_data, tmp_path / "b", flip=0.3)
    r = cli("--predictions", a, "--compare", b, "--data_dir", small_data, "--json")
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["dev"]["sst"] == 1.0 and set(out["compare"]) == {"sst", "qqp", "sts", "overall"}
    for c in out["compare"].values():
        assert isinstance(c["diff"], float) and len(c["ci"]) == 2 and 0 < c["p"] <= 1
    assert out["compare"]["sst"]["diff"] == pytest.approx(15 / 48)
    r = cli("--predictions", a, "--compare", b, "--data_dir", small_data, "--ci")
    assert r.returncode == 0, r.stderr
    assert "| SST acc | 1.0000 | 0.6875 | +0.3125 | [+" in r.stdout and "A > B" in r.stdout
    assert "95% bootstrap interval" in r.stdout


def test_compare_needs_the_same_ids(small_data, tmp_path):
    a = write_dev(small_data, tmp_path / "a")
    b = write_dev(small_data, tmp_path / "b", only=40)
    r = cli("--predictions", a, "--compare", b, "--data_dir", small_data, "--allow_partial")
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert "sst dev covers other ids than" in r.stderr and "8 only in" in r.stderr
    r = cli("--predictions", a, "--compare", b, "--data_dir", small_data)  # without --allow_partial: B is incomplete
    assert r.returncode == 1 and "have no prediction" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    (b / "sts-dev-output.csv").unlink()
    r = cli("--predictions", a, "--compare", b, "--data_dir", small_data, "--allow_partial")
    assert r.returncode == 1 and "a paired comparison needs the same tasks" in r.stderr
