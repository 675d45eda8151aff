"""minbert: multitask fine-tuning of a from-scratch BERT (SST, QQP, STS), with PCGrad, SMART and M-FAC.

The package's folders: ``model/`` (encoder, tokenizer, heads, the multitask model), ``tasks/`` (the task registry,
readers, metrics, prediction files), ``training/`` (the run's settings, the run, the trainer, checkpoints),
``methods/`` (combiners, SMART, optimizers), ``io/`` (files and flags: the one reader, the settings that flags are
derived from, the one atomic writer); the entry points sit at the top (``cli``, ``api``, ``predict_cli``,
``export``, ``plot``, ``experiments``). docs/architecture.md draws it.
"""
import importlib
import importlib.abc
import importlib.util
import sys

from minbert.api import InferenceModel, load
from minbert.methods.optim.mfac import MFAC
from minbert.model.config import BertConfig
from minbert.model.encoder import BertModel
from minbert.model.multitask import MultitaskBert, MultitaskConfig
from minbert.model.tokenizer import load_tokenizer

__version__ = "0.1.0"
__all__ = ["BertConfig", "BertModel", "InferenceModel", "MFAC", "MultitaskBert", "MultitaskConfig", "load",
           "load_tokenizer", "__version__"]

# Where each module of the flat layout (minbert 0.1 before the folders) lives now. ``import minbert.trainer`` or
# ``from minbert.combiners import COMBINERS`` in a user's code keeps working: the old name is the same module object
# as the new one (so a monkeypatch through either name reaches the code). ``minbert.model``, ``minbert.tasks`` and
# ``minbert.io`` are folders now and serve their old names themselves.
MOVED_MODULES = {
    "config": "model.config", "embedded": "model.embedded", "tokenizer": "model.tokenizer",
    "pooling": "model.pooling", "heads": "model.heads", "multitask": "model.multitask",
    "user_tasks": "tasks.user_tasks", "data": "tasks.data", "data_settings": "tasks.data_settings",
    "metrics": "tasks.metrics", "predict": "tasks.predict", "predict_input": "tasks.predict_input",
    "significance": "tasks.significance",
    "settings": "io.settings", "run_config": "training.run_config", "config_file": "training.config_file",
    "legacy_settings": "training.legacy_settings", "run": "training.run", "trainer": "training.trainer",
    "trainer_settings": "training.trainer_settings", "trainer_state": "training.trainer_state",
    "checkpoint_state": "training.checkpoint_state", "output_dir": "training.output_dir",
    "metrics_log": "training.metrics_log", "progress": "training.progress", "precision": "training.precision",
    "distributed": "training.distributed",
    "combiners": "methods.combiners", "mtl_methods": "methods.mtl_methods", "mtl_combiners": "methods.mtl_combiners",
    "user_combiner": "methods.user_combiner", "smart": "methods.smart", "optim": "methods.optim",
    "disk_full": "io.disk_full", "folder_lock": "io.folder_lock", "torch_load": "io.torch_load",
    "output_policy": "io.output_policy",
}


def moved_to(fullname: str) -> str | None:
    """The module's name now, for a name of the flat layout (``minbert.optim.mfac``: ``minbert.methods.optim.mfac``),
    else None."""
    head, _, rest = fullname.partition(".")
    first, _, tail = rest.partition(".")
    if head != __name__ or first not in MOVED_MODULES:
        return None
    return f"{__name__}.{MOVED_MODULES[first]}" + (f".{tail}" if tail else "")


class _MovedModuleFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds a flat-layout name and hands back the module under its new name (imported on first use)."""

    def find_spec(self, fullname, path=None, target=None):
        new = moved_to(fullname)
        return importlib.util.spec_from_loader(fullname, self) if new else None

    def create_module(self, spec):
        return importlib.import_module(moved_to(spec.name))  # the same object: no second copy of the module

    def exec_module(self, module):
        pass  # already executed under its new name


if not any(isinstance(f, _MovedModuleFinder) for f in sys.meta_path):
    sys.meta_path.insert(0, _MovedModuleFinder())
