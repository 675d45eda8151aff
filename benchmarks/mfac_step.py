"""Time one M-FAC step against an AdamW step and against the memory floor.

An exact M-FAC step has to stream the m x d gradient window twice (once for
G @ g, once for G^T y), so its floor is two window reads at the memory
bandwidth of the machine. The bandwidth is measured in the same run by timing
a full reduction (``window.sum()``) over the window itself.

    python benchmarks/mfac_step.py --quick            # < 1 minute on a 2-core CPU
    python benchmarks/mfac_step.py --device cuda

The last line is ``RATIO step_over_floor=X step_over_adamw=Y`` for the largest
dense (window dtype = parameter dtype) size that was run.
"""

import argparse
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from minbert.methods.optim import MFAC  # noqa: E402

SIZES = {  # (num_grads m, number of parameters d)
    ("cpu", True): [(16, 1 << 19), (64, 1 << 20), (128, 1 << 21)],
    ("cpu", False): [(32, 1 << 20), (128, 1 << 21), (256, 1 << 22)],
    ("cuda", True): [(128, 1 << 22), (512, 1 << 23)],
    ("cuda", False): [(256, 1 << 22), (1024, 1 << 23), (1024, 1 << 24)],
}


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn, device, repeats, warmup=2):
    """Median wall time of fn() in seconds."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_params(d, device, n_tensors=8, seed=0):
    """d parameters split into a few 2-D tensors, with random gradients."""
    gen = torch.Generator(device=device).manual_seed(seed)
    sizes = [d // n_tensors] * (n_tensors - 1) + [d - (d // n_tensors) * (n_tensors - 1)]
    params = []
    for n in sizes:
        shape = (n // 256, 256) if n % 256 == 0 else (n,)
        p = torch.randn(shape, generator=gen, device=device, requires_grad=True)
        p.grad = torch.randn(p.shape, generator=gen, device=device)
        params.append(p)
    return params


@torch.no_grad()
def fill_window(opt, m):
    """Put the optimizer in its steady state (full ring) without m real steps."""
    state = opt.state_dict()  # references to the live buffers
    gram = state["mfac"]["gram"]
    state["mfac"]["step"] = m
    if opt.sparsity_k is not None:
        # Random sorted top-k rows. Their exact Gram matrix would cost as much as
        # m steps; a strongly diagonally dominant SPD stand-in (which stays SPD
        # when row/column j is refreshed) makes the Cholesky cost the same.
        values, indices = state["mfac"]["values"], state["mfac"]["indices"]
        values.normal_()
        indices.copy_(torch.randint(0, opt.dim, indices.shape, device=indices.device).sort(dim=1).values)
        gram.copy_(torch.eye(m, dtype=gram.dtype, device=gram.device) * 1e6 * m * values.shape[1])
        opt.load_state_dict(state)
        return
    window = state["mfac"]["window"]
    window.normal_()
    gram.zero_()
    cols = max(1, (1 << 24) // m)
    for c0 in range(0, window.shape[1], cols):  # exact Gram matrix, in column blocks
        block = window[:, c0 : c0 + cols].float()
        gram += (block @ block.T).double()
    opt.load_state_dict(state)


def bench(m, d, device, repeats, window_dtype=None, sparsity_k=None):
    params = make_params(d, device)
    opt = MFAC(params, lr=1e-6, num_grads=m, damp=1e-6, window_dtype=window_dtype, sparsity_k=sparsity_k)
    fill_window(opt, m)
    t_step = timeit(opt.step, device, repeats)

    if sparsity_k is None:
        window = opt._window
        window_bytes = window.numel() * window.element_size()
        # Best read bandwidth of a full reduction and of a matvec (the kernel M-FAC uses).
        ones = torch.ones(d, dtype=window.dtype, device=device)
        t_read = min(
            timeit(lambda: window.sum(), device, repeats),
            timeit(lambda: window @ ones, device, repeats),
        )
    else:
        window_bytes = opt._values.numel() * opt._values.element_size()
        window_bytes += opt._indices.numel() * opt._indices.element_size()
        t_read = timeit(lambda: (opt._values.sum(), opt._indices.sum()), device, repeats)
    bandwidth = window_bytes / t_read
    t_floor = 2 * window_bytes / bandwidth
    del opt

    adamw = torch.optim.AdamW(params, lr=1e-6)
    t_adamw = timeit(adamw.step, device, repeats)
    return dict(window_gib=window_bytes / 2**30, step=t_step, floor=t_floor, adamw=t_adamw, bw=bandwidth / 1e9)


def _regression_problem():
    """Least squares with ill-conditioned features, d = 256; M-FAC lr 0.3, damp 1.0, m = 32."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(4096, 256, generator=gen) * torch.logspace(0, -2, 256)
    y = X @ torch.randn(256, generator=gen) + 0.01 * torch.randn(4096, generator=gen)
    model = torch.nn.Linear(256, 1, bias=False)
    torch.nn.init.zeros_(model.weight)
    loss_fn = lambda out, target: ((out.squeeze(1) - target) ** 2).mean()  # noqa: E731
    return "regression d=256", model, X, y, loss_fn, dict(lr=0.3, damp=1.0, num_grads=32)


