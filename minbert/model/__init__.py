"""The model: the encoder's configuration (config.py) and embedded pretrained weights (embedded.py), the WordPiece
tokenizer (tokenizer.py), the from-scratch BERT encoder (encoder.py), pooling (pooling.py), the task heads
(heads.py) and the multitask model with its checkpoints (multitask.py).

``minbert.model`` was a module before these folders: its names (``BertModel``, ``to_hf_state_dict``, ...) are
still found here, read from :mod:`minbert.model.encoder` when first asked for.
"""
import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    encoder = importlib.import_module("minbert.model.encoder")
    try:
        return getattr(encoder, name)
    except AttributeError:
        raise AttributeError(f"module 'minbert.model' has no attribute {name!r}") from None
