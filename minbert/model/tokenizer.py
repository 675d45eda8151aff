"""Tokenizer loading: a ``tokenizers.Tokenizer`` (lower-cased WordPiece) from tokenizer.json or vocab.txt."""
from __future__ import annotations

import os
from pathlib import Path

from tokenizers import Tokenizer, normalizers, pre_tokenizers
from tokenizers.models import WordPiece
from tokenizers.processors import TemplateProcessing

from minbert.io import DataError, read_text_file
from minbert.model.config import PRESETS, BertConfig
from minbert.model.encoder import resolve_model_dir


def load_tokenizer(name_or_path: str | Path, max_seq_length: int | None = None) -> Tokenizer:
    """Load the tokenizer of a preset or model directory, with built-in padding off and truncation to
    ``max_seq_length`` (None: keep the tokenizer's own truncation, else 128; a checkpoint's tokenizer.json keeps
    its training run's limit, so predictions match). Presets without weights use the embedded encoder's uncased
    vocabulary. Sentence pairs are encoded as ``[CLS] a [SEP] b [SEP]`` with token types 0/1 (a tokenizer.json
    without that template gets it) and truncated longest-first. A vocabulary whose token ids do not fit the model's
    embedding table (config.json's vocab_size) is refused."""
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
    # A pair read as one sequence (--pair_encoding cross) loses tokens from its longer sentence first, one at a
    # time, so both sentences keep a share (run_glue's default); a single text is cut at the end either way.
    tok.enable_truncation(max_length=max_seq_length, strategy="longest_first")
    if not has_pair_template(tok):
        _set_bert_template(tok)
    return tok


# [CLS] a [SEP] b [SEP]: the pair needs this many tokens of its own to keep at least one of each sentence.
PAIR_SPECIAL_TOKENS = 3
# Five tokens leave room for one token of each sentence of a pair; below that the tokenizer drops a whole
# sentence (or, below 2, its truncation silently switches off).
MIN_SEQ_LENGTH = PAIR_SPECIAL_TOKENS + 2


def seq_length_problem(n, max_positions: int | None) -> str | None:
    """What is wrong with ``n`` as a max_seq_length for a model of ``max_positions`` position embeddings (None:
    not known yet), or None. The one rule for training (--max_seq_length), minbert-predict and minbert.load."""
    if isinstance(n, bool) or not isinstance(n, int):
        return f"must be an integer, got {n!r}"
    if n < MIN_SEQ_LENGTH:
        return f"must be >= {MIN_SEQ_LENGTH} (a sentence pair needs [CLS] a [SEP] b [SEP]), got {n}"
    if max_positions is not None and n > max_positions:
        return f"must be <= {max_positions}, the model's max_position_embeddings, got {n}"
    return None


def has_pair_template(tok: Tokenizer) -> bool:
    """Whether the tokenizer's post-processor encodes a pair as ``[CLS] a [SEP] b [SEP]`` with token types 0
    (``[CLS] a [SEP]``) and 1 (``b [SEP]``), as BERT was pre-trained to read sentence pairs."""
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        return False
    truncation = tok.truncation
    tok.no_truncation()
    try:
        e = tok.encode("a", "b")
    finally:
        if truncation:
            tok.enable_truncation(**{k: truncation[k] for k in ("max_length", "stride", "strategy", "direction")})
    if len(e.ids) < 5 or e.ids[0] != cls_id or e.ids[-1] != sep_id or e.ids.count(sep_id) != 2:
        return False
    first_sep = e.ids.index(sep_id)
    return e.type_ids == [0] * (first_sep + 1) + [1] * (len(e.ids) - first_sep - 1)


def _set_bert_template(tok: Tokenizer) -> None:
    """Give a WordPiece tokenizer without a BERT pair template one (a tokenizer.json saved without its
    post-processor); a tokenizer lacking [CLS] or [SEP] is left as it is (it cannot read pairs as one sequence)."""
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    if cls_id is None or sep_id is None:
        return
    tok.post_processor = TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)],
    )


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
    _set_bert_template(tok)
    return tok


def pad_token_id(tok: Tokenizer) -> int:
    pid = tok.token_to_id("[PAD]")
    return 0 if pid is None else pid