def _mlp_problem():
    """10-class Gaussian mixture, MLP 64-128-10 (d = 9,610); M-FAC lr 0.03, damp 1e-2, m = 64."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 10, (8192,), generator=gen)
    X = torch.randn(10, 64, generator=gen)[labels] + 4.0 * torch.randn(8192, 64, generator=gen)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 10))
    return "MLP d=9,610", model, X, labels, torch.nn.functional.cross_entropy, dict(lr=0.03, damp=1e-2, num_grads=64)


def accuracy_report(steps=200, batch=64):
    """Compressed vs dense windows on small problems where both fit (CPU, float32).

    For each variant: (a) full-data loss along its own training run; (b) the
    gradient stream of the dense run replayed through the variant (lr = 1, from
    p = 0), comparing its updates with the dense updates by cosine similarity,
    per step and accumulated over all steps (error feedback acts over time).
    """
    import copy

    variants = [
        ("dense fp32", {}),
        ("bf16 window", dict(window_dtype=torch.bfloat16)),
        ("top-10%", dict(sparsity_k=0.1)),
        ("top-5%", dict(sparsity_k=0.05)),
        ("top-1%", dict(sparsity_k=0.01)),
    ]
    cos = torch.nn.functional.cosine_similarity
    for make in (_regression_problem, _mlp_problem):
        name, model0, X, y, loss_fn, hyper = make()
        checkpoints = [0, steps // 4, steps // 2, steps - 1]
        print(f"# accuracy: {name}, {steps} steps, batch {batch}, {hyper}")
        at = "loss @ steps " + "/".join(str(c + 1) for c in checkpoints)
        print(f"{'window':>12} {at:>36} {'step cos':>9} {'sum cos':>8}")
        dense_grads = dense_updates = None
        for label, kwargs in variants:
            model = copy.deepcopy(model0)
            opt = MFAC(model.parameters(), **hyper, **kwargs)
            gen = torch.Generator().manual_seed(1)
            losses, grads = [], []
            for t in range(steps):
                idx = torch.randint(0, len(X), (batch,), generator=gen)
                opt.zero_grad()
                loss_fn(model(X[idx]), y[idx]).backward()
                grads.append([p.grad.clone() for p in model.parameters()])
                opt.step()
                if t in checkpoints:
                    with torch.no_grad():
                        losses.append(loss_fn(model(X), y).item())
            if dense_grads is None:
                dense_grads = grads

            # Replay the dense run's gradients: u_t = F_t^{-1} c_t for this window type.
            params = [torch.zeros_like(p, requires_grad=True) for p in model.parameters()]
            replay = MFAC(params, **{**hyper, "lr": 1.0}, **kwargs)
            updates = []
            for step_grads in dense_grads:
                for p, g in zip(params, step_grads):
                    p.data.zero_()
                    p.grad = g
                replay.step()
                updates.append(-torch.cat([p.detach().reshape(-1) for p in params]))
            updates = torch.stack(updates)
            if dense_updates is None:
                dense_updates = updates
            step_cos = cos(updates, dense_updates, dim=1).mean().item()
            sum_cos = cos(updates.sum(0), dense_updates.sum(0), dim=0).item()
            curve = "/".join(f"{v:.3f}" for v in losses)
            print(f"{label:>12} {curve:>36} {step_cos:>9.3f} {sum_cos:>8.3f}", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes, few repeats (< 1 minute on CPU)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed steps per measurement")
    parser.add_argument("--no-compressed", action="store_true", help="skip the bf16 / top-k rows")
    parser.add_argument(
        "--accuracy", action="store_true", help="first compare compressed vs dense windows on small problems"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (default 1: on a shared few-core box every OpenMP barrier can stall for a "
        "scheduler tick, which swamps the timings; 0 keeps torch's default)",
    )
    args = parser.parse_args()
    if args.threads > 0:
        torch.set_num_threads(args.threads)

    if args.accuracy:
        accuracy_report()
    device = torch.device(args.device)
    repeats = args.repeats or (5 if args.quick else 10)
    sizes = SIZES[(device.type, args.quick)]
    runs = [("fp32", m, d, {}) for m, d in sizes]
    if not args.no_compressed:
        m, d = sizes[-1]
        runs += [("bf16", m, d, dict(window_dtype=torch.bfloat16)), ("top-1%", m, d, dict(sparsity_k=0.01))]

    print(f"# M-FAC step benchmark on {device} ({torch.get_num_threads()} threads), torch {torch.__version__}")
    print(
        f"{'window':>7} {'m':>5} {'d':>10} {'GiB':>6} {'GB/s':>6} {'step ms':>9} {'floor ms':>9} "
        f"{'adamw ms':>9} {'step/floor':>10} {'step/adamw':>10}"
    )
    last_dense = None
    for name, m, d, kwargs in runs:
        r = bench(m, d, device, repeats, **kwargs)
        x, y = r["step"] / r["floor"], r["step"] / r["adamw"]
        print(
            f"{name:>7} {m:>5} {d:>10,} {r['window_gib']:>6.2f} {r['bw']:>6.1f} {1e3 * r['step']:>9.2f} "
            f"{1e3 * r['floor']:>9.2f} {1e3 * r['adamw']:>9.2f} {x:>10.2f} {y:>10.2f}",
            flush=True,
        )
        if name == "fp32":
            last_dense = (x, y)
    print(f"RATIO step_over_floor={last_dense[0]:.2f} step_over_adamw={last_dense[1]:.2f}")


if __name__ == "__main__":
    main()
