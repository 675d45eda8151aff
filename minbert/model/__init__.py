"""The model: the encoder's configuration (config.py) and embedded pretrained weights (embedded.py), the WordPiece
tokenizer (tokenizer.py), the from-scratch BERT encoder (encoder.py), pooling (pooling.py), the task heads
(heads.py) and the multitask model with its checkpoints (multitask.py).

``minbert.model`` was the encoder's module before these folders: its names (``BertModel``,
``to_hf_state_dict``, ...) are re-exported here.
"""
from minbert.model.encoder import (BertEmbeddings, BertLayer, BertModel, BertOutput, Packing, SKIP_PADDING_FROM,
                                   check_hf_shapes, check_model_dir, from_hf_state_dict, hf_shapes,
                                   load_state_dict_file, num_parameters, resolve_model_dir, to_hf_state_dict)

__all__ = ["BertEmbeddings", "BertLayer", "BertModel", "BertOutput", "Packing", "SKIP_PADDING_FROM",
           "check_hf_shapes", "check_model_dir", "from_hf_state_dict", "hf_shapes", "load_state_dict_file",
           "num_parameters", "resolve_model_dir", "to_hf_state_dict"]
