"""A BERT encoder written from scratch in plain PyTorch (Devlin et al. 2019).

Numerically equal to ``transformers.BertModel`` on the same weights (tested). Differences are internal only:
the query/key/value projections of a layer are one fused ``Linear`` (one matmul instead of three), and
attention runs through ``torch.nn.functional.scaled_dot_product_attention``, and ``encode`` (what the multitask
model calls) skips padding tokens outside attention when a batch has enough of them (its rows at padding positions
are then zero; ``forward`` computes every position like transformers). Checkpoints in the Hugging Face
layout are converted on load (``from_hf_state_dict``) and back on export (``to_hf_state_dict``).
"""
from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minbert.io import check_finite, load_safetensors
from minbert.model.config import PRESETS, BertConfig

log = logging.getLogger("minbert")


@dataclass
class BertOutput:
    last_hidden_state: torch.Tensor  # (batch, seq, hidden)
    pooler_output: torch.Tensor | None  # (batch, hidden): tanh(dense(h[CLS])), None without a pooler


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
        return self.dropout(self.norm(x))


# Gathering the real tokens and scattering them back around attention costs about 5% of a layer's time on CPU
# (measured, docs/speed.md): it pays from about this fraction of padding on.
SKIP_PADDING_FROM = 0.1


@dataclass
class Packing:
    """Where the real (not padding) tokens of a padded (batch, seq) layout are, flattened to batch * seq rows."""
    keep: torch.Tensor  # row indices of the real tokens
    pad: torch.Tensor  # row indices of the padding

    @classmethod
    def from_mask(cls, attention_mask: torch.Tensor) -> "Packing":
        flat = attention_mask.reshape(-1).bool()
        return cls(flat.nonzero().squeeze(1), (~flat).nonzero().squeeze(1))

    @property
    def rows(self) -> int:
        """batch * seq"""
        return self.keep.shape[0] + self.pad.shape[0]

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(batch, seq, d) -> (tokens, d)"""
        return x.reshape(self.rows, x.shape[-1]).index_select(0, self.keep)

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(tokens, d) -> (batch * seq, d) with zero padding rows: as attention keys they are masked out, as
        queries their outputs are dropped; zero (not left uninitialized) so that 0 x value stays 0."""
        out = x.new_empty(self.rows, x.shape[-1])
        out.index_copy_(0, self.keep, x)
        return out.index_fill_(0, self.pad, 0)


class BertLayer(nn.Module):
    """Post-LN transformer layer: x = LN(x + Attn(x)); x = LN(x + FFN(x))."""

    def __init__(self, config: BertConfig):
        super().__init__()
        h = config.hidden_size
        self.num_heads = config.num_attention_heads
        self.attn_dropout = config.attention_probs_dropout_prob
        self.qkv = nn.Linear(h, 3 * h)  # fused query, key, value
        self.attn_out = nn.Linear(h, h)
        self.attn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.ffn_in = nn.Linear(h, config.intermediate_size)
        self.ffn_out = nn.Linear(config.intermediate_size, h)
        self.ffn_norm = nn.LayerNorm(h, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.act = {
            "gelu": F.gelu,
            "gelu_new": lambda t: F.gelu(t, approximate="tanh"),
            "relu": F.relu,
        }[config.hidden_act]

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None, packing: Packing | None = None) -> torch.Tensor:
        """``x``: (batch, seq, hidden); or, with ``packing``, the real tokens only, (tokens, hidden)."""
        if packing is None:
            b, t, h = x.shape
            qkv = self.qkv(x)
        else:  # back to the padded layout for attention only
            (b, t), h = (mask.shape[0], mask.shape[-1]), x.shape[-1]
            qkv = packing.unpack(self.qkv(x))
        # (b, t, 3h) -> 3 x (b, heads, t, head_dim)
        q, k, v = qkv.view(b, t, 3, self.num_heads, h // self.num_heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.attn_dropout if self.training else 0.0
        )
        a = a.transpose(1, 2).reshape(b * t, h)  # a view after SDPA's fused CPU kernel, a copy after its math path
        a = a.view(b, t, h) if packing is None else a.index_select(0, packing.keep)
        x = self.attn_norm(x + self.dropout(self.attn_out(a)))
        return self.ffn_norm(x + self.dropout(self.ffn_out(self.act(self.ffn_in(x)))))


