"""Seeded fuzz cases for the inference entry points (minbert-predict, minbert.load, MultitaskBert.load,
minbert-export): every class of bad input is one line from the one gate of its kind, the same answer whichever
door it came through."""
from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import minbert
from minbert.api import MaxSeqLengthError, NonFiniteOutputError
from minbert.export import main as export_main
from minbert.io import json_text
from minbert.io.torch_load import load_torch_file
from minbert.model.encoder import BertModel
from minbert.model.multitask import MultitaskBert
from minbert.predict_cli import main as predict_main
from minbert.tasks.data import TASKS, DataError, blank_text_problem, read_task_file
from minbert.tasks.predict_input import read_inputs

from .test_api import tiny_run_dir

SEED = 22
INVISIBLE = [" ", "\u200b", "\u200d", "\ufeff", "\x01", "\x7f", "\u0301", "\u00a0", "\u2028", "\u3000", "\u2060"]
VISIBLE = ["a", "film", "é", "?", "日", "0"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory, seed=5)


@pytest.fixture(scope="module")
def model(run_dir):
    return minbert.load(run_dir, device="cpu")


def predict(argv, capsys):
    try:
        code = predict_main(argv)
    except SystemExit as e:  # usage errors: argparse's exit 2
        code = e.code
    out, err = capsys.readouterr()
    return code, out, err


def random_text(rng: random.Random, visible: bool) -> str:
    chars = [rng.choice(INVISIBLE) for _ in range(rng.randint(1, 6))]
    if visible:
        chars.insert(rng.randrange(len(chars) + 1), rng.choice(VISIBLE))
    return "".join(chars)


def test_one_rule_for_empty_texts_everywhere(run_dir, model, tmp_path, capsys):
    """CLI arguments, --input lines, task files and the API accept a text exactly when blank_text_problem does."""
    rng = random.Random(SEED)
    for case in range(12):
        text = random_text(rng, visible=case % 3 == 0)
        blank = blank_text_problem(text) is not None
        assert blank == (case % 3 != 0), repr(text)
        code, _, err = predict(["--checkpoint", str(run_dir), "--task", "sst", text], capsys)
        assert (code == 2 and "TEXT 1 " in err) if blank else code == 0, (repr(text), err)
        if blank:
            with pytest.raises(ValueError, match="sentence 0 "):
                model.predict_sentiment([text])
            with pytest.raises(ValueError, match="the first sentence "):
                model.predict_similarity([(text, "fine")])
        else:
            assert model.predict_sentiment([text]).shape == (1,)
        if text.strip():  # a line of spaces only is a blank line (skipped and counted)
            f = tmp_path / f"lines{case}.txt"
            f.write_text(f"fine\n{text}\n", encoding="utf-8")
            if blank:
                with pytest.raises(DataError, match=f"{f}:2: the text "):
                    read_inputs(f, "sst")
            else:
                assert read_inputs(f, "sst", input_format="lines")[1] == [("fine",), (text,)]
        task = tmp_path / f"task{case}.csv"
        task.write_text(f"id\tsentence\n1\tfine\n2\t{text}\n", encoding="utf-8")
        if blank:
            with pytest.raises(DataError, match=f"{task}:3: sentence "):
                read_task_file(TASKS["sst"], task, "test")


HEADERS = {  # the exact layouts (header, a row): the CS224N files' headers, with and without labels
    "sst": [("id\tsentence", "7\ta b"), ("\tid\tsentence\tsentiment", "0\t7\ta b\t3"),
            ("0\t\tid\tsentence", "1\t0.0\t7\ta b")],
    "qqp": [("id\tsentence1\tsentence2", "7\ta b\tc d"), ("\tid\tsentence1\tsentence2\tis_duplicate", "0\t7\ta b\tc d\t1")],
    "sts": [("id\tsentence1\tsentence2", "7\ta b\tc d"), ("\tid\tsentence1\tsentence2\tsimilarity", "0\t7\ta b\tc d\t3.5")],
}


def test_input_layouts_are_exact(tmp_path):
    """Exact headers read as the task layout; every other header-like first line (another task's header, missing,
    renamed, reordered or extra columns) is one line naming the file, the header found and the one expected."""
    rng = random.Random(SEED)
    for task, headers in HEADERS.items():
        pair = TASKS[task].is_pair
        for header, row in headers:
            f = tmp_path / "ok.csv"
            f.write_text(f"{header}\n{row}\n")
            ids, inputs = read_inputs(f, task)
            assert ids == ["7"] and len(inputs[0]) == (2 if pair else 1)
        names = ["id", "sentence", "sentence1", "sentence2", "label", "text", "question1", "question2", "similarity"]
        for _ in range(15):
            fields = rng.sample(names, rng.randint(1 if pair else 2, 4))
            header = "\t".join(fields)
            if fields in ([h for h in hh.split("\t") if h and not h.isdigit()] for hh, _ in headers):
                continue
            f = tmp_path / "bad.csv"
            f.write_text(f"{header}\nx\ty\n")
            for fmt in ("auto", "task"):
                with pytest.raises(DataError) as e:
                    read_inputs(f, task, input_format=fmt)
                msg = str(e.value)
                assert "\n" not in msg and msg.startswith(f"{f}:1: header '") and "found, expected the header 'id" in msg
    f = tmp_path / "tsv.txt"  # an sst row with tabs is never one sentence, with or without --input_format lines
    f.write_text("the film\t3\n")
    for fmt in ("auto", "lines"):
        with pytest.raises(DataError, match="tab"):
            read_inputs(f, "sst", input_format=fmt)


