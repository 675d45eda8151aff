"""The resumable state of a training run: OUTPUT_DIR/last (everything needed to continue bit-identically) and
OUTPUT_DIR/best (the best epoch's weights).

``last`` holds the weights (model.safetensors, with the configs and tokenizer), the optimizer state
(optimizer.pt), the scheduler, random generators and combiner/regularizer state (training_state.pt), and the
loop's position and counters (trainer_state.json). Every directory is written beside the old one and swapped
in whole (minbert.io.replace_dir). The files hold a :meth:`minbert.training.trainer.Trainer.state_dict` (declared in
minbert/training/trainer_state.py) and the weights: this module reaches the trainer only through state_dict() and
load_state_dict(). Reading checks every file first and names the one that is damaged or belongs to another run.
"""
from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import torch

from minbert.io import (atomic_save, atomic_write_text, check_regular_file, first_line, published_dir, read_json_file,
                        replace_dir)
from minbert.io import json_text
from minbert.io.torch_load import load_torch_file
from minbert.model.multitask import load_weights
from minbert.training import distributed
from minbert.training.output_dir import read_json

# trainer_state.json: each key and the JSON types its value may have.
TRAINER_STATE_KEYS = {
    "global_step": int, "steps_per_epoch": int, "total_steps": int, "bad_steps": int, "bad_in_a_row": int,
    "running": dict, "epoch_examples": (int, float), "epoch_seconds": (int, float), "best": (dict, type(None)),
}
BEST_KEYS = {"score": (int, float), "epoch": int, "step": int, "dev": dict}
TRAINING_STATE_KEYS = ("scheduler", "rng", "combiner", "smart")


