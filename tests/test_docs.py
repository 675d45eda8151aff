"""Every command and code block of README.md and docs/*.md keeps working: each shell command of a minbert entry
point is parsed by that entry point's own parser and settings checks (no training), every Python block compiles,
and the cheap Python blocks run against tiny fixtures. A block that cannot run here is listed below with why."""
from __future__ import annotations

import argparse
import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from .conftest import ROOT

DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^```([\w-]*)[^\n]*\n(.*?)^```", flags=re.S | re.M)


def blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line number, text) of every fenced block of a Markdown file."""
    text = path.read_text(encoding="utf-8")
    return [(m.group(1).lower(), text.count("\n", 0, m.start()) + 2, m.group(2)) for m in FENCE.finditer(text)]


def shell_commands(block: str) -> list[str]:
    """The command lines of a shell block: continuation lines joined, a `$ ` prompt dropped, comments kept for
    shlex to drop."""
    lines, pending = [], ""
    for raw in block.splitlines():
        line = raw[2:] if raw.startswith("$ ") else raw
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        lines.append(pending + line)
        pending = ""
    return [line for line in lines if line.strip() and not line.lstrip().startswith("#")]


def split_commands(line: str) -> list[list[str]]:
    """A command line as its simple commands (split at `&&`, `;`, `|`), each without leading VAR=value
    assignments and without the wrappers that only run the command (taskset, /usr/bin/time)."""
    words = shlex.split(line, comments=True)
    commands, current = [], []
    for w in words + ["&&"]:
        if w in ("&&", ";", "|", "||", "&"):
            if current:
                commands.append(current)
            current = []
        else:
            current.append(w)
    out = []
    for words in commands:
        while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=\S*", words[0]):
            words = words[1:]
        if words[:1] == ["taskset"]:
            words = words[3:]  # taskset -c CPUS
        if words[:1] == ["/usr/bin/time"]:
            words = words[3:] if words[1:2] == ["-f"] else words[2:] if words[1:2] == ["-v"] else words[1:]
        out.append(words)
    return out


class Refused(Exception):
    """An entry point's parser or settings check refused a documented command."""


def exact_flags(p: argparse.ArgumentParser, argv: list[str], what: str) -> None:
    """argparse accepts an unambiguous prefix of a flag (--skip_bad_row): the docs spell every flag in full."""
    for word in argv:
        flag = word.split("=", 1)[0]
        if flag.startswith("--") and flag not in p._option_string_actions:
            raise Refused(f"{what}: {flag} is not a flag of its parser (a misspelling, or an abbreviation)")


@contextlib.contextmanager
def refusals(what: str):
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            yield
    except SystemExit as e:
        if e.code:
            raise Refused(f"{what}: {err.getvalue().strip().splitlines()[-1] if err.getvalue().strip() else e}")


def check_train(argv: list[str]) -> None:
    from minbert.cli import check_train_args, train_parser
    from minbert.training.config_file import apply_config_file

    p = train_parser()
    exact_flags(p, argv, "train_multitask.py")
    with refusals("train_multitask.py"):
        from_file = apply_config_file(p, argv)
        args = p.parse_args(argv)
    if args.predict_only or Path(args.model_name_or_path).is_absolute():
        # the checkpoint or model directory of a documented command is the reader's (runs/..., /path/to/...):
        # the flags were parsed above; the settings checks would stop at the missing directory
        return
    with refusals("train_multitask.py"):
        check_train_args(p, args, from_file)


def parses(p, argv: list[str], program: str):
    """The command's flags are spelled in full and its parser accepts them; the parsed namespace."""
    exact_flags(p, argv, program)
    with refusals(program):
        return p.parse_args(argv)


def check_evaluate(argv: list[str]) -> None:
    from minbert.cli import evaluate_parser

    parses(evaluate_parser(), argv, "evaluate.py")


def check_experiments(argv: list[str]) -> None:
    from minbert.experiments.command import parse_seeds, parser
    from minbert.experiments.profiles import ROW_KEYS

    p = parser()
    exact_flags(p, argv, "python -m minbert.experiments")
    with refusals("python -m minbert.experiments"):
        args = p.parse_args(argv)
        parse_seeds(p, args.seeds)
        unknown = [k for k in args.rows.split(",") if k not in ROW_KEYS]
        if args.experiment != "mtl" and unknown:
            p.error(f"--rows: unknown row {unknown}")


