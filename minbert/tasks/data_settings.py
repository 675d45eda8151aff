"""The data group of train_multitask.py's flags (:class:`DataSettings`, minbert.io.settings) and the reader of
``--tasks``: which task files a run reads, how many rows, and how long an input may be. Beside minbert.tasks.data (the
readers themselves), which stays within the size limit; what ``--task_spec`` holds is minbert.tasks.user_tasks'."""
from __future__ import annotations

from dataclasses import dataclass

from minbert.io import comma_list
from minbert.io.settings import flag_reader, positive_int, setting
from minbert.model.tokenizer import MIN_SEQ_LENGTH
from minbert.tasks.registry import DEFAULT_TASKS, TASKS


def read_tasks(text: str) -> list[str]:
    """--tasks: a comma-separated list of known tasks."""
    tasks = comma_list(text, "task list")  # the one rule of list flags: no empty or repeated item
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ValueError(f"unknown task {', '.join(bad)!r} (choose from {', '.join(TASKS)})")
    return tasks


tasks_flag = flag_reader(read_tasks)


@dataclass
class DataSettings:
    """The data group of flags: which task files are read, how many rows, and how long an input may be."""

    data_dir: str = setting("data", help="folder holding the CS224N task files")
    tasks: list[str] = setting(list(DEFAULT_TASKS), parse=tasks_flag,
                               help="comma-separated tasks: sst,qqp,sts (default), or sst2 (SST-2 built from the SST "
                                    "files)")
    # The command line gives a file's path; RunConfig.validate replaces it by the file's checked content
    # (user_tasks.checked_task_spec), which args.json then records, so a run never depends on the file again.
    task_spec: str | dict | None = setting(None, metavar="FILE.json",
                                           help="tasks of your own, trained beside --tasks (docs/tasks.md)")
    max_seq_length: int | None = setting(  # its range is tokenizer.seq_length_problem's
        None, parse=positive_int,
        help=f"truncate longer inputs, {MIN_SEQ_LENGTH} tokens at least (a pair needs [CLS] a [SEP] b "
             "[SEP]) and at most the model's max_position_embeddings (default: the tokenizer's own limit: "
             "128 for the embedded encoder, the training run's with --predict_only)")
    max_train_samples: int | None = setting(None, bounds=(1, None), help="first N training rows per task")
    max_eval_samples: int | None = setting(None, bounds=(1, None),
                                           help="first N dev/test rows per task (prediction files then hold only "
                                                "those)")
    skip_bad_rows: bool = setting(False, help="skip malformed rows (counted and reported) instead of stopping")
