"""BERT architecture configuration: a dataclass readable from a Hugging Face ``config.json``."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path

# The largest encoder built: 4e9 parameters (16 GB of float32 weights, 12x bert-large's 335M). A config.json
# asking for more (hidden_size 1e9, a typo) is refused before any memory is allocated.
MAX_PARAMETERS = 4_000_000_000
HIDDEN_ACTS = ("gelu", "gelu_new", "relu")
_POSITIVE_INTS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                  "max_position_embeddings", "type_vocab_size")
_PROBABILITIES = ("hidden_dropout_prob", "attention_probs_dropout_prob")


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    initializer_range: float = 0.02
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    add_pooling_layer: bool = True

    def __post_init__(self) -> None:
        """Every field is checked here, the one place a config is validated (presets, config.json, checkpoints):
        a bad value is a one-line ValueError naming the field, before any weight is allocated."""
        for name in _POSITIVE_INTS:
            _check_int(name, getattr(self, name), minimum=1)
        _check_int("pad_token_id", self.pad_token_id, minimum=0)
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id {self.pad_token_id} is not below vocab_size {self.vocab_size}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )
        if not isinstance(self.hidden_act, str) or self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"unsupported hidden_act {self.hidden_act!r} ({', '.join(HIDDEN_ACTS)})")
        for name in _PROBABILITIES:
            value = _check_number(name, getattr(self, name))
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value!r}")
        for name in ("initializer_range", "layer_norm_eps"):
            if not _check_number(name, getattr(self, name)) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)!r}")
        if not isinstance(self.add_pooling_layer, bool):
            raise ValueError(f"add_pooling_layer must be true or false, got {self.add_pooling_layer!r}")
        if self.num_parameters() > MAX_PARAMETERS:
            raise ValueError(f"this config describes a model of {self.num_parameters():.3g} parameters "
                             f"({4 * self.num_parameters() / 2**30:.3g} GiB in float32), over the limit of "
                             f"{MAX_PARAMETERS:.0e}: check hidden_size, intermediate_size, num_hidden_layers, "
                             "vocab_size and max_position_embeddings")

    def num_parameters(self) -> int:
        """The encoder's parameter count, computed from the config alone (nothing allocated)."""
        h, i = self.hidden_size, self.intermediate_size
        embeddings = (self.vocab_size + self.max_position_embeddings + self.type_vocab_size) * h + 2 * h
        layer = (3 * h * h + 3 * h) + (h * h + h) + 2 * h + (h * i + i) + (i * h + h) + 2 * h
        pooler = h * h + h if self.add_pooling_layer is True else 0
        return embeddings + self.num_hidden_layers * layer + pooler

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_dict(cls, d: dict) -> "BertConfig":
        """Keep the fields we know; Hugging Face configs carry many we do not use."""
        if d.get("position_embedding_type", "absolute") != "absolute":
            raise ValueError(f"only absolute position embeddings are supported, got {d['position_embedding_type']!r}")
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})

    @classmethod
    def from_json(cls, path: str | Path) -> "BertConfig":
        """Read and validate a ``config.json``; every problem is one line naming the file."""
        from minbert.io import DataError, read_json_file

        path = Path(path)
        try:
            d = read_json_file(path)
        except DataError as e:  # "config.json:3: invalid JSON: ..." -> "config.json: cannot read config: ... (line 3)"
            where, _, problem = str(e).partition(": ")
            line = where[len(str(path)) + 1:]
            if not line.isdigit():
                raise
            raise DataError(f"{path}: cannot read config: {problem} (line {line})") from None
        if not isinstance(d, dict):
            raise DataError(f"{path}: config must be a JSON object, found {type(d).__name__}")
        try:
            return cls.from_dict(d)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d.update(model_type="bert", architectures=["BertModel"], position_embedding_type="absolute")
        return d

    def save(self, path: str | Path) -> None:
        from minbert.io import atomic_write_text, json_text

        atomic_write_text(path, json_text(self.to_dict()) + "\n")


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):  # JSON true, 768.0 and "768" are not sizes
        raise ValueError(f"{name} must be an integer, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _check_number(name: str, value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    return value


# Architecture presets. Only `minilm-l6` ships weights (the embedded encoder); the others initialize randomly
# with the embedded encoder's uncased WordPiece vocabulary (30522 tokens).
PRESETS: dict[str, BertConfig] = {
    "bert-base": BertConfig(),
    "bert-mini": BertConfig(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-tiny": BertConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "minilm-l6": BertConfig(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536),
}
PRETRAINED_PRESETS = ("minilm-l6",)
