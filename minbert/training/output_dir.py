"""The rules of --output_dir: what a run writes there, when a folder holding a run may be reused or resumed,
and the check that a resumed run has the settings of the run it continues."""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from minbert.io import TEMP_SUFFIX, published_dir, read_json_file, remove_stale_temps
from minbert.io.settings import setting
from minbert.tasks.data import TASKS
from minbert.tasks.user_tasks import NAME as TASK_NAME
from minbert.training.legacy_settings import current_settings
from minbert.training.metrics_log import REPORT_TO


@dataclass
class OutputSettings:
    """The output group of flags: where the run writes, whether it starts over or continues, what it writes."""

    output_dir: str = setting("runs/default", help="run folder: args.json, metrics.jsonl, best/ checkpoint, "
                              "predictions/, results.json (not the current directory or a folder holding the data)")
    overwrite_output_dir: bool = setting(False, help="replace the run (finished or not) in --output_dir")
    save_steps: int = setting(200, bounds=(0, None), help="save the resumable state in OUTPUT_DIR/last every N "
                                                          "steps (0: only at epoch ends)")
    resume: bool = setting(False, help="continue the run in --output_dir from OUTPUT_DIR/last (same flags; "
                                       "bit-identical on CPU)")
    predict_only: bool = setting(False, help="no training: predict with --checkpoint")
    checkpoint: str | None = setting(None, help="with --predict_only: a minbert checkpoint directory (e.g. "
                                                "runs/default/best)")
    skip_test_predictions: bool = setting(
        False, help="do not read the test files nor write their prediction files (a run for its dev scores, "
                    "e.g. the experiments' cpu profile)")
    report_to: str = setting("none", choices=REPORT_TO,
                             help="also log metrics.jsonl's numbers as TensorBoard scalars in OUTPUT_DIR/tensorboard "
                                  "(needs: pip install tensorboard)")

# What a run writes in --output_dir (--overwrite_output_dir removes these, and nothing else, before starting).
RUN_OUTPUTS = ("args.json", "metrics.jsonl", "results.json", "last", "best", "predictions", "tensorboard")
# Flags that may differ between a run and its --resume (they do not change the trained weights).
RESUME_MAY_CHANGE = {"resume", "overwrite_output_dir", "output_dir", "save_steps", "logging_steps", "device",
                     "per_device_eval_batch_size", "max_bad_steps", "report_to", "config",
                     "skip_test_predictions", "trust_combiner_code"}


def read_json(path: Path):
    """The JSON value in ``path``, or None if it cannot be read (a missing or damaged file)."""
    try:
        return read_json_file(path)
    except (OSError, ValueError):  # DataError is a ValueError
        return None


def check_output_dir(config) -> Path | None:
    """Apply the --output_dir rules before any work is done; return the `last` checkpoint to resume from.
    ``config``: the run's run_config.RunConfig (its output group; a resume compares all its settings).

    A finished run (results.json) or an unfinished one (args.json, metrics.jsonl or last/ but no results) is
    refused unless --overwrite_output_dir (start over) or --resume (continue; a run killed before its first
    checkpoint starts from step 0, which is the same thing) is given.
    """
    output = config.output
    out = Path(output.output_dir)
    last = published_dir(out / "last")
    if output.resume:
        if last is None and ((out / "results.json").is_file() or published_dir(out / "best") is not None):
            raise ValueError(f"--resume: {out} has no last/ checkpoint to continue from (deleted?); pass "
                             "--overwrite_output_dir to start over")
        if last is not None or (out / "args.json").is_file():
            check_same_settings(config, out / "args.json")
        return last
    if output.overwrite_output_dir:
        foreign = foreign_file(out)
        if foreign is not None:
            raise ValueError(f"--overwrite_output_dir: {out} holds {foreign}, which minbert did not write; move it "
                             "away or choose another --output_dir (only a run's own files are replaced)")
        return None
    if (out / "results.json").is_file():
        raise ValueError(f"--output_dir {out} holds a finished run; pass --overwrite_output_dir to replace it")
    if last is not None or (out / "args.json").exists() or (out / "metrics.jsonl").exists():
        raise ValueError(f"--output_dir {out} holds an unfinished run; pass --resume to continue it or "
                         "--overwrite_output_dir to start over")
    return None


