"""Progress lines for logs: when stderr is not a terminal (``train_multitask.py ... > log 2>&1``), tqdm draws no
bar, so the training loop calls :class:`ProgressLog` every ``--logging_steps`` steps and it writes one line

    epoch 1/3  step 50/567 (8.8%)  loss sst 1.5432 qqp 0.6120 sts 2.0311  41.3 examples/s  0:01:12 elapsed, 0:12:30 left

with the mean losses of the last steps and the time left estimated from the steps done so far in this process
(as Hugging Face's Trainer logs when it has no progress bar). On a terminal it writes nothing: tqdm's bar shows
the same.
"""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


def format_duration(seconds: float) -> str:
    """H:MM:SS (hours unbounded)."""
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 3600}:{seconds % 3600 // 60:02d}:{seconds % 60:02d}"


class ProgressLog:
    """``total_steps``: the run's optimizer steps; ``num_epochs``: for the ``epoch e/N`` field; ``start_step``: where
    this process starts (a resumed run's step), so the estimate uses only the steps this process has timed.
    ``stream``: stderr by default; ``enabled``: None = only when the stream is not a terminal."""

    def __init__(self, total_steps: int, num_epochs: int, start_step: int = 0, stream: TextIO | None = None,
                 enabled: bool | None = None, clock: Callable[[], float] = time.perf_counter):
        self.total_steps, self.num_epochs, self.start_step = total_steps, num_epochs, start_step
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            isatty = getattr(self.stream, "isatty", None)
            enabled = not (callable(isatty) and isatty())
        self.enabled = enabled
        self.clock = clock
        self.start_time = clock()

    def line(self, epoch: int, step: int, losses: dict[str, float], examples_per_s: float) -> str:
        """The progress line for ``step`` (optimizer steps done) in ``epoch`` (1-based)."""
        elapsed = self.clock() - self.start_time
        done = step - self.start_step
        parts = [f"epoch {epoch}/{self.num_epochs}",
                 f"step {step}/{self.total_steps} ({100.0 * step / max(1, self.total_steps):.1f}%)"]
        if losses:
            parts.append("loss " + " ".join(f"{task} {loss:.4f}" for task, loss in losses.items()))
        parts.append(f"{examples_per_s:.1f} examples/s")
        if done > 0:
            left = elapsed / done * max(0, self.total_steps - step)
            parts.append(f"{format_duration(elapsed)} elapsed, {format_duration(left)} left")
        return "  ".join(parts)

    def log(self, epoch: int, step: int, losses: dict[str, float], examples_per_s: float) -> None:
        """Write the progress line (and flush, so a redirected log shows it at once) unless disabled."""
        if not self.enabled:
            return
        self.stream.write(self.line(epoch, step, losses, examples_per_s) + "\n")
        self.stream.flush()
