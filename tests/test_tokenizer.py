import pytest

from minbert.model.tokenizer import load_tokenizer


def test_embedded_tokenizer_no_padding_and_pairs():
    tok = load_tokenizer("minilm-l6", max_seq_length=16)
    e = tok.encode("Hello, World!")
    assert e.tokens == ["[CLS]", "hello", ",", "world", "!", "[SEP]"]  # lower-cased, no padding to 128
    p = tok.encode("first one", "second")
    assert p.tokens == ["[CLS]", "first", "one", "[SEP]", "second", "[SEP]"]
    assert p.type_ids == [0, 0, 0, 0, 1, 1]
    assert len(tok.encode("word " * 100).ids) == 16


def test_vocab_txt_wordpiece(tmp_path):
    import json

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "##s", "on"]
    (tmp_path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": len(vocab)}))
    tok = load_tokenizer(tmp_path, max_seq_length=32)
    e = tok.encode("The CATS sat on mats", "the cat")
    assert e.tokens == ["[CLS]", "the", "cat", "##s", "sat", "on", "[UNK]", "[SEP]", "the", "cat", "[SEP]"]
    assert e.type_ids[-3:] == [1, 1, 1]


def test_missing_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="neither tokenizer.json nor vocab.txt"):
        load_tokenizer(tmp_path)
