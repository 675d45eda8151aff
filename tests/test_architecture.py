"""The package's layout: no import cycle anywhere in minbert/, the training run's modules stay small, and the
command line's flags are the run configuration's settings, declared once."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from minbert.cli import train_parser
from minbert.run_config import RunConfig
from minbert.settings import setting_names

from .conftest import ROOT

PACKAGE = ROOT / "minbert"
TRAINING_RUN = ("run.py", "run_config.py", "trainer.py", "trainer_state.py", "checkpoint_state.py", "output_dir.py",
                "metrics_log.py", "optim/build.py")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict[str, set[str]]:
    """module -> the minbert modules it imports, at the top or inside a function (a lazy import still closes
    a cycle). ``from . import x`` counts as importing the module ``minbert.x`` if there is one, else the package."""
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in files.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        deps = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                deps.update(a.name for a in node.names if a.name in files)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = package.split(".")[: len(package.split(".")) - node.level + 1]
                    target = ".".join(base + ([node.module] if node.module else []))
                else:
                    target = node.module or ""
                submodules = {f"{target}.{a.name}" for a in node.names} & set(files)
                if submodules:
                    deps.update(submodules)
                if len(submodules) < len(node.names) and target in files:  # names defined in the module itself
                    deps.add(target)
        graph[name] = deps - {name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle as a list of modules (first == last), or None; depth-first search with three colours."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state:
                found = visit(dep)
                if found:
                    return found
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def test_the_cycle_finder_finds_a_planted_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_the_graph_sees_lazy_and_relative_imports():
    graph = import_graph()
    assert "minbert.run" in graph["minbert.cli"]  # imported inside train_main
    assert "minbert.optim.mfac" in graph["minbert.optim"]
    assert "minbert.distributed" in graph["minbert.trainer"]  # from . import distributed


def test_no_import_cycle_in_minbert():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_training_run_modules_hold_one_concern_each_and_stay_small():
    for name in TRAINING_RUN:
        lines = len((PACKAGE / name).read_text(encoding="utf-8").splitlines())
        assert lines <= 350, f"minbert/{name} has {lines} lines"


def test_the_flags_are_the_settings_declared_on_the_dataclasses():
    flags = [a.dest for a in train_parser()._actions if a.dest != "help"]
    assert setting_names(RunConfig) == flags
    defaults = RunConfig.from_namespace(train_parser().parse_args([]))
    assert list(defaults.to_dict()) == flags  # args.json: every flag, in --help's order
    assert defaults.to_dict() == RunConfig().to_dict()  # the parser's defaults are the fields' defaults
    assert defaults.learning_rate == defaults.training.learning_rate == train_parser().get_default("learning_rate")
    groups = {f.name for f in dataclasses.fields(RunConfig)}
    assert groups == {"config", "model", "data", "training", "multitask", "optimizer", "output"}
