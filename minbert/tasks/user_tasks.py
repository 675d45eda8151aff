"""Tasks of the user's own: a small JSON file (``--task_spec my_tasks.json``, docs/tasks.md) declares them, and
each becomes a :class:`minbert.tasks.registry.TaskSpec` that trains beside the run's built-in tasks.

The file is one JSON object, ``{"tasks": [TASK, ...]}``; a TASK is an object with the keys of :data:`KEYS`.
It is checked whole before anything is read or written: every mistake is one line naming the file and the key
(``my_tasks.json: tasks[1].num_labels: must be an integer >= 2``). What a run keeps is the checked *content*
(:func:`parse_task_spec`, every default filled in), never the path: args.json holds it as ``task_spec`` and each
checkpoint's multitask.json as ``task_spec``, so that ``--resume``, ``--predict_only``, ``minbert.load``,
minbert-predict and evaluate.py rebuild the tasks without the file.

This module imports only minbert.tasks.registry (which every module may read) and minbert.io.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from minbert.io import DataError, read_json_file, read_text_file
from minbert.tasks.registry import METRIC_RANGES, OVERALL, TASKS, TaskSpec, register_user_tasks

INPUTS = {"sentence": ("sentence",), "pair": ("sentence1", "sentence2")}  # input -> its default text columns
KINDS = {"classification": "accuracy", "regression": "pearson"}  # kind -> its metric (the one it may have)
LABEL_COLUMN = "label"  # the label column's default name
SPLIT_NAMES = ("train", "dev", "test")
# Every key of a task, and whether it must be given; the others have defaults.
KEYS = {"name": True, "input": True, "kind": True, "num_labels": False, "score_range": False, "metric": False,
        "files": True, "text_columns": False, "label_column": False}
NAME = re.compile(r"[a-z][a-z0-9_]{0,39}")  # a word that is safe in a file name (NAME-dev-output.csv)


class TaskSpecError(ValueError):
    """A task spec is wrong; the message is one line naming its source and key."""


def read_task_spec(path: str | Path) -> dict:
    """The checked content of a task spec file (:func:`parse_task_spec`); TaskSpecError naming the file."""
    try:  # a FIFO or a directory is refused without blocking, invalid UTF-8 named by line, a BOM dropped
        text = read_text_file(path)
    except DataError as e:
        raise TaskSpecError(str(e)) from None
    try:
        content = json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskSpecError(f"{path}:{e.lineno}: not JSON ({e.msg})") from None
    return parse_task_spec(content, str(path))


def parse_task_spec(content, source: str = "task_spec") -> dict:
    """``content`` (the JSON value of a spec file, or a dict from Python) checked and with every default filled in:
    ``{"tasks": [TASK, ...]}``. A mistake is a TaskSpecError ``SOURCE: tasks[i].key: what is wrong``."""
    if not isinstance(content, dict) or set(content) != {"tasks"}:
        raise TaskSpecError(f"{source}: expected a JSON object {{\"tasks\": [...]}}, got {_show(content)}")
    tasks = content["tasks"]
    if not isinstance(tasks, list) or not tasks:
        raise TaskSpecError(f"{source}: tasks: expected a non-empty list of task objects, got {_show(tasks)}")
    out, seen = [], {}
    for i, task in enumerate(tasks):
        entry = _parse_task(task, f"{source}: tasks[{i}]")
        if entry["name"] in seen:
            raise TaskSpecError(f"{source}: tasks[{i}].name: {entry['name']!r} is also tasks[{seen[entry['name']]}]")
        seen[entry["name"]] = i
        out.append(entry)
    return {"tasks": out}


def _parse_task(task, where: str) -> dict:
    if not isinstance(task, dict):
        raise TaskSpecError(f"{where}: expected a JSON object, got {_show(task)}")
    unknown = [k for k in task if k not in KEYS]
    if unknown:
        raise TaskSpecError(f"{where}: unknown key {unknown[0]!r} (known: {', '.join(KEYS)})")
    missing = [k for k, required in KEYS.items() if required and k not in task]
    if missing:
        raise TaskSpecError(f"{where}: missing key {missing[0]!r}")

    def fail(key: str, what: str):
        raise TaskSpecError(f"{where}.{key}: {what}")

    name = task["name"]
    if not isinstance(name, str) or not NAME.fullmatch(name):
        fail("name", f"must be a word of lower-case letters, digits and _ starting with a letter (at most 40), "
                     f"got {_show(name)}")
    taken = {OVERALL} | {t for t, s in TASKS.items() if not s.user} | {s.output_prefix for s in TASKS.values()
                                                                        if not s.user}
    if name in taken:
        fail("name", f"{name!r} is a built-in task or prediction file name; choose another")
    entry = {"name": name, "input": _choice(task["input"], INPUTS, "input", fail),
             "kind": _choice(task["kind"], KINDS, "kind", fail)}
    classes = entry["kind"] == "classification"
    if classes:
        n = task.get("num_labels")
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            fail("num_labels", f"must be an integer >= 2 (a classification task's number of classes), got {_show(n)}")
        if "score_range" in task:
            fail("score_range", "is for kind regression (a classification task has num_labels)")
        entry["num_labels"] = n
    else:
        r = task.get("score_range")
        if not (isinstance(r, list) and len(r) == 2 and all(_is_number(x) for x in r) and r[0] < r[1]):
            fail("score_range", f"must be [low, high], two finite numbers with low < high, got {_show(r)}")
        if "num_labels" in task:
            fail("num_labels", "is for kind classification (a regression task has score_range)")
        entry["score_range"] = [float(r[0]), float(r[1])]
    metric = task.get("metric", KINDS[entry["kind"]])
    if metric not in METRIC_RANGES:
        fail("metric", f"unknown metric {_show(metric)} (choose from {', '.join(METRIC_RANGES)})")
    if metric != KINDS[entry["kind"]]:
        fail("metric", f"{metric} does not score a {entry['kind']} task (use {KINDS[entry['kind']]})")
    entry["metric"] = metric
    files = task["files"]
    if not isinstance(files, dict) or set(files) != set(SPLIT_NAMES):
        fail("files", f"expected an object with exactly the keys train, dev, test, got {_show(files)}")
    for split in SPLIT_NAMES:
        f = files[split]
        if not isinstance(f, str) or not f.strip() or f in (".", "..") or "/" in f or "\\" in f or "\x00" in f:
            fail(f"files.{split}", f"expected a file name in --data_dir (no folder), got {_show(f)}")
    entry["files"] = {split: files[split] for split in SPLIT_NAMES}
    columns = task.get("text_columns", list(INPUTS[entry["input"]]))
    want = len(INPUTS[entry["input"]])
    if not (isinstance(columns, list) and len(columns) == want and all(_is_word(c) for c in columns)
            and len(set(columns)) == want):
        fail("text_columns", f"expected {want} distinct column name(s) for input {entry['input']}, got {_show(columns)}")
    label = task.get("label_column", LABEL_COLUMN)
    if not _is_word(label) or label in columns or label == "id":
        fail("label_column", f"expected a column name other than id and the text columns, got {_show(label)}")
    entry.update(text_columns=list(columns), label_column=label)
    return entry


def _choice(value, choices, key: str, fail) -> str:
    if not isinstance(value, str) or value not in choices:
        fail(key, f"unknown {key} {_show(value)} (choose from {', '.join(choices)})")
    return value


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _is_word(x) -> bool:
    return isinstance(x, str) and bool(x.strip()) and x == x.strip() and not any(c in x for c in "\t\n\r\"")


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) or math.isfinite(value) else str(value)
    return text if len(text) <= 60 else text[:60] + "..."


def task_specs(content: dict | None) -> list[TaskSpec]:
    """The TaskSpecs of checked content (:func:`parse_task_spec`), in the file's order."""
    out = []
    for t in (content or {}).get("tasks", []):
        classes = t["kind"] == "classification"
        out.append(TaskSpec(
            t["name"], dict(t["files"]), tuple(t["text_columns"]), t["label_column"],
            "class" if classes else "score", num_labels=t.get("num_labels", 0),
            score_range=tuple(t.get("score_range", (0.0, 0.0))), output_prefix=t["name"],
            prediction_header="Predicted_Label" if classes else "Predicted_Score",
            head="classify" if classes else "regress", metric=t["metric"],
            table_label=f"{t['name']} {'acc' if classes else 'r'}", user=True,
        ))
    return out


