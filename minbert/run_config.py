"""One training run's settings: a dataclass mirroring train_multitask.py's flags, checked in one place.

The flags (their help, defaults and converters) are declared once, in ``minbert.cli.train_parser``; a
RunConfig is built from what that parser returns: the command line, a ``--config`` file whose keys became the
parser's defaults, or the argument lists of ``minbert.experiments``. :meth:`RunConfig.validate` then checks the
whole resolved configuration (types, nulls, non-finite numbers, ranges, conflicting flags, the output directory,
``--optim_args``) before anything is read or written. Its messages name the flag (``--warmup_ratio``) or, for
a value that came from a config file, the file and key (``run.json: warmup_ratio``).
"""
from __future__ import annotations

import dataclasses
import math
import os
import re
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

from .combiners import COMBINERS, PCGRAD_REDUCTIONS, build_combiner
from .config import PRESETS, BertConfig
from .data import TASKS
from .heads import DEFAULT_PARA_HEAD, DEFAULT_STS_HEAD, PARA_HEADS, STS_HEADS, pair_head_conflict
from .legacy_settings import current_settings
from .model import check_model_dir
from .multitask import parse_pair_encoding, resolve_checkpoint
from .optim import OPTIMIZERS
from .pooling import POOLING_MODES
from .precision import BF16_MODES
from .smart import SMART_PROJECTIONS
from .user_combiner import check_interface
from .user_tasks import TaskSpecError, checked_task_spec

# Choices of the flags that take one of a few words, each from the module that implements them (the parser's
# `choices` come from here too).
POOLINGS = POOLING_MODES
OPTIMIZER_NAMES = tuple(OPTIMIZERS)
REPORT_TO = ("none", "tensorboard")

from .tokenizer import MIN_SEQ_LENGTH, seq_length_problem  # noqa: E402,F401 (the one max_seq_length rule)
SEED_RANGE = (0, 2**32 - 1)  # numpy's global generator takes 32-bit seeds

# Numeric ranges, inclusive: (low, high), None for no bound. Every float must also be finite.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_train_samples": (1, None), "max_eval_samples": (1, None), "seed": SEED_RANGE,
    "per_device_train_batch_size": (1, None), "per_device_eval_batch_size": (1, None),
    "learning_rate": (0, None), "head_learning_rate": (0, None), "num_train_epochs": (1, None),
    "max_steps_per_epoch": (1, None), "weight_decay": (0, None), "warmup_ratio": (0, 1), "max_grad_norm": (0, None),
    "max_bad_steps": (0, None), "logging_steps": (1, None), "iterations_multiplier": (1, None),
    "smart_steps": (0, None), "smart_lambda": (0, None), "smart_eta": (0, None), "smart_epsilon": (0, None),
    "smart_sigma": (0, None), "bregman_mu": (0, None), "bregman_beta": (0, 1), "save_steps": (0, None),
}
CHOICES: dict[str, tuple[str, ...]] = {
    "pooling": POOLINGS, "sts_head": tuple(STS_HEADS), "para_head": PARA_HEADS, "bf16": BF16_MODES, "smart_projection": SMART_PROJECTIONS,
    "optim": OPTIMIZER_NAMES, "report_to": REPORT_TO, "pcgrad_reduction": PCGRAD_REDUCTIONS,
}
class ConfigError(ValueError):
    """A setting is wrong; ``from_file`` says whether the message names a config file (else a flag)."""

    def __init__(self, message: str, from_file: bool = False):
        super().__init__(message)
        self.from_file = from_file