def poisoned(source, directory, rng: random.Random, weights: str = "model.safetensors") -> str:
    """Copy checkpoint ``source`` to ``directory`` with one value of one random float tensor set to NaN or inf."""
    import shutil

    shutil.copytree(source, directory)
    state = load_file(directory / weights)
    name = rng.choice(sorted(k for k, v in state.items() if v.is_floating_point()))
    flat = state[name].reshape(-1).clone()
    flat[rng.randrange(flat.numel())] = rng.choice([math.nan, math.inf, -math.inf])
    state[name] = flat.reshape(state[name].shape)
    save_file(state, str(directory / weights), metadata={"format": "pt"})
    return name


def test_non_finite_weights_are_refused_by_every_loader(run_dir, tmp_path, capsys):
    rng = random.Random(SEED)
    exported = tmp_path / "exported"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    capsys.readouterr()
    for i in range(3):
        bad = tmp_path / f"bad{i}"
        name = poisoned(run_dir / "best", bad, rng)
        message = f"{bad / 'model.safetensors'}: tensor {name} is not finite (1 NaN or inf value(s))"
        with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)")):
            minbert.load(bad)
        with pytest.raises(DataError, match="not finite"):
            MultitaskBert.load(bad)  # --predict_only and minbert-export read through it
        code, out, err = predict(["--checkpoint", str(bad), "--task", "sst", "a film", "--format", "jsonl"], capsys)
        assert code == 1 and out == "" and err.startswith(f"error: {message}") and err.count("\n") == 1
        assert export_main(["--checkpoint", str(bad), "--out", str(tmp_path / f"o{i}")]) == 1
        assert not (tmp_path / f"o{i}").exists() and "not finite" in capsys.readouterr().err
        for weights in ("model.safetensors", "heads.safetensors"):  # an export folder: encoder and heads
            bad_export = tmp_path / f"bad_export{i}_{weights}"
            poisoned(exported, bad_export, rng, weights)
            with pytest.raises(DataError, match=f"{bad_export / weights}: tensor .* not finite"):
                minbert.load(bad_export)


def test_non_finite_outputs_never_reach_an_answer(run_dir, capsys):
    model = minbert.load(run_dir, device="cpu")
    with torch.no_grad():
        model.model.heads["sts"].parameters().__next__().fill_(math.inf)  # finite on disk, broken in memory
    with pytest.raises(NonFiniteOutputError, match="non-finite"):
        model.predict_similarity([("a", "b")])
    with pytest.raises(ValueError, match="non-finite number"):
        json_text({"probability": math.nan})


def test_max_seq_length_has_the_training_limits(run_dir, capsys):
    rng = random.Random(SEED)
    limit = 512  # bert-tiny's max_position_embeddings
    values = [1, 2, 3, 4, 5, limit, limit + 1, 10**6] + [rng.randint(-10**9, 10**9) for _ in range(4)]
    for n in values:
        ok = 5 <= n <= limit
        code, out, err = predict(["--checkpoint", str(run_dir), "--task", "qqp", "a", "b", "--max_seq_length", str(n)],
                                 capsys)
        assert (code == 0) == ok and (err == "") == ok, (n, err)
        if not ok:  # argparse (n <= 0) or the shared rule: a usage error whose one error line names the flag
            assert code == 2 and err.splitlines()[-1].startswith("minbert-predict: error: ") and \
                "--max_seq_length" in err.splitlines()[-1] and "Traceback" not in err
            if n > 0:
                with pytest.raises(MaxSeqLengthError, match=f"max_seq_length must be (>= 5|<= {limit})"):
                    minbert.load(run_dir, max_seq_length=n)
    with pytest.raises(MaxSeqLengthError, match="integer"):
        minbert.load(run_dir, max_seq_length=64.0)


def test_export_and_checkpoint_are_not_confused(run_dir, tmp_path, capsys):
    exported = tmp_path / "exported"
    assert export_main(["--checkpoint", str(run_dir), "--out", str(exported)]) == 0
    a = minbert.load(run_dir).predict_sentiment(["a gripping film"], return_probabilities=True)[1]
    b = minbert.load(exported).predict_sentiment(["a gripping film"], return_probabilities=True)[1]
    np.testing.assert_allclose(a, b, atol=1e-5)
    assert isinstance(MultitaskBert.load(exported), MultitaskBert)  # --predict_only --checkpoint EXPORT works
    for wrong in (run_dir / "best", run_dir):
        with pytest.raises(ValueError, match=r"a minbert (checkpoint|run folder), not a Hugging Face model folder; "
                                             r"convert it with `minbert-export --checkpoint"):
            BertModel.from_pretrained(wrong)
    hf = tmp_path / "hf_only"  # an encoder without minbert's heads where a checkpoint is expected
    hf.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        (hf / name).write_bytes((exported / name).read_bytes())
    with pytest.raises(ValueError, match="--model_name_or_path"):
        minbert.load(hf)


class Payload:
    """Any object other than tensors and containers: torch.load(weights_only=True) refuses to unpickle it."""


def test_a_pickled_payload_is_refused_without_unsafe_advice(tmp_path):
    torch.save({"x": Payload()}, tmp_path / "optimizer.pt")
    with pytest.raises(ValueError) as e:
        load_torch_file(tmp_path / "optimizer.pt")
    msg = str(e.value)
    assert msg.startswith(f"{tmp_path / 'optimizer.pt'}: refused: it holds pickled Python objects")
    assert "weights_only=False" not in msg and "weights_only` set to `False" not in msg and "\n" not in msg
    assert "safe_globals" not in msg and "Payload" in msg  # the diagnosis, not how to allowlist the class
    json.dumps(msg)  # no escape codes either
    assert "\x1b" not in msg
