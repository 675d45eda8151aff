"""Every command's --help exits 0, shows its option groups, and documents every option."""
import argparse
import importlib
import importlib.util
import subprocess
import sys

import pytest

from minbert import cli, export, plot

TRAIN_GROUPS = ["model", "data", "training", "multitask", "optimizer", "output"]


def _main_of(module_name):
    if importlib.util.find_spec(module_name) is None:
        pytest.skip(f"{module_name} does not exist yet")
    return importlib.import_module(module_name).main


COMMANDS = {
    "train": (lambda: cli.train_main, TRAIN_GROUPS),
    "evaluate": (lambda: cli.evaluate_main, ["data", "output"]),
    "export": (lambda: export.main, ["model", "output"]),
    "plot": (lambda: plot.main, ["data", "output"]),
    "experiments": (lambda: _main_of("minbert.experiments"), []),
}


@pytest.mark.parametrize("name", COMMANDS)
def test_help_is_complete_and_grouped(name, capsys, monkeypatch):
    get_main, groups = COMMANDS[name]
    main = get_main()
    parsers = []  # every parser that printed help, to check its options
    format_help = argparse.ArgumentParser.format_help
    monkeypatch.setattr(argparse.ArgumentParser, "format_help", lambda self: parsers.append(self) or format_help(self))
    with pytest.raises(SystemExit) as e:
        main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage:")
    for group in groups:
        assert f"\n{group}:\n" in out, f"{name} --help lacks the group {group!r}"
    assert parsers
    undocumented = [a.option_strings or a.dest for p in parsers for a in p._actions if not a.help]
    assert not undocumented, f"{name}: options without help: {undocumented}"


@pytest.mark.parametrize("module", ["minbert.export", "minbert.plot"])
def test_python_dash_m_entry_points(module):
    done = subprocess.run([sys.executable, "-m", module, "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("usage:")


def test_evaluate_help_says_a_dev_selected_score_is_optimistic(capsys):
    """Issue 20, item 4: the best epoch is chosen on dev, so its dev score (and an interval on it) is optimistic."""
    from minbert.cli import evaluate_main

    with pytest.raises(SystemExit):
        evaluate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "optimistic" in text and "dev_last" in text and "one-epoch run" in text
