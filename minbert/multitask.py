"""MultitaskBert: one shared encoder, one head per task (SST, QQP, STS)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import nn

from .config import BertConfig
from .data import TASKS
from .heads import STS_HEADS, build_heads
from .io import DataError, atomic_save, atomic_write_text, load_safetensors, read_json_file
from .model import BertModel
from .pooling import POOLING_MODES, pool

PARA_HEADS = ("uv", "sbert")


@dataclass
class MultitaskConfig:
    tasks: list[str] = field(default_factory=lambda: ["sst", "qqp", "sts"])
    pooling: str = "cls"
    sts_head: str = "linear"
    para_head: str = "uv"
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        """The one place a multitask config is validated (new runs and multitask.json alike)."""
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
        self.heads = build_heads(encoder.config.hidden_size, config.tasks, config.sts_head, config.head_dropout,
                                 config.para_head)

    # The forward pass is split at the embedding-layer output so SMART can perturb it (Jiang et al. 2020, §3).
    def embed_inputs(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        """Embedding-layer outputs of each sentence in the batch (one for SST, two for pair tasks)."""
        embeds = [self.encoder.embed(batch["input_ids"])]
        if "input_ids_b" in batch:
            embeds.append(self.encoder.embed(batch["input_ids_b"]))
        return embeds

    def forward_embedded(self, task: str, embeds: list[torch.Tensor], batch: dict[str, torch.Tensor]) -> torch.Tensor:
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
        atomic_write_text(directory / "multitask.json", json.dumps(asdict(self.config), indent=2) + "\n")
        if tokenizer is not None:
            atomic_write_text(directory / "tokenizer.json", tokenizer.to_str(pretty=True))

    @classmethod
    def load(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "MultitaskBert":
        """Load a checkpoint directory written by :meth:`save`. Its configs are validated and the weights file's
        keys and shapes checked against them; every problem is one line naming the file (and the tensor)."""
        directory = Path(directory)
        if not directory.is_dir():
            raise ValueError(f"{directory}: no such checkpoint directory")
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
