"""The tasks: the registry of what a task is (registry.py), tasks of the user's own (user_tasks.py), the task file
readers and batches (data.py, data_settings.py), the metrics and the overall score (metrics.py), prediction and
the prediction files (predict.py, predict_input.py), and bootstrap intervals for evaluate.py (significance.py).

``minbert.tasks`` was the registry's module before these folders: its names (``TASKS``, ``TaskSpec``, ...) are
still found here, read from :mod:`minbert.tasks.registry` when first asked for.
"""
import importlib


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    registry = importlib.import_module("minbert.tasks.registry")
    try:
        return getattr(registry, name)
    except AttributeError:
        raise AttributeError(f"module 'minbert.tasks' has no attribute {name!r}") from None
