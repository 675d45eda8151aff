"""The size of SMART's perturbation δ and of the adversarial divergence, under both forms of δ and in float32
against bfloat16 autocast (docs/multitask.md, "SMART: the size of δ").

The model is the training command's default architecture (train_multitask.py's defaults, so --pooling mean and
its heads) on the pretrained encoder, in eval mode so that dropout does not hide the perturbation, and one batch
of the first N training examples of every task. For each task and form it prints:

* the largest |δ| of each real token (median and range over the batch's tokens; padding has no gradient);
* R_noise: ℓ_s(f(x + ν), f(x)) with the initial noise ν ~ N(0, σ²I) alone (``--smart_steps 0``);
* R_adv: ℓ_s(f(x + δ), f(x)) after the ascent step, and R_adv / R_noise;
* R_rand: ℓ_s at a random direction of the same size as δ (each real token rescaled to δ's max-norm for that
  token), and R_adv / R_rand: how much the ascent's direction, not δ's size, adds;
* with --bf16 also: R_noise and R_adv under bfloat16 autocast (the same noise); the float32 divergence at the δ
  found under bfloat16 (is that δ adversarial?); the cosine between the δ found in bfloat16 and in float32; and
  what the first layer sees of δ once x + δ is rounded to bfloat16: the component of bf16(x + δ) - bf16(x) along
  δ (1: all of δ on average) and its cosine with δ.

    python benchmarks/smart_scale.py --bf16            # minilm-l6, 16 examples: about 100 s of CPU on one core
    python benchmarks/smart_scale.py --train_mode      # dropout on, as in training
    python benchmarks/smart_scale.py --forms library_early --epsilon 1e-5   # the early formula with the report's ε
    python benchmarks/smart_scale.py --forms library --eta 1e5   # a step large enough for the gradient to beat ν

Every number is unweighted (λ = 1); the training loss adds λ = 5 times R_adv.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minbert.cli import train_parser  # noqa: E402
from minbert.methods.smart import SMART_PROJECTIONS, adversarial_perturbation, divergence  # noqa: E402
from minbert.model.tokenizer import load_tokenizer, pad_token_id  # noqa: E402
from minbert.tasks.data import load_task, tensorize  # noqa: E402
from minbert.training.run import build_model  # noqa: E402
from minbert.training.run_config import RunConfig  # noqa: E402


def load(model_name: str, data_dir: str, tasks: list[str], examples: int, seed: int = 0):
    """(model in eval mode, {task: batch of the first ``examples`` training rows})."""
    config = RunConfig.from_namespace(train_parser().parse_args(["--model_name_or_path", model_name, "--tasks",
                                                                 ",".join(tasks)]))
    torch.manual_seed(seed)  # the heads are freshly initialized
    model = build_model(config).eval()
    tok = load_tokenizer(model_name, config.data.max_seq_length)
    batches = {}
    for task in tasks:
        data = tensorize(load_task(task, "train", data_dir, skip_bad_rows=True, max_samples=examples), tok)
        batches[task] = data.batch(list(range(len(data))), pad_token_id(tok))
    return model, batches


def measure(model, task: str, batch: dict, projection: str, bf16: bool = False, seed: int = 0, **smart) -> dict:
    """δ and the divergences of one task's batch (see the module docstring)."""
    kind = model.heads[task].kind
    fwd = lambda xs: model.forward_embedded(task, xs, batch)  # noqa: E731

    def noise(embeds):  # the same ν in every call with the same seed
        g = torch.Generator().manual_seed(seed)
        return [torch.randn(e.shape, generator=g, dtype=e.dtype) for e in embeds]

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
        embeds = model.embed_inputs(batch)
        with torch.no_grad():
            clean = fwd(embeds)
        nus = adversarial_perturbation(fwd, embeds, clean, kind, noise=noise, projection=projection,
                                       **{**smart, "steps": 0})
        deltas = adversarial_perturbation(fwd, embeds, clean, kind, noise=noise, projection=projection, **smart)
        with torch.no_grad():
            r_noise = divergence(fwd([e + n for e, n in zip(embeds, nus)]), clean, kind).item()
            r_adv = divergence(fwd([e + d for e, d in zip(embeds, deltas)]), clean, kind).item()
    with torch.no_grad():  # the float32 divergence at this δ: is a δ found under bf16 adversarial in float32?
        embeds32 = model.embed_inputs(batch)
        r_adv_fp32 = divergence(fwd([e + d.float() for e, d in zip(embeds32, deltas)]), fwd(embeds32), kind).item()
    masks = [batch["attention_mask"], batch.get("attention_mask_b")]
    token_max = torch.cat([d.abs().amax(-1)[m.bool()] for d, m in zip(deltas, masks)])
    r_rand = random_direction_divergence(fwd, embeds32, deltas, kind, seed)
    # What the first layer sees of δ once x + δ is rounded to bfloat16: its component along δ (1 = all of δ, in
    # the mean) and the cosine (how much rounding noise comes with it).
    seen = torch.cat([((e + d).bfloat16().float() - e.bfloat16().float()).flatten() for e, d in zip(embeds, deltas)])
    flat = torch.cat([d.flatten() for d in deltas])
    return {"delta_token_max_median": token_max.median().item(), "delta_token_max_min": token_max.min().item(),
            "delta_max": token_max.max().item(),
            "r_noise": r_noise, "r_adv": r_adv, "r_rand": r_rand, "r_adv_fp32": r_adv_fp32, "deltas": deltas,
            "bf16_along": (seen @ flat / (flat @ flat)).item(),
            "bf16_cos": (seen @ flat / (seen.norm() * flat.norm())).item()}


