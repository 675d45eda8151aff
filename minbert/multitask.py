"""MultitaskBert: one shared encoder, one head per task (SST, QQP, STS)."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import BertConfig
from .heads import build_heads
from .io import atomic_save, atomic_write_text, published_dir
from .model import BertModel
from .pooling import POOLING_MODES, pool


@dataclass
class MultitaskConfig:
    tasks: list[str] = field(default_factory=lambda: ["sst", "qqp", "sts"])
    pooling: str = "cls"
    sts_head: str = "linear"
    para_head: str = "uv"
    head_dropout: float = 0.1

    def __post_init__(self) -> None:
        if self.pooling not in POOLING_MODES:
            raise ValueError(f"unknown pooling {self.pooling!r} (choose from {', '.join(POOLING_MODES)})")


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
        directory = Path(directory)
        for name in ("model.safetensors", "config.json", "multitask.json"):
            if not (directory / name).is_file():
                raise ValueError(f"{directory}: not a minbert checkpoint ({name} is missing)")
        encoder_config = BertConfig.from_json(directory / "config.json")
        try:
            mt_config = MultitaskConfig(**json.loads((directory / "multitask.json").read_text(encoding="utf-8")))
        except (TypeError, json.JSONDecodeError) as e:
            raise ValueError(f"{directory / 'multitask.json'}: invalid: {e}") from None
        model = cls(BertModel(encoder_config), mt_config)
        state = load_weights(directory / "model.safetensors", map_location)
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{directory}: checkpoint does not match its config (missing {missing}, unexpected {unexpected})")
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
    raise ValueError(f"{path}: not a minbert checkpoint (no multitask.json) nor a run directory with best/")


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A safetensors state dict; an unreadable file is a one-line ValueError naming it."""
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device=str(device))
    except Exception as e:  # safetensors raises its own error types
        raise ValueError(f"{path}: cannot read: {e}") from None
