"""minbert.load / InferenceModel: the same predictions as the training run's prediction path, from a checkpoint, a
run directory and an exported folder; batched, bf16, embeddings; and docs/prediction.md's Python example runs as written."""
from __future__ import annotations

import os
import re

import numpy as np
import pytest
import torch

import minbert
from minbert import BertModel, MultitaskBert, MultitaskConfig, load_tokenizer
from minbert.export import export_checkpoint
from minbert.tasks.data import load_task, tensorize
from minbert.tasks.predict import predict_task

from .conftest import ROOT

SENTENCES = ["a gripping, funny film", "It 's a lovely film with lovely performances by Buy and Accorsi .",
             "dull , flat and far too long", "Naïve café, déjà vu!"]
PAIRS = [("How old are you?", "What is your age?"), ("A man plays a guitar.", "A woman is slicing an onion."),
         ("Do you prefer to ask or answer questions on Quora?", "Do Quora users prefer to ask questions?")]


def tiny_run_dir(tmp_path_factory, seed):
    """A run folder holding only best/ (a tiny checkpoint perturbed with ``seed``) and an args.json."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_checkpoint(run / "best", seed=seed)
    (run / "args.json").write_text("{}\n")
    return run


def save_tiny_checkpoint(directory, tasks=("sst", "qqp", "sts"), seed=0, **config) -> None:
    """A bert-tiny MultitaskBert with every weight perturbed away from its initial value (so the heads' outputs
    differ between inputs), saved with its tokenizer like a run's best/."""
    torch.manual_seed(seed)
    model = MultitaskBert(BertModel.from_pretrained("bert-tiny"), MultitaskConfig(tasks=list(tasks), **config))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.2 * torch.randn_like(p))
    model.save(directory, load_tokenizer("bert-tiny", max_seq_length=32))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run directory (args.json + best/) holding a tiny checkpoint with mean pooling and the sbert/cosine heads."""
    run = tmp_path_factory.mktemp("run")
    save_tiny_checkpoint(run / "best", pooling="mean", para_head="sbert", sts_head="cosine_regression")
    (run / "args.json").write_text("{}\n")
    return run


@pytest.fixture(scope="module")
def model(run_dir):
    # float32 whatever the default (bf16 where native): compared with the float32 training path to 1e-5
    return minbert.load(run_dir / "best", device="cpu", bf16=False)


def test_predictions_match_the_training_prediction_path(model, run_dir, small_data, one_thread):
    """predict_task (what training and --predict_only write to the CS224N files) and the API agree on the dev rows."""
    reference = MultitaskBert.load(run_dir / "best")
    tokenizer = load_tokenizer(run_dir / "best")
    for task in ("sst", "qqp", "sts"):
        data = load_task(task, "dev", small_data, max_samples=20)
        expected = predict_task(reference, tensorize(data, tokenizer), 8, torch.device("cpu"), progress=False)
        texts = [ex.texts for ex in data.examples]
        if task == "sst":
            got = model.predict_sentiment([t[0] for t in texts], batch_size=3)
            assert got.tolist() == expected.tolist()
        elif task == "qqp":
            got = model.predict_paraphrase(texts, batch_size=3)
            assert got.dtype == bool and got.tolist() == expected.bool().tolist()
        else:
            got = model.predict_similarity(texts, batch_size=3)
            np.testing.assert_allclose(got, expected.numpy(), atol=1e-5)
            assert ((got >= 0) & (got <= 5)).all()


def test_probabilities_are_consistent_with_the_labels(model):
    labels, probs = model.predict_sentiment(SENTENCES, return_probabilities=True)
    assert probs.shape == (len(SENTENCES), 5) and labels.shape == (len(SENTENCES),)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert (probs.argmax(1) == labels).all()
    assert len(set(labels.tolist())) > 1 or np.ptp(probs, axis=0).max() > 1e-3  # the inputs are told apart
    decisions, p = model.predict_paraphrase(PAIRS, return_probabilities=True)
    assert ((p > 0.5) == decisions).all() and ((p >= 0) & (p <= 1)).all()


def test_a_run_dir_and_an_exported_folder_load_the_same_model(model, run_dir, tmp_path):
    from_run = minbert.load(run_dir, device="cpu", bf16="off")
    export_checkpoint(run_dir, tmp_path / "exported")  # a run dir is exported from its best/
    exported = minbert.load(tmp_path / "exported", device="cpu", max_seq_length=32, bf16="off")  # the run's limit
    for other in (from_run, exported):
        assert other.tasks == model.tasks and other.pooling == "mean"
        np.testing.assert_allclose(other.predict_sentiment(SENTENCES, return_probabilities=True)[1],
                                   model.predict_sentiment(SENTENCES, return_probabilities=True)[1], atol=1e-5)
        np.testing.assert_allclose(other.predict_paraphrase(PAIRS, return_probabilities=True)[1],
                                   model.predict_paraphrase(PAIRS, return_probabilities=True)[1], atol=1e-5)
        np.testing.assert_allclose(other.predict_similarity(PAIRS), model.predict_similarity(PAIRS), atol=1e-5)
        np.testing.assert_allclose(other.encode(SENTENCES), model.encode(SENTENCES), atol=1e-5)


def test_encode_pools_like_the_heads_and_normalizes(model):
    emb = model.encode(SENTENCES)
    assert emb.shape == (len(SENTENCES), model.embedding_dim) and emb.dtype == np.float32
    one_by_one = np.concatenate([model.encode([s]) for s in SENTENCES])  # no padding at all
    np.testing.assert_allclose(emb, one_by_one, atol=1e-5)
    # the cosine_regression head scores 5 * cos(u, v) of these very embeddings
    u, v = model.encode([a for a, _ in PAIRS], normalize=True), model.encode([b for _, b in PAIRS], normalize=True)
    np.testing.assert_allclose(np.linalg.norm(u, axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(model.predict_similarity(PAIRS), np.clip(5 * (u * v).sum(1), 0, 5), atol=1e-4)


def test_bf16_is_close_to_float32(run_dir, model):
    bf16 = minbert.load(run_dir, device="cpu", bf16=True)
    p32 = model.predict_sentiment(SENTENCES, return_probabilities=True)[1]
    p16 = bf16.predict_sentiment(SENTENCES, return_probabilities=True)[1]
    assert np.abs(p16 - p32).max() < 0.05
    np.testing.assert_allclose(bf16.predict_similarity(PAIRS), model.predict_similarity(PAIRS), atol=0.25)


def test_empty_inputs_and_mistakes(model, tmp_path):
    assert model.predict_sentiment([]).shape == (0,) and model.encode([]).shape == (0, model.embedding_dim)
    with pytest.raises(TypeError, match="list of sentences"):
        model.predict_sentiment("one string")
    with pytest.raises(TypeError, match="pairs"):
        model.predict_similarity(("a", "b"))
    with pytest.raises(ValueError, match="sentence 1 is empty"):
        model.encode(["fine", "  "])
    with pytest.raises(ValueError, match="no sst2 head"):
        model.predict_sentiment(["x"], task="sst2")
    with pytest.raises(ValueError, match="no such directory"):
        minbert.load(tmp_path / "nope")
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "args.json").write_text("{}")
    with pytest.raises(ValueError, match="without a best/ checkpoint"):
        minbert.load(tmp_path / "run")


def test_sst_only_checkpoint_has_no_pair_heads(tmp_path):
    save_tiny_checkpoint(tmp_path / "ck", tasks=("sst2",))
    m = minbert.load(tmp_path / "ck", device="cpu")
    assert m.sentiment_task() == "sst2" and m.predict_sentiment(SENTENCES).max() <= 1
    with pytest.raises(ValueError, match="no qqp head"):
        m.predict_paraphrase(PAIRS)


def doc_section(title: str, doc: str = "docs/prediction.md") -> str:
    text = (ROOT / doc).read_text(encoding="utf-8")
    start = text.index(f"\n## {title}")
    end = text.find("\n## ", start + 1)
    return text[start : end if end >= 0 else None]


def test_documented_python_example_runs(tmp_path, monkeypatch, one_thread):
    """The Python code blocks of docs/prediction.md's API section run as written, against a tiny runs/main/best."""
    blocks = re.findall(r"```python\n(.*?)```", doc_section("Use a trained model"), flags=re.S)
    assert blocks, "the docs/prediction.md section has no python code block"
    save_tiny_checkpoint(tmp_path / "runs" / "main" / "best")
    (tmp_path / "runs" / "main" / "args.json").write_text("{}\n")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/prediction.md", "exec"), namespace)
    assert isinstance(namespace.get("model"), minbert.InferenceModel)
    assert os.getcwd() == str(tmp_path)


def test_resolve_checkpoint_falls_back_to_best_old(run_dir, tmp_path):
    """A kill between io.replace_dir's two renames leaves best.old: the run's checkpoint is still found."""
    import shutil

    from minbert.model.multitask import resolve_checkpoint

    shutil.copytree(run_dir / "best", tmp_path / "best.old")
    assert resolve_checkpoint(tmp_path) == tmp_path / "best.old"
    assert resolve_checkpoint(run_dir) == run_dir / "best" and resolve_checkpoint(run_dir / "best") == run_dir / "best"
