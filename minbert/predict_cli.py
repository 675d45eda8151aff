"""Try a trained model on your own sentences: ``minbert-predict`` (or ``python -m minbert.predict_cli``).

    minbert-predict --checkpoint runs/main --task sst "a gripping, funny film"
    minbert-predict --checkpoint runs/main --task qqp "How old are you?" "What is your age?"
    minbert-predict --checkpoint runs/main --task sts "A man plays a guitar." "A man is playing guitar."
    minbert-predict --checkpoint runs/main --task sts --input pairs.txt --format jsonl --output pairs.jsonl

``--input`` reads a file in the task's CSV layout (the CS224N files: tab-separated, a header naming the ``id`` and
text columns) or one text per line (a tab-separated pair per line for qqp and sts): ``--input_format``, or the
exact header, says which (``minbert.tasks.predict_input``); anything else is refused. Predictions are made by the Python
API (``minbert.api``), batched; the whole output is computed before anything is written, and ``--output`` is
written atomically, never over an existing file unless ``--overwrite``, never over an input or into a checkpoint
or run folder (``minbert.io.output_policy``).
"""
from __future__ import annotations

import argparse
import csv
import io
import sys

from minbert.api import DEFAULT_BATCH_SIZE, SENTIMENT_LABELS, InferenceModel, MaxSeqLengthError, load
from minbert.cli import _run_user_command
from minbert.io import atomic_write_text, json_text, read_json_file
from minbert.io.output_policy import check_output_path
from minbert.io.settings import positive_int
from minbert.model.multitask import resolve_checkpoint
from minbert.tasks.data import TASKS, blank_text_problem
from minbert.tasks.predict_input import INPUT_FORMATS, read_inputs  # noqa: F401 (read_inputs: the --input reader)
from minbert.tasks.registry import HEAD_ORDER
from minbert.tasks.user_tasks import declare, parse_task_spec
from minbert.training.precision import DEFAULT_BF16, bf16_flag

PREDICT_TASKS = HEAD_ORDER
FORMATS = ("text", "csv", "jsonl")


class UsageError(Exception):
    """A mistake in the command line found after parsing (e.g. a task the checkpoint has no head for): exit 2."""


def _device(text: str) -> str:
    if text in ("auto", "cpu", "cuda") or (text.startswith("cuda:") and text[5:].isdigit()):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: choose auto, cpu, cuda or cuda:N")


