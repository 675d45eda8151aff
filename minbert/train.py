"""The names that lived in minbert.train before the training run was split into one module per concern
(docs/architecture.md); they are re-exported here so existing imports keep working:

- :mod:`minbert.trainer`: the loop (Trainer, evaluate, NonFiniteError, TrainingInterrupted);
- :mod:`minbert.checkpoint_state`: the resumable state in OUTPUT_DIR/last and best;
- :mod:`minbert.output_dir`: the --output_dir rules;
- :mod:`minbert.metrics_log`: metrics.jsonl and TensorBoard;
- :mod:`minbert.optim.build`: param groups, the optimizer and the learning-rate schedule of a run;
- :mod:`minbert.run`: one run from start to end.
"""
from .checkpoint_state import component_state, load_component_state, rng_state, set_rng_state
from .metrics_log import MetricsLog
from .optim.build import linear_schedule, optimizer_for_run as build_optimizer, param_groups
from .output_dir import RESUME_MAY_CHANGE, RUN_OUTPUTS, check_output_dir, prepare_output_dir
from .run import (build_model, compile_encoder, load_datasets, resolve_device, run, set_seed,
                  write_all_predictions)
from .trainer import NonFiniteError, Trainer, TrainingInterrupted, amp_dtype, evaluate, stop_on_sigint

__all__ = [
    "MetricsLog", "NonFiniteError", "RESUME_MAY_CHANGE", "RUN_OUTPUTS", "Trainer", "TrainingInterrupted",
    "amp_dtype", "build_model", "build_optimizer", "check_output_dir", "compile_encoder", "component_state",
    "evaluate", "linear_schedule", "load_component_state", "load_datasets", "param_groups", "prepare_output_dir",
    "resolve_device", "rng_state", "run", "set_rng_state", "set_seed", "stop_on_sigint", "write_all_predictions",
]