def setting_differences(saved: dict, config) -> list[str]:
    """The flags that change the trained weights (all but RESUME_MAY_CHANGE) whose value in a run's recorded
    settings ``saved`` (its args.json) differs from ``config``'s, as ``--key SAVED (now NOW)``. Flags absent from
    ``saved`` came with a newer minbert (their defaults cannot have been used) and are skipped. ``config``: a
    RunConfig (its flat view, :meth:`RunConfig.to_dict`, is what args.json records)."""
    saved = current_settings(saved, saved=True)  # an older minbert's names and defaults (smart_projection none)
    now = json.loads(json.dumps(config.to_dict(), default=str))
    return [f"--{k} {saved[k]} (now {now[k]})" for k in now
            if k in saved and k not in RESUME_MAY_CHANGE and not _same_value(k, saved[k], now[k])]


# Settings that name a folder: "data" and "/home/me/project/data" are the same setting when they are the same
# folder (relative paths are taken from the current directory, where the runner and --resume run).
PATH_SETTINGS = ("data_dir", "model_name_or_path")


def _same_value(key: str, saved, now) -> bool:
    if saved == now:
        return True
    if key in PATH_SETTINGS and isinstance(saved, str) and isinstance(now, str):
        a, b = Path(saved), Path(now)
        return a.exists() and b.exists() and a.resolve() == b.resolve()
    return False


def check_same_settings(config, saved_args: Path) -> None:
    """--resume: the flags that change the trained weights must be those in the run's args.json."""
    saved = read_json(saved_args)
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: cannot read {saved_args}; start over with --overwrite_output_dir")
    diffs = setting_differences(saved, config)
    if diffs:
        shown = ", ".join(diffs[:3])
        raise ValueError(f"--resume: {saved_args} was written with other settings: {shown}; resume with the same flags")


# What the package writes inside the folders of RUN_OUTPUTS (checked before --overwrite_output_dir deletes them).
CHECKPOINT_FILES = {"model.safetensors", "config.json", "multitask.json", "tokenizer.json", "best.json",
                    "optimizer.pt", "training_state.pt", "trainer_state.json"}


def _ours(folder: str, name: str) -> bool:
    """Whether a file ``name`` inside the run's ``folder`` (predictions, best, last, tensorboard) is one minbert
    writes (or a temporary file of its atomic writer)."""
    if name.startswith(".") and name.endswith(TEMP_SUFFIX):
        return True
    if folder == "predictions":  # also a task of the user's own of the run replaced (its spec may be another now)
        return any(name in (spec.prediction_file("dev"), spec.prediction_file("test")) for spec in TASKS.values()) \
            or bool(re.fullmatch(rf"({TASK_NAME.pattern})-(dev|test)-output\.csv", name))
    if folder == "tensorboard":
        return name.startswith("events.out.tfevents.")
    return name in CHECKPOINT_FILES


RUN_FOLDERS = ("last", "best", "predictions", "tensorboard")  # the RUN_OUTPUTS that are folders


def foreign_file(out: Path) -> Path | None:
    """The first file or folder that --overwrite_output_dir would delete but a run did not write (None if there is
    none): a user's notes in predictions/ or best/, a file where a run writes a folder, a folder of another program
    named like one of ours. Other entries of ``out`` (notes beside the run) are never deleted, so not checked."""
    if not out.is_dir():
        return None
    for name in RUN_FOLDERS:
        for entry in (out / name, out / f"{name}.old", out / f"{name}.partial"):
            if not (entry.exists() or entry.is_symlink()):
                continue
            if entry.is_symlink() or not entry.is_dir():
                return entry
            for inner in sorted(entry.iterdir()):
                if inner.is_dir() or not _ours(name, inner.name):
                    return inner
    return None


def clean_failed_start(config) -> None:
    """A run that failed before its first checkpoint (no last/, no results.json) removes what it wrote, so that the
    same command can start again; a later failure keeps last/ for --resume."""
    out = Path(config.output.output_dir)
    if published_dir(out / "last") is not None or (out / "results.json").exists():
        return
    _remove_outputs(out, config.output)


def _remove_outputs(out: Path, output: OutputSettings) -> None:
    keep = Path(output.checkpoint).resolve() if output.checkpoint else None  # --predict_only's
    for name in RUN_OUTPUTS:
        for path in (out / name, out / f"{name}.old", out / f"{name}.partial"):
            if keep is not None and (path.resolve() == keep or path.resolve() in keep.parents):
                continue
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif path.exists() or path.is_symlink():
                path.unlink()


def prepare_output_dir(config) -> Path:
    """Create --output_dir (after :func:`check_output_dir`); clear what killed writers left behind, and on
    --overwrite_output_dir the previous run's outputs."""
    output = config.output
    out = Path(output.output_dir)
    check_output_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    if output.overwrite_output_dir and not output.resume:
        _remove_outputs(out, output)  # check_output_dir made sure nothing else is there
    for directory in (out, out / "predictions"):
        remove_stale_temps(directory)
    return out
