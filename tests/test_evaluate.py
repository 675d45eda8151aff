"""evaluate.py: scores, JSON output, and file:line errors for bad prediction files."""
import json
import re
import subprocess
import sys

import pytest

from minbert.tasks.data import DEFAULT_TASKS, TASKS, load_task
from minbert.tasks.metrics import overall_score
from minbert.tasks.predict import prediction_path, read_predictions, score_prediction_dir, write_predictions

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


# ---------------------------------------------------------------------------------------------------------
# Nothing is scored on fewer rows, or on a different file, than the user thinks.

def _evaluate(capsys, *args):
    from minbert.cli import evaluate_main

    rc = evaluate_main(list(args))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_gold_row_with_empty_label_is_an_error_or_a_named_skip(data_copy, tmp_path, capsys):
    _gold_predictions(data_copy, tmp_path)
    gold = data_copy / "sts-dev.csv"
    lines = gold.read_text(encoding="utf-8").split("\n")
    lines[5] = lines[5].rsplit("\t", 1)[0] + "\t"  # line 6 loses its label
    gold.write_text("\n".join(lines), encoding="utf-8")
    rc, out, err = _evaluate(capsys, "--predictions", str(tmp_path), "--data_dir", str(data_copy))
    assert rc == 1 and err.startswith(f"error: {gold}:6: missing label") and len(err.splitlines()) == 1, err
    results = score_prediction_dir(tmp_path, data_copy, skip_bad_rows=True)
    err = capsys.readouterr().err
    assert f"warning: {gold}:6: missing label: gold row skipped, not scored" in err
    assert results["dev"]["sts"] == pytest.approx(1.0)  # scored on the 47 other rows, and said so


def test_dangling_symlink_prediction_file_is_an_error_not_absent(small_data, tmp_path, capsys):
    _gold_predictions(small_data, tmp_path)
    path = tmp_path / "sts-dev-output.csv"
    path.unlink()
    path.symlink_to(tmp_path / "elsewhere.csv")
    rc, out, err = _evaluate(capsys, "--predictions", str(tmp_path), "--data_dir", str(small_data))
    assert rc == 1 and err == f"error: {path}: broken symbolic link (its target {tmp_path / 'elsewhere.csv'} does not exist)\n"


def test_allow_partial_with_header_only_files_says_so(small_data, tmp_path, capsys):
    _gold_predictions(small_data, tmp_path)
    for path in tmp_path.iterdir():
        path.write_text(path.read_text().split("\n")[0] + "\n")
    rc, out, err = _evaluate(capsys, "--predictions", str(tmp_path), "--data_dir", str(small_data), "--allow_partial")
    assert rc == 1 and re.fullmatch(r"error: .*-output\.csv:2: no predictions after the header\n", err), err


def test_allow_partial_says_how_many_rows_were_scored(small_data, tmp_path, capsys):
    _gold_predictions(small_data, tmp_path)
    path = tmp_path / "sst-dev-output.csv"
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:11]))
    rc, out, err = _evaluate(capsys, "--predictions", str(tmp_path), "--data_dir", str(small_data), "--allow_partial")
    assert rc == 0 and f"warning: {path}: scored on 10 of the 48 rows" in err


def test_constant_sts_predictions_warn_and_count_as_zero(small_data, tmp_path, capsys):
    """Pearson r of constant predictions is undefined: a warning naming the file, r counted as 0 (overall
    then gets (0 + 1) / 2 for STS), and the JSON stays valid (no NaN)."""
    _gold_predictions(small_data, tmp_path)
    ids = [ex.id for ex in load_task("sts", "dev", small_data).examples]
    for value in (2.5, 0.1):  # 0.1 x 48: numpy's std of equal floats is 1e-17, not 0 (scipy would give NaN)
        write_predictions(tmp_path / "sts-dev-output.csv", TASKS["sts"], ids, [value] * len(ids))
        rc, out, err = _evaluate(capsys, "--predictions", str(tmp_path), "--data_dir", str(small_data), "--json")
        assert rc == 0
        assert f"warning: {tmp_path / 'sts-dev-output.csv'}: all 48 predictions are equal: Pearson r is undefined" in err
        dev = json.loads(out, parse_constant=lambda c: pytest.fail(f"{c} in the JSON"))["dev"]
        assert dev["sts"] == 0.0 and dev["overall"] == pytest.approx((dev["sst"] + dev["qqp"] + 0.5) / 3)


def test_bom_is_accepted_in_prediction_files_like_task_files(small_data, tmp_path):
    _gold_predictions(small_data, tmp_path)
    path = tmp_path / "sst-dev-output.csv"
    before = read_predictions(path, TASKS["sst"])
    path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes())
    assert read_predictions(path, TASKS["sst"]) == before
    assert score_prediction_dir(tmp_path, small_data)["dev"]["sst"] == 1.0


def test_write_predictions_refuses_ids_it_could_not_read_back(tmp_path):
    for bad in ("a,b", "x\ny", " lead", "nul\x00"):
        with pytest.raises(ValueError, match="cannot write the prediction"):
            write_predictions(tmp_path / "sst-dev-output.csv", TASKS["sst"], [bad], [1])
    assert not (tmp_path / "sst-dev-output.csv").exists()
