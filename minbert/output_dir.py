"""The rules of --output_dir: what a run writes there, when a folder holding a run may be reused or resumed,
and the check that a resumed run has the settings of the run it continues."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

from .io import published_dir, read_json_file, remove_stale_temps

# What a run writes in --output_dir (--overwrite_output_dir removes these, and nothing else, before starting).
RUN_OUTPUTS = ("args.json", "metrics.jsonl", "results.json", "last", "best", "predictions", "tensorboard")
# Flags that may differ between a run and its --resume (they do not change the trained weights).
RESUME_MAY_CHANGE = {"resume", "overwrite_output_dir", "output_dir", "save_steps", "logging_steps", "device",
                     "per_device_eval_batch_size", "max_bad_steps", "report_to", "config",
                     "skip_test_predictions"}


def settings(config) -> dict:
    """The flags and values of a RunConfig or an argparse namespace, as args.json holds them."""
    return config.to_dict() if hasattr(config, "to_dict") else dict(vars(config))


def read_json(path: Path):
    """The JSON value in ``path``, or None if it cannot be read (a missing or damaged file)."""
    try:
        return read_json_file(path)
    except (OSError, ValueError):  # DataError is a ValueError
        return None


def check_output_dir(config) -> Path | None:
    """Apply the --output_dir rules before any work is done; return the `last` checkpoint to resume from.

    A finished run (results.json) or an unfinished one (args.json, metrics.jsonl or last/ but no results) is
    refused unless --overwrite_output_dir (start over) or --resume (continue; a run killed before its first
    checkpoint starts from step 0, which is the same thing) is given.
    """
    out = Path(config.output_dir)
    last = published_dir(out / "last")
    if getattr(config, "resume", False):
        if last is None and ((out / "results.json").is_file() or published_dir(out / "best") is not None):
            raise ValueError(f"--resume: {out} has no last/ checkpoint to continue from (deleted?); pass "
                             "--overwrite_output_dir to start over")
        if last is not None or (out / "args.json").is_file():
            check_same_settings(config, out / "args.json")
        return last
    if config.overwrite_output_dir:
        return None
    if (out / "results.json").is_file():
        raise ValueError(f"--output_dir {out} holds a finished run; pass --overwrite_output_dir to replace it")
    if last is not None or (out / "args.json").exists() or (out / "metrics.jsonl").exists():
        raise ValueError(f"--output_dir {out} holds an unfinished run; pass --resume to continue it or "
                         "--overwrite_output_dir to start over")
    return None


def check_same_settings(config, saved_args: Path) -> None:
    """--resume: the flags that change the trained weights must be those in the run's args.json."""
    from .run_config import current_settings

    saved = read_json(saved_args)
    if not isinstance(saved, dict):
        raise ValueError(f"--resume: cannot read {saved_args}; start over with --overwrite_output_dir")
    saved = current_settings(saved, saved=True)  # an older minbert's names and defaults (smart_projection none)
    now = json.loads(json.dumps(settings(config), default=str))
    # Flags absent from the saved file came with a newer minbert; their defaults cannot have been used.
    diffs = [k for k in now if k in saved and k not in RESUME_MAY_CHANGE and saved[k] != now[k]]
    if diffs:
        shown = ", ".join(f"--{k} {saved[k]} (now {now[k]})" for k in diffs[:3])
        raise ValueError(f"--resume: {saved_args} was written with other settings: {shown}; resume with the same flags")


def prepare_output_dir(config) -> Path:
    """Create --output_dir (after :func:`check_output_dir`); clear what killed writers left behind, and on
    --overwrite_output_dir the previous run's outputs."""
    out = Path(config.output_dir)
    check_output_dir(config)
    out.mkdir(parents=True, exist_ok=True)
    if config.overwrite_output_dir and not getattr(config, "resume", False):
        keep = Path(config.checkpoint).resolve() if getattr(config, "checkpoint", None) else None  # --predict_only's
        for name in RUN_OUTPUTS:
            for path in (out / name, out / f"{name}.old", out / f"{name}.partial"):
                if keep is not None and (path.resolve() == keep or path.resolve() in keep.parents):
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                elif path.exists():
                    path.unlink()
    for directory in (out, out / "predictions"):
        remove_stale_temps(directory)
    return out
