"""minbert-predict: texts and files in, the API's predictions out (text, CSV, JSON lines); mistakes are one line."""
from __future__ import annotations

import csv
import io
import json
import os
import re
import shlex
import subprocess
import sys

import numpy as np
import pytest

import minbert
from minbert.predict_cli import main
from minbert.tasks.data import load_task

from .conftest import ROOT
from .test_api import doc_section, save_tiny_checkpoint, tiny_run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory, seed=1)


@pytest.fixture(scope="module")
def api(run_dir):
    return minbert.load(run_dir, device="cpu", bf16="off")


def predict(argv, capsys) -> tuple[int, str, str]:
    # float32 like `api` (compared to 1e-6) whatever the default, unless a test asks for --bf16
    code = main(argv if "--bf16" in argv else [*argv, "--bf16", "off"])
    out, err = capsys.readouterr()
    return code, out, err


def test_texts_on_the_command_line(run_dir, api, capsys, one_thread):
    code, out, _ = predict(["--checkpoint", str(run_dir), "--task", "sst", "a gripping, funny film"], capsys)
    labels, probs = api.predict_sentiment(["a gripping, funny film"], return_probabilities=True)
    name = minbert.api.SENTIMENT_LABELS["sst"][labels[0]]
    assert code == 0 and out.startswith(f"{name} ({labels[0]})  probabilities: negative {probs[0][0]:.3f}")
    code, out, _ = predict(["--checkpoint", str(run_dir), "--task", "qqp", "How old are you?", "What is your age?"], capsys)
    d, p = api.predict_paraphrase([("How old are you?", "What is your age?")], return_probabilities=True)
    assert code == 0 and out == f"paraphrase: {'yes' if d[0] else 'no'}  probability {p[0]:.3f}\n"
    code, out, _ = predict(["--checkpoint", str(run_dir / "best"), "--task", "sts", "a b", "c d", "--format", "jsonl"],
                           capsys)
    record = json.loads(out)
    assert code == 0 and record["similarity"] == pytest.approx(float(api.predict_similarity([("a b", "c d")])[0]), abs=1e-4)
    assert record["sentence1"] == "a b" and record["id"] == "1"
    code, out, _ = predict(["--checkpoint", str(run_dir), "--task", "sst", "one", "two", "three", "--bf16"], capsys)
    assert code == 0 and [line.split(":")[0] for line in out.splitlines()] == ["1", "2", "3"]


def test_task_file_in_csv_out(run_dir, api, small_data, tmp_path, capsys, one_thread):
    code, out, _ = predict(["--checkpoint", str(run_dir), "--task", "sst", "--input", str(small_data / "ids-sst-dev.csv"),
                            "--batch_size", "5"], capsys)
    assert code == 0
    rows = list(csv.DictReader(io.StringIO(out)))
    data = load_task("sst", "dev", small_data)
    assert [r["id"] for r in rows] == [ex.id for ex in data.examples]
    assert [r["sentence"] for r in rows] == [ex.texts[0] for ex in data.examples]
    expected = api.predict_sentiment([ex.texts[0] for ex in data.examples])
    assert [int(r["label"]) for r in rows] == expected.tolist()
    assert list(rows[0])[-5:] == ["p_negative", "p_somewhat_negative", "p_neutral", "p_somewhat_positive", "p_positive"]
    # the test split has no labels, and two unnamed index columns: read by the same reader
    out_file = tmp_path / "out" / "qqp.jsonl"
    code, out, _ = predict(["--checkpoint", str(run_dir), "--task", "qqp", "--input",
                            str(small_data / "quora-test-student.csv"), "--format", "jsonl", "--output", str(out_file)],
                           capsys)
    assert code == 0 and out == ""
    records = [json.loads(line) for line in out_file.read_text().splitlines()]
    test = load_task("qqp", "test", small_data)
    assert [r["id"] for r in records] == [ex.id for ex in test.examples]
    expected_p = api.predict_paraphrase([ex.texts for ex in test.examples], return_probabilities=True)[1]
    np.testing.assert_allclose([r["probability"] for r in records], expected_p, atol=1e-6)


def test_one_text_or_pair_per_line(run_dir, api, tmp_path, capsys):
    pairs = tmp_path / "pairs.txt"
    pairs.write_text("A man plays a guitar.\tA man is playing guitar.\n\nHow old are you?\tWhere do you live?\n")
    code, out, err = predict(["--checkpoint", str(run_dir), "--task", "sts", "--input", str(pairs)], capsys)
    rows = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and [r["id"] for r in rows] == ["1", "3"]  # ids are line numbers
    expected = api.predict_similarity([("A man plays a guitar.", "A man is playing guitar."),
                                       ("How old are you?", "Where do you live?")])
    np.testing.assert_allclose([float(r["similarity"]) for r in rows], expected, atol=1e-4)
    assert err == f"note: {pairs}: 1 blank line(s) skipped\n"
    lines = tmp_path / "lines.txt"
    lines.write_text("first, with a comma\n\"quoted\"\n")
    code, out, _ = predict(["--checkpoint", str(run_dir), "--task", "sst", "--input", str(lines)], capsys)
    assert code == 0 and [r["sentence"] for r in csv.DictReader(io.StringIO(out))] == ["first, with a comma",
                                                                                        '"quoted"']
    lines.write_text("first\tand a tab\n")  # a TSV row is never scored as one sentence
    code, out, err = predict(["--checkpoint", str(run_dir), "--task", "sst", "--input", str(lines)], capsys)
    assert code == 1 and out == "" and "header 'first \\t and a tab' found, expected the header 'id \\t sentence'" in err


