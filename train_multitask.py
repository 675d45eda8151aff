"""Fine-tune BERT on SST, QQP and STS; see `python train_multitask.py --help`."""
from minbert.cli import train_main

if __name__ == "__main__":
    raise SystemExit(train_main())
