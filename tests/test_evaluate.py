"""evaluate.py: scores, JSON output, and file:line errors for bad prediction files."""
import json
import subprocess
import sys

import pytest

from minbert.data import DEFAULT_TASKS, TASKS, load_task
from minbert.predict import prediction_path, read_predictions, score_prediction_dir, write_predictions
from minbert.metrics import overall_score

from .conftest import ROOT


def _gold_predictions(data_dir, out, noise=False):
    """Write prediction files equal to the gold labels (dev) or constant (test), for the three CS224N tasks."""
    for task in DEFAULT_TASKS:
        spec = TASKS[task]
        for split in ("dev", "test"):
            data = load_task(task, split, data_dir)
            values = [ex.label if ex.label is not None else 0 for ex in data.examples]
            if noise and task == "sst":
                values = [(v + 1) % 5 if i % 4 == 0 else v for i, v in enumerate(values)]
            write_predictions(prediction_path(out, task, split), spec, [ex.id for ex in data.examples], values)


def test_perfect_predictions_score_one(small_data, tmp_path):
    _gold_predictions(small_data, tmp_path, noise=True)
    results = score_prediction_dir(tmp_path, small_data)
    assert set(results) == {"dev"}  # test files have no gold labels
    dev = results["dev"]
    assert dev["sst"] == pytest.approx(36 / 48) and dev["qqp"] == 1.0 and dev["sts"] == pytest.approx(1.0)
    assert dev["overall"] == pytest.approx(overall_score({"sst": 0.75, "qqp": 1.0, "sts": 1.0}))
    assert dev["overall"] == pytest.approx((0.75 + 1.0 + 1.0) / 3)


def test_file_layout_is_cs224n(small_data, tmp_path):
    _gold_predictions(small_data, tmp_path)
    lines = (tmp_path / "sts-dev-output.csv").read_text().splitlines()
    assert lines[0] == "id \t Predicted_Similiary "
    first = load_task("sts", "dev", small_data).examples[0]
    assert lines[1] == f"{first.id} , {first.label:.4f} "
    assert (tmp_path / "para-test-output.csv").read_text().splitlines()[0] == "id \t Predicted_Is_Paraphrase "
    assert len(read_predictions(tmp_path / "sst-test-output.csv", TASKS["sst"])) == 48


def _cli(*args):
    return subprocess.run([sys.executable, str(ROOT / "evaluate.py"), *args], capture_output=True, text=True, cwd=ROOT)


def test_cli_table_and_json(small_data, tmp_path):
    _gold_predictions(small_data, tmp_path)
    r = _cli("--predictions", str(tmp_path), "--data_dir", str(small_data))
    assert r.returncode == 0, r.stderr
    assert "| dev | 1.0000 | 1.0000 | 1.0000 | 1.0000 |" in r.stdout
    r = _cli("--predictions", str(tmp_path), "--data_dir", str(small_data), "--json")
    assert json.loads(r.stdout)["dev"]["overall"] == pytest.approx(1.0)


def _corrupt(path, fn):
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(fn(lines)))


@pytest.mark.parametrize("name,fn,message", [
    ("missing id", lambda ls: ls[:5] + ls[6:], r"sst-dev-output\.csv: 1 id\(s\) of .* have no prediction, e\.g\. '.*' \(.*ids-sst-dev\.csv:6\)"),
    ("duplicate id", lambda ls: ls + [ls[3]], r"sst-dev-output\.csv:50: duplicate id '.*' \(first on line 4\)"),
    ("unknown id", lambda ls: ls + ["zzz , 1 \n"], r"sst-dev-output\.csv: 1 id\(s\) not in .*ids-sst-dev\.csv, e\.g\. 'zzz'"),
    ("malformed", lambda ls: ls[:3] + ["abc 1\n"] + ls[4:], r"sst-dev-output\.csv:4: expected 'id , value'"),
    ("bad value", lambda ls: ls[:3] + ["abc , x\n"] + ls[4:], r"sst-dev-output\.csv:4: value 'x' is not a number"),
    ("bad class", lambda ls: ls[:2] + ["abc , 7\n"] + ls[3:], r"sst-dev-output\.csv:3: value '7' is not a class"),
    ("bad header", lambda ls: ["id\tfoo\n"] + ls[1:], r"sst-dev-output\.csv:1: header should be"),
])
def test_bad_prediction_files_are_one_line_errors(small_data, tmp_path, name, fn, message):
    _gold_predictions(small_data, tmp_path)
    _corrupt(tmp_path / "sst-dev-output.csv", fn)
    r = _cli("--predictions", str(tmp_path), "--data_dir", str(small_data))
    assert r.returncode != 0
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert __import__("re").search(message, r.stderr), r.stderr


def test_empty_prediction_dir(tmp_path, small_data):
    r = _cli("--predictions", str(tmp_path), "--data_dir", str(small_data))
    assert r.returncode != 0 and "no prediction files" in r.stderr
