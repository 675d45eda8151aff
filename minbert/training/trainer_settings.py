"""The training group of flags (the Trainer's settings; in a module of their own, as the Trainer's resumable
state is in trainer_state.py): the seed, batch sizes, learning rates and schedule, the step's guards, the device
and the precision."""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch

from minbert.io.settings import setting
from minbert.training.precision import BF16_MODES, DEFAULT_BF16, bf16_flag, resolve_bf16

SEED_RANGE = (0, 2**32 - 1)  # numpy's global generator takes 32-bit seeds
DEVICE_PATTERN = r"auto|cpu|cuda(:\d+)?"


@dataclass
class TrainingSettings:
    seed: int = setting(11711, bounds=SEED_RANGE, parse=int,
                        help="random seed (0 to 2**32-1): new weights, batch order, dropout")
    per_device_train_batch_size: int = setting(
        32, bounds=(1, None), help="examples per task in each training step (every step draws a batch of every task)")
    per_device_eval_batch_size: int = setting(128, bounds=(1, None),
                                              help="examples per batch when predicting dev and test")
    learning_rate: float = setting(1e-4, bounds=(0, None), help="peak learning rate of the encoder: linear warmup "
                                                                "to it, then linear decay to 0")
    head_learning_rate: float = setting(
        1e-3, bounds=(0, None),
        help="peak learning rate of the task heads (same schedule): freshly initialized layers on top "
             "of a pretrained encoder need larger steps, e.g. to learn the scale of the cosine feature; "
             "an lr in --optim_args does not change it")
    num_train_epochs: int = setting(3, bounds=(1, None), help="epochs; dev scores after each, the best epoch is kept")
    max_steps_per_epoch: int | None = setting(None, bounds=(1, None), help="cap the steps of an epoch (quick runs)")
    weight_decay: float = setting(0.01, bounds=(0, None),
                                  help="decoupled weight decay (not on biases and LayerNorm weights)")
    warmup_ratio: float = setting(0.1, bounds=(0, 1), help="fraction of all steps spent warming the learning rate "
                                                           "up, in [0, 1]")
    max_grad_norm: float = setting(1.0, bounds=(0, None), help="clip the gradient norm (0: off)")
    max_bad_steps: int = setting(
        10, bounds=(0, None),
        help="non-finite loss or gradient: skip the step; stop after more than N such steps in a row")
    logging_steps: int = setting(50, bounds=(1, None), help="write the mean losses of the last N steps to "
                                                            "metrics.jsonl")
    device: str = setting("auto", help="auto, cpu or cuda")
    bf16: str = setting(
        DEFAULT_BF16, choices=BF16_MODES, parse=bf16_flag, nargs="?", const="on", metavar="{auto,on,off}",
        help="bfloat16 autocast for forward passes and losses in training and prediction (weights, "
             "gradients and optimizer state stay float32); about 2x faster on CPUs with AVX512-BF16/AMX "
             "(docs/speed.md). --bf16 alone = on; auto (the default) = on where the device has native "
             "bfloat16 (CUDA with bf16, AVX512-BF16/AMX CPUs), off elsewhere and with --smart_projection ball")
    torch_compile: bool = setting(
        False, help="compile the encoder layers with torch.compile (dynamic shapes); the first steps are slow "
                    "while it compiles, and on CPU it needs a C++ compiler")

    def device_problem(self) -> str | None:
        return None if re.fullmatch(DEVICE_PATTERN, self.device) else "choose auto, cpu or cuda"

    def amp_dtype(self, smart_ball: bool = False) -> torch.dtype | None:
        """--bf16: bfloat16 autocast for forward passes and losses (weights, gradients and optimizer state stay
        float32). run() resolves ``auto`` before training; a caller that did not gets it resolved for the CPU or
        CUDA here (``smart_ball``: SMART's ball projection, which keeps float32)."""
        mode = self.bf16
        if mode == "auto":
            cuda = torch.cuda.is_available() and self.device != "cpu"
            mode = resolve_bf16(mode, torch.device("cuda" if cuda else "cpu"), smart_ball)
        return torch.bfloat16 if mode in ("on", True) else None
