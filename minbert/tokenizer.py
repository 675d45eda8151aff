"""Tokenizer loading: a ``tokenizers.Tokenizer`` (lower-cased WordPiece) from tokenizer.json or vocab.txt."""
from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.processors import TemplateProcessing

from .config import PRESETS
from .model import resolve_model_dir


def load_tokenizer(name_or_path: str | Path, max_seq_length: int | None = None) -> Tokenizer:
    """Load the tokenizer of a preset or model directory, with built-in padding off and truncation to
    ``max_seq_length`` (None: keep the tokenizer's own truncation, else 128; a checkpoint's tokenizer.json keeps
    its training run's limit, so predictions match). Presets without weights use the embedded encoder's uncased vocabulary. Sentence pairs
    are encoded as ``[CLS] a [SEP] b [SEP]`` with token types 0/1."""
    name = str(name_or_path)
    directory = resolve_model_dir("minilm-l6" if name in PRESETS else name)
    if (directory / "tokenizer.json").is_file():
        try:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
        except Exception as e:  # tokenizers raises a bare Exception on bad JSON
            raise ValueError(f"{directory / 'tokenizer.json'}: cannot read tokenizer: {e}") from None
    elif (directory / "vocab.txt").is_file():
        tok = _wordpiece_from_vocab(directory / "vocab.txt")
    else:
        raise ValueError(f"{directory}: neither tokenizer.json nor vocab.txt found")
    tok.no_padding()  # we pad per batch; the shipped tokenizer.json pads every input to 128
    if max_seq_length is None:
        max_seq_length = (tok.truncation or {}).get("max_length") or 128
    tok.enable_truncation(max_length=max_seq_length)
    return tok


def _wordpiece_from_vocab(vocab_file: Path) -> Tokenizer:
    vocab = {}
    with open(vocab_file, encoding="utf-8") as f:
        for i, line in enumerate(f):
            vocab[line.rstrip("\n")] = i
    for special in ("[CLS]", "[SEP]", "[UNK]", "[PAD]"):
        if special not in vocab:
            raise ValueError(f"{vocab_file}: special token {special} is missing")
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