class BertModel(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size) if config.add_pooling_layer else None
        self.apply(self._init_weights)

    def _init_weights(self, module: nn.Module) -> None:
        # BERT's initialization: N(0, initializer_range) weights, zero biases, identity LayerNorm.
        std = self.config.initializer_range
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, std=std)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)

    def embed(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """The embedding-layer output (SMART perturbs this, Jiang et al. 2020 §3)."""
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        return self.embeddings(input_ids, token_type_ids)

    def encode(self, x: torch.Tensor, attention_mask: torch.Tensor | None = None, skip_padding: bool = True) -> BertOutput:
        """Run the transformer layers (and pooler) on embedding-layer output ``x``.

        With ``skip_padding`` and at least ``SKIP_PADDING_FROM`` of the batch padding, the token-wise work
        (projections, feed-forward, LayerNorm: nearly all of it) runs on the real tokens only, packed into one
        (tokens, hidden) matrix; only attention sees the padded layout. Real positions are unchanged; rows of
        ``last_hidden_state`` at padding positions are then zero (poolings never read them). Length-bucketed
        batches still carry 3-25% padding (a pair task pads each side to its own longest), see docs/speed.md."""
        mask = packing = None
        shape = x.shape
        real = int(attention_mask.sum()) if attention_mask is not None else x.shape[0] * x.shape[1]
        if real < x.shape[0] * x.shape[1]:
            # Boolean mask, True = attend; broadcast over heads and query positions.
            mask = attention_mask[:, None, None, :].bool()
            if skip_padding and real <= (1 - SKIP_PADDING_FROM) * attention_mask.numel():
                packing = Packing.from_mask(attention_mask)
                x = packing.pack(x)
        for layer in self.layers:
            x = layer(x, mask, packing)
        if packing is not None:
            x = packing.unpack(x).view(shape)
        pooled = torch.tanh(self.pooler(x[:, 0])) if self.pooler is not None else None
        return BertOutput(last_hidden_state=x, pooler_output=pooled)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        skip_padding: bool = False,
    ) -> BertOutput:
        """transformers.BertModel's computation, every position included (``skip_padding``: see :meth:`encode`)."""
        return self.encode(self.embed(input_ids, token_type_ids), attention_mask, skip_padding)

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, add_pooling_layer: bool = True) -> "BertModel":
        """Load a preset name (``minilm-l6`` has weights; the others initialize randomly) or a directory in the
        Hugging Face layout (config.json + model.safetensors, or pytorch_model.bin)."""
        directory = check_model_dir(name_or_path)
        if directory is None:  # a preset without weights
            config = BertConfig(**{**PRESETS[str(name_or_path)].__dict__, "add_pooling_layer": add_pooling_layer})
            return cls(config)
        config = BertConfig.from_json(directory / "config.json")
        config.add_pooling_layer = add_pooling_layer
        weights_file, hf_state = load_state_dict_file(directory)  # read (and its shapes checked) before allocating
        check_hf_shapes(hf_state, config, str(weights_file))
        model = cls(config)
        model.load_hf_state_dict(hf_state, source=str(weights_file))
        return model

    def load_hf_state_dict(self, hf_state: dict[str, torch.Tensor], source: str = "checkpoint") -> None:
        """Load Hugging Face BertModel weights (``bert.``-prefixed or bare keys); missing weights are errors,
        unexpected ones a warning, a missing pooler is freshly initialized with a warning. A tensor whose shape
        differs from the config's is a one-line error naming ``source`` and the tensor's key."""
        check_hf_shapes(hf_state, self.config, source)
        state, unexpected = from_hf_state_dict(hf_state, self.config.num_hidden_layers)
        own = self.state_dict()
        missing = sorted(k for k in own if k not in state)
        if missing and all(k.startswith("pooler.") for k in missing):
            log.warning("%s has no pooler weights: the pooler is freshly initialized", source)
            missing = []
        if missing:
            raise ValueError(f"{source}: missing weights: {', '.join(missing)}")
        unexpected += sorted(k for k in state if k not in own)
        if unexpected:
            log.warning("%s: ignoring %d unexpected weights: %s", source, len(unexpected), ", ".join(unexpected))
        for k, v in state.items():
            if k in own and own[k].shape != v.shape:
                raise ValueError(f"{source}: weight {k} has shape {tuple(v.shape)}, expected {tuple(own[k].shape)}")
        self.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