def rng_state() -> dict:
    """Every global random number generator: Python, NumPy, torch CPU and CUDA (plain types and tensors, so
    the file loads with torch.load(weights_only=True))."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def component_state(obj) -> dict:
    """The resumable state of a combiner or regularizer: its torch.Generators (e.g. PCGrad's task order) and
    its ``state_dict()`` if it has one."""
    if obj is None:
        return {}
    out = {"generators": {k: g.get_state() for k, g in vars(obj).items() if isinstance(g, torch.Generator)}}
    if callable(getattr(obj, "state_dict", None)):
        out["state"] = obj.state_dict()
    return out


def load_component_state(obj, state: dict) -> None:
    if obj is None or not state:
        return
    for k, g_state in state.get("generators", {}).items():
        getattr(obj, k).set_state(g_state)
    if "state" in state:
        obj.load_state_dict(state["state"])


class StateDoesNotFit(ValueError):
    """A part of a state_dict (``position``, ``optimizer``, ``scheduler``, ``combiner``, ``smart``) that this
    trainer cannot take; restore() names the file it came from."""

    def __init__(self, part: str, what: str):
        super().__init__(f"{part}: {what}")
        self.part, self.what = part, what


def own_rng(state: dict) -> dict:
    """This process's random generators in a state_dict: under torchrun each rank continues its own stream."""
    per_rank = state.get("rng_per_rank")
    return per_rank[distributed.rank()] if per_rank else state["rng"]


# ------------------------------------------------------------------------------------------------- writing
def save_last(directory: Path, state: dict, model, tokenizer) -> None:
    """Write a :meth:`minbert.training.trainer.Trainer.state_dict` and the model to ``directory`` (`last`), swapped in
    whole: the position to trainer_state.json, the optimizer to optimizer.pt, the rest to training_state.pt.
    Under torchrun only rank 0 writes (every rank holds the same state; rank 0's holds every rank's rng)."""
    if not distributed.is_main():
        return
    extra = {k: state[k] for k in (*TRAINING_STATE_KEYS, "rng_per_rank") if k in state}

    def write(d: Path) -> None:
        model.save(d, tokenizer)
        atomic_save(d / "optimizer.pt", lambda p: torch.save(state["optimizer"], p))
        atomic_save(d / "training_state.pt", lambda p: torch.save(extra, p))
        atomic_write_text(d / "trainer_state.json", json_text(state["position"]) + "\n")

    replace_dir(directory, write)


def save_best(directory: Path, model, tokenizer, tag: dict) -> None:
    """Write the best epoch's weights (the model's current ones) to ``directory`` (`best`), tagged with its
    epoch, step and dev scores (best.json)."""
    if not distributed.is_main():
        return

    def write(d: Path) -> None:
        model.save(d, tokenizer)
        atomic_write_text(d / "best.json", json_text(tag) + "\n")

    replace_dir(directory, write)


# ------------------------------------------------------------------------------------------------- reading
class DamagedCheckpoint(ValueError):
    """A file of a checkpoint cannot be read or does not belong to this run."""

    def __init__(self, path: Path, what: str):
        super().__init__(f"--resume: {path}: {what}")


def read_trainer_state(path: Path) -> dict:
    """trainer_state.json, checked key by key."""
    try:
        state = read_json_file(path, finite=False)  # a FIFO or other non-regular file is refused, not waited on
    except (OSError, ValueError) as e:
        raise DamagedCheckpoint(path, f"cannot read: {first_line(e)}") from None
    if not isinstance(state, dict):
        raise DamagedCheckpoint(path, "not a trainer state (expected a JSON object)")
    for key, types in TRAINER_STATE_KEYS.items():
        if key not in state:
            raise DamagedCheckpoint(path, f"not a trainer state (no {key!r})")
        if not isinstance(state[key], types) or isinstance(state[key], bool):
            raise DamagedCheckpoint(path, f"{key}: unexpected value {state[key]!r}")
    for key, types in BEST_KEYS.items():
        if state["best"] is not None and not isinstance(state["best"].get(key), types):
            raise DamagedCheckpoint(path, f"best.{key}: unexpected value {state['best'].get(key)!r}")
    return state


def check_positions(state: dict, path: Path) -> None:
    """The loop's position and counters must be ones a run can reach: 0 <= global_step <= total_steps (of
    steps_per_epoch > 0), epochs_done = global_step // steps_per_epoch, at most global_step skipped steps, and a best
    epoch that ended (a multiple of steps_per_epoch) at or before global_step."""
    spe, total, step = state["steps_per_epoch"], state["total_steps"], state["global_step"]
    if spe < 1 or total < spe or total % spe:
        raise DamagedCheckpoint(path, f"impossible schedule: {spe} steps/epoch, {total} steps in all")
    if not 0 <= step <= total:
        raise DamagedCheckpoint(path, f"global_step {step} is outside 0..{total} (total_steps)")
    if "epochs_done" in state and state["epochs_done"] != step // spe:
        raise DamagedCheckpoint(path, f"epochs_done {state['epochs_done']!r} does not match global_step {step} "
                                      f"({step // spe} epochs of {spe} steps)")
    if not 0 <= state["bad_in_a_row"] <= state["bad_steps"] <= step:
        raise DamagedCheckpoint(path, f"bad_steps {state['bad_steps']} / bad_in_a_row {state['bad_in_a_row']} "
                                      f"impossible after {step} steps")
    best = state["best"]
    if best is not None and not (0 < best["step"] <= step and best["step"] % spe == 0
                                 and best["epoch"] == best["step"] // spe):
        raise DamagedCheckpoint(path, f"best epoch {best['epoch']} at step {best['step']} impossible at global_step "
                                      f"{step} ({spe} steps/epoch)")


def read_weights(path: Path, model: torch.nn.Module, device) -> dict[str, torch.Tensor]:
    """A model.safetensors whose names and shapes are this model's (not another model size's)."""
    try:
        weights = load_weights(path, device)
    except ValueError as e:  # its message names the file
        raise ValueError(f"--resume: {first_line(e)}") from None
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
    if missing or unexpected:
        raise DamagedCheckpoint(path, f"does not match this run's model (missing {missing[:3]}, unexpected "
                                      f"{unexpected[:3]}); was it written with other --tasks or heads?")
    for k, v in weights.items():
        if v.shape != own[k].shape:
            raise DamagedCheckpoint(path, f"weight {k} has shape {tuple(v.shape)}, this run's model "
                                          f"{tuple(own[k].shape)}: written by another model size?")
    return weights


def _torch_load(path: Path):
    try:
        return load_torch_file(path)  # weights_only=True; its refusal never suggests turning that off
    except ValueError as e:  # its message names the file
        raise ValueError(f"--resume: {first_line(e)}") from None


def restore(trainer, directory: Path, model: torch.nn.Module, device, tokenizer,
            best_dir: Path) -> dict[str, torch.Tensor] | None:
    """Continue from a `last` checkpoint: read and check every file, then load the weights into ``model`` and
    the rest into ``trainer`` through ``trainer.load_state_dict`` (nothing changes before every file is read).
    Returns the best epoch's weights (None before the first epoch ended): the current ones if `last` is the
    best epoch (rewriting ``best_dir`` if a kill came between the two), else ``best_dir``'s."""
    state = read_trainer_state(directory / "trainer_state.json")
    if state.get("world_size", 1) != distributed.world_size():
        raise ValueError(f"--resume: {directory} was written by a run of {state.get('world_size', 1)} process(es), "
                         f"this one has {distributed.world_size()}; resume with the same torchrun --nnodes and "
                         "--nproc_per_node (the global batch depends on them)")
    check_positions(state, directory / "trainer_state.json")
    model_state = read_weights(directory / "model.safetensors", model, device)
    optim_state = _torch_load(directory / "optimizer.pt")
    if not isinstance(optim_state, dict) or "param_groups" not in optim_state:
        raise DamagedCheckpoint(directory / "optimizer.pt", "not an optimizer state")
    extra_path = directory / "training_state.pt"
    extra = _torch_load(extra_path)
    if not isinstance(extra, dict) or any(k not in extra for k in TRAINING_STATE_KEYS):
        raise DamagedCheckpoint(extra_path, "not a training state (scheduler, rng, combiner, smart)")
    now = rng_state()
    try:  # setting it once checks it; the generators go back to where they were until train() starts
        set_rng_state(own_rng(extra))
    except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as e:
        raise DamagedCheckpoint(extra_path, f"rng: {first_line(e)}") from None
    finally:
        set_rng_state(now)

    try:
        trainer.load_state_dict({"position": state, "optimizer": optim_state, **extra})
    except StateDoesNotFit as e:
        if e.part == "position":
            raise ValueError(f"--resume: {directory} {e.what}") from None
        raise DamagedCheckpoint(directory / "optimizer.pt" if e.part == "optimizer" else extra_path,
                                f"does not fit this run: {e.what}") from None
    model.load_state_dict(model_state)
    best = state["best"]
    if best is None:
        return None
    published = published_dir(best_dir)
    tag = read_json(published / "best.json") if published is not None else None
    tag_step = tag.get("step") if isinstance(tag, dict) else None
    if best["step"] == state["global_step"]:  # the best epoch is the one `last` holds
        if tag_step != best["step"]:  # killed between writing `last` and `best`
            save_best(best_dir, model, tokenizer, {"epoch": best["epoch"], "step": best["step"], "dev": best["dev"]})
        return {k: v.detach().clone() for k, v in model.state_dict().items()}
    if tag_step == best["step"]:
        return read_weights(published / "model.safetensors", model, device)
    raise ValueError(f"--resume: {best_dir} does not hold the best epoch ({best['epoch']}) recorded in {directory}; "
                     "start over with --overwrite_output_dir")
