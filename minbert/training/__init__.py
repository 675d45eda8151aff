"""A training run: its settings (run_config.py, config_file.py, legacy_settings.py, trainer_settings.py), the run
from start to end (run.py), the training loop (trainer.py), its resumable state and checkpoints (trainer_state.py,
checkpoint_state.py), the output folder (output_dir.py), the logs (metrics_log.py, progress.py), bf16
(precision.py) and torchrun data parallelism (distributed.py)."""