@dataclass
class RunConfig:
    """The settings of one run, field for field the flags of ``train_multitask.py`` (same names, same order;
    their defaults and help are in ``minbert.cli.train_parser``)."""

    config: str | None
    # model
    model_name_or_path: str
    pooling: str
    sts_head: str
    para_head: str
    pair_encoding: str
    # data
    data_dir: str
    tasks: list[str]
    task_spec: str | dict | None  # a file's path; after validate() its checked content (minbert.user_tasks)
    max_seq_length: int | None
    max_train_samples: int | None
    max_eval_samples: int | None
    skip_bad_rows: bool
    # training
    seed: int
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    learning_rate: float
    head_learning_rate: float
    num_train_epochs: int
    max_steps_per_epoch: int | None
    weight_decay: float
    warmup_ratio: float
    max_grad_norm: float
    max_bad_steps: int
    logging_steps: int
    device: str
    bf16: str
    torch_compile: bool
    # multitask
    combiner: str
    combiner_args: str | None
    iterations_multiplier: int
    smart: bool
    smart_steps: int
    smart_lambda: float
    smart_eta: float
    smart_projection: str
    smart_epsilon: float | None
    smart_sigma: float
    bregman: bool
    bregman_mu: float
    bregman_beta: float
    trust_combiner_code: bool
    pcgrad_reduction: str
    # optimizer
    optim: str
    optim_args: str | None
    # output
    output_dir: str
    overwrite_output_dir: bool
    save_steps: int
    resume: bool
    predict_only: bool
    checkpoint: str | None
    skip_test_predictions: bool
    report_to: str

    # The config file each key came from, for the keys a --config file set (not a field: not in args.json).
    from_file: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_namespace(cls, args, from_file: dict[str, str] | None = None) -> "RunConfig":
        """From the parser's namespace (``from_file``: key -> the --config file that set it). Copies, checks
        nothing: :meth:`validate` does."""
        values = dict(vars(args))
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in values]
        extra = [k for k in values if k not in {f.name for f in dataclasses.fields(cls)}]
        if missing or extra:  # a flag added to train_parser needs its field here (and the other way round)
            raise TypeError(f"RunConfig and train_parser disagree: fields without a flag {missing}, "
                            f"flags without a field {extra}")
        if isinstance(values["optim_args"], list):  # the M-FAC cards pass it unquoted: several shell words
            values["optim_args"] = " ".join(map(str, values["optim_args"]))
        config = cls(**current_settings(values))
        config.from_file = dict(from_file or {})
        return config

    def to_dict(self) -> dict:
        """The flags and their values (what run() writes to args.json, which --config reads back)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

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
        self._check_types()
        self._check_ranges()
        self._check_combinations()
        self._check_pair_encoding()
        self._check_paths()
        self._check_max_seq_length()
        self._check_optim_args()
        self._check_combiner()  # last: a user's combiner is imported only by a run that passed every other check
        return self

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, hint = getattr(self, f.name), hints[f.name]
            args = typing.get_args(hint)
            optional = type(None) in args
            base, *more = [a for a in args if a is not type(None)] if optional else [hint]
            if value is None:
                if not optional:
                    self.fail(f.name, f"expected {_kind(base)}, got null")
                continue
            if not any(_is_instance(value, b) for b in (base, *more)):
                self.fail(f.name, f"expected {_kind(base)}, got {value!r}")
            if isinstance(value, float) and not math.isfinite(value):
                self.fail(f.name, f"must be a finite number, got {value}")
            if isinstance(value, str) and not value.strip() and f.name not in ("optim_args",):
                self.fail(f.name, "must not be empty")

    def _check_ranges(self) -> None:
        for key, (low, high) in RANGES.items():
            value = getattr(self, key)
            if value is None:
                continue
            if (low is not None and value < low) or (high is not None and value > high):
                bound = (f"in [{low}, {high}]" if low is not None and high is not None
                         else f">= {low}" if low is not None else f"<= {high}")
                self.fail(key, f"must be {bound}, got {value}")
        for key, choices in CHOICES.items():
            if getattr(self, key) not in choices:
                self.fail(key, f"choose from {', '.join(choices)}", getattr(self, key))
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            self.fail("tasks", f"unknown task {', '.join(map(repr, bad)) or 'list: empty'} "
                               f"(choose from {', '.join(TASKS)})")
        if len(set(self.tasks)) != len(self.tasks):
            self.fail("tasks", f"a task is listed twice: {','.join(self.tasks)}")
        if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", self.device):
            self.fail("device", "choose auto, cpu or cuda", self.device)

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
        try:
            encoding = parse_pair_encoding(self.pair_encoding)
        except ValueError as e:
            self.fail("pair_encoding", str(e), self.pair_encoding)
        given = {"sts_head": (self.sts_head, DEFAULT_STS_HEAD), "para_head": (self.para_head, DEFAULT_PARA_HEAD)}
        conflict = pair_head_conflict(encoding, self.tasks, given)
        if conflict:  # the message names both flags; and the config file, if one set either
            files = [self.from_file[k] for k in ("pair_encoding", "sts_head", "para_head") if k in self.from_file]
            raise ConfigError(f"{files[0]}: {conflict}" if files else conflict, bool(files))

    def _check_combiner(self) -> None:
        # A user's class (package.module:Class) is code: it is imported only when the command line says to trust it
        # (a --config file cannot: minbert.config_file), never with --predict_only (which trains nothing), and
        # then built and its step(ctx) checked here, so a mistake stops the run before any work.
        user_code = self.combiner not in COMBINERS
        if user_code and self.predict_only:
            return
        if user_code and ":" in self.combiner and not self.trust_combiner_code:
            self.fail("combiner", "names code to import and run; pass --trust_combiner_code on the command line "
                      "if you trust it", self.combiner)
        try:
            combiner = build_combiner(self.combiner, self.seed, self.combiner_args)
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
        try:  # --task_spec (files in --data_dir): a mistake names the spec file, or args.json's key, first
            self.task_spec = checked_task_spec(self.task_spec, self.where("task_spec"), self.data_dir, self.predict_only)
        except TaskSpecError as e:
            raise ConfigError(str(e), from_file=True) from None

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
        from .optim.build import check_optim_args

        try:
            check_optim_args(self.optim, self.optim_args)
        except ValueError as e:
            self.fail_with("optim_args", str(e).splitlines()[0])


def _is_instance(value, base) -> bool:
    if base is bool:
        return isinstance(value, bool)
    if base is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if base is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if typing.get_origin(base) is list:
        (item,) = typing.get_args(base)
        return isinstance(value, list) and all(_is_instance(v, item) for v in value)
    return isinstance(value, base)


def _kind(base) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}
    if typing.get_origin(base) is list:
        return "a list of strings"
    return names.get(base, getattr(base, "__name__", str(base)))