def declare(content: dict | None) -> list[str]:
    """Register the tasks of checked content for this process (tasks.register_user_tasks); their names."""
    specs = task_specs(content)
    register_user_tasks(specs)
    return [s.name for s in specs]


def spec_names(content: dict | None) -> list[str]:
    return [t["name"] for t in (content or {}).get("tasks", [])]


def run_tasks(data) -> list[str]:
    """The tasks a run trains (``data``: its data_settings.DataSettings): ``--tasks``, then the tasks of its
    ``--task_spec`` (checked content, as RunConfig.validate leaves it)."""
    spec = data.task_spec
    return [*data.tasks, *spec_names(spec if isinstance(spec, dict) else None)]


def check_data_files(content: dict, data_dir: str | Path, source: str, splits=SPLIT_NAMES) -> None:
    """Every file of ``splits`` the spec names exists in ``data_dir`` (else a TaskSpecError naming source and key)."""
    for i, t in enumerate(content["tasks"]):
        for split, name in t["files"].items():
            if split not in splits:
                continue
            path = Path(data_dir) / name
            if not path.is_file():
                raise TaskSpecError(f"{source}: tasks[{i}].files.{split}: {path}: no such file")


def checked_task_spec(spec, where: str, data_dir: str | Path, predict_only: bool = False) -> dict | None:
    """RunConfig's --task_spec: a file's path (the command line) or its content (args.json, Python), as checked
    content whose data files exist (a --predict_only run reads no training file)."""
    if spec is None:
        return None
    content = read_task_spec(spec) if isinstance(spec, str) else parse_task_spec(spec, where)
    check_data_files(content, data_dir, spec if isinstance(spec, str) else where,
                     SPLIT_NAMES[1:] if predict_only else SPLIT_NAMES)
    return content