def check_predict(argv: list[str]) -> None:
    from minbert.predict_cli import check_predict_args, predict_parser

    p = predict_parser()
    exact_flags(p, argv, "minbert-predict")
    with refusals("minbert-predict"):
        check_predict_args(p, p.parse_args(argv))


def check_export(argv: list[str]) -> None:
    from minbert.export import export_parser

    parses(export_parser(), argv, "minbert-export")


def check_plot(argv: list[str]) -> None:
    from minbert.plot import plot_parser

    p = plot_parser()
    exact_flags(p, argv, "python -m minbert.plot")
    with refusals("python -m minbert.plot"):
        args = p.parse_args(argv)
        if bool(args.runs) == bool(args.experiments):
            p.error("give run folders or --experiments RESULTS.json (one of the two)")


def check_torchrun(argv: list[str]) -> None:
    from torch.distributed.run import get_args_parser

    p = get_args_parser()
    with refusals("torchrun"):
        args = p.parse_args(argv)
    exact_flags(p, argv[: argv.index(args.training_script)], "torchrun")
    check_words([args.training_script, *args.training_script_args])


ENTRY_POINTS = {
    ("train_multitask.py",): check_train, ("minbert-train",): check_train,
    ("evaluate.py",): check_evaluate, ("minbert-evaluate",): check_evaluate,
    ("-m", "minbert.experiments"): check_experiments,
    ("minbert-predict",): check_predict, ("-m", "minbert.predict_cli"): check_predict,
    ("minbert-export",): check_export, ("-m", "minbert.export"): check_export,
    ("-m", "minbert.plot"): check_plot,
    ("torchrun",): check_torchrun,
}
# Commands that are not minbert entry points, or whose parser is not built without running them, and why.
NOT_PARSED = {
    "bash": "the CI script (.ci/run) and shell helpers: run by CI itself",
    "benchmarks/": "benchmark scripts build their parser inside main() after heavy imports (transformers); "
                   "tests/test_throughput_bench.py and tests/test_gpu_check.py run their flags",
    "pip ": "installs", "python3 -m venv": "installs", "python -m venv": "installs", ". ": "installs (activate)",
    "tensorboard": "TensorBoard's own command", "wait": "shell built-in",
    "printf": "writes a data file", "examples/": "an example script that writes a data file (tests/test_user_tasks.py "
                                                  "runs examples/sts_binary.py)",
    "du": "shell tools", "ls": "shell tools", "cat": "shell tools",
}


def entry_point(words: list[str]):
    """(name, check, its arguments) of the entry point a simple command runs, or ("not parsed", None, None)."""
    full = " ".join(words)
    if words[:1] in (["python"], ["python3"]):
        words = words[1:]
    for prefix, check in ENTRY_POINTS.items():
        if tuple(words[: len(prefix)]) == prefix:
            return " ".join(prefix), check, words[len(prefix):]
    for prefix in NOT_PARSED:
        if full.startswith(prefix) or (words[:1] and words[0].startswith(prefix)):
            return "not parsed", None, None
    raise AssertionError(f"a documented command that no test checks: {full!r} (add it to ENTRY_POINTS or "
                         "NOT_PARSED in tests/test_docs.py)")


def check_words(words: list[str]) -> None:
    """Check one simple command with its entry point's parser (Refused when it refuses it)."""
    _, check, argv = entry_point(words)
    if check is not None:
        check(argv)


def documented_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for lang, line, text in blocks(path):
            if lang in SHELL:
                found += [(f"{path.relative_to(ROOT)}:{line}", c) for c in shell_commands(text)]
    return found


COMMANDS = documented_commands()


@pytest.fixture(scope="module")
def reader_folder(tmp_path_factory):
    """The folder a reader runs the documented commands from: the clone's data/ and examples/, the docs' own data
    folder (my_data), and the args.json of earlier runs that a --config names."""
    d = tmp_path_factory.mktemp("reader")
    for name in ("data", "examples"):
        (d / name).symlink_to(ROOT / name)
    (d / "my_data").mkdir()  # the data files, and the task of one's own that docs/tasks.md writes there
    for f in (ROOT / "data").iterdir():
        (d / "my_data" / f.name).symlink_to(f)
    for split in ("train", "dev", "test"):
        (d / "my_data" / f"stsbin-{split}.csv").write_text("id\tsentence1\tsentence2\tlabel\n")
    for run in ("main", "default"):
        (d / "runs" / run).mkdir(parents=True)
        (d / "runs" / run / "args.json").write_text("{}\n")
    return d


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}-{i}" for i, (w, _) in enumerate(COMMANDS)])
def test_documented_command_parses(where, command, reader_folder, monkeypatch):
    monkeypatch.chdir(reader_folder)
    for words in split_commands(command):
        try:
            check_words(words)
        except Refused as e:
            pytest.fail(f"{where}: {command}\n{e}")