# ----------------------------------------------------------------------------------------------------------
# Hugging Face layout <-> ours

_HF_LAYER = {
    "attention.output.dense": "attn_out",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
    "output.LayerNorm": "ffn_norm",
}
_HF_EMB = {"word_embeddings": "word", "position_embeddings": "position", "token_type_embeddings": "token_type", "LayerNorm": "norm"}
_IGNORED = re.compile(r"^(embeddings\.position_ids|cls\.|.*\.num_batches_tracked$)")


def _bare_hf_key(key: str) -> str:
    """A Hugging Face key without the ``bert.`` prefix, with TF-era LayerNorm names (gamma/beta) renamed."""
    k = key[len("bert."):] if key.startswith("bert.") else key
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", k))


def hf_shapes(config: BertConfig) -> dict[str, tuple[int, ...]]:
    """The shape of every Hugging Face BertModel tensor (bare keys) that ``config`` describes, computed from the
    config alone (nothing allocated)."""
    h, i = config.hidden_size, config.intermediate_size
    out = {"embeddings.word_embeddings.weight": (config.vocab_size, h),
           "embeddings.position_embeddings.weight": (config.max_position_embeddings, h),
           "embeddings.token_type_embeddings.weight": (config.type_vocab_size, h),
           "pooler.dense.weight": (h, h), "pooler.dense.bias": (h,)}
    per_layer = {"attention.self.query": (h, h), "attention.self.key": (h, h), "attention.self.value": (h, h),
                 "attention.output.dense": (h, h), "intermediate.dense": (i, h), "output.dense": (h, i)}
    for n in range(config.num_hidden_layers):
        for name, shape in per_layer.items():
            out[f"encoder.layer.{n}.{name}.weight"], out[f"encoder.layer.{n}.{name}.bias"] = shape, shape[:1]
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            out[f"encoder.layer.{n}.{name}.weight"] = out[f"encoder.layer.{n}.{name}.bias"] = (h,)
    out["embeddings.LayerNorm.weight"] = out["embeddings.LayerNorm.bias"] = (h,)
    return out


def check_hf_shapes(hf: dict[str, torch.Tensor], config: BertConfig, source: str) -> None:
    """Every known tensor of ``hf`` is floating-point with the shape ``config`` gives it, else one line naming
    ``source`` and the key."""
    expected = hf_shapes(config)
    for key, value in hf.items():
        want = expected.get(_bare_hf_key(key))
        if want is None:
            continue
        if tuple(value.shape) != want:
            raise ValueError(f"{source}: tensor {key} has shape {tuple(value.shape)}, the config gives "
                             f"{want} (weights of another model size?)")
        if not value.is_floating_point():
            raise ValueError(f"{source}: tensor {key} has dtype {value.dtype}, not a floating-point type")


def from_hf_state_dict(hf: dict[str, torch.Tensor], num_layers: int) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Convert Hugging Face BertModel keys to ours. Returns (state, unexpected HF keys)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str, str], torch.Tensor] = {}
    unexpected: list[str] = []
    for key, value in hf.items():
        k = _bare_hf_key(key)
        if _IGNORED.match(k):
            if k.startswith("cls."):
                unexpected.append(key)
            continue
        if m := re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", k):
            if m[1] in _HF_EMB:
                out[f"embeddings.{_HF_EMB[m[1]]}.{m[2]}"] = value
                continue
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.(weight|bias)", k):
            qkv[(int(m[1]), m[3], m[2])] = value
            continue
        elif m := re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)\.(weight|bias)", k):
            if m[2] in _HF_LAYER:
                out[f"layers.{m[1]}.{_HF_LAYER[m[2]]}.{m[3]}"] = value
                continue
        elif m := re.fullmatch(r"pooler\.dense\.(weight|bias)", k):
            out[f"pooler.{m[1]}"] = value
            continue
        unexpected.append(key)
    for i in range(num_layers):
        for p in ("weight", "bias"):
            parts = [qkv.pop((i, p, n), None) for n in ("query", "key", "value")]
            if all(t is not None for t in parts):
                out[f"layers.{i}.qkv.{p}"] = torch.cat(parts, dim=0)
    unexpected += [f"encoder.layer.{i}.attention.self.{n}.{p}" for (i, p, n) in qkv]
    return out, unexpected


