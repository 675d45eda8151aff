"""Output folders never lose data (issue 22): a --config file cannot delete a run or run code,
--overwrite_output_dir deletes only the package's files, one process per folder (folder_lock), a run that fails
before its first checkpoint leaves the folder as it found it, and an impossible resumable position is refused.
Seeded fuzz cases for each class."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from minbert.cli import apply_config_file, train_main, train_parser
from minbert.io.folder_lock import LOCK_NAME, FolderInUse, folder_lock, lock_beside
from minbert.training.checkpoint_state import DamagedCheckpoint, check_positions
from minbert.training.config_file import COMMAND_LINE_ONLY
from minbert.training.output_dir import (RUN_OUTPUTS, OutputSettings, check_output_dir, clean_failed_start,
                                         foreign_file, prepare_output_dir)
from minbert.training.run_config import RunConfig

from .conftest import ROOT

SEED = 20261203


def _finished_run(out: Path) -> None:
    """The files of a finished run (enough for the output-folder rules)."""
    (out / "predictions").mkdir(parents=True)
    (out / "best").mkdir()
    (out / "predictions" / "sst-dev-output.csv").write_text("id \t Predicted_Sentiment \n")
    (out / "best" / "model.safetensors").write_bytes(b"x")
    (out / "best" / "best.json").write_text("{}")
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text("")
    (out / "results.json").write_text('{"dev": {}}')


# ------------------------------------------------------------------------------------------ --config reuse
def test_a_config_file_cannot_set_overwrite_resume_or_trust(tmp_path, capsys):
    run = tmp_path / "run"
    _finished_run(run)
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"output_dir": str(run), "overwrite_output_dir": True, "resume": True,
                                  "trust_combiner_code": True, "combiner": "x.py:C", "learning_rate": 5e-5}))
    p = train_parser()
    from_file = apply_config_file(p, ["--config", str(config)])
    args = p.parse_args(["--config", str(config)])
    assert (args.overwrite_output_dir, args.resume, args.trust_combiner_code) == (False, False, False)
    assert args.learning_rate == 5e-5 and args.combiner == "x.py:C" and "overwrite_output_dir" not in from_file
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("note: ") and all(k in err for k in COMMAND_LINE_ONLY)
    with pytest.raises(ValueError, match="holds a finished run"):  # the run is refused, never deleted
        check_output_dir(RunConfig.from_namespace(args))
    assert (run / "results.json").is_file()


def test_reusing_a_config_with_one_flag_changed_never_deletes_the_run(tmp_path, small_data, capsys):
    run = tmp_path / "run"
    _finished_run(run)
    config = tmp_path / "args.json"
    config.write_text(json.dumps({"output_dir": str(run), "overwrite_output_dir": True, "data_dir": str(small_data),
                                  "model_name_or_path": "bert-tiny"}))
    assert train_main(["--config", str(config), "--learning_rate", "5e-5"]) == 1
    assert "holds a finished run; pass --overwrite_output_dir" in capsys.readouterr().err
    assert sorted(p.name for p in run.iterdir()) == sorted(["args.json", "best", "metrics.jsonl", "predictions",
                                                            "results.json"])


@pytest.mark.parametrize("key", COMMAND_LINE_ONLY)
def test_command_line_only_keys_keep_their_type_check(tmp_path, key):
    config = tmp_path / "c.json"
    config.write_text(json.dumps({key: "yes"}))
    with pytest.raises(SystemExit):
        apply_config_file(train_parser(), ["--config", str(config)])


def test_config_combiner_is_never_imported(tmp_path, small_data, capsys):
    marker = tmp_path / "ran"
    code = tmp_path / "evil.py"
    code.write_text(f"open({str(marker)!r}, 'w').write('x')\nclass C:\n    def step(self, ctx):\n        return {{}}\n")
    config = tmp_path / "c.json"
    config.write_text(json.dumps({"combiner": f"{code}:C", "trust_combiner_code": True, "data_dir": str(small_data)}))
    out = tmp_path / "out"
    for extra in ([], ["--predict_only", "--checkpoint", str(tmp_path)], ["--trust_combiner_code", "--seed", "-1"]):
        with pytest.raises(SystemExit):
            train_main(["--config", str(config), "--output_dir", str(out), *extra])
        err = capsys.readouterr().err
        assert not marker.exists(), extra  # not by the file, not with --predict_only, not in a run failing validation
        if not extra:
            assert f"combiner {code}:C: names code to import and run; pass --trust_combiner_code on the command " \
                   "line if you trust it" in err
    assert not out.exists()


# ------------------------------------------------------------------------------------------ --overwrite_output_dir
FOREIGN = [("predictions", "my-notes.md"), ("best", "README"), ("last", "extra.bin"), ("tensorboard", "notes"),
           ("predictions", "sub", "x"), ("best", "model.safetensors.bak"), ("last.old", "x.txt")]


@pytest.mark.parametrize("case", range(12))
def test_overwrite_refuses_a_folder_with_foreign_files(tmp_path, case):
    rng = random.Random(SEED + case)
    out = tmp_path / "run"
    _finished_run(out)
    parts = rng.choice(FOREIGN)
    path = out.joinpath(*parts)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("the user's") if rng.random() < 0.8 else path.mkdir()
    config = RunConfig(output=OutputSettings(output_dir=str(out), overwrite_output_dir=True))
    with pytest.raises(ValueError) as e:
        prepare_output_dir(config)
    assert "minbert did not write" in str(e.value) and str(out / parts[0] / parts[1]) in str(e.value)
    assert path.exists() and (out / "results.json").exists()  # nothing deleted


def test_overwrite_deletes_only_the_runs_files(tmp_path):
    out = tmp_path / "run"
    _finished_run(out)
    (out / LOCK_NAME).write_text("")
    (out / ".results.json.abc.tmp").write_text("")  # a killed writer's temporary file
    (out / "notes.txt").write_text("mine")  # beside the run: kept, never deleted
    (out / "predictions" / ".sst-dev-output.csv.x.tmp").write_text("")
    assert foreign_file(out) is None
    config = RunConfig(output=OutputSettings(output_dir=str(out), overwrite_output_dir=True))
    prepare_output_dir(config)
    assert sorted(p.name for p in out.iterdir()) == [LOCK_NAME, "notes.txt"]
    (out / "best").write_text("a file where a run writes a folder")
    with pytest.raises(ValueError, match="best, which minbert did not write"):
        prepare_output_dir(config)


# ------------------------------------------------------------------------------------------ failed starts
def test_a_failed_start_leaves_nothing_that_blocks_the_same_command(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "args.json").write_text("{}")
    (out / "metrics.jsonl").write_text("{}\n")
    (out / "predictions").mkdir()
    (out / "keep.txt").write_text("mine")
    config = RunConfig(output=OutputSettings(output_dir=str(out)))
    clean_failed_start(config)
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    check_output_dir(config)  # the same command may start again
    (out / "last").mkdir()  # after the first checkpoint the run is kept for --resume
    (out / "args.json").write_text("{}")
    clean_failed_start(config)
    assert (out / "args.json").exists()


# ------------------------------------------------------------------------------------------ the folder lock
def test_a_second_process_on_the_same_folder_gets_one_line_with_the_pid(tmp_path):
    out = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from minbert.io.folder_lock import folder_lock\n"
        f"with folder_lock({str(out)!r}):\n    print('locked', flush=True); time.sleep(60)\n")],
        stdout=subprocess.PIPE, text=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(FolderInUse) as e:
            with folder_lock(out):
                pass
        assert str(e.value) == (f"--output_dir {out} is in use by another minbert process (pid {holder.pid}); wait "
                                "for it to finish or choose another folder")
    finally:
        holder.kill()
        holder.wait()
    with folder_lock(out):  # a killed holder released it: no stale lock
        pass
    assert list(out.iterdir()) == []  # the killed holder's lock file is gone too


def test_the_lock_is_exclusive_in_one_process_and_removes_a_folder_it_created(tmp_path):
    out = tmp_path / "new" / "run"
    with folder_lock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
        with pytest.raises(FolderInUse):
            with folder_lock(out):
                pass
    assert not out.exists()  # created for a run that wrote nothing: gone again
    out.mkdir(parents=True)
    (out / "notes.txt").write_text("")
    with folder_lock(out):
        pass
    assert [p.name for p in out.iterdir()] == ["notes.txt"]  # the folder as it was found: no lock file left
    target = tmp_path / "export"
    with lock_beside(target):
        assert (tmp_path / f".export{LOCK_NAME}").exists() and not target.exists()
        with pytest.raises(FolderInUse, match="--out"):
            with lock_beside(target):
                pass
    assert not (tmp_path / f".export{LOCK_NAME}").exists()


def test_training_holds_the_lock(tmp_path, small_data, capsys):
    out = tmp_path / "run"
    with folder_lock(out):
        code = train_main(["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data),
                           "--output_dir", str(out), "--device", "cpu"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == (f"error: --output_dir {out} is in use by another minbert process (pid {os.getpid()}); wait "
                       "for it to finish or choose another folder")


# ------------------------------------------------------------------------------------------ impossible positions
def _state(**changes) -> dict:
    state = {"global_step": 6, "epochs_done": 2, "steps_per_epoch": 3, "total_steps": 9, "bad_steps": 1,
             "bad_in_a_row": 0, "best": {"score": 0.5, "epoch": 2, "step": 6, "dev": {}}}
    state.update(changes)
    return state


def test_possible_positions_pass():
    check_positions(_state(), Path("t.json"))
    check_positions(_state(global_step=0, epochs_done=0, bad_steps=0, best=None), Path("t.json"))
    check_positions(_state(global_step=9, epochs_done=3), Path("t.json"))


@pytest.mark.parametrize("case", range(16))
def test_impossible_positions_are_refused(case):
    rng = random.Random(SEED + 100 + case)
    change = rng.choice([
        {"global_step": rng.choice([-1, 10, 10**9])}, {"epochs_done": rng.choice([0, 1, 3, 7])},
        {"steps_per_epoch": 0}, {"total_steps": rng.choice([0, 2, 10])}, {"bad_steps": 7},
        {"bad_in_a_row": 2, "bad_steps": 1}, {"best": {"score": 1, "epoch": 3, "step": 9, "dev": {}}},
        {"best": {"score": 1, "epoch": 1, "step": 4, "dev": {}}}, {"best": {"score": 1, "epoch": 2, "step": 3, "dev": {}}},
    ])
    with pytest.raises(DamagedCheckpoint) as e:
        check_positions(_state(**change), Path("last/trainer_state.json"))
    assert str(e.value).startswith("--resume: last/trainer_state.json: ") and "\n" not in str(e.value)


def test_run_outputs_cover_what_a_run_writes():
    assert {"args.json", "results.json", "best", "last", "predictions"} <= set(RUN_OUTPUTS)
