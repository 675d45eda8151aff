"""The package's layout: no import cycle anywhere in minbert/, the training run's modules stay small, and the
command line's flags are the run configuration's settings, declared once."""
from __future__ import annotations

import ast
import dataclasses
from pathlib import Path

from minbert.cli import train_parser
from minbert.io.settings import setting_names
from minbert.training.run_config import RunConfig

from .conftest import ROOT

PACKAGE = ROOT / "minbert"
TRAINING_RUN = tuple(f"training/{name}.py" for name in ("run", "run_config", "trainer", "trainer_state",
                                                          "checkpoint_state", "output_dir", "metrics_log")) \
    + ("methods/optim/build.py",)


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
    assert "minbert.training.run" in graph["minbert.cli"]  # imported inside train_main
    assert "minbert.methods.optim.mfac" in graph["minbert.methods.optim"]
    assert "minbert.training.distributed" in graph["minbert.training.trainer"]  # from minbert.training import distributed


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


# ------------------------------------------------------------------------------------------ the folders
ENTRY_POINTS = {"__init__.py", "api.py", "cli.py", "export.py", "plot.py", "predict_cli.py"}
FOLDERS = {"model", "tasks", "training", "methods", "io", "experiments"}


def test_ls_minbert_shows_the_design():
    """Only the entry points sit at the top of the package; everything else is in its part's folder."""
    top = {p.name for p in PACKAGE.iterdir() if p.name != "__pycache__"}
    assert {n for n in top if n.endswith(".py")} == ENTRY_POINTS
    assert {n for n in top if (PACKAGE / n).is_dir()} == FOLDERS
    for folder in FOLDERS:
        assert (PACKAGE / folder / "__init__.py").read_text(encoding="utf-8").startswith('"""'), folder


def test_flat_layout_names_are_the_same_module_objects():
    """Code written for the flat layout imports the very module that now lives in a folder (one object, so a
    monkeypatch through the old name reaches the code)."""
    import importlib

    import minbert
    for old, new in minbert.MOVED_MODULES.items():
        assert importlib.import_module(f"minbert.{old}") is importlib.import_module(f"minbert.{new}"), old
        assert (PACKAGE / (new.replace(".", "/") + ".py")).is_file() or (PACKAGE / new.replace(".", "/")).is_dir()
    from minbert.optim.mfac import MFAC  # a submodule of a moved package
    from minbert.trainer import Trainer
    assert MFAC is minbert.MFAC and Trainer.__module__ == "minbert.training.trainer"
    from minbert.model import BertModel, to_hf_state_dict  # the folders answer their old module's names
    from minbert.tasks import TASKS
    from minbert.io import atomic_write_text, read_text_file  # noqa: F401
    from minbert.model import encoder
    from minbert.tasks import registry
    assert BertModel is encoder.BertModel and to_hf_state_dict is encoder.to_hf_state_dict
    assert TASKS is registry.TASKS
    assert minbert.moved_to("minbert.nothing") is None and minbert.moved_to("minbert.optim.build") == \
        "minbert.methods.optim.build"


def test_a_misspelled_name_is_still_an_error():
    import importlib

    import pytest
    with pytest.raises(ModuleNotFoundError):
        importlib.import_module("minbert.trainerr")
    with pytest.raises(ImportError):
        exec("from minbert.tasks import NO_SUCH_NAME", {})
    with pytest.raises(ImportError):
        exec("from minbert.model import NoSuchModel", {})


def old_path_uses(text: str) -> list[str]:
    """``minbert.<flat module>`` or ``minbert/<flat module>.py`` in ``text``: the layout before the folders."""
    import re

    import minbert
    names = "|".join(sorted(minbert.MOVED_MODULES, key=len, reverse=True))
    return [m.group(0) for m in re.finditer(rf"(?<![\w./])minbert[./]({names})(?!\w)(\.py)?", text)]


def test_the_package_tests_docs_and_benchmarks_use_the_new_paths():
    """The old names are for users' code only: nothing shipped here leans on them (this file and
    minbert/__init__.py, which name them on purpose, aside)."""
    files = [p for pattern in ("minbert/**/*.py", "tests/*.py", "benchmarks/*.py", "examples/*.py", "docs/*.md",
                               "*.md", "*.py") for p in ROOT.glob(pattern)]
    skip = {PACKAGE / "__init__.py", Path(__file__).resolve()}
    found = [f"{p.relative_to(ROOT)}: {use}" for p in files if p.resolve() not in skip
             for use in old_path_uses(p.read_text(encoding="utf-8"))]
    assert not found, "\n".join(found)


def test_the_old_path_scan_finds_an_old_path():
    assert old_path_uses("from minbert.trainer import Trainer; see minbert/smart.py") == ["minbert.trainer",
                                                                                       "minbert/smart.py"]
    assert old_path_uses("minbert/optim/mfac.py, minbert.optim.MFAC") == ["minbert/optim", "minbert.optim"]
    assert old_path_uses("from minbert.training.trainer import Trainer; minbert/methods/smart.py") == []


def folder_edges(graph: dict[str, set[str]]) -> set[tuple[str, str]]:
    """(folder, folder) for each import between two parts of the package; an entry point is its own part."""
    def part(module: str) -> str:
        name = module.split(".")[1] if "." in module else "__init__"
        return name if name in FOLDERS - {"experiments"} else "entry points"
    return {(part(a), part(b)) for a, deps in graph.items() for b in deps if part(a) != part(b)}


def test_the_folders_depend_downward():
    """docs/architecture.md's picture: io/ at the bottom, training/ above the methods, the model and the tasks, the
    entry points on top (model/ and tasks/ use each other: heads from the registry, data through the tokenizer)."""
    below = {"io": set(), "methods": {"io"}, "model": {"io", "tasks"}, "tasks": {"io", "model"},
             "training": {"io", "methods", "model", "tasks"}}
    wrong = sorted((a, b) for a, b in folder_edges(import_graph()) if a in below and b not in below[a])
    assert not wrong, wrong
    assert folder_edges({"minbert.io.read": {"minbert.training.run"}, "minbert.cli": {"minbert.io.read"}}) == {
        ("io", "training"), ("entry points", "io")}
