"""The from-scratch encoder equals transformers.BertModel on the same weights; loaders report problems."""
import logging

import pytest
import torch

from minbert import BertConfig, BertModel
from minbert.model.encoder import from_hf_state_dict, resolve_model_dir, to_hf_state_dict

transformers = pytest.importorskip("transformers")


def _hf_pair(config: BertConfig, seed: int = 0):
    """A random transformers.BertModel and ours loaded from its state dict."""
    torch.manual_seed(seed)
    hf_cfg = transformers.BertConfig(**{k: v for k, v in config.__dict__.items() if k != "add_pooling_layer"})
    hf = transformers.BertModel(hf_cfg).eval()
    ours = BertModel(config).eval()
    ours.load_hf_state_dict(hf.state_dict())
    return hf, ours


def _batch(vocab: int, b: int = 4, t: int = 19, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (b, t), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 12:] = 0
    mask[2, 4:] = 0
    ids[mask == 0] = 0
    types = torch.zeros_like(ids)
    types[:, 9:] = 1
    return ids, mask, types


def _max_diff(hf, ours, ids, mask, types):
    with torch.no_grad():
        a = ours(ids, attention_mask=mask, token_type_ids=types)
        b = hf(input_ids=ids, attention_mask=mask, token_type_ids=types)
    return (a.last_hidden_state - b.last_hidden_state).abs().max().item(), (a.pooler_output - b.pooler_output).abs().max().item()


def test_equal_to_transformers_random_bert_base_with_padding():
    cfg = BertConfig()  # 12 layers, hidden 768: the default architecture
    hf, ours = _hf_pair(cfg)
    hidden, pooled = _max_diff(hf, ours, *_batch(cfg.vocab_size))
    assert hidden <= 1e-5 and pooled <= 1e-5


@pytest.mark.slow
def test_equal_to_transformers_on_minilm_weights():
    directory = resolve_model_dir("minilm-l6")
    hf = transformers.BertModel.from_pretrained(str(directory)).eval()
    ours = BertModel.from_pretrained("minilm-l6").eval()
    assert ours.config.num_hidden_layers == 6 and ours.config.hidden_size == 384
    hidden, pooled = _max_diff(hf, ours, *_batch(30522))
    assert hidden <= 1e-5 and pooled <= 1e-5


def test_hf_key_conversion_round_trips():
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99)
    hf, ours = _hf_pair(cfg)
    back = to_hf_state_dict(ours.state_dict())
    ref = {k: v for k, v in hf.state_dict().items() if k != "embeddings.position_ids"}
    assert set(back) == set(ref)
    assert all(torch.equal(back[k], ref[k]) for k in ref)


def _save_hf_dir(tmp_path, state, cfg, fmt="safetensors"):
    import json

    from safetensors.torch import save_file

    (tmp_path / "config.json").write_text(json.dumps(cfg.to_dict()))
    if fmt == "safetensors":
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"))
    else:
        torch.save(state, tmp_path / "pytorch_model.bin")
    return tmp_path


TINY = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, vocab_size=99)


@pytest.mark.parametrize("prefix,fmt", [("", "safetensors"), ("bert.", "safetensors"), ("bert.", "bin")])
def test_from_pretrained_layouts(tmp_path, prefix, fmt):
    hf, _ = _hf_pair(TINY)
    state = {prefix + k: v for k, v in hf.state_dict().items()}
    state["cls.predictions.bias"] = torch.zeros(99)  # an MLM head: unexpected, reported, ignored
    ours = BertModel.from_pretrained(_save_hf_dir(tmp_path, state, TINY, fmt)).eval()
    hidden, pooled = _max_diff(hf, ours, *_batch(99))
    assert hidden <= 1e-5 and pooled <= 1e-5


def test_missing_weights_are_named(tmp_path):
    hf, _ = _hf_pair(TINY)
    state = {k: v for k, v in hf.state_dict().items() if "layer.1.output.dense" not in k}
    with pytest.raises(ValueError, match=r"missing weights: layers\.1\.ffn_out\.bias, layers\.1\.ffn_out\.weight"):
        BertModel.from_pretrained(_save_hf_dir(tmp_path, state, TINY))


def test_missing_pooler_warns_once_and_initializes(tmp_path, caplog):
    hf, _ = _hf_pair(TINY)
    state = {k: v for k, v in hf.state_dict().items() if not k.startswith("pooler.")}
    with caplog.at_level(logging.WARNING, logger="minbert"):
        model = BertModel.from_pretrained(_save_hf_dir(tmp_path, state, TINY))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "pooler" in warnings[0].getMessage()
    assert model.pooler is not None


def test_unexpected_weights_are_reported(tmp_path, caplog):
    hf, _ = _hf_pair(TINY)
    state = dict(hf.state_dict())
    state["encoder.layer.0.extra.weight"] = torch.zeros(3)
    with caplog.at_level(logging.WARNING, logger="minbert"):
        BertModel.from_pretrained(_save_hf_dir(tmp_path, state, TINY))
    assert "encoder.layer.0.extra.weight" in caplog.text


def test_bin_loading_refuses_code_execution(tmp_path):
    """A pickle whose unpickling would run code is refused by torch.load(weights_only=True)."""
    import json
    import pickle

    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (tmp_path / "config.json").write_text(json.dumps(TINY.to_dict()))
    with open(tmp_path / "pytorch_model.bin", "wb") as f:
        pickle.dump({"x": Evil()}, f)
    with pytest.raises(ValueError, match="pytorch_model.bin: (refused|cannot read)") as e:
        BertModel.from_pretrained(tmp_path)
    assert not marker.exists()
    assert "weights_only=False" not in str(e.value) and "\n" not in str(e.value)  # never the unsafe advice


def test_shape_mismatch_is_an_error(tmp_path):
    hf, _ = _hf_pair(TINY)
    cfg = BertConfig(**{**TINY.__dict__, "intermediate_size": 48})
    with pytest.raises(ValueError, match="has shape"):
        BertModel.from_pretrained(_save_hf_dir(tmp_path, hf.state_dict(), cfg))


def test_from_hf_state_dict_accepts_gamma_beta():
    hf, _ = _hf_pair(TINY)
    state = {k.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): v
             for k, v in hf.state_dict().items()}
    converted, unexpected = from_hf_state_dict(state, TINY.num_hidden_layers)
    assert not unexpected and "embeddings.norm.weight" in converted


def test_presets_and_unknown_name():
    m = BertModel.from_pretrained("bert-tiny")
    assert m.config.num_hidden_layers == 2 and m.config.vocab_size == 30522
    with pytest.raises(ValueError, match="not a preset"):
        BertModel.from_pretrained("bert-huge")


def test_config_from_hf_json(tmp_path):
    (tmp_path / "config.json").write_text('{"hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 3, "model_type": "bert", "foo": 1}')
    cfg = BertConfig.from_json(tmp_path / "config.json")
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.intermediate_size) == (64, 3, 3072)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="bad.json: cannot read config"):
        BertConfig.from_json(tmp_path / "bad.json")