def to_hf_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our encoder keys -> Hugging Face BertModel keys (bare layout)."""
    inv_layer = {v: k for k, v in _HF_LAYER.items()}
    inv_emb = {v: k for k, v in _HF_EMB.items()}
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if m := re.fullmatch(r"embeddings\.(\w+)\.(weight|bias)", key):
            out[f"embeddings.{inv_emb[m[1]]}.{m[2]}"] = value
        elif m := re.fullmatch(r"layers\.(\d+)\.qkv\.(weight|bias)", key):
            for name, part in zip(("query", "key", "value"), value.chunk(3, dim=0)):
                out[f"encoder.layer.{m[1]}.attention.self.{name}.{m[2]}"] = part.contiguous()
        elif m := re.fullmatch(r"layers\.(\d+)\.(\w+)\.(weight|bias)", key):
            out[f"encoder.layer.{m[1]}.{inv_layer[m[2]]}.{m[3]}"] = value
        elif m := re.fullmatch(r"pooler\.(weight|bias)", key):
            out[f"pooler.dense.{m[1]}"] = value
        else:
            raise KeyError(f"not an encoder weight: {key}")
    return out


def resolve_model_dir(name_or_path: str | Path) -> Path | None:
    """A directory in the Hugging Face layout for ``name_or_path``, or None for a preset without weights."""
    name = str(name_or_path)
    if name == "minilm-l6":
        from minbert.model.embedded import embedded_model_dir

        return embedded_model_dir()
    if name in PRESETS:
        return None
    path = Path(name)
    if not path.is_dir():
        raise ValueError(f"{name}: not a preset ({', '.join(PRESETS)}) nor a directory")
    if (path / "args.json").is_file() and not (path / "config.json").is_file():
        raise _minbert_folder(path, "run folder")
    if not os.path.lexists(path / "config.json"):  # one that is there but unreadable is named when it is read
        raise ValueError(f"{path}: no config.json (expected a Hugging Face model directory)")
    return path


def check_model_dir(name_or_path: str | Path) -> Path | None:
    """:func:`resolve_model_dir`, and what can be told from the folder's layout without reading a weight: not a
    minbert checkpoint (a run's best/ or last/), and a weights file present. Run before the data is read
    (RunConfig.validate), so a wrong --model_name_or_path costs no wait."""
    directory = resolve_model_dir(name_or_path)
    if directory is None:
        return None
    if (directory / "multitask.json").is_file() and not (directory / "heads.safetensors").is_file():
        raise _minbert_folder(directory, "checkpoint")  # its tensors are encoder.* / heads.*: not "missing"
    if not any(os.path.lexists(directory / n) for n in ("model.safetensors", "pytorch_model.bin")):
        raise ValueError(f"{directory}: no model.safetensors nor pytorch_model.bin (expected a Hugging Face model "
                         f"directory)")
    return directory


def _minbert_folder(path: Path, kind: str) -> ValueError:
    return ValueError(f"{path}: a minbert {kind}, not a Hugging Face model folder; convert it with `minbert-export "
                      f"--checkpoint {path} --out DIR` and pass DIR (to predict with it: --checkpoint {path})")


def load_state_dict_file(directory: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """(file, state dict): model.safetensors, else pytorch_model.bin through ``torch.load(weights_only=True)``
    (never plain pickle). Whatever stands at either name is read (a FIFO or a broken link is refused)."""
    st, binf = directory / "model.safetensors", directory / "pytorch_model.bin"
    if os.path.lexists(st):
        return st, load_safetensors(st)
    if os.path.lexists(binf):
        from minbert.io.torch_load import load_torch_file

        state = load_torch_file(binf)  # weights_only=True; a refusal names the file, never the unsafe option
        if not isinstance(state, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in state.items()):
            raise ValueError(f"{binf}: not a state dict of tensors")
        return binf, check_finite(state, binf)
    raise ValueError(f"{directory}: neither model.safetensors nor pytorch_model.bin found")


def num_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


__all__ = ["BertModel", "BertOutput", "from_hf_state_dict", "to_hf_state_dict"]
