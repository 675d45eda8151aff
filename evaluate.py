"""Score the six CS224N prediction files; see `python evaluate.py --help`."""
from minbert.cli import evaluate_main

if __name__ == "__main__":
    raise SystemExit(evaluate_main())