def equal_size_random(deltas: list[torch.Tensor], seed: int = 0) -> list[torch.Tensor]:
    """Random directions with each token's max-norm equal to that of δ (a token with δ = 0 stays 0)."""
    g = torch.Generator().manual_seed(seed + 1)
    out = []
    for d in deltas:
        r = torch.randn(d.shape, generator=g, dtype=torch.float32)
        out.append(r / r.abs().amax(-1, keepdim=True) * d.float().abs().amax(-1, keepdim=True))
    return out


@torch.no_grad()
def random_direction_divergence(fwd, embeds, deltas, kind: str, seed: int = 0) -> float:
    """ℓ_s(f(x + r), f(x)) in float32 for a random r of δ's per-token size (:func:`equal_size_random`)."""
    rand = equal_size_random(deltas, seed)
    return divergence(fwd([e + r for e, r in zip(embeds, rand)]), fwd(embeds), kind).item()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model_name_or_path", default="minilm-l6")
    p.add_argument("--data_dir", default="data")
    p.add_argument("--tasks", default="sst,qqp,sts")
    p.add_argument("--examples", type=int, default=16, help="training examples per task (one batch)")
    p.add_argument("--bf16", action="store_true", help="also measure under bfloat16 autocast")
    p.add_argument("--epsilon", type=float, default=None,
                   help="ε of both forms (default: each form's own, minbert.methods.smart.default_epsilon)")
    p.add_argument("--eta", type=float, default=None, help="η of every form (default: SMART's 1e-3)")
    p.add_argument("--forms", default=",".join(SMART_PROJECTIONS))
    p.add_argument("--train_mode", action="store_true",
                   help="dropout on, as in training (the clean and perturbed passes then differ by dropout too)")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, batches = load(args.model_name_or_path, args.data_dir, args.tasks.split(","), args.examples)
    model.train(args.train_mode)
    smart = {} if args.epsilon is None else {"epsilon": args.epsilon}
    if args.eta is not None:
        smart["eta"] = args.eta
    print("| form | task | max |δ| per token: median (min..max) | R_noise | R_adv | R_adv / R_noise | R_rand | "
          "R_adv / R_rand |"
          + (" R_noise bf16 | R_adv bf16 | R_adv bf16 / fp32 | fp32 R at δ found in bf16 | cos(δ bf16, δ fp32) |"
             " bf16(x+δ) - bf16(x): along δ, cos |" if args.bf16 else ""))
    print("|---" * (14 if args.bf16 else 8) + "|")
    for projection in args.forms.split(","):
        for task, batch in batches.items():
            torch.manual_seed(0)
            m = measure(model, task, batch, projection, **smart)
            row = (f"| {projection} | {task} | {m['delta_token_max_median']:.2e} ({m['delta_token_max_min']:.1e}.."
                   f"{m['delta_max']:.1e}) | {m['r_noise']:.2e} | {m['r_adv']:.2e} | "
                   f"{m['r_adv'] / m['r_noise']:.3g} | {m['r_rand']:.2e} | {m['r_adv'] / m['r_rand']:.3g} |")
            if args.bf16:
                torch.manual_seed(0)
                b = measure(model, task, batch, projection, bf16=True, **smart)
                d32, d16 = (torch.cat([d.flatten().float() for d in x["deltas"]]) for x in (m, b))
                cos = (d32 @ d16 / (d32.norm() * d16.norm())).item()
                row += (f" {b['r_noise']:.2e} | {b['r_adv']:.2e} | {b['r_adv'] / m['r_adv']:.2f} | "
                        f"{b['r_adv_fp32']:.2e} | {cos:.3f} | "
                        f"{m['bf16_along']:.2f}, {m['bf16_cos']:.2f} |")
            print(row, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
