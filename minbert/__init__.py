"""minbert: multitask fine-tuning of a from-scratch BERT (SST, QQP, STS), with PCGrad, SMART and M-FAC."""
from .api import InferenceModel, load
from .config import BertConfig
from .model import BertModel
from .multitask import MultitaskBert, MultitaskConfig
from .tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "InferenceModel", "MultitaskBert", "MultitaskConfig", "load", "load_tokenizer",
           "__version__"]
