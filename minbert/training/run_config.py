"""One training run's settings: the composition of the settings groups, each declared once by the module that
uses it, and checked in one place.

Each group is a small dataclass whose fields are the flags of train_multitask.py (minbert.io.settings): the model's
(multitask.ModelSettings), the data's (data_settings.DataSettings), the training loop's
(trainer_settings.TrainingSettings), the combiner's and SMART's (combiners.MultitaskSettings, smart.SmartSettings),
the optimizer's (optim.build.OptimizerSettings) and the output's (output_dir.OutputSettings).
``minbert.cli.train_parser`` derives the flags from them; a RunConfig is built from what that parser returns: the
command line, a ``--config`` file whose keys became the parser's defaults, or the argument lists of
``minbert.experiments``. Its flat view (``config.seed``, :meth:`RunConfig.to_dict`) is what args.json records.
:meth:`RunConfig.validate` then checks the whole resolved configuration (types, nulls, non-finite numbers, ranges
and choices from the fields, conflicting flags, the output directory, ``--optim_args``, ``--task_spec``, the
combiner) before anything is read or written. Its messages name the flag (``--warmup_ratio``) or, for a value that
came from a config file, the file and key (``run.json: warmup_ratio``).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from minbert.io.settings import (add_arguments, first_problem, from_flat, group, owner_of, setting,
                                      setting_names, to_flat)
from minbert.methods.combiners import COMBINERS, MultitaskSettings
from minbert.methods.optim.build import OptimizerSettings
from minbert.methods.user_combiner import check_interface
from minbert.model.config import PRESETS, BertConfig
from minbert.model.encoder import check_model_dir
from minbert.model.heads import DEFAULT_PARA_HEAD, DEFAULT_STS_HEAD, pair_head_conflict
from minbert.model.multitask import ModelSettings, PairEncoding, resolve_checkpoint
from minbert.model.tokenizer import seq_length_problem
from minbert.tasks.data import TASKS
from minbert.tasks.data_settings import DataSettings
from minbert.tasks.user_tasks import (SPLIT_NAMES, TaskSpecError, check_data_files, checked_task_spec,
                                      checkpoint_task_spec, spec_difference)
from minbert.training.config_file import apply_config_file
from minbert.training.legacy_settings import current_settings
from minbert.training.output_dir import OutputSettings
from minbert.training.trainer_settings import TrainingSettings


class ConfigError(ValueError):
    """A setting is wrong; ``from_file`` says whether the message names a config file (else a flag)."""

    def __init__(self, message: str, from_file: bool = False):
        super().__init__(message)
        self.from_file = from_file


class _RaisingParser(argparse.ArgumentParser):
    """The flags' parser for RunConfig.from_flags: a mistake raises ConfigError (argparse and apply_config_file
    would print the usage and exit, as a command line should)."""

    def error(self, message: str):
        raise ConfigError(message)

    def exit(self, status: int = 0, message: str | None = None):
        raise ConfigError((message or "").strip().removeprefix("error: "), from_file=True)


@dataclass
class RunConfig:
    """The settings of one run: ``--config`` and the groups of flags, in --help's order. Every flag is also an
    attribute of the RunConfig itself (``config.seed`` is ``config.training.seed``)."""

    config: str | None = setting(None, metavar="FILE.json",
                                 help="read flags from a JSON object (keys = flag names without dashes, e.g. a run's "
                                      "args.json); flags given on the command line override it")
    model: ModelSettings = group(ModelSettings, "model")
    data: DataSettings = group(DataSettings, "data")
    training: TrainingSettings = group(TrainingSettings, "training")
    multitask: MultitaskSettings = group(MultitaskSettings, "multitask")
    optimizer: OptimizerSettings = group(OptimizerSettings, "optimizer")
    output: OutputSettings = group(OutputSettings, "output")

    # The config file each key came from, for the keys a --config file set (not a field: not in args.json).
    from_file: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_namespace(cls, args, from_file: dict[str, str] | None = None) -> "RunConfig":
        """From the parser's namespace (``from_file``: key -> the --config file that set it). Copies, checks
        nothing: :meth:`validate` does."""
        config = from_flat(cls, current_settings(dict(vars(args))))
        config.from_file = dict(from_file or {})
        return config

    @classmethod
    def from_flags(cls, argv: list[str]) -> "RunConfig":
        """train_multitask.py's flags as a RunConfig, from Python: ``RunConfig.from_flags(["--combiner", "pcgrad"])``.
        The same flags, readers and ``--config`` files as the command line; a flag mistake is a ConfigError (one
        line) instead of an exit. Checks no value: :meth:`validate` does, and ``run()`` calls it."""
        parser = _RaisingParser(prog="train_multitask.py", add_help=False)
        add_arguments(parser, cls)
        argv = [str(a) for a in argv]
        from_file = apply_config_file(parser, argv)
        return cls.from_namespace(parser.parse_args(argv), from_file)

    def to_dict(self) -> dict:
        """The flags and their values (what run() writes to args.json, which --config reads back)."""
        return to_flat(self)

    # ------------------------------------------------------------------------------------------ checking
    def where(self, key: str, value=None) -> str:
        """How a message names a setting: ``--key [value]``, or ``FILE: key [value]`` if a config file set it."""
        shown = "" if value is None else f" {value}"
        return f"{self.from_file[key]}: {key}{shown}" if key in self.from_file else f"--{key}{shown}"

    def fail(self, key: str, what: str, value=None, others: tuple[str, ...] = (), sep: str = ": "):
        """Raise a ConfigError about ``key`` (``others``: further keys involved, to tell whether a file set one)."""
        from_file = any(k in self.from_file for k in (key, *others))
        raise ConfigError(f"{self.where(key, value)}{sep}{what}", from_file)

    def fail_with(self, key: str, message: str):
        """:meth:`fail` with a message that may already name the flag (``--key ...``): the flag is named once, as
        ``--key`` or as ``FILE: key`` if a config file set it."""
        flag = f"--{key}"
        after = message[len(flag):len(flag) + 1]
        if message.startswith(flag) and not (after.isalnum() or after == "_"):
            self.fail(key, message[len(flag):], sep="")
        self.fail(key, message)

    def validate(self) -> "RunConfig":
        """Check everything that can be checked before a file is read or written; raise ConfigError."""
        self._check_settings()
        self._check_combinations()
        self._check_pair_encoding()
        self._check_paths()
        self._check_max_seq_length()
        self._check_optim_args()
        self._check_combiner()  # last: a user's combiner is imported only by a run that passed every other check
        return self

    def _check_settings(self) -> None:
        problem = first_problem(self)  # each field's type, range and choices
        if problem:
            self.fail(*problem)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            self.fail("tasks", f"unknown task {', '.join(map(repr, bad)) or 'list: empty'} "
                               f"(choose from {', '.join(TASKS)})")
        if len(set(self.tasks)) != len(self.tasks):
            self.fail("tasks", f"a task is listed twice: {','.join(self.tasks)}")
        problem = self.training.device_problem()
        if problem:
            self.fail("device", problem, self.device)

    def _check_combinations(self) -> None:
        if self.predict_only and not self.checkpoint:
            self.fail("predict_only", "needs --checkpoint DIR", sep=" ")
        if self.checkpoint and not self.predict_only:
            self.fail("checkpoint", "is only used with --predict_only", self.checkpoint, ("predict_only",))
        if self.resume and (self.predict_only or self.overwrite_output_dir):
            other = "predict_only" if self.predict_only else "overwrite_output_dir"
            self.fail("resume", f"cannot be combined with {self.where(other)}", others=(other,), sep=" ")
        if self.bregman and not self.smart:
            self.fail("bregman", "is part of SMART: add --smart", others=("smart",), sep=" ")
        # bf16 keeps ~3 significant digits of an O(1) embedding: the ball's 1e-5 δ drowns in rounding, the default's
        # 1e-3 step does not (measured: docs/multitask.md, "SMART under bf16").
        if self.smart and self.bf16 == "on" and self.smart_projection == "ball":
            self.fail("smart_projection", f"ball with {self.where('bf16')}: the ball's perturbation (radius "
                      "--smart_epsilon, 1e-5 by default) is below bfloat16's resolution, so the regularizer measures "
                      "rounding; drop --bf16 or use --smart_projection library", others=("bf16",), sep=" ")

    def _check_pair_encoding(self) -> None:
        encoding = self.pair_encoding  # parsed when read (multitask.PairEncoding); here only if set by hand
        if not isinstance(encoding, PairEncoding):
            try:
                encoding = self.model.pair_encoding = PairEncoding(encoding)
            except ValueError as e:
                self.fail("pair_encoding", str(e), self.pair_encoding)
        given = {"sts_head": (self.sts_head, DEFAULT_STS_HEAD), "para_head": (self.para_head, DEFAULT_PARA_HEAD)}
        conflict = pair_head_conflict(encoding.by_task, self.tasks, given)
        if conflict:  # the message names both flags; and the config file, if one set either
            files = [self.from_file[k] for k in ("pair_encoding", "sts_head", "para_head") if k in self.from_file]
            raise ConfigError(f"{files[0]}: {conflict}" if files else conflict, bool(files))

    def _check_combiner(self) -> None:
        # A user's class (package.module:Class) is code: it is imported only when the command line says to trust it
        # (a --config file cannot: minbert.training.config_file), never with --predict_only (which trains nothing), and
        # then built and its step(ctx) checked here, so a mistake stops the run before any work.
        user_code = self.combiner not in COMBINERS
        if user_code and self.predict_only:
            return
        if user_code and ":" in self.combiner and not self.trust_combiner_code:
            self.fail("combiner", "names code to import and run; pass --trust_combiner_code on the command line "
                      "if you trust it", self.combiner)
        try:
            combiner = self.multitask.built_combiner(self.seed)  # the instance the Trainer trains with
            if user_code:
                check_interface(combiner, self.combiner)
        except ValueError as e:  # the message names the flag already
            key = "combiner_args" if str(e).startswith("--combiner_args") else "combiner"
            self.fail_with(key, str(e))

    def _check_paths(self) -> None:
        if not os.path.isdir(self.data_dir):
            self.fail("data_dir", "no such directory", self.data_dir)
        name = self.model_name_or_path
        if name not in PRESETS and not os.path.isdir(name):
            self.fail("model_name_or_path", f"not a preset ({', '.join(PRESETS)}) nor a directory", name)
        if name not in PRESETS and not self.predict_only:  # the folder's layout, before any data is read
            try:
                check_model_dir(name)
            except ValueError as e:
                self.fail("model_name_or_path", str(e).splitlines()[0])
        if self.predict_only:  # a checkpoint, or a run's output directory (its best/)
            try:
                self.checkpoint = str(resolve_checkpoint(self.checkpoint))
            except ValueError as e:
                self.fail("checkpoint", str(e).splitlines()[0])
        out = Path(self.output_dir).resolve()
        if out.exists() and not out.is_dir():
            self.fail("output_dir", "exists and is not a directory", self.output_dir)
        cwd, data = Path.cwd().resolve(), Path(self.data_dir).resolve()
        if out == cwd or out in cwd.parents:
            self.fail("output_dir", "is the current directory or one of its parents; name a folder for the run "
                                    "(e.g. runs/NAME)", self.output_dir)
        if out == data or out in data.parents:
            self.fail("output_dir", f"holds the data ({self.data_dir}); name a folder of its own for the run",
                      self.output_dir)
        given = self.task_spec
        try:  # --task_spec (files in --data_dir): a mistake names the spec file, or args.json's key, first
            self.task_spec = checked_task_spec(given, self.where("task_spec"), self.data_dir, self.predict_only)
            if self.predict_only:
                self._take_checkpoint_tasks(given)
        except TaskSpecError as e:
            raise ConfigError(str(e), from_file=True) from None

    def _take_checkpoint_tasks(self, given) -> None:
        # --predict_only predicts the tasks of the user's own that the checkpoint has heads for: its multitask.json
        # holds their spec, so no --task_spec is needed; one that is given must declare the same tasks.
        stored = checkpoint_task_spec(self.checkpoint)
        if self.task_spec is not None:
            difference = spec_difference(self.task_spec, stored)
            if difference:
                shown = self.where("task_spec", given if isinstance(given, str) else None)
                raise ConfigError(f"{shown}: disagrees with --checkpoint {self.checkpoint}: {difference}", True)
        if stored is not None:
            check_data_files(stored, self.data_dir, f"{Path(self.checkpoint) / 'multitask.json'}: task_spec",
                             SPLIT_NAMES[1:])
        self.task_spec = stored

    def model_config(self) -> BertConfig:
        """The encoder's architecture: the preset's, or the config.json of the model or --predict_only checkpoint."""
        source = self.checkpoint if self.predict_only else self.model_name_or_path
        if not self.predict_only and source in PRESETS:
            return PRESETS[source]
        return BertConfig.from_json(Path(source) / "config.json")  # a file problem: one line naming the file

    def _check_max_seq_length(self) -> None:
        n = self.max_seq_length
        if n is None:
            return
        try:
            limit = self.model_config().max_position_embeddings
        except (ValueError, TypeError):  # a missing or broken config.json is a file error, which run() reports
            limit = None                 # (naming the file) when it reads the model, before writing anything
        problem = seq_length_problem(n, limit)
        if problem:
            self.fail("max_seq_length", problem)

    def _check_optim_args(self) -> None:
        try:
            self.optimizer.options()  # parsed once: the optimizer is built from this result
        except ValueError as e:
            self.fail_with("optim_args", str(e).splitlines()[0])


def _flat_property(name: str) -> property:
    def get(self):
        return getattr(owner_of(self, name), name)

    def put(self, value):
        setattr(owner_of(self, name), name, value)

    return property(get, put, doc=f"--{name}")


# The flat view: every flag is an attribute of a RunConfig (what args.json records), read from its group.
for _name in setting_names(RunConfig):
    if _name not in {f.name for f in dataclasses.fields(RunConfig)}:
        setattr(RunConfig, _name, _flat_property(_name))