def declared_tasks(argv: list[str] | None) -> tuple[str, ...]:
    """The tasks of the user's own that ``--checkpoint``'s multitask.json declares, declared for this process, so
    that ``--task`` accepts them (none where the checkpoint cannot be read: loading it names the problem)."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--checkpoint")
    path = pre.parse_known_args(argv)[0].checkpoint
    try:
        saved = read_json_file(resolve_checkpoint(path) / "multitask.json")
        return tuple(declare(parse_task_spec(saved["task_spec"]))) if "task_spec" in saved else ()
    except (ValueError, OSError, TypeError):
        return ()


def predict_parser(tasks: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """minbert-predict's flags; ``tasks``: tasks of the user's own that --task accepts besides the built-in ones."""
    p = argparse.ArgumentParser(
        prog="minbert-predict",
        description="Predict with a trained minbert model: the sentiment of sentences (sst, sst2), whether two "
                    "questions are paraphrases (qqp), the 0-5 similarity of two sentences (sts).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("model")
    g.add_argument("--checkpoint", required=True,
                   help="a minbert checkpoint (e.g. runs/main/best), a training run's --output_dir (its best/ is "
                        "used) or a minbert-export folder")
    g.add_argument("--device", type=_device, default="auto", help="auto, cpu, cuda or cuda:N")
    g.add_argument("--bf16", type=bf16_flag, nargs="?", const="on", default=DEFAULT_BF16, metavar="{auto,on,off}",
                   help="bfloat16 autocast for the forward passes (weights stay float32); --bf16 alone = on; auto (the "
                        "default) = on where the device has native bfloat16, off elsewhere")
    g.add_argument("--batch_size", type=positive_int, default=DEFAULT_BATCH_SIZE, help="inputs per forward pass")
    g.add_argument("--max_seq_length", type=positive_int, default=None,
                   help="truncate longer inputs, 5 to the model's max_position_embeddings, as in training (default: "
                        "the checkpoint's training limit; 128 for an export)")
    g = p.add_argument_group("input")
    g.add_argument("--task", required=True, choices=(*PREDICT_TASKS, *tasks),
                   help="sst / sst2: sentiment of each TEXT; qqp: is the pair TEXT TEXT a paraphrase; sts: the "
                        "0-5 similarity of the pair TEXT TEXT; or a task of your own the checkpoint was trained on")
    g.add_argument("texts", nargs="*", metavar="TEXT",
                   help="the sentence(s) to predict (sst: one or more; qqp, sts: exactly two, one pair)")
    g.add_argument("--input", metavar="FILE", default=None,
                   help="read the inputs from FILE instead: the task's CSV layout (tab-separated with the header "
                        f"'id, text column(s)[, label]', like data/{TASKS[HEAD_ORDER[0]].files['dev']}), or one text "
                        "per line (a "
                        "tab-separated pair per line for qqp and sts)")
    g.add_argument("--input_format", choices=INPUT_FORMATS, default="auto",
                   help="task: the task's CSV layout; lines: one text (or pair) per line, no header; auto: task if "
                        "the first line is exactly that header, lines if it is a plain input, else an error")
    g.add_argument("--skip_bad_rows", action="store_true",
                   help="in a task-layout --input, skip malformed rows (counted and reported) instead of stopping")
    g = p.add_argument_group("output")
    g.add_argument("--format", choices=FORMATS, default=None,
                   help="text (readable lines), csv or jsonl (one JSON object per line); default: text for TEXT "
                        "arguments, csv for --input")
    g.add_argument("--output", metavar="FILE", default=None,
                   help="write here (atomically) instead of stdout; never over --input or into a checkpoint or run "
                        "folder")
    g.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
    return p


def check_predict_args(p: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if args.input and args.texts:
        p.error("give TEXT arguments or --input FILE, not both")
    if not args.input and not args.texts:
        p.error("nothing to predict: give TEXT argument(s) or --input FILE")
    if args.texts and TASKS[args.task].is_pair and len(args.texts) != 2:
        p.error(f"--task {args.task} takes two texts (one pair), got {len(args.texts)}; "
                "for several pairs use --input FILE (a tab-separated pair per line)")
    for i, text in enumerate(args.texts, start=1):
        problem = blank_text_problem(text)  # the rule of --input, the task readers and the Python API
        if problem:
            p.error(f"TEXT {i} {problem}")
    if args.format is None:
        args.format = "csv" if args.input else "text"


def predict_records(model: InferenceModel, task: str, ids: list[str], inputs: list[tuple[str, ...]]) -> list[dict]:
    """One output record per input: its id and text(s), then the prediction."""
    columns = TASKS[task].text_columns
    records = [{"id": i, **dict(zip(columns, texts))} for i, texts in zip(ids, inputs)]
    if task in SENTIMENT_LABELS:
        labels, probs = model.predict_sentiment([t[0] for t in inputs], return_probabilities=True, task=task)
        names = SENTIMENT_LABELS[task]
        for r, label, p in zip(records, labels, probs):
            r.update(label=int(label), label_name=names[int(label)],
                     probabilities={n: round(float(x), 6) for n, x in zip(names, p)})
    elif TASKS[task].user:  # a task of the user's own: its class id and class probabilities, or its score
        if TASKS[task].label_kind == "class":
            labels, probs = model.predict(task, inputs if TASKS[task].is_pair else [t[0] for t in inputs], True)
            for r, label, p in zip(records, labels, probs):
                r.update(label=int(label), label_name=str(label),
                         probabilities={str(n): round(float(x), 6) for n, x in enumerate(p)})
        else:
            for r, score in zip(records, model.predict(task, inputs if TASKS[task].is_pair else [t[0] for t in inputs])):
                r.update(score=round(float(score), 4))
    elif TASKS[task].api_method == "predict_paraphrase":
        decisions, probs = model.predict_paraphrase(inputs, return_probabilities=True)
        for r, d, p in zip(records, decisions, probs):
            r.update(is_paraphrase=bool(d), probability=round(float(p), 6))
    else:
        for r, score in zip(records, model.predict_similarity(inputs)):
            r.update(similarity=round(float(score), 4))
    return records


def format_records(records: list[dict], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json_text(r, indent=None) + "\n" for r in records)  # NaN refused: jsonl is JSON
    if fmt == "csv":
        flat = []
        for r in records:
            row = {k: v for k, v in r.items() if k != "probabilities"}
            if "is_paraphrase" in row:
                row["is_paraphrase"] = int(row["is_paraphrase"])
            row.update({f"p_{n.replace(' ', '_')}": p for n, p in r.get("probabilities", {}).items()})
            flat.append(row)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=list(flat[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(flat)
        return buf.getvalue()
    return "".join(_readable(r, prefix=len(records) > 1) + "\n" for r in records)


def _readable(r: dict, prefix: bool) -> str:
    if "label" in r:
        probs = "  ".join(f"{n} {p:.3f}" for n, p in r["probabilities"].items())
        line = f"{r['label_name']} ({r['label']})  probabilities: {probs}"
    elif "is_paraphrase" in r:
        line = f"paraphrase: {'yes' if r['is_paraphrase'] else 'no'}  probability {r['probability']:.3f}"
    elif "score" in r:
        line = f"score: {r['score']:.4f}"
    else:
        line = f"similarity: {r['similarity']:.2f} (0-5)"
    return f"{r['id']}: {line}" if prefix else line


def main(argv: list[str] | None = None) -> int:
    p = predict_parser(declared_tasks(argv))
    args = p.parse_args(argv)
    check_predict_args(p, args)

    def go():
        if args.output:  # before the model is read: a refused --output costs nothing
            check_output_path(args.output, "--output", {"--input": args.input, "--checkpoint": args.checkpoint}
                              if args.input else {"--checkpoint": args.checkpoint}, args.overwrite)
        try:
            model = load(args.checkpoint, device=args.device, bf16=args.bf16, batch_size=args.batch_size,
                         max_seq_length=args.max_seq_length)
        except MaxSeqLengthError as e:
            raise UsageError(f"--{e}" if str(e).startswith("max_seq_length") else str(e)) from None
        if args.task not in model.tasks:
            raise UsageError(f"--task {args.task}: the checkpoint has no {args.task} head (it has: "
                             f"{', '.join(model.tasks)})")
        if args.input:
            ids, inputs = read_inputs(args.input, args.task, args.skip_bad_rows, args.input_format)
        elif TASKS[args.task].is_pair:
            ids, inputs = ["1"], [tuple(args.texts)]
        else:
            ids, inputs = [str(i) for i in range(1, len(args.texts) + 1)], [(t,) for t in args.texts]
        text = format_records(predict_records(model, args.task, ids, inputs), args.format)
        if args.output:
            atomic_write_text(args.output, text)
        else:
            sys.stdout.write(text)

    try:
        return _run_user_command(go)
    except UsageError as e:
        p.error(str(e))  # usage + one "minbert-predict: error: ..." line, exit 2


if __name__ == "__main__":
    raise SystemExit(main())
