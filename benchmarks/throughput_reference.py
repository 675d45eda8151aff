"""The transformers side of benchmarks/throughput.py: (b) our pooling and heads on a transformers.BertModel
holding the same weights, (c) a run_glue-style BertForSequenceClassification computation, the training step that
drives both like Trainer.train_step drives ours, (b)'s prediction loop, and the check that (a) and (b) agree."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minbert.methods.optim.build import linear_schedule, optimizer_for_run
from minbert.model.encoder import to_hf_state_dict
from minbert.model.pooling import pool
from minbert.tasks.data import TaskTensors, sorted_batches
from minbert.training.run_config import RunConfig

from throughput_batches import TASKS


def hf_encoder(transformers, encoder, attn_implementation: str | None = None) -> nn.Module:
    """A transformers.BertModel with our encoder's weights (by default its default attention implementation)."""
    cfg = encoder.config
    extra = {"attn_implementation": attn_implementation} if attn_implementation else {}
    hf_cfg = transformers.BertConfig(**{k: v for k, v in cfg.__dict__.items() if k != "add_pooling_layer"}, **extra)
    hf = transformers.BertModel(hf_cfg, add_pooling_layer=cfg.add_pooling_layer)
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(encoder.state_dict()), strict=False)
    missing = [k for k in missing if not k.endswith(("position_ids", "token_type_ids"))]  # buffers
    if missing or unexpected:
        raise RuntimeError(f"weights do not map onto transformers.BertModel: missing {missing}, unexpected {unexpected}")
    return hf


class HFMultitask(nn.Module):
    """(b): our MultitaskBert's computation (pooling, heads, losses) on a transformers.BertModel."""

    def __init__(self, encoder: nn.Module, heads: nn.ModuleDict, pooling: str):
        super().__init__()
        self.encoder, self.heads, self.pooling = encoder, heads, pooling

    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pooled = []
        for suffix in ("", "_b"):  # one joint sequence (with token types) for a cross-encoded pair
            if "input_ids" + suffix in batch:
                mask = batch["attention_mask" + suffix]
                out = self.encoder(input_ids=batch["input_ids" + suffix], attention_mask=mask,
                                   token_type_ids=batch.get("token_type_ids" + suffix))
                pooled.append(pool(out, mask, self.pooling))
        return self.heads[task](*pooled)

    def loss(self, task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.heads[task].loss(output, batch["labels"])


class GlueStyle(nn.Module):
    """(c): transformers.BertModel + dropout + linear on the pooled output, cross-entropy (what run_glue trains:
    BertForSequenceClassification), one classifier per task."""

    def __init__(self, encoder: nn.Module, num_labels: dict[str, int], dropout: float):
        super().__init__()
        self.encoder = encoder
        self.dropout = nn.Dropout(dropout)
        hidden = encoder.config.hidden_size
        self.heads = nn.ModuleDict({t: nn.Linear(hidden, n) for t, n in num_labels.items()})

    def forward(self, task: str, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        out = self.encoder(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                           token_type_ids=batch["token_type_ids"])
        return self.heads[task](self.dropout(out.pooler_output))

    def loss(self, task: str, output: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return F.cross_entropy(output, batch["labels"])


class Pipeline:
    """A transformers model trained like Trainer.train_step trains ours: per task, forward + loss (autocast with
    --bf16), backward, then clip + AdamW step + zero grads, then the schedule."""

    def __init__(self, model: nn.Module, config: RunConfig, amp: torch.dtype | None):
        self.model, self.amp, self.max_grad_norm = model, amp, config.training.max_grad_norm
        self.device = next(model.parameters()).device
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = optimizer_for_run(config, model)
        self.scheduler = linear_schedule(self.optimizer, 0, 10**9)

    def train_step(self, batches: dict[str, dict[str, torch.Tensor]]) -> None:
        for task, batch in batches.items():
            batch = {k: v.to(self.device) for k, v in batch.items()}  # a no-op on the CPU
            with torch.autocast(self.device.type, dtype=self.amp, enabled=self.amp is not None):
                loss = self.model.loss(task, self.model(task, batch), batch).float()
            loss.backward()
            grads = [p.grad for p in self.params if p.grad is not None]
            norm = torch.nn.utils.get_total_norm(grads)
            if bool(torch.isfinite(norm)):
                torch.nn.utils.clip_grads_with_norm_(self.params, self.max_grad_norm, norm)
                self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            loss.item()
        self.scheduler.step()


@torch.inference_mode()
def predict_hf(model: HFMultitask, data: TaskTensors, batch_size: int, pad_id: int, amp: torch.dtype | None) -> torch.Tensor:
    """(b)'s inference: predict_task's loop (same length-sorted batches, eval mode, inference_mode)."""
    model.eval()
    head = model.heads[data.task.name]
    device = next(model.parameters()).device
    out = [None] * len(data)
    for idx in sorted_batches(data.lengths(), batch_size):
        batch = {k: v.to(device) for k, v in data.batch(idx, pad_id).items()}
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            pred = head.predict(model(data.task.name, batch).float())
        for i, p in zip(idx, pred):
            out[i] = p
    return torch.stack(out)


@torch.no_grad()
def max_logit_difference(ours, hf, train, chosen, pad_id, tasks=TASKS) -> float:
    """Outputs of (a) and (b) on the first chosen batch of each task, float32, eval mode."""
    ours.eval(), hf.eval()
    device = next(ours.parameters()).device
    diff = 0.0
    for t in tasks:
        batch = {k: v.to(device) for k, v in train[t].batch(chosen[t][0], pad_id).items()}
        diff = max(diff, (ours(t, batch) - hf(t, batch)).abs().max().item())
    return diff
