"""ProgressLog: one line per call with epoch, step/total, each task's loss, examples/s and the time left, written
only when the stream is not a terminal (tqdm draws the bar there)."""
from __future__ import annotations

import io

from minbert.training.progress import ProgressLog, format_duration


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_line_has_every_field_and_a_linear_time_estimate():
    clock, stream = Clock(), io.StringIO()
    progress = ProgressLog(total_steps=600, num_epochs=3, stream=stream, clock=clock)
    clock.now += 30.0  # 50 steps in 30 s: 0.6 s a step, 550 steps left
    progress.log(1, 50, {"sst": 1.54321, "qqp": 0.61204, "sts": 2.0}, 41.27)
    assert stream.getvalue() == ("epoch 1/3  step 50/600 (8.3%)  loss sst 1.5432 qqp 0.6120 sts 2.0000  41.3 examples/s  "
                                 "0:00:30 elapsed, 0:05:30 left\n")


def test_a_resumed_run_estimates_from_its_own_steps():
    clock, stream = Clock(), io.StringIO()
    progress = ProgressLog(total_steps=1000, num_epochs=2, start_step=900, stream=stream, clock=clock)
    clock.now += 10.0  # 20 steps since the resume in 10 s: 80 left take 40 s
    progress.log(2, 920, {"sst": 0.5}, 100.0)
    assert stream.getvalue().endswith("0:00:10 elapsed, 0:00:40 left\n")
    assert "epoch 2/2  step 920/1000 (92.0%)" in stream.getvalue()


def test_no_estimate_before_a_step_and_nothing_on_a_terminal():
    progress = ProgressLog(total_steps=10, num_epochs=1, stream=io.StringIO(), clock=Clock())
    assert progress.line(1, 0, {}, 0.0) == "epoch 1/1  step 0/10 (0.0%)  0.0 examples/s"
    terminal = Terminal()
    quiet = ProgressLog(total_steps=10, num_epochs=1, stream=terminal, clock=Clock())
    assert not quiet.enabled
    quiet.log(1, 5, {"sst": 1.0}, 10.0)
    assert terminal.getvalue() == ""
    forced = ProgressLog(total_steps=10, num_epochs=1, stream=terminal, enabled=True, clock=Clock())
    forced.log(1, 5, {"sst": 1.0}, 10.0)
    assert terminal.getvalue().startswith("epoch 1/1  step 5/10")


def test_format_duration():
    assert [format_duration(s) for s in (0, 59.6, 61, 3600, 90061)] == ["0:00:00", "0:01:00", "0:01:01", "1:00:00",
                                                                        "25:01:01"]
