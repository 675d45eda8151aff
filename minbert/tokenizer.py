"""Tokenizer loading: a ``tokenizers.Tokenizer`` (lower-cased WordPiece) from tokenizer.json or vocab.txt."""
from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.processors import TemplateProcessing

from .config import PRESETS, BertConfig
from .io import DataError, read_text_file
from .model import resolve_model_dir


def load_tokenizer(name_or_path: str | Path, max_seq_length: int | None = None) -> Tokenizer:
    """Load the tokenizer of a preset or model directory, with built-in padding off and truncation to
    ``max_seq_length`` (None: keep the tokenizer's own truncation, else 128; a checkpoint's tokenizer.json keeps
    its training run's limit, so predictions match). Presets without weights use the embedded encoder's uncased
    vocabulary. Sentence pairs are encoded as ``[CLS] a [SEP] b [SEP]`` with token types 0/1. A vocabulary whose
    token ids do not fit the model's embedding table (config.json's vocab_size) is refused."""
    name = str(name_or_path)
    directory = resolve_model_dir("minilm-l6" if name in PRESETS else name)
    if os.path.lexists(directory / "tokenizer.json"):  # whatever is there is read (a FIFO or broken link: refused)
        source = directory / "tokenizer.json"
        tok = read_tokenizer_json(source)
    elif os.path.lexists(directory / "vocab.txt"):
        source = directory / "vocab.txt"
        tok = _wordpiece_from_vocab(source)
    else:
        raise ValueError(f"{directory}: neither tokenizer.json nor vocab.txt found")
    # Token ids index the encoder's embedding table: a vocabulary larger than config.json's vocab_size would
    # fail in the middle of training. (For presets without weights: the embedded encoder's, the same size.)
    config = PRESETS[name] if name in PRESETS else BertConfig.from_json(directory / "config.json")
    ids = tok.get_vocab(with_added_tokens=True).values()
    if ids and max(ids) >= config.vocab_size:
        raise DataError(f"{source}: token ids run up to {max(ids)}, beyond the vocab_size {config.vocab_size} of "
                        f"{name if name in PRESETS else directory / 'config.json'}")
    tok.no_padding()  # we pad per batch; the shipped tokenizer.json pads every input to 128
    if max_seq_length is None:
        max_seq_length = (tok.truncation or {}).get("max_length") or 128
    tok.enable_truncation(max_length=max_seq_length)
    return tok


def read_tokenizer_json(path: Path) -> Tokenizer:
    """A ``tokenizers`` tokenizer.json; anything unreadable is one line naming the file."""
    text = read_text_file(path)
    try:
        return Tokenizer.from_str(text)
    except Exception as e:  # tokenizers raises a bare Exception on bad JSON
        raise DataError(f"{path}: cannot read tokenizer: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None


def _wordpiece_from_vocab(vocab_file: Path) -> Tokenizer:
    """A BERT WordPiece tokenizer from ``vocab.txt``: one token per line, its id the line number - 1."""
    lines = read_text_file(vocab_file).split("\n")  # invalid UTF-8: named by file and line
    if lines[-1] == "":
        lines.pop()
    vocab = {token: i for i, token in enumerate(lines)}  # a repeated token: the last one wins, as in transformers
    for special in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"):
        if special not in vocab:
            raise DataError(f"{vocab_file}: special token {special} is missing")
    tok = Tokenizer(WordPiece(vocab, unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    return tok


def pad_token_id(tok: Tokenizer) -> int:
    pid = tok.token_to_id("[PAD]")
    return 0 if pid is None else pid
