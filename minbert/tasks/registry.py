"""The task registry: one :class:`TaskSpec` per built-in task holds everything the package knows about it.

A task's files, columns and label type (data.py reads them), the head it gets (heads.py builds it from
``head``), its metric and its part of the CS224N overall score (metrics.py), its prediction file (predict.py),
its name in the score tables (metrics.py, significance.py, experiments), and the Python API method that predicts
it (api.py). The package names the tasks only here: tests/test_tasks.py scans ``minbert/`` for task names and
file names written anywhere else. Adding a built-in task is one entry in :data:`TASKS`.

This module imports nothing from the package (every other module may read it).
"""
from __future__ import annotations

from dataclasses import dataclass

# metric -> the range of its score (results.json checks; accuracies in [0, 1], Pearson r in [-1, 1])
METRIC_RANGES = {"accuracy": (0.0, 1.0), "pearson": (-1.0, 1.0)}
OVERALL = "overall"  # the key of the CS224N overall score beside the task scores
OVERALL_RANGE = (0.0, 1.0)


@dataclass(frozen=True)
class TaskSpec:
    name: str
    files: dict[str, str]  # split -> file name
    text_columns: tuple[str, ...]
    label_column: str
    label_kind: str  # "class" (integer in [0, num_labels)) or "score" (float in [lo, hi])
    num_labels: int = 0
    score_range: tuple[float, float] = (0.0, 0.0)
    output_prefix: str = ""  # prediction file prefix (CS224N leaderboard names)
    prediction_header: str = ""
    # Derived tasks: the file's label -> this task's label, None = not part of the task (e.g. SST-2 leaves out the
    # neutral class). Such rows are dropped by definition and counted in TaskData.dropped, not treated as bad rows.
    label_map: tuple[int | None, ...] | None = None
    # The task whose file layout a derived task's prediction inputs are read with (every row kept: no label_map).
    source: str = ""
    head: str = ""  # heads.py's head family: "sentiment", "paraphrase" or "similarity"
    metric: str = "accuracy"  # "accuracy" or "pearson" (metrics.task_score)
    leaderboard: bool = False  # one of the three tasks of the CS224N overall score
    table_label: str = ""  # its column / row name in score tables
    class_names: tuple[str, ...] = ()  # names of the class ids (the API's SENTIMENT_LABELS)
    api_method: str = ""  # the InferenceModel method that predicts it
    # Pair tasks: the flag choosing the bi-encoder's head, and its value that is a plain linear layer.
    head_flag: tuple[str, str] | None = None
    # A task of the user's own (--task_spec, minbert.tasks.user_tasks): scored and reported beside the CS224N overall
    # score, never part of it (nor of the training overall that picks the best epoch).
    user: bool = False

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def metric_range(self) -> tuple[float, float]:
        return METRIC_RANGES[self.metric]

    def overall_part(self, value: float) -> float:
        """The score's share in the CS224N overall score: accuracies as they are, Pearson r mapped to 0..1."""
        return (value + 1) / 2 if self.metric == "pearson" else value

    def prediction_file(self, split: str) -> str:
        """The prediction file's name, e.g. ``sst-dev-output.csv`` (the CS224N leaderboard's names)."""
        return f"{self.output_prefix}-{split}-output.csv"


_SST_FILES = {"train": "ids-sst-train.csv", "dev": "ids-sst-dev.csv", "test": "ids-sst-test-student.csv"}
_SENTIMENT_NAMES = ("negative", "somewhat negative", "neutral", "somewhat positive", "positive")

# Ordered: the CS224N tasks sst, qqp, sts, then the derived ones (this order is that of score tables, loss logs
# and the --tasks choices).
TASKS: dict[str, TaskSpec] = {spec.name: spec for spec in (
    TaskSpec(
        "sst", _SST_FILES, ("sentence",), "sentiment", "class", num_labels=5, output_prefix="sst",
        prediction_header="Predicted_Sentiment", head="sentiment", leaderboard=True, table_label="SST acc",
        class_names=_SENTIMENT_NAMES, api_method="predict_sentiment",
    ),
    TaskSpec(
        "qqp", {"train": "quora-train.csv", "dev": "quora-dev.csv", "test": "quora-test-student.csv"},
        ("sentence1", "sentence2"), "is_duplicate", "class", num_labels=2, output_prefix="para",
        prediction_header="Predicted_Is_Paraphrase", head="paraphrase", leaderboard=True, table_label="QQP acc",
        api_method="predict_paraphrase", head_flag=("para_head", "uv"),
    ),
    TaskSpec(
        "sts", {"train": "sts-train.csv", "dev": "sts-dev.csv", "test": "sts-test-student.csv"},
        ("sentence1", "sentence2"), "similarity", "score", score_range=(0.0, 5.0), output_prefix="sts",
        prediction_header="Predicted_Similiary",  # sic: the course's spelling
        head="similarity", metric="pearson", leaderboard=True, table_label="STS r",
        api_method="predict_similarity", head_flag=("sts_head", "linear"),
    ),
    # GLUE's SST-2 built from the SST files: classes 0-1 negative, 3-4 positive, neutral (2) dropped. The dev split
    # keeps 872 sentences, exactly GLUE's SST-2 dev set. The unlabeled test file is predicted whole.
    TaskSpec(
        "sst2", _SST_FILES, ("sentence",), "sentiment", "class", num_labels=2, output_prefix="sst2",
        prediction_header="Predicted_Sentiment", label_map=(0, 0, None, 1, 1), source="sst", head="sentiment",
        table_label="SST-2 acc", class_names=(_SENTIMENT_NAMES[0], _SENTIMENT_NAMES[-1]),
        api_method="predict_sentiment",
    ),
)}
# The CS224N multitask benchmark: what --tasks means when not given, and the tasks of the overall score.
DEFAULT_TASKS = tuple(name for name, spec in TASKS.items() if spec.leaderboard)
LEADERBOARD_TASKS = DEFAULT_TASKS


def head_order(names) -> list[str]:
    """``names`` (tasks of the registry) single-sentence tasks first, then pair tasks, each in registry order: the
    order heads are built in (parameter initialization draws from the seeded generator in this order)."""
    chosen = [t for t in TASKS if t in names]
    return [t for t in chosen if not TASKS[t].is_pair] + [t for t in chosen if TASKS[t].is_pair]


HEAD_ORDER = tuple(head_order(TASKS))  # also the order of minbert-predict's --task choices


def register_user_tasks(specs) -> None:
    """Add tasks of the user's own (minbert.tasks.user_tasks builds them) to :data:`TASKS`, after the built-in ones, for
    this process. A name of a built-in task, or of a user task already declared otherwise, is a ValueError: a
    process holds one definition per name (two runs or checkpoints that declare one name differently cannot be
    used in one process)."""
    for spec in specs:
        old = TASKS.get(spec.name)
        if old is not None and not old.user:
            raise ValueError(f"task {spec.name!r} is a built-in task; give yours another name")
        if old is not None and old != spec:
            raise ValueError(f"task {spec.name!r} is already declared otherwise in this process")
    for spec in specs:
        TASKS[spec.name] = spec


def get_task(name: str) -> TaskSpec:
    """The task called ``name``; ValueError naming the known tasks otherwise."""
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (choose from {', '.join(TASKS)})")
    return TASKS[name]


def tasks_of_method(method: str) -> tuple[str, ...]:
    """The tasks the API method ``method`` predicts, in registry order (predict_sentiment: sst, sst2)."""
    return tuple(t for t, s in TASKS.items() if s.api_method == method)
