"""The one reader of ``minbert-predict --input``: exactly two layouts, never a guess.

* ``task``: the task's CS224N layout, tab-separated with a header row whose named columns are exactly
  ``id`` and the task's text columns (``sentence``; ``sentence1 sentence2`` for qqp and sts), optionally followed by
  the label column (the dev files); unnamed or numeric index columns (``ids-sst-test-student.csv`` starts with
  ``0``) are allowed. Rows are read by :func:`minbert.tasks.data.read_task_file`, with every check training applies.
* ``lines``: one text per line (sst, sst2) or one tab-separated pair per line (qqp, sts), no header; the id of an
  input is its line number. A line that is blank is skipped and counted; a sentence with a tab is an error
  (a TSV row is never scored as one sentence).

``--input_format auto`` (the default) takes ``task`` when the first line is exactly such a header and ``lines``
when the first line is a plain input; a first line that is neither (another task's header, a header with other
names, a tab-separated row for sst) is a one-line error naming the file, the header found and the one expected.
"""
from __future__ import annotations

import sys
from pathlib import Path

from minbert.io import read_text_file
from minbert.tasks.data import TASKS, DataError, blank_text_problem, read_task_file, shorten

INPUT_FORMATS = ("auto", "task", "lines")
# Column names of the task files and of common TSV datasets: a first line holding one of them is a header.
_COMMON_HEADER_WORDS = {"id", "label", "text", "question1", "question2", "qid1", "qid2", "score", "sentence_a",
                        "sentence_b"}


def _header_words() -> set[str]:
    """:data:`_COMMON_HEADER_WORDS` and the columns of every task now (tasks of the user's own included)."""
    return _COMMON_HEADER_WORDS | {c for spec in TASKS.values() for c in (*spec.text_columns, spec.label_column)}


def layout_of(task: str):
    spec = TASKS[task]
    return TASKS[spec.source] if spec.source else spec  # SST-2 is read from the SST files, every row kept


def expected_headers(task: str) -> list[list[str]]:
    spec = layout_of(task)
    return [["id", *spec.text_columns], ["id", *spec.text_columns, spec.label_column]]


def _named(fields: list[str]) -> list[str]:
    return [f for f in fields if f and not f.isdigit()]  # unnamed and pandas-index columns carry no meaning


def _show(fields: list[str], limit: int = 80) -> str:
    text = " \\t ".join(fields)  # the separator shown as \t, as the messages of the task readers do
    return "'" + (text if len(text) <= limit else text[:limit] + "...") + "'"


def read_inputs(path: str | Path, task: str, skip_bad_rows: bool = False,
                input_format: str = "auto") -> tuple[list[str], list[tuple[str, ...]]]:
    """(ids, inputs) of an --input file in one of the two layouts (module docstring). Every problem is a one-line
    DataError naming the file (and line)."""
    path = Path(path)
    if input_format not in INPUT_FORMATS:
        raise ValueError(f"input_format {input_format!r}: choose {', '.join(INPUT_FORMATS)}")
    text = read_text_file(path)  # regular file, UTF-8 (a bad byte named by line), a BOM dropped
    lines = [line[:-1] if line.endswith("\r") else line for line in text.split("\n")]
    if lines and lines[-1] == "":
        lines.pop()  # the file's final newline
    if not any(line.strip() for line in lines):
        raise DataError(f"{path}: no texts to predict")
    first = next(line for line in lines if line.strip())
    fields = [h.strip() for h in first.split("\t")]
    expected = expected_headers(task)
    is_header = _named(fields) in expected
    expect = f"expected the header {_show(expected[0])} (--input_format task)"
    if input_format == "task" or (input_format == "auto" and is_header):
        if not is_header:
            raise DataError(f"{path}:1: header {_show(fields)} found, {expect}")
        return _read_task_layout(path, task, skip_bad_rows)
    if input_format == "auto":
        spec = layout_of(task)
        shape = len(fields) == (2 if spec.is_pair else 1)
        if not shape or any(f.lower() in _header_words() for f in fields):
            plain = "a tab-separated pair" if spec.is_pair else "one sentence without tabs"
            raise DataError(f"{path}:1: header {_show(fields)} found, {expect}, or {plain} per line "
                            "(--input_format lines)")
    return _read_lines(path, task, lines)


def _read_task_layout(path: Path, task: str, skip_bad_rows: bool) -> tuple[list[str], list[tuple[str, ...]]]:
    data = read_task_file(layout_of(task), path, "test", skip_bad_rows)
    if data.skipped:
        print(f"warning: {path}: skipped {len(data.skipped)} malformed row(s): {'; '.join(data.skipped)}",
              file=sys.stderr)
    if not data.examples:
        raise DataError(f"{path}: no texts to predict after the header")
    return [ex.id for ex in data.examples], [ex.texts for ex in data.examples]


def _read_lines(path: Path, task: str, lines: list[str]) -> tuple[list[str], list[tuple[str, ...]]]:
    is_pair = layout_of(task).is_pair
    ids, inputs, blank = [], [], 0
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            blank += 1
            continue
        if "\x00" in line:
            raise DataError(f"{path}:{n}: NUL byte in the line")
        parts = line.split("\t")
        if is_pair and len(parts) != 2:
            raise DataError(f"{path}:{n}: expected two tab-separated texts (one {task} pair per line), found "
                            f"{len(parts)} field(s): {shorten(line)}")
        if not is_pair and len(parts) != 1:
            raise DataError(f"{path}:{n}: {len(parts)} tab-separated fields: --task {task} reads one sentence per "
                            "line, without tabs (a task file needs the header 'id \\t sentence')")
        for side, t in zip(("first", "second") if is_pair else ("",), parts):
            problem = blank_text_problem(t)
            if problem:
                what = f"the {side} text of the pair" if is_pair else "the text"
                raise DataError(f"{path}:{n}: {what} {problem}")
        inputs.append(tuple(parts))
        ids.append(str(n))
    if blank:
        print(f"note: {path}: {blank} blank line(s) skipped", file=sys.stderr)
    return ids, inputs
