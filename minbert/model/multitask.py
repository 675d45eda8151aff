"""MultitaskBert: one shared encoder, one head per task (SST, QQP, STS).

A pair task (QQP, STS) is read either as two sentences encoded one at a time (``bi``, a siamese bi-encoder: the
head compares the two pooled embeddings) or as one sequence ``[CLS] a [SEP] b [SEP]`` with token types 0/1
(``cross``, as BERT reads pairs in run_glue: attention compares the sentences token by token, and the head reads
the pooled joint sequence). MultitaskConfig.pair_encoding says which, per task.
"""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from minbert.io import (DataError, atomic_save, atomic_write_text, json_text, load_safetensors, published_dir,
                        read_json_file)
from minbert.io.settings import flag_reader, setting
from minbert.model.config import PRESETS, BertConfig
from minbert.model.encoder import BertModel
from minbert.model.heads import DEFAULT_PARA_HEAD, DEFAULT_STS_HEAD, PARA_HEADS, STS_HEADS, build_heads
from minbert.model.pooling import POOLING_MODES, pool
from minbert.tasks.data import DEFAULT_TASKS, PAIR_ENCODINGS, TASKS
from minbert.tasks.user_tasks import declare, parse_task_spec


@dataclass
class MultitaskConfig:
    tasks: list[str] = field(default_factory=lambda: list(DEFAULT_TASKS))
    pooling: str = "cls"
    sts_head: str = "linear"
    para_head: str = "uv"
    head_dropout: float = 0.1
    # pair task -> "bi" or "cross"; a task not listed is "bi" (checkpoints from before cross-encoding have none)
    pair_encoding: dict[str, str] = field(default_factory=dict)
    # The tasks of the user's own among ``tasks`` (minbert.tasks.user_tasks' checked content, {"tasks": [...]}): stored in
    # the checkpoint, so that loading it declares them without the --task_spec file. None: built-in tasks only.
    task_spec: dict | None = None

    def encoding(self, task: str) -> str:
        """How ``task``'s examples are tokenized: "cross" for a cross-encoded pair task, else "bi"."""
        return self.pair_encoding.get(task, "bi")

    def __post_init__(self) -> None:
        """The one place a multitask config is validated (new runs and multitask.json alike)."""
        if self.task_spec is not None:  # declared first: ``tasks`` names them
            self.task_spec = parse_task_spec(self.task_spec, "task_spec")
            declare(self.task_spec)
        if not isinstance(self.tasks, (list, tuple)) or not self.tasks:
            raise ValueError(f"tasks must be a non-empty list of task names, got {self.tasks!r}")
        bad = [t for t in self.tasks if not isinstance(t, str) or t not in TASKS]
        if bad:
            raise ValueError(f"unknown task {bad[0]!r} in tasks (choose from {', '.join(TASKS)})")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks repeat a task: {self.tasks!r}")
        for name, value, choices in (("pooling", self.pooling, POOLING_MODES), ("sts_head", self.sts_head, STS_HEADS),
                                     ("para_head", self.para_head, PARA_HEADS)):
            if not isinstance(value, str) or value not in choices:
                raise ValueError(f"unknown {name} {value!r} (choose from {', '.join(choices)})")
        dropout = self.head_dropout
        if isinstance(dropout, bool) or not isinstance(dropout, (int, float)) or not (math.isfinite(dropout)
                                                                                       and 0 <= dropout < 1):
            raise ValueError(f"head_dropout must be a number in [0, 1), got {dropout!r}")
        check_pair_encoding(self.pair_encoding)

    @classmethod
    def from_json(cls, path: str | Path) -> "MultitaskConfig":
        """Read and validate a ``multitask.json``; every problem is one line naming the file."""
        path = Path(path)
        d = read_json_file(path)
        if not isinstance(d, dict):
            raise DataError(f"{path}: expected a JSON object, found {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise DataError(f"{path}: unknown key {unknown[0]!r} (known: {', '.join(f.name for f in fields(cls))})")
        try:
            return cls(**d)
        except ValueError as e:
            raise DataError(f"{path}: {e}") from None


class MultitaskBert(nn.Module):
    def __init__(self, encoder: BertModel, config: MultitaskConfig):
        super().__init__()
        self.encoder = encoder
        self.config = config
        if any(e == "cross" for e in config.pair_encoding.values()) and encoder.config.type_vocab_size < 2:
            raise ValueError(f"--pair_encoding cross needs token types 0 and 1; the encoder has type_vocab_size "
                             f"{encoder.config.type_vocab_size}")
        self.heads = build_heads(encoder.config.hidden_size, config.tasks, config.sts_head, config.head_dropout,
                                 config.para_head, config.pair_encoding)

    # The forward pass is split at the embedding-layer output so SMART can perturb it (Jiang et al. 2020, §3).
    def embed_inputs(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Embedding-layer outputs of each sequence in the batch: one for SST and for a cross-encoded pair (the
        joint sequence, with its token types), two for a bi-encoded pair."""
        embeds = [self.encoder.embed(batch["input_ids"], batch.get("token_type_ids"))]
        if "input_ids_b" in batch:
            embeds.append(self.encoder.embed(batch["input_ids_b"], batch.get("token_type_ids_b")))
        return embeds

    def forward_embedded(self, task: str, embeds: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's output from embedding-layer outputs: each sequence is encoded and pooled (a cross-encoded
        pair once, over both sentences' tokens), then the head reads the pooled vector(s)."""
        if len(embeds) != (2 if TASKS[task].is_pair and self.config.encoding(task) == "bi" else 1):
            raise ValueError(f"{task}: the batch holds {len(embeds)} sequence(s) per example but the model reads "
                             f"{task} {self.config.encoding(task)}-encoded; tokenize it with "
                             f"tensorize(..., pair_encoding={self.config.encoding(task)!r})")
        masks = [batch["attention_mask"], batch.get("attention_mask_b")]
        pooled = [pool(self.encoder.encode(e, m), m, self.config.pooling) for e, m in zip(embeds, masks)]
        return self.heads[task](*pooled)

    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.forward_embedded(task, self.embed_inputs(batch), batch)

    def loss(self, task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[task].loss(output, batch["labels"])

    def head_parameters(self) -> list[nn.Parameter]:
        return list(self.heads.parameters())

    def shared_parameters(self) -> list[nn.Parameter]:
        return list(self.encoder.parameters())

    # ------------------------------------------------------------------ checkpoints
    def save(self, directory: str | Path, tokenizer=None) -> None:
        """Save as safetensors + JSON configs (+ tokenizer.json), each file written atomically."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        atomic_save(directory / "model.safetensors", lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        self.encoder.config.save(directory / "config.json")
        config = {k: v for k, v in asdict(self.config).items() if not (k == "task_spec" and v is None)}
        atomic_write_text(directory / "multitask.json", json_text(config) + "\n")
        if tokenizer is not None:
            atomic_write_text(directory / "tokenizer.json", tokenizer.to_str(pretty=True))

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "MultitaskBert":
        """Load a checkpoint directory written by :meth:`save`. Its configs are validated and the weights file's
        keys and shapes checked against them; every problem is one line naming the file (and the tensor)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{directory}: no such checkpoint directory")
        if (directory / "heads.safetensors").is_file():  # a minbert-export folder reads as the same model
            return load_exported(directory)
        for name in ("model.safetensors", "config.json", "multitask.json"):
            if not os.path.lexists(directory / name):  # one that is there but unreadable is named when read
                raise ValueError(f"{directory}: not a minbert checkpoint ({name} is missing)")
        encoder_config = BertConfig.from_json(directory / "config.json")
        mt_config = MultitaskConfig.from_json(directory / "multitask.json")
        weights_file = directory / "model.safetensors"
        state = load_weights(weights_file, map_location)
        model = cls(BertModel(encoder_config), mt_config)
        check_state_dict(model, state, weights_file)
        model.load_state_dict(state)
        return model


def load_exported(directory: str | Path) -> MultitaskBert:
    """Rebuild the multitask model from a ``minbert-export`` folder: the encoder from its Hugging Face files, the
    heads from heads.safetensors and multitask.json (every weights file checked finite, as in :meth:`load`)."""
    directory = Path(directory)
    config = BertConfig.from_json(directory / "config.json")
    encoder = BertModel.from_pretrained(directory, add_pooling_layer=config.add_pooling_layer)
    model = MultitaskBert(encoder, MultitaskConfig.from_json(directory / "multitask.json"))
    heads_file = directory / "heads.safetensors"
    missing, unexpected = model.load_state_dict(load_weights(heads_file), strict=False)
    missing = [k for k in missing if k.startswith("heads.")]  # the encoder is already loaded
    if missing or unexpected:
        raise DataError(f"{heads_file}: does not match {directory / 'multitask.json'} "
                        f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
    return model


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint directory that ``path`` names: a checkpoint itself (its multitask.json beside the weights, as
    written by MultitaskBert.save or minbert-export), or a training run's --output_dir, whose best epoch is best/
    (or best.old, if a kill came between the two renames of io.replace_dir). Anything else is a one-line ValueError."""
    path = Path(path)
    if not path.is_dir():
        raise ValueError(f"{path}: no such directory")
    if (path / "multitask.json").is_file():
        return path
    best = published_dir(path / "best")
    if best is not None and (best / "multitask.json").is_file():
        return best
    if (path / "args.json").is_file():
        raise ValueError(f"{path}: a run directory without a best/ checkpoint (the run has not finished an epoch)")
    if (path / "config.json").is_file() and any((path / f).is_file() for f in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"{path}: a Hugging Face model folder without minbert's task heads (no multitask.json); "
                         f"fine-tune it with --model_name_or_path {path}, or give the minbert-export folder it "
                         "came from (it has heads.safetensors)")
    raise ValueError(f"{path}: not a minbert checkpoint (no multitask.json) nor a run directory with best/")


def check_pair_encoding(pair_encoding: dict[str, str]) -> None:
    """A MultitaskConfig.pair_encoding names pair tasks only, each "bi" or "cross" (one-line ValueError)."""
    if not isinstance(pair_encoding, dict):
        raise ValueError(f"pair_encoding must map pair tasks to bi or cross, got {pair_encoding!r}")
    for task, encoding in pair_encoding.items():
        if task not in TASKS or not TASKS[task].is_pair:
            raise ValueError(f"pair_encoding: {task!r} is not a sentence-pair task ({', '.join(pair_tasks())})")
        if encoding not in PAIR_ENCODINGS:
            raise ValueError(f"pair_encoding: {task}={encoding!r}: choose {' or '.join(PAIR_ENCODINGS)}")


def pair_tasks() -> tuple[str, ...]:
    """The sentence-pair tasks of the registry now (tasks of the user's own included, once declared)."""
    return tuple(t for t, spec in TASKS.items() if spec.is_pair)


def parse_pair_encoding(text: str) -> dict[str, str]:
    """``--pair_encoding``: ``bi`` or ``cross`` for every pair task, or per task, ``qqp=cross,sts=bi`` (a pair task
    not named stays ``bi``). Returns {pair task: encoding}; a bad value is a one-line ValueError."""
    text = text.strip()
    if text in PAIR_ENCODINGS:
        return {t: text for t in pair_tasks()}
    out = {t: "bi" for t in pair_tasks()}
    named: set[str] = set()
    for part in text.split(","):
        task, sep, encoding = (x.strip() for x in part.partition("="))
        if not sep:
            raise ValueError(f"{part.strip()!r}: expected bi, cross or TASK=bi|cross,... (e.g. qqp=cross,sts=bi)")
        if task not in out:
            what = "is not a sentence-pair task" if task in TASKS else "is not a task"
            raise ValueError(f"{task!r} {what} (pair tasks: {', '.join(out)})")
        if task in named:
            raise ValueError(f"{task} is given twice")
        if encoding not in PAIR_ENCODINGS:
            raise ValueError(f"{task}={encoding!r}: choose {' or '.join(PAIR_ENCODINGS)}")
        named.add(task)
        out[task] = encoding
    return out


def pair_encoding_of(settings: "ModelSettings", trained: list[str]) -> dict[str, str]:
    """MultitaskConfig.pair_encoding from the model's flags: the encoding of each pair task of ``trained``."""
    value = settings.pair_encoding or "bi"
    parsed = value.by_task if isinstance(value, PairEncoding) else parse_pair_encoding(value)
    out = {t: e for t, e in parsed.items() if t in trained}
    # A user's pair task follows the one-word form (bi, cross); TASK=.. names built-ins (the flag is read before
    # the --task_spec tasks are declared).
    word = value if value in PAIR_ENCODINGS else "bi"
    out.update({t: str(word) for t in trained if t not in out and TASKS[t].is_pair})
    return out


def format_pair_encoding(pair_encoding: dict[str, str]) -> str:
    """The canonical --pair_encoding text of a mapping: one word when every pair task has the same encoding."""
    full = {t: pair_encoding.get(t, "bi") for t in pair_tasks() if not TASKS[t].user}
    values = set(full.values())
    return values.pop() if len(values) == 1 else ",".join(f"{t}={e}" for t, e in full.items())


class PairEncoding(str):
    """A --pair_encoding value, parsed once: its canonical text (what args.json records, e.g. ``qqp=cross,sts=bi``)
    that keeps the parsed {pair task: encoding} as ``by_task``. A ValueError if the text is not one."""

    def __new__(cls, text: str) -> "PairEncoding":
        by_task = parse_pair_encoding(text)
        value = super().__new__(cls, format_pair_encoding(by_task))
        value.by_task = by_task
        return value


pair_encoding_flag = flag_reader(PairEncoding)


def check_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: Path) -> None:
    """``state`` has exactly ``model``'s keys, with its shapes; else one line naming ``source`` and a tensor."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        what = f"lacks the tensor {missing[0]}" if missing else f"has the unexpected tensor {unexpected[0]}"
        raise DataError(f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected): the weights do "
                        f"not match {source.parent / 'config.json'} and {source.parent / 'multitask.json'}")
    for key, value in state.items():
        if value.shape != own[key].shape:
            raise DataError(f"{source}: tensor {key} has shape {tuple(value.shape)}, the configs give "
                            f"{tuple(own[key].shape)} (weights of another model size?)")
        if value.is_floating_point() != own[key].is_floating_point():
            raise DataError(f"{source}: tensor {key} has dtype {value.dtype}, expected {own[key].dtype}")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors state dict; an unreadable file is a one-line error naming it."""
    return load_safetensors(path, str(device))


@dataclass
class ModelSettings:
    """The model group of flags: the encoder, the sentence embedding, the pair heads and how pairs are read."""

    model_name_or_path: str = setting(
        "minilm-l6", help=f"a preset ({', '.join(PRESETS)}; only minilm-l6 has pretrained weights) or a Hugging Face "
                          "model directory (config.json + model.safetensors or pytorch_model.bin + vocab)")
    pooling: str = setting("mean", choices=POOLING_MODES, help="sentence embedding for every task")
    sts_head: str = setting(
        DEFAULT_STS_HEAD, choices=STS_HEADS,
        help="STS head: linear on [u; v] (the report's baseline), cosine_embedding (CosineEmbeddingLoss, "
             "no layer), cosine (d->d linear, 5*sigmoid(20*cos)), cosine_2d1 (linear on [u; v; cos]), "
             "cosine_regression (5*cos, SBERT's regression objective); see docs/multitask.md")
    para_head: str = setting(DEFAULT_PARA_HEAD, choices=PARA_HEADS,
                             help="paraphrase head features: uv = linear on [u; v] (the report's baseline), "
                                  "sbert = linear on [u; v; |u-v|; u*v]")
    pair_encoding: str = setting(
        "bi", parse=pair_encoding_flag, metavar="{bi,cross,qqp=..,sts=..}",
        help="how QQP and STS read a sentence pair: bi (each sentence encoded alone, the head compares the "
             "two embeddings) or cross (one sequence [CLS] a [SEP] b [SEP], the head reads it pooled, as "
             "run_glue does; --sts_head/--para_head then do not apply); per task: qqp=cross,sts=bi")

    def __post_init__(self) -> None:
        if isinstance(self.pair_encoding, str) and not isinstance(self.pair_encoding, PairEncoding):
            try:  # text from Python or a RunConfig built by hand; a wrong one is left to the settings check
                self.pair_encoding = PairEncoding(self.pair_encoding)
            except ValueError:
                pass
