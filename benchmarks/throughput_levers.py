"""benchmarks/throughput.py --levers: (a) with one of its speed levers taken away at a time, on the same examples,
and (b) with transformers' eager attention instead of SDPA."""
from __future__ import annotations

import contextlib
import copy
import functools

import torch

from minbert.model.encoder import BertModel
from minbert.tasks.predict import predict_task

from throughput_batches import TASKS, FixedStream, shuffled_examples
from throughput_reference import HFMultitask, Pipeline, hf_encoder, predict_hf


# name -> (what is taken away, the pipeline it is taken from)
LEVERS = {
    "padded": ("(a) skipping padding tokens outside attention", "a"),
    "random": ("(a) length bucketing: random batches of the same examples, padded to their longest", "a"),
    "bs32": ("(a) large eval batches: 32 instead of --eval_batch_size", "a"),
    "nograd": ("(a) torch.inference_mode: torch.no_grad instead", "a"),
    "math": ("(a) SDPA's fused CPU attention kernel: its math backend (softmax(QK^T)V as separate ops)", "a"),
    "hf_eager": ("(b) SDPA: transformers' eager attention instead", "b"),
}


def lever_runs(args, config, ours, hf, trainer, train, chosen, evals, a_train, a_infer, b_train, b_infer, device,
               pad_id, amp):
    """(a) with one lever taken away at a time, on the same examples; and (b) with eager attention (``config``: the
    RunConfig that (a)'s Trainer was built from)."""

    @contextlib.contextmanager
    def every_position():
        ours.encoder.encode = functools.partial(BertModel.encode, ours.encoder, skip_padding=False)
        try:
            yield
        finally:
            del ours.encoder.encode

    @contextlib.contextmanager
    def random_batches():
        saved = trainer.streams
        g = torch.Generator().manual_seed(args.seed)
        trainer.streams = {}
        for t in TASKS:
            idx = shuffled_examples(chosen[t], g)
            trainer.streams[t] = FixedStream(train[t], [idx[s:s + args.batch_size] for s in range(0, len(idx), args.batch_size)])
        try:
            yield
        finally:
            trainer.streams = saved

    def ours_infer(batch_size=args.eval_batch_size, grad_mode=torch.inference_mode):
        predict = predict_task.__wrapped__  # predict_task without its inference_mode decorator
        with grad_mode():
            for t in TASKS:
                predict(ours, evals[t], batch_size, device, pad_id, amp_dtype=amp)

    def math_attention():
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])

    import transformers

    hf_eager = HFMultitask(hf_encoder(transformers, ours.encoder, "eager"), copy.deepcopy(hf.heads), hf.pooling)
    eager_pipe = Pipeline(hf_eager, config, amp)

    def with_context(ctx, fn):
        def run():
            with ctx():
                fn()
        return run

    def eager_train():
        hf_eager.train()
        for i in range(args.train_batches):
            eager_pipe.train_step({t: train[t].batch(chosen[t][i], pad_id) for t in TASKS})

    return {
        "padded_train": with_context(every_position, a_train),
        "padded_infer": with_context(every_position, a_infer),
        "random_train": with_context(random_batches, a_train),
        "bs32_infer": functools.partial(ours_infer, batch_size=32),
        "nograd_infer": functools.partial(ours_infer, grad_mode=torch.no_grad),
        "math_infer": with_context(math_attention, a_infer),
        "hf_eager_train": eager_train,
        "hf_eager_infer": lambda: [predict_hf(hf_eager, evals[t], args.eval_batch_size, pad_id, amp) for t in TASKS],
    }