def test_no_command_hides_in_an_untagged_block():
    """A block without a language is not parsed above: a command of an entry point must be in a bash block."""
    hidden = [f"{path.relative_to(ROOT)}:{line}" for path in DOCS for lang, line, text in blocks(path)
              if not lang and re.match(r"\s*(\$ )?(\S+=\S+ )*(python3? |torchrun |minbert-|/usr/bin/time )", text)]
    assert not hidden, hidden


def test_every_entry_point_is_documented_and_checked():
    seen = {entry_point(w)[0] for _, c in COMMANDS for w in split_commands(c)} - {"not parsed"}
    # every entry point has at least one documented command (torchrun's script is checked as well)
    assert {"train_multitask.py", "evaluate.py", "-m minbert.experiments", "minbert-predict", "torchrun"} <= seen
    assert any(p in seen for p in ("minbert-export", "-m minbert.export"))
    assert "-m minbert.plot" in seen


@pytest.mark.parametrize("command,message", [
    ("python train_multitask.py --skip_bad_row --output_dir runs/x", "--skip_bad_row is not a flag"),
    ("python train_multitask.py --pooling average", "invalid choice: 'average'"),
    ("python train_multitask.py --warmup_ratio 2", "--warmup_ratio"),
    ("python evaluate.py --predictions p --cis", "--cis is not a flag"),
    ("python -m minbert.experiments paper --profile fast", "invalid choice: 'fast'"),
    ("python -m minbert.experiments paper --seeds 1,x", "--seeds"),
    ("minbert-predict --checkpoint runs/main --task sts 'only one'", "takes two texts"),
    ("minbert-export --checkpoint runs/main", "--out"),
    ("python -m minbert.plot runs/a --output a.png", "--out"),
    ("torchrun --nproc_per_node=2 train_multitask.py --lerning_rate 1e-4", "--lerning_rate"),
    ("torchrun --nproc-per-nod=2 train_multitask.py", "--nproc-per-nod"),
])
def test_the_checker_refuses_a_misspelled_flag(command, message, reader_folder, monkeypatch):
    monkeypatch.chdir(reader_folder)
    with pytest.raises(Refused, match=re.escape(message)):
        for words in split_commands(command):
            check_words(words)


def test_the_checker_finds_commands_in_blocks():
    text = ("```bash\nOMP_NUM_THREADS=1 taskset -c 0 python train_multitask.py --seed 1 \\\n    --tasks sst  # x\n"
            "pip install -e . && python evaluate.py --predictions p\n```\n")
    cmds = shell_commands(FENCE.search(text).group(2))
    assert [w for c in cmds for w in split_commands(c)] == [
        ["python", "train_multitask.py", "--seed", "1", "--tasks", "sst"], ["pip", "install", "-e", "."],
        ["python", "evaluate.py", "--predictions", "p"]]
    with pytest.raises(AssertionError, match="no test checks"):
        check_words(["python", "my_script.py"])


# ---- Python blocks ----

def python_blocks() -> list[tuple[str, str]]:
    return [(f"{path.relative_to(ROOT)}:{line}", text) for path in DOCS for lang, line, text in blocks(path)
            if lang == "python"]