def stored_task_spec(run_dir: str | Path) -> dict | None:
    """The task spec a training run stored in its args.json (``run_dir``: the run folder), or None."""
    return _spec_in(Path(run_dir) / "args.json")


def checkpoint_task_spec(directory: str | Path) -> dict | None:
    """The task spec a checkpoint stored in its multitask.json (``directory``: the checkpoint, as
    multitask.resolve_checkpoint names it): the tasks of the user's own it has heads for, or None. A file that
    cannot be read is left to MultitaskBert.load, which names it when it reads the checkpoint."""
    return _spec_in(Path(directory) / "multitask.json")


def _spec_in(path: Path) -> dict | None:
    try:
        saved = read_json_file(path)  # the package's one JSON gate: never blocks on a FIFO
    except ValueError:  # DataError: unreadable, or not JSON
        return None
    spec = saved.get("task_spec") if isinstance(saved, dict) else None
    return parse_task_spec(spec, f"{path}: task_spec") if spec is not None else None


def spec_difference(given: dict | None, stored: dict | None) -> str | None:
    """What differs between two checked specs, ``given`` (the command line's) and ``stored`` (a checkpoint's), in
    words (``tasks[0].num_labels is 3 here, 2 in the checkpoint``); None if they declare the same tasks (in any
    order)."""
    mine = {t["name"]: t for t in (given or {}).get("tasks", [])}
    theirs = {t["name"]: t for t in (stored or {}).get("tasks", [])}
    if set(mine) != set(theirs):
        return f"tasks {', '.join(mine) or '(none)'} here, {', '.join(theirs) or '(none)'} in the checkpoint"
    for i, (name, task) in enumerate(mine.items()):
        for key in KEYS:
            if task.get(key) != theirs[name].get(key):
                return (f"tasks[{i}].{key} is {_show(task.get(key))} here, {_show(theirs[name].get(key))} in the "
                        "checkpoint")
    return None