@pytest.mark.parametrize("content,message", [
    ("a\tb\nonly one\n", "{f}:2: expected two tab-separated texts (one qqp pair per line), found 1 field(s): 'only one'"),
    ("a\t \n", "{f}:1: the second text of the pair is empty"),
    ("\n\n", "{f}: no texts to predict"),
    (b"a\tb\n\xff\tc\n", "{f}:2: invalid UTF-8 (byte 0xff)"),
    ("id\tsentence1\tsentence2\n1\tx\n", "{f}:2: expected 3 tab-separated fields, found 2 (use --skip_bad_rows to "
                                          "skip such rows)"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys, content, message):
    f = tmp_path / "in.txt"
    f.write_bytes(content if isinstance(content, bytes) else content.encode())
    out_file = tmp_path / "out.csv"
    code, out, err = predict(["--checkpoint", str(run_dir), "--task", "qqp", "--input", str(f), "--output", str(out_file)],
                             capsys)
    assert code == 1 and out == "" and err == f"error: {message.format(f=f)}\n"
    assert not out_file.exists() and os.listdir(tmp_path) == ["in.txt"]


@pytest.mark.parametrize("argv,message", [
    (["--task", "qqp", "only one"], "--task qqp takes two texts (one pair), got 1; for several pairs use --input FILE "
                                    "(a tab-separated pair per line)"),
    (["--task", "nli", "x"], "argument --task: invalid choice: 'nli' (choose from "),  # quoting varies by Python
    (["--task", "sst2", "x"], "--task sst2: the checkpoint has no sst2 head (it has: sst, qqp, sts)"),
    (["--task", "sst"], "nothing to predict: give TEXT argument(s) or --input FILE"),
    (["--task", "sst", "x", "--input", "f.txt"], "give TEXT arguments or --input FILE, not both"),
    (["--task", "sst", "x", "--device", "tpu"], "argument --device: 'tpu': choose auto, cpu, cuda or cuda:N"),
    (["--task", "sst", "x", "--batch_size", "0"], "argument --batch_size: must be positive, got 0"),
])
def test_usage_errors_exit_2_with_one_error_line(run_dir, capsys, argv, message):
    with pytest.raises(SystemExit) as e:
        main(["--checkpoint", str(run_dir), *argv])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert lines[0].startswith("usage: minbert-predict") and lines[-1].startswith(f"minbert-predict: error: {message}")
    assert sum(line.startswith("minbert-predict: error") for line in lines) == 1


def test_checkpoint_mistakes_are_one_line(tmp_path, capsys):
    code, _, err = predict(["--checkpoint", str(tmp_path / "nope"), "--task", "sst", "x"], capsys)
    assert code == 1 and err == f"error: {tmp_path / 'nope'}: no such directory\n"
    code, _, err = predict(["--checkpoint", str(tmp_path), "--task", "sst", "x"], capsys)
    assert code == 1 and err == (f"error: {tmp_path}: not a minbert checkpoint (no multitask.json) nor a run "
                                 "directory with best/\n")


def test_documented_commands_run(tmp_path, small_data, monkeypatch, capsys, one_thread):
    """docs/prediction.md's minbert-predict commands, run as written from a folder holding a tiny runs/main and the
    data."""
    section = doc_section("Use a trained model")
    commands = [line for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S)
                for line in block.splitlines() if line.startswith("minbert-predict ")]
    assert len(commands) >= 4
    save_tiny_checkpoint(tmp_path / "runs" / "main" / "best")
    (tmp_path / "runs" / "main" / "args.json").write_text("{}\n")
    (tmp_path / "data").symlink_to(small_data)
    monkeypatch.chdir(tmp_path)
    for command in commands:
        argv = shlex.split(command)[1:]
        code, out, err = predict(argv, capsys)
        assert code == 0, (command, err)
        assert "--output" in argv or out.strip()
    assert len((tmp_path / "sts-dev.jsonl").read_text().splitlines()) == 48


@pytest.mark.slow
def test_python_dash_m_entry_point(run_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-m", "minbert.predict_cli", "--checkpoint", str(run_dir), "--task", "sts",
                             "A man plays a guitar.", "A man is playing guitar.", "--format", "csv"],
                            env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.splitlines()[0] == "id,sentence1,sentence2,similarity"


def test_help_is_grouped_and_complete(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and all(f"\n{g}:\n" in out for g in ("model", "input", "output"))
    from minbert.predict_cli import predict_parser

    assert all(a.help for a in predict_parser()._actions)
