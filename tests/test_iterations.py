"""--iterations_multiplier K (the report's §4.5): an epoch has K x (smallest task's batches) steps; smaller tasks
cycle through their data (each pass freshly shuffled); larger tasks keep drawing unseen examples across epochs."""
from collections import Counter

import pytest

from minbert.tasks.data import TASKS
from minbert.training.run import run
from minbert.training.run_config import RunConfig
from minbert.training.trainer import Trainer

from .conftest import DATA, write_slice

SIZES = {"sst": 20, "qqp": 48, "sts": 12}  # batch 4: 5, 12 and 3 batches per pass
BATCH, K, EPOCHS = 4, 2, 2


@pytest.fixture
def uneven_data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    for task in SIZES:  # the three default tasks (sst2 shares the SST files)
        for split, name in TASKS[task].files.items():
            write_slice(DATA / name, d / name, SIZES[task] if split == "train" else 8)
    return d


def test_iterations_multiplier_semantics(uneven_data, tmp_path, monkeypatch):
    seen: list[dict[str, list[int]]] = []  # per step: the training examples each task's batch holds
    original = Trainer.train_step

    def recording_train_step(self, step):
        assert step == len(seen)  # the loop numbers its steps 0, 1, 2, ... across epochs
        seen.append({t: list(self.streams[t].indices(step)) for t in self.tasks})
        return original(self, step)

    monkeypatch.setattr(Trainer, "train_step", recording_train_step)
    config = RunConfig.from_flags([
        "--model_name_or_path", "bert-tiny", "--data_dir", str(uneven_data), "--iterations_multiplier", str(K),
        "--per_device_train_batch_size", str(BATCH), "--num_train_epochs", str(EPOCHS), "--combiner", "sum",
        "--output_dir", str(tmp_path / "run"),
    ])
    run(config)

    steps_per_epoch = K * min(-(-n // BATCH) for n in SIZES.values())  # K x smallest task's batches = 2 x 3
    assert steps_per_epoch == 6
    assert len(seen) == EPOCHS * steps_per_epoch
    epochs = [seen[e * steps_per_epoch:(e + 1) * steps_per_epoch] for e in range(EPOCHS)]

    def examples(steps, task):
        return Counter(i for s in steps for i in s[task])

    # STS, the smallest task, cycles: every example exactly K times per epoch, each pass a fresh shuffle
    for ep in epochs:
        assert examples(ep, "sts") == Counter({i: K for i in range(SIZES["sts"])})
    passes = [[tuple(s["sts"]) for s in seen[p * 3:(p + 1) * 3]] for p in range(4)]
    assert len(set(map(tuple, passes))) > 1

    # QQP (12 batches per pass) is larger than an epoch (6 steps): epoch 2 draws only examples epoch 1 did not see
    first, second = examples(epochs[0], "qqp"), examples(epochs[1], "qqp")
    assert max(first.values()) == 1 and max(second.values()) == 1
    assert not set(first) & set(second)
    assert set(first) | set(second) == set(range(SIZES["qqp"]))

    # SST (5 batches per pass) starts its second pass inside epoch 1 and continues it, not restarts it, in epoch 2
    sst_all = examples(seen, "sst")
    assert sum(sst_all.values()) == EPOCHS * steps_per_epoch * BATCH
    assert set(sst_all.values()) <= {2, 3}  # 12 batches = 2 full passes + 2 batches of the third
    # step 6 (epoch 2's first) is batch 1 of pass 1: the pass epoch 1 began at step 5
    assert set(seen[5]["sst"]) | set(seen[6]["sst"]) | set(seen[7]["sst"]) | set(seen[8]["sst"]) | \
        set(seen[9]["sst"]) == set(range(SIZES["sst"]))


def test_steps_per_epoch_is_capped_by_max_steps_per_epoch(uneven_data, tmp_path, monkeypatch):
    counted = []
    monkeypatch.setattr(Trainer, "train_step", lambda self, step: counted.append(step) or {})
    config = RunConfig.from_flags([
        "--model_name_or_path", "bert-tiny", "--data_dir", str(uneven_data), "--iterations_multiplier", "3",
        "--per_device_train_batch_size", str(BATCH), "--num_train_epochs", "1", "--max_steps_per_epoch", "4",
        "--output_dir", str(tmp_path / "run"),
    ])
    run(config)
    assert counted == [0, 1, 2, 3]  # min(3 x 3, 4)
