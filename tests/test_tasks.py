"""The task registry (minbert/tasks/registry.py): the one place the package names its tasks."""
import ast
import json
import subprocess
import sys

import pytest

from minbert.model.heads import build_heads
from minbert.tasks.metrics import format_scores, overall_score
from minbert.tasks.predict import prediction_path
from minbert.tasks.registry import DEFAULT_TASKS, HEAD_ORDER, LEADERBOARD_TASKS, TASKS, get_task, tasks_of_method

from .conftest import ROOT

PACKAGE = ROOT / "minbert"
# String constants allowed outside tasks/registry.py, each with its reason: (file relative to minbert/, the constant).
ALLOWED = {
    # The experiment cards are command lines (argv) of recorded experiments: "--tasks sst2" there is what a user
    # types, and "sst2" names the card's setting; neither defines the task.
    ("experiments/cards.py", "sst2"),
    ("experiments/command.py", "sst2"),
    # --sts_head is a public flag (the bi-encoder's similarity head; tasks.TaskSpec.head_flag names it; declared as
    # the field multitask.ModelSettings.sts_head): the experiment rows pass it, as a user would.
    ("experiments/profiles.py", "--sts_head"),
}


def _names() -> set[str]:
    """Task names, the task files and the prediction files: what only tasks/registry.py may spell out."""
    names = set(TASKS)
    for spec in TASKS.values():
        names |= set(spec.files.values())
        names |= {spec.prediction_file(split) for split in ("dev", "test")}
    return names


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring nodes (module, class and function docstrings say what a task is; they may name it)."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                out.add(id(first.value))
    return out


def literal_task_names(source: str, rel: str) -> list[str]:
    """``file:line: constant`` for each string constant in the module ``source`` (``minbert/rel``) that is a task
    name, holds a task file's name or is a flag named after a task (docstrings and comments left out)."""
    tree = ast.parse(source)
    docs, names = _docstrings(tree), _names()
    files = {n for n in names if n.endswith(".csv")}
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Constant) or not isinstance(node.value, str) or id(node) in docs:
            continue
        value = node.value
        hit = value in names or any(f in value for f in files) or value.startswith(tuple(f"--{t}_" for t in TASKS))
        if hit and (rel, value) not in ALLOWED:
            found.append((node.lineno, f"minbert/{rel}:{node.lineno}: {value!r}"))
    return [hit for _, hit in sorted(found)]


def test_tasks_are_named_only_in_the_registry():
    found = [hit for path in sorted(PACKAGE.rglob("*.py")) if path != PACKAGE / "tasks" / "registry.py"
             for hit in literal_task_names(path.read_text(encoding="utf-8"), path.relative_to(PACKAGE).as_posix())]
    assert not found, "task names outside minbert/tasks/registry.py:\n" + "\n".join(found)


def test_every_allowed_literal_is_still_there():
    """An allow-list entry whose constant is gone from its file would silently allow it again later: none is."""
    for rel, value in ALLOWED:
        tree = ast.parse((PACKAGE / rel).read_text(encoding="utf-8"))
        assert any(isinstance(n, ast.Constant) and n.value == value for n in ast.walk(tree)), (rel, value)


def test_the_scan_finds_a_literal():
    """The scan itself: a task name, a task file, a prediction file and a task flag are found; a docstring and
    an allowed constant are not."""
    source = ('"""sst in a docstring"""\nx = "qqp"\ny = f"{d}/ids-sst-dev.csv"\nz = ("sts-test-output.csv",)\n'
              'w = "--sst_weight"\n')
    assert [h.split(": ", 1)[1] for h in literal_task_names(source, "m.py")] == [
        "'qqp'", "'/ids-sst-dev.csv'", "'sts-test-output.csv'", "'--sst_weight'"]
    assert literal_task_names('x = "--sts_head"\n', "experiments/profiles.py") == []
    assert literal_task_names('x = "--sts_head"\n', "training/run.py") == ["minbert/training/run.py:1: '--sts_head'"]


def test_registry_order_and_lookup():
    assert list(TASKS)[:3] == list(DEFAULT_TASKS) == list(LEADERBOARD_TASKS)
    assert set(HEAD_ORDER) == set(TASKS)
    assert get_task("sts") is TASKS["sts"]
    with pytest.raises(ValueError, match="unknown task 'nli'"):
        get_task("nli")
    assert tasks_of_method("predict_sentiment") == ("sst", "sst2")


def test_prediction_files_and_overall_come_from_the_registry(tmp_path):
    assert [prediction_path(tmp_path, t, "dev").name for t in DEFAULT_TASKS] == [
        "sst-dev-output.csv", "para-dev-output.csv", "sts-dev-output.csv"]
    # (SST acc + QQP acc + (STS r + 1) / 2) / 3, exactly
    assert overall_score({"sst": 0.5, "qqp": 0.75, "sts": 0.2}) == (0.5 + 0.75 + (0.2 + 1) / 2) / 3
    assert format_scores({"dev": {"sst": 0.5}}).splitlines()[0] == "| split | SST acc | QQP acc | STS r | overall |"


def test_heads_follow_the_registry():
    heads = build_heads(8, list(TASKS))
    assert list(heads) == list(HEAD_ORDER)
    assert {t: h.classifier.out_features for t, h in heads.items() if TASKS[t].head == "sentiment"} == {
        t: TASKS[t].num_labels for t in TASKS if TASKS[t].head == "sentiment"}


ADD_A_TASK = r'''
import dataclasses, json, shutil, sys
from pathlib import Path
import minbert.tasks.registry as T

# A new task, as one more TASKS entry would declare it: a 5-class single-sentence task on copies of the SST files.
toy = dataclasses.replace(T.TASKS["sst"], name="toy", output_prefix="toy", leaderboard=False, table_label="Toy acc",
                          files={s: f"toy-{s}.csv" for s in ("train", "dev", "test")})
T.TASKS["toy"] = toy
data, out = Path(sys.argv[1]), Path(sys.argv[2])
for split, name in toy.files.items():
    shutil.copy(data / T.TASKS["sst"].files[split], data / name)
from minbert.cli import train_main
assert train_main(["--model_name_or_path", "bert-tiny", "--data_dir", str(data), "--output_dir", str(out),
                   "--max_train_samples", "16", "--per_device_train_batch_size", "8", "--num_train_epochs", "1",
                   "--max_seq_length", "32", "--seed", "7", "--tasks", "toy,sts"]) == 0
print(json.dumps({"predictions": sorted(p.name for p in (out / "predictions").iterdir()),
                  "dev": json.loads((out / "results.json").read_text())["dev"]}))
'''


def test_a_new_task_needs_only_its_registry_entry(data_copy, tmp_path):
    """A registry entry is enough to train on a task, write its prediction files and score it: no other module
    changes (in a fresh interpreter, whose TASKS gets the entry before the run; module constants derived from
    TASKS at import, like minbert-predict's choices, would see it only from a real entry in tasks/registry.py)."""
    run = subprocess.run([sys.executable, "-c", ADD_A_TASK, str(data_copy), str(tmp_path / "run")],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    result = json.loads(run.stdout.strip().splitlines()[-1])
    assert result["predictions"] == ["sts-dev-output.csv", "sts-test-output.csv", "toy-dev-output.csv",
                                     "toy-test-output.csv"]
    assert set(result["dev"]) == {"toy", "sts", "overall"}  # training's overall: the mean over the tasks trained
    assert 0.0 <= result["dev"]["toy"] <= 1.0
