"""minbert-export writes a Hugging Face model directory that transformers loads and that computes what ours does."""
import json

import pytest
import torch
from safetensors.torch import load_file

from minbert import BertModel, MultitaskBert, MultitaskConfig, load_tokenizer
from minbert.export import main as export_main

transformers = pytest.importorskip("transformers")

SENTENCES = [
    "It 's a lovely film with lovely performances by Buy and Accorsi .",
    "Do you prefer to ask or answer questions on Quora?",
    'Which is correct grammar: "I graduated from University of XXXX"? Naïve café, déjà vu!',
]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved bert-tiny MultitaskBert whose weights are all perturbed away from their initial values, so a
    swapped or mis-split weight (zero biases, identity LayerNorm at init) would show in the outputs."""
    torch.manual_seed(0)
    model = MultitaskBert(BertModel.from_pretrained("bert-tiny"), MultitaskConfig(tasks=["sst", "qqp", "sts"]))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    directory = tmp_path_factory.mktemp("ckpt") / "best"
    model.save(directory, load_tokenizer("bert-tiny", max_seq_length=16))  # short: the export must drop it
    return directory


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("hf") / "exported"
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(out)]) == 0
    return out


def test_export_writes_the_hugging_face_layout(exported):
    names = {p.name for p in exported.iterdir()}
    assert names == {"config.json", "model.safetensors", "tokenizer.json", "vocab.txt", "tokenizer_config.json",
                     "heads.safetensors", "multitask.json"}
    config = json.loads((exported / "config.json").read_text())
    assert config["model_type"] == "bert" and config["architectures"] == ["BertModel"]
    vocab = (exported / "vocab.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == config["vocab_size"] and vocab[0] == "[PAD]" and vocab[101] == "[CLS]"


def test_transformers_bert_model_loads_it_and_matches(checkpoint, exported):
    hf, info = transformers.BertModel.from_pretrained(str(exported), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    ours = MultitaskBert.load(checkpoint).encoder.eval()
    hf.eval()
    tok = load_tokenizer(checkpoint)
    enc = [tok.encode(a, b) for a, b in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1])]
    length = max(len(e.ids) for e in enc)
    ids = torch.tensor([e.ids + [0] * (length - len(e.ids)) for e in enc])
    types = torch.tensor([e.type_ids + [0] * (length - len(e.ids)) for e in enc])
    mask = (torch.arange(length)[None, :] < torch.tensor([len(e.ids) for e in enc])[:, None]).long()
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    diff = (a.last_hidden_state - b.last_hidden_state)[mask.bool()].abs().max().item()
    assert diff <= 1e-5
    assert (a.pooler_output - b.pooler_output).abs().max().item() <= 1e-5


def test_auto_tokenizer_gives_our_ids(checkpoint, exported):
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported))
    ours = load_tokenizer(checkpoint, max_seq_length=512)
    for a, b in zip(SENTENCES, SENTENCES[1:] + SENTENCES[:1]):
        assert hf_tok(a)["input_ids"] == ours.encode(a).ids
        pair = hf_tok(a, b)
        assert pair["input_ids"] == ours.encode(a, b).ids
        assert pair["token_type_ids"] == ours.encode(a, b).type_ids
    # The checkpoint's per-run truncation (16 tokens) is not part of the released tokenizer.
    assert len(hf_tok(SENTENCES[2])["input_ids"]) > 16


def test_export_round_trips_into_minbert(checkpoint, exported):
    """The export is also a --model_name_or_path directory, and heads.safetensors restores the full model."""
    original = MultitaskBert.load(checkpoint)
    encoder = BertModel.from_pretrained(exported)
    config = MultitaskConfig(**json.loads((exported / "multitask.json").read_text()))
    rebuilt = MultitaskBert(encoder, config)
    rebuilt.load_state_dict(load_file(str(exported / "heads.safetensors")), strict=False)
    for k, v in original.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[k], v), k


def test_export_errors_are_one_line(tmp_path, checkpoint, exported, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 1
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(exported)]) == 1  # not empty, no --overwrite
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "config.json").write_text("{}")
    assert export_main(["--checkpoint", str(bad), "--out", str(tmp_path / "o2")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 3 and all(line.startswith("error: ") for line in err)
    assert "no such directory" in err[0] and "--overwrite" in err[1] and "not a minbert checkpoint" in err[2]
    assert export_main(["--checkpoint", str(checkpoint), "--out", str(exported), "--overwrite"]) == 0
