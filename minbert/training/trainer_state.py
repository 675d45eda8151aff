"""The Trainer's resumable state in one place: ``state_dict()`` / ``load_state_dict()``, as torch modules and
optimizers have them, and the checkpoints made of it.

:class:`ResumableState` is the part of :class:`minbert.training.trainer.Trainer` that says what a run needs to continue
bit-identically, besides the weights (the model's own state_dict): the position and counters, the best epoch's
bookkeeping, the optimizer, scheduler, combiner and SMART states and the random generators (TaskStream batch i
is a pure function of i, so the position is the data stream's state). :mod:`minbert.training.checkpoint_state` writes
such a dict to ``last`` and reads it back, and touches nothing else of the trainer.
"""
from __future__ import annotations

from pathlib import Path

from minbert.io import first_line
from minbert.training import checkpoint_state, distributed
from minbert.training.checkpoint_state import StateDoesNotFit

# What load_state_dict may raise when a part does not fit this run (another optimizer, other groups, ...).
LOAD_ERRORS = (KeyError, TypeError, ValueError, RuntimeError, IndexError, AttributeError)


class ResumableState:
    """Mixed into Trainer; the attributes it reads and sets are the Trainer's (set in Trainer.__init__)."""

    def state_dict(self) -> dict:
        """Everything needed to continue, but the weights: ``position`` (the keys of trainer_state.json),
        ``optimizer``, ``scheduler``, ``rng``, ``combiner``, ``smart`` and, under torchrun, ``rng_per_rank``.
        The best epoch's weights are not in it (``best`` holds them). Under torchrun every rank must call it
        (it gathers every rank's generators, and a sharded optimizer's state on rank 0, whose state alone then
        holds the optimizer: the others get None)."""
        best = None
        if self.best_epoch:  # set together with best_state at an epoch's end, or by a resume
            best = {"score": self.best_score, "epoch": self.best_epoch, "step": self.best_step, "dev": self.best_scores}
        position = {
            "global_step": self.global_step, "epochs_done": self.global_step // self.steps_per_epoch,
            "steps_per_epoch": self.steps_per_epoch, "total_steps": self.total_steps, "best": best,
            "bad_steps": self.bad_steps, "bad_in_a_row": self.bad_in_a_row, "running": self.running,
            "epoch_examples": self.epoch_examples, "epoch_seconds": self.epoch_seconds,
            "world_size": distributed.world_size(),
        }
        state = {"position": position, "scheduler": self.scheduler.state_dict(), "rng": checkpoint_state.rng_state(),
                 "combiner": checkpoint_state.component_state(self.combiner),
                 "smart": checkpoint_state.component_state(self.smart)}
        if distributed.world_size() > 1:  # each rank's own random state (dropout), for a bit-identical resume
            state["rng_per_rank"] = distributed.all_gather_object(state["rng"])
            if callable(getattr(self.optimizer, "consolidate_state_dict", None)):
                # An optimizer whose state is sharded over the ranks (M-FAC's window, torch's
                # ZeroRedundancyOptimizer) gathers it on rank 0, whose state_dict() then holds all of it.
                self.optimizer.consolidate_state_dict(to=0)
        state["optimizer"] = self.optimizer.state_dict() if distributed.is_main() else None
        return state

    def load_state_dict(self, state: dict) -> None:
        """Continue from a state_dict(). Its schedule must be this run's (else StateDoesNotFit("position") before
        anything changes); a part that does not fit raises StateDoesNotFit naming it. The random generators are
        set when train() starts, after everything that draws random numbers while building the run."""
        pos = state["position"]
        if (pos["steps_per_epoch"], pos["total_steps"]) != (self.steps_per_epoch, self.total_steps):
            raise StateDoesNotFit("position", f"has {pos['steps_per_epoch']} steps/epoch and {pos['total_steps']} in "
                                              f"all, this run {self.steps_per_epoch} and {self.total_steps}; resume "
                                              "with the same data and flags")
        load_component = checkpoint_state.load_component_state
        for part, load in (("optimizer", lambda: self.optimizer.load_state_dict(state["optimizer"])),
                           ("scheduler", lambda: self.scheduler.load_state_dict(state["scheduler"])),
                           ("combiner", lambda: load_component(self.combiner, state["combiner"])),
                           ("smart", lambda: load_component(self.smart, state["smart"]))):
            try:
                load()
            except LOAD_ERRORS as e:
                raise StateDoesNotFit(part, first_line(e)) from None
        self._rng_to_restore = checkpoint_state.own_rng(state)
        self.global_step = pos["global_step"]
        self.bad_steps, self.bad_in_a_row = pos["bad_steps"], pos["bad_in_a_row"]
        self.running = {task: list(pos["running"].get(task, [])) for task in self.tasks}
        self.epoch_examples, self.epoch_seconds = pos["epoch_examples"], pos["epoch_seconds"]
        best = pos["best"]
        if best is not None:
            self.best_score, self.best_epoch, self.best_step = best["score"], best["epoch"], best["step"]
            self.best_scores = best["dev"]

    # ------------------------------------------------------------------------------------------ checkpoints
    def save_last(self) -> None:
        """Write state_dict() and the weights to ``out_dir/last``. Skipped while non-finite steps are being
        skipped, so `last` always follows a good update."""
        if self.bad_in_a_row:
            return
        checkpoint_state.save_last(self.out_dir / "last", self.state_dict(), self.model, self.tokenizer)
        self.last_saved_step = self.global_step

    def save_best(self) -> None:
        """Write the best epoch's weights (the model's current ones) to ``out_dir/best``, tagged with its step."""
        tag = {"epoch": self.best_epoch, "step": self.best_step, "dev": self.best_scores}
        checkpoint_state.save_best(self.out_dir / "best", self.model, self.tokenizer, tag)

    def restore(self, directory: Path) -> None:
        """Continue from a `last` checkpoint (checkpoint_state.restore checks every file, then calls
        load_state_dict) and take the best epoch's weights back."""
        self.best_state = checkpoint_state.restore(self, directory, self.model, self.device, self.tokenizer,
                                                   self.out_dir / "best")
        self.last_saved_step = self.global_step
