"""A task of your own from the shipped data: "stsbin", is a sentence pair similar (STS similarity above 2.5)?

    python examples/sts_binary.py my_data
    python train_multitask.py --task_spec examples/stsbin.json --data_dir my_data --output_dir runs/stsbin

writes my_data/stsbin-{train,dev,test}.csv (columns id, sentence1, sentence2, label; the test file has no labels,
as the STS test file has none) from my_data's sts-*.csv files, which it reads with minbert's own reader (malformed
rows skipped). examples/stsbin.json declares the task (docs/tasks.md). ``--rows N`` keeps the first N rows.
"""
import argparse
import csv
from pathlib import Path

from minbert.tasks.data import load_task

THRESHOLD = 2.5


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("data_dir", help="the folder holding the sts-*.csv files; the stsbin files are written there")
    p.add_argument("--rows", type=int, default=None, help="keep the first N rows of each split")
    args = p.parse_args(argv)
    for split in ("train", "dev", "test"):
        examples = load_task("sts", split, args.data_dir, skip_bad_rows=True).examples[: args.rows]
        path = Path(args.data_dir) / f"stsbin-{split}.csv"
        with open(path, "w", encoding="utf-8", newline="") as f:
            out = csv.writer(f, delimiter="\t", lineterminator="\n")
            out.writerow(["id", "sentence1", "sentence2", *(["label"] if split != "test" else [])])
            for ex in examples:
                label = [int(ex.label > THRESHOLD)] if split != "test" else []
                out.writerow([ex.id, *ex.texts, *label])
        print(f"{path}: {len(examples)} pairs")


if __name__ == "__main__":
    main()