PYTHON = python_blocks()
# Python blocks that cannot run in a test, each named by its file and a line of it, and why. Their imports from
# minbert are still checked below; every other block runs.
NOT_RUN = {
    ("docs/mfac.md", "opt.consolidate_state_dict(to=0)"): "a fragment of a torchrun program (a process group, "
                                                          "'...' for the training)",
    ("docs/multitask.md", "# python bench_step.py"): "times training steps of minilm-l6 on the shipped data (minutes)",
    ("docs/results.md", "# row_cost.py"): "times every kind of row and a full dev/test prediction of minilm-l6 "
                                          "(minutes)",
    ("docs/tasks.md", "model = minbert.load(\"runs/stsbin\")"): "needs the run docs/tasks.md trains "
                                                                 "(tests/test_user_tasks.py runs the same calls)",
    ("docs/training.md", "scores = run(config)"): "trains the main job with PCGrad (minutes; tests/test_config.py runs "
                                                    "RunConfig.from_flags, tests/test_user_tasks.py runs run(config))",
    ("docs/tasks.md", "scores = run(config)"): "trains the main job with a task of one's own (minutes; "
                                                 "tests/test_user_tasks.py runs it small)",
}
# What a fragment refers to without defining it: the tiny objects it runs with.
FIXTURES = {
    ("docs/mfac.md", "build_optimizer(\"MFAC\", param_groups"):
        lambda: {"param_groups": [{"params": [__import__("torch").nn.Parameter(__import__("torch").zeros(8))]}]},
}


def listed(table: dict, where: str, code: str):
    return next((v for (file, line), v in table.items() if where.startswith(file + ":") and line in code), None)


@pytest.mark.parametrize("where,code", PYTHON, ids=[w for w, _ in PYTHON])
def test_python_blocks_compile(where, code):
    compile(code, where, "exec")


def test_not_run_blocks_exist_and_import():
    """Every listed block is still in its file, and the minbert names it imports exist (an API rename fails here)."""
    import importlib

    for (file, line), _ in NOT_RUN.items():
        codes = [c for w, c in PYTHON if w.startswith(file + ":") and line in c]
        assert len(codes) == 1, (file, line)
        for module, names in re.findall(r"^from (minbert[\w.]*) import (.+)$", codes[0], flags=re.M):
            mod = importlib.import_module(module)
            for name in names.split(","):
                assert hasattr(mod, name.strip()), f"{file}: {module}.{name.strip()}"


def test_cheap_python_blocks_run(tmp_path, monkeypatch, one_thread):
    """Every Python block not in NOT_RUN runs as written, in a folder holding a tiny runs/main (a bert-tiny
    checkpoint) and an export of it in exported/."""
    import minbert
    from minbert.export import export_checkpoint

    from .test_api import save_tiny_checkpoint

    save_tiny_checkpoint(tmp_path / "runs" / "main" / "best")
    (tmp_path / "runs" / "main" / "args.json").write_text("{}\n")
    export_checkpoint(tmp_path / "runs" / "main", tmp_path / "exported")
    monkeypatch.chdir(tmp_path)
    ran = []
    for where, code in PYTHON:
        if listed(NOT_RUN, where, code):
            continue
        fixture = listed(FIXTURES, where, code)
        namespace: dict = fixture() if fixture else {}
        exec(compile(code, where, "exec"), namespace)
        ran.append(where)
        if "minbert.load(" in code:
            assert isinstance(namespace.get("model"), minbert.InferenceModel), where
    assert len(ran) == len(PYTHON) - len(NOT_RUN)
    assert any(w.startswith("README.md") for w in ran) and any(w.startswith("docs/prediction.md") for w in ran)


# ---- links ----

def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces as dashes."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_links_between_the_docs_resolve():
    """Sections moved between README.md and docs/: every relative link names a file and a heading that exist."""
    broken = []
    for path in DOCS:
        text = FENCE.sub("", path.read_text(encoding="utf-8"))
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"[a-z]+:", target):
                continue
            file, _, frag = target.partition("#")
            dest = (path.parent / file) if file else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)}: {target}")
            elif frag and dest.suffix == ".md":
                headings = re.findall(r"^#+ (.*)$", FENCE.sub("", dest.read_text(encoding="utf-8")), flags=re.M)
                if frag not in {anchor(h) for h in headings}:
                    broken.append(f"{path.relative_to(ROOT)}: {target}")
    assert not broken, broken


def test_the_readme_opens_with_the_main_job_and_the_ci_test_command():
    """The README's first block holds the two commands of a fresh machine; its test command is .ci/run, whose
    pytest line is the one the README's comment names."""
    lang, _, first = blocks(ROOT / "README.md")[0]
    commands = shell_commands(first)
    assert lang == "bash" and len(commands) == 2
    assert "train_multitask.py --skip_bad_rows --output_dir runs/main" in commands[0]
    assert commands[1] == "bash .ci/run"
    named = re.search(r"`(python -m pytest [^`]+)`", first).group(1)
    ci = [line for line in (ROOT / ".ci" / "run").read_text().splitlines() if line.startswith("python -m pytest")]
    assert ci == [named]
