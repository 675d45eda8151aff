"""The Trainer's resumable state is one state_dict() / load_state_dict() pair (minbert/training/trainer_state.py), and
minbert/training/checkpoint_state.py reaches the trainer through that pair only."""
from __future__ import annotations

import ast
import copy

import torch

from minbert.cli import train_parser
from minbert.model.tokenizer import load_tokenizer
from minbert.tasks.data import load_task, tensorize
from minbert.training.metrics_log import MetricsLog
from minbert.training.run import build_model
from minbert.training.run_config import RunConfig
from minbert.training.trainer import Trainer

from .conftest import ROOT

# PCGrad's generator, M-FAC's window, SMART's Bregman EMA copy and dropout: state beyond a plain AdamW's.
STATEFUL = ["--combiner", "pcgrad", "--optim", "mfac", "--optim_args", "num_grads: 4", "--smart", "--bregman",
            "--smart_steps", "1"]


def make_trainer(small_data, out) -> Trainer:
    argv = ["--model_name_or_path", "bert-tiny", "--seed", "5", "--max_seq_length", "32", "--bf16", "off",
            "--per_device_train_batch_size", "4", "--max_steps_per_epoch", "2", "--num_train_epochs", "2",
            "--save_steps", "1", *STATEFUL]
    args = RunConfig.from_namespace(train_parser().parse_args(argv))
    tokenizer = load_tokenizer("bert-tiny", 32)
    model = build_model(args)
    data = {split: {t: tensorize(load_task(t, split, small_data, max_samples=8), tokenizer, model.config.encoding(t))
                    for t in args.tasks} for split in ("train", "dev")}
    out.mkdir()
    return Trainer(args, model, data["train"], data["dev"], torch.device("cpu"), tokenizer, out,
                   MetricsLog(out / "metrics.jsonl"))


def assert_same(a, b, where="state"):
    """Equal, tensors bit for bit, recursively."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and list(a) == list(b), f"{where}: keys {list(a)} != {list(b)}"
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def without_clock(state: dict) -> dict:
    """The state less the epoch's wall-clock seconds, which no two runs share."""
    return {**state, "position": {k: v for k, v in state["position"].items() if k != "epoch_seconds"}}


def test_state_dict_round_trips_and_a_fresh_trainer_continues_identically(small_data, tmp_path, one_thread,
                                                                           monkeypatch):
    snapshots: dict[int, dict[int, tuple[dict, dict]]] = {}

    def snapshot(self):  # Trainer.save_last, after every step (--save_steps 1): the state and the weights
        weights = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        snapshots.setdefault(id(self), {})[self.global_step] = (copy.deepcopy(self.state_dict()), weights)

    monkeypatch.setattr(Trainer, "save_last", snapshot)
    full = make_trainer(small_data, tmp_path / "full")
    full.train()
    taken = snapshots[id(full)]
    assert sorted(taken) == [1, 2, 3, 4]
    state, weights = taken[3]  # mid-epoch 2, after epoch 1's best was recorded
    assert state["position"]["global_step"] == 3 and state["position"]["best"]["epoch"] == 1
    assert state["combiner"]["generators"] and state["smart"]["state"]["ema"] and "mfac" in state["optimizer"]

    fresh = make_trainer(small_data, tmp_path / "fresh")
    fresh.model.load_state_dict(weights)
    fresh.load_state_dict(copy.deepcopy(state))
    again = fresh.state_dict()
    assert_same(without_clock({**again, "rng": None}), without_clock({**state, "rng": None}))
    assert again["position"]["epoch_seconds"] == state["position"]["epoch_seconds"]
    fresh.train()  # sets the saved generators first, then steps 4 (the last)
    end, end_weights = snapshots[id(fresh)][4]
    assert_same(end_weights, taken[4][1], "weights")
    assert_same(without_clock(end), without_clock(taken[4][0]))


def test_a_state_for_another_schedule_is_refused_before_anything_changes(small_data, tmp_path, one_thread):
    from minbert.training.checkpoint_state import StateDoesNotFit

    trainer = make_trainer(small_data, tmp_path / "a")
    state = trainer.state_dict()
    state["position"] = {**state["position"], "steps_per_epoch": 3, "total_steps": 6}
    before = copy.deepcopy(trainer.optimizer.state_dict())
    try:
        trainer.load_state_dict(state)
    except StateDoesNotFit as e:
        assert e.part == "position" and "3 steps/epoch and 6 in all, this run 2 and 4" in e.what
    else:
        raise AssertionError("a state of another schedule was taken")
    assert_same(trainer.optimizer.state_dict(), before)


# ------------------------------------------------------------------------------------------ the one door
def trainer_attributes() -> set[str]:
    """Every attribute a Trainer has: its methods and what its code assigns to ``self.<name>``."""
    names = {n for n in dir(Trainer) if not n.startswith("__")}
    for name in ("trainer.py", "trainer_state.py"):
        for node in ast.walk(ast.parse((ROOT / "minbert" / "training" / name).read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "self":
                names.add(node.attr)
    return names


def trainer_accesses(source: str, allowed=frozenset({"state_dict", "load_state_dict"})) -> list[str]:
    """``x.<name>`` in ``source`` for every name of a Trainer attribute but the allowed ones."""
    attributes = trainer_attributes() - allowed
    return sorted({f"line {n.lineno}: .{n.attr}" for n in ast.walk(ast.parse(source))
                   if isinstance(n, ast.Attribute) and n.attr in attributes})


def test_the_access_check_finds_a_planted_access():
    assert trainer_accesses("def save(trainer):\n    x = trainer.global_step\n    trainer._rng_to_restore = 1\n") \
        == ["line 2: .global_step", "line 3: ._rng_to_restore"]
    assert trainer_accesses("def save(trainer):\n    trainer.load_state_dict(trainer.state_dict())\n") == []


def test_checkpoint_state_reaches_the_trainer_only_through_its_state_dict():
    source = (ROOT / "minbert" / "training" / "checkpoint_state.py").read_text(encoding="utf-8")
    assert trainer_accesses(source) == []


# ------------------------------------------------------------------------------------------ last/ on disk
# The files of last/ and their keys as d915111 wrote them: a last/ of that version resumes with this one.
LAST_FILES = ["config.json", "model.safetensors", "multitask.json", "optimizer.pt", "tokenizer.json",
              "trainer_state.json", "training_state.pt"]
POSITION_KEYS = ["global_step", "epochs_done", "steps_per_epoch", "total_steps", "best", "bad_steps", "bad_in_a_row",
                 "running", "epoch_examples", "epoch_seconds", "world_size"]


def test_last_keeps_its_layout_and_restores_the_state_dict(small_data, tmp_path, one_thread):
    import json

    trainer = make_trainer(small_data, tmp_path / "run")
    trainer.model.train()
    trainer.train_step(0)
    trainer.global_step = 1
    trainer.save_last()
    last = tmp_path / "run" / "last"
    assert sorted(p.name for p in last.iterdir()) == LAST_FILES
    assert list(json.loads((last / "trainer_state.json").read_text())) == POSITION_KEYS
    assert list(torch.load(last / "training_state.pt", weights_only=True)) == ["scheduler", "rng", "combiner", "smart"]
    saved = trainer.state_dict()

    fresh = make_trainer(small_data, tmp_path / "fresh")
    fresh.out_dir = tmp_path / "run"
    fresh.restore(last)
    assert fresh.last_saved_step == 1 and fresh.best_state is None
    assert_same({**fresh.state_dict(), "rng": None}, {**saved, "rng": None})
    assert_same(fresh.model.state_dict(), trainer.model.state_dict(), "weights")
