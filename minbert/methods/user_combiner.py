"""The interface of a user's combiner (``--combiner package.module:Class``), checked at the door.

A user's class must have a ``step(ctx)`` method that takes the StepContext and returns ``{task: loss}`` (docs/
multitask.md). :func:`check_interface` checks the signature while the settings are validated (before any data is
read or any file written); :func:`checked_step` wraps ``step`` for training so that a wrong return value, a
``sys.exit`` or an exception inside the user's code ends the run with one line naming the combiner, instead of a
traceback at step 1 (and a SystemExit that would skip the run's clean-up).
"""
from __future__ import annotations

import inspect
from typing import Callable


class CombinerError(ValueError):
    """A user's combiner broke its interface (a one-line message naming ``--combiner``)."""


def check_interface(combiner, spec: str) -> None:
    """``combiner.step`` must be callable with exactly one positional argument (the StepContext)."""
    step = getattr(combiner, "step", None)
    if not callable(step):
        raise CombinerError(f"--combiner {spec}: no step(ctx) method (see docs/multitask.md)")
    try:
        signature = inspect.signature(step)
    except (TypeError, ValueError):  # not introspectable (a C function): checked by calling it
        return
    try:
        signature.bind(object())
    except TypeError as e:
        raise CombinerError(f"--combiner {spec}: step{signature} cannot be called as step(ctx): {e}") from None


def check_losses(losses, tasks: list[str], spec: str) -> dict[str, float]:
    """What step(ctx) returned: a dict of the tasks' losses as numbers (a NaN loss is the run's non-finite
    guard's business, not an interface error)."""
    if not isinstance(losses, dict):
        raise CombinerError(f"--combiner {spec}: step(ctx) returned {type(losses).__name__}, expected a dict "
                            "{task: loss} (see docs/multitask.md)")
    unknown = [k for k in losses if k not in tasks]
    if unknown:
        raise CombinerError(f"--combiner {spec}: step(ctx) returned a loss for {unknown[0]!r}, which is not a task "
                            f"of this run ({', '.join(tasks)})")
    out = {}
    for task, value in losses.items():
        try:
            out[task] = float(value)
        except (TypeError, ValueError):
            raise CombinerError(f"--combiner {spec}: step(ctx) returned {type(value).__name__} as the loss of "
                                f"{task}, expected a number") from None
    return out


def checked_step(combiner, spec: str, passthrough: tuple[type[BaseException], ...] = ()) -> Callable:
    """``combiner.step`` wrapped: its result checked (:func:`check_losses`), ``sys.exit`` and the user's own
    exceptions turned into one-line CombinerErrors. ``passthrough``: exceptions that are the training loop's own
    (a non-finite stop, an interrupt) and go through unchanged."""
    def step(ctx):
        try:
            losses = combiner.step(ctx)
        except passthrough:
            raise
        except SystemExit as e:
            raise CombinerError(f"--combiner {spec}: step(ctx) called sys.exit({e.code!r}); a combiner must return "
                                "its losses (or raise an exception)") from None
        except Exception as e:  # the user's code: one line, not a traceback
            msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
            raise CombinerError(f"--combiner {spec}: step(ctx) raised {type(e).__name__}"
                                f"{': ' + msg if msg else ''}") from None
        return check_losses(losses, ctx.tasks, spec)
    return step
