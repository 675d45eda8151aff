"""M-FAC with its gradient window sharded over 2 gloo ranks on CPU (issue #6).

One `torch.multiprocessing.spawn` of two ranks runs every scenario and saves
what it saw; the tests compare that with single-process M-FAC run here. Both
ranks get the same gradients, as after DDP's gradient all-reduce.
"""

import datetime
import os
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from minbert.methods.optim import MFAC, MFACMemoryError
import minbert.methods.optim.mfac as mfac_module

WORLD = 2
# d = 15 + 4 + 16 + 4 = 39 (odd): the shards are columns 0:20 and 20:39, and the
# cut falls inside the third parameter.
SHAPES = [(3, 5), (4,), (4, 4), (4,)]
D = 39
M, STEPS, SAVE_AT = 4, 12, 7  # the ring of 4 wraps; checkpoints are taken after 7 steps
CONFIGS = {
    "fp32": (torch.float32, {}),
    "fp64": (torch.float64, {}),
    "bf16_window": (torch.float32, {"window_dtype": torch.bfloat16}),
    "topk_all": (torch.float32, {"sparsity_k": 1.0}),  # k = d: the top-k code path, no entry dropped
}
TOLERANCE = {torch.float32: 1e-6, torch.float64: 1e-12}
PREFLIGHT_PARAMS = 100_001  # shards of 50,001 and 50,000
SMALL_FREE = 30 * 2**20


def make_optimizer(config="fp32", **extra):
    """Parameters from a fixed seed and an MFAC over two groups (weight decay; momentum + its own lr)."""
    dtype, kwargs = CONFIGS[config]
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() for s in SHAPES]
    groups = [{"params": params[:2], "weight_decay": 0.1}, {"params": params[2:], "lr": 0.05, "momentum": 0.9}]
    return params, MFAC(groups, **{"lr": 0.1, "num_grads": M, "damp": 1e-2, **kwargs, **extra})


def flat(params):
    return torch.cat([p.detach().reshape(-1) for p in params])


def run_steps(params, opt, steps):
    """Step with gradient t for t in `steps` (the (4,) bias has none on odd t); parameters after each step."""
    out = []
    for t in steps:
        g = torch.randn(D, generator=torch.Generator().manual_seed(100 + t), dtype=torch.float64)
        for p, piece in zip(params, g.split([p.numel() for p in params])):
            p.grad = piece.view_as(p).to(p.dtype)
        if t % 2:
            params[1].grad = None
        opt.step()
        out.append(flat(params).clone())
    return torch.stack(out)


def restart(params_at, config="fp32", state=None, **extra):
    """A fresh optimizer (wrong lr on purpose: the state dict restores it) on parameters `params_at`."""
    params, opt = make_optimizer(config, lr=123.0, **extra)
    with torch.no_grad():
        for p, value in zip(params, params_at.split([p.numel() for p in params])):
            p.copy_(value.view_as(p))
    if state is not None:
        opt.load_state_dict(state)
    return params, opt


def regression():
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(512, D, generator=gen) * torch.logspace(0, -1, D)
    return X, X @ torch.randn(D, generator=gen)


def train_regression(steps=60, **kwargs):
    """Least squares with top-k M-FAC; full-data loss before and after."""
    X, y = regression()
    w = torch.zeros(D, requires_grad=True)
    opt = MFAC([w], lr=0.3, num_grads=8, damp=1.0, **kwargs)
    gen = torch.Generator().manual_seed(1)
    initial = (y**2).mean().item()
    for _ in range(steps):
        idx = torch.randint(0, len(X), (64,), generator=gen)
        opt.zero_grad()
        ((X[idx] @ w - y[idx]) ** 2).mean().backward()
        opt.step()
    with torch.no_grad():
        return initial, ((X @ w - y) ** 2).mean().item(), w.detach().clone(), opt


def preflight(free, **kwargs):
    """The preflight message with `free` bytes free (None when it fits) and the largest num_grads it names."""
    real = mfac_module.free_memory_bytes
    mfac_module.free_memory_bytes = lambda device: free
    try:
        MFAC([torch.zeros(PREFLIGHT_PARAMS, requires_grad=True)], num_grads=1024, **kwargs)
        return None, None
    except MFACMemoryError as e:
        return str(e), int(str(e).split("fits on all ranks: " if dist.is_initialized() else "fits: ")[1].split()[0])
    finally:
        mfac_module.free_memory_bytes = real


def raises(fn, exc):
    """The message of the `exc` that fn() raises (None when it raises nothing)."""
    try:
        fn()
    except exc as e:
        return str(e)
    return None


# ------------------------------------------------------------------- the two ranks


def _rank_main(rank, init_file, out_dir):
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=60))
    res = {}

    # Exactness: the parameters after every step, for each window type.
    for config in CONFIGS:
        params, opt = make_optimizer(config)
        assert opt.sharded
        res[config] = run_steps(params, opt, range(STEPS))
        window = opt._window if opt.sparsity_k is None else opt._values
        res[config + "_window_shape"] = tuple(window.shape)

    # Checkpoints after SAVE_AT steps: consolidated (world-size independent) and per-rank shards.
    params, opt = make_optimizer()
    run_steps(params, opt, range(SAVE_AT))
    res["ckpt_params"] = flat(params).clone()
    res["state_dict_unconsolidated"] = raises(opt.state_dict, RuntimeError)
    opt.consolidate_state_dict(to=0)
    if rank == 0:
        torch.save(opt.state_dict(), out_dir / "full.pt")
    else:
        res["state_dict_other_rank"] = raises(opt.state_dict, RuntimeError)
    torch.save(opt.shard_state_dict(), out_dir / f"shard{rank}.pt")
    res["continued"] = run_steps(params, opt, range(SAVE_AT, STEPS))
    res["state_dict_after_step"] = raises(opt.state_dict, RuntimeError)
    dist.barrier()  # full.pt and both shards are written
    for source, file in [("full", "full.pt"), ("shard", f"shard{rank}.pt"), ("single", "single.pt")]:
        at = torch.load(out_dir / "single_params.pt") if source == "single" else res["ckpt_params"]
        params2, opt2 = restart(at, state=torch.load(out_dir / file, weights_only=True))
        res["resumed_" + source] = run_steps(params2, opt2, range(SAVE_AT, STEPS))
    other = torch.load(out_dir / f"shard{1 - rank}.pt", weights_only=True)
    res["load_other_shard"] = raises(lambda: restart(res["ckpt_params"], state=other), ValueError)

    # Top-k windows (k < d): per-shard selection; checkpoints resume with the same number of ranks.
    params, opt = make_optimizer(sparsity_k=0.3)
    res["topk_shard_ks"] = opt._shard_ks
    run_steps(params, opt, range(SAVE_AT))
    at = flat(params).clone()
    opt.consolidate_state_dict(to=1)
    if rank == 1:
        torch.save(opt.state_dict(), out_dir / "topk_full.pt")
    res["topk_continued"] = run_steps(params, opt, range(SAVE_AT, STEPS))
    dist.barrier()
    state = torch.load(out_dir / "topk_full.pt", weights_only=True)
    params2, opt2 = restart(at, state=state, sparsity_k=0.3)
    res["topk_resumed"] = run_steps(params2, opt2, range(SAVE_AT, STEPS))
    single = torch.load(out_dir / "topk_single.pt", weights_only=True)
    res["topk_load_single"] = raises(lambda: restart(at, state=single, sparsity_k=0.3), ValueError)
    initial, final, w, _ = train_regression(sparsity_k=0.2)
    res["topk_regression"] = (initial, final, w)

    # Memory preflight: per-rank sizes; all ranks raise when one does not fit.
    res["preflight_both"] = preflight(SMALL_FREE)
    res["preflight_one"] = preflight(SMALL_FREE if rank == 1 else 100 * 2**30)
    largest = res["preflight_both"][1]
    real_free = mfac_module.free_memory_bytes
    mfac_module.free_memory_bytes = lambda device: SMALL_FREE
    try:
        for key, m in (("fits_at_largest", largest), ("fits_above_largest", largest + 1)):
            res[key] = raises(lambda: MFAC([torch.zeros(PREFLIGHT_PARAMS)], num_grads=m), MFACMemoryError)
    finally:
        mfac_module.free_memory_bytes = real_free
    os.environ["LOCAL_WORLD_SIZE"] = "2"  # as torchrun sets it: both ranks' shards come out of one host's memory
    res["preflight_host"] = preflight(SMALL_FREE)
    del os.environ["LOCAL_WORLD_SIZE"]

    torch.save(res, out_dir / f"rank{rank}.pt")
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    """Run both ranks once (after writing the single-process checkpoints they resume from); their results."""
    out = tmp_path_factory.mktemp("mfac_ddp")
    params, opt = make_optimizer()
    run_steps(params, opt, range(SAVE_AT))
    torch.save(opt.state_dict(), out / "single.pt")
    torch.save(flat(params), out / "single_params.pt")
    params, opt = make_optimizer(sparsity_k=0.3)
    run_steps(params, opt, range(SAVE_AT))
    torch.save(opt.state_dict(), out / "topk_single.pt")

    mp.spawn(_rank_main, args=(str(out / "init"), str(out)), nprocs=WORLD)
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


# ------------------------------------------------------------------- tests


@pytest.mark.parametrize("config", list(CONFIGS))
def test_sharded_steps_equal_single_process(ranks, config):
    _, res = ranks
    dtype, _ = CONFIGS[config]
    params, opt = make_optimizer(config)
    assert not opt.sharded
    expected = run_steps(params, opt, range(STEPS))
    assert torch.equal(res[0][config], res[1][config]), "ranks disagree"
    tol = TOLERANCE[dtype]
    for step, (got, want) in enumerate(zip(res[0][config], expected)):
        err = (got - want).abs().max().item()
        assert err <= tol, f"{config} step {step}: max |sharded - single| = {err:.2e} > {tol:.0e}"
    # Each rank holds m x d_r: 20 and 19 columns (or all 20 / 19 entries of its shard for k = d).
    assert [r[config + "_window_shape"] for r in res] == [(M, 20), (M, 19)]


def test_consolidated_and_shard_checkpoints_resume_bit_identically(ranks):
    _, res = ranks
    for r in res:
        assert torch.equal(r["resumed_full"], r["continued"])
        assert torch.equal(r["resumed_shard"], r["continued"])
        assert "consolidate_state_dict" in r["state_dict_unconsolidated"]
        assert "consolidate_state_dict" in r["state_dict_after_step"]  # a step invalidates the gathered copy
        assert "columns 0:20" in r["load_other_shard"] or "columns 20:39" in r["load_other_shard"]
    assert "consolidate_state_dict" in res[1]["state_dict_other_rank"]


def test_checkpoints_move_between_world_sizes(ranks):
    out, res = ranks
    tol = TOLERANCE[torch.float32]
    # 1 -> 2 ranks: a single-process checkpoint resumed by both ranks continues like one process.
    params, opt = make_optimizer()
    run_steps(params, opt, range(SAVE_AT))
    single_continued = run_steps(params, opt, range(SAVE_AT, STEPS))
    assert torch.equal(res[0]["resumed_single"], res[1]["resumed_single"])
    assert (res[0]["resumed_single"] - single_continued).abs().max() <= tol
    # 2 -> 1: the consolidated checkpoint holds the whole window and resumes in one process.
    full = torch.load(out / "full.pt", weights_only=True)
    assert full["mfac"]["window"].shape == (M, D) and "shard" not in full["mfac"]
    params, opt = restart(res[0]["ckpt_params"], state=full)
    assert (run_steps(params, opt, range(SAVE_AT, STEPS)) - res[0]["continued"]).abs().max() <= tol
    # Per-rank shard files merge offline into the same full checkpoint.
    shards = [torch.load(out / f"shard{r}.pt", weights_only=True) for r in (1, 0)]
    merged = MFAC.merge_shard_state_dicts(shards)
    for key in ("window", "gram", "momentum_buffer"):
        assert torch.equal(merged["mfac"][key], full["mfac"][key])
    assert merged["param_groups"] == full["param_groups"]
    with pytest.raises(ValueError, match=r"missing the shards of ranks \[1\]"):
        MFAC.merge_shard_state_dicts(shards[1:])


def test_topk_window_is_selected_per_shard(ranks):
    out, res = ranks
    # k = 0.3 * 39 = 12 entries in one process; shards keep ceil(12 * 20 / 39) = 7 and ceil(12 * 19 / 39) = 6.
    assert res[0]["topk_shard_ks"] == res[1]["topk_shard_ks"] == [7, 6]
    for r in res:
        assert torch.equal(r["topk_resumed"], r["topk_continued"])  # same number of ranks: bit-identical
        assert "same number of ranks" in r["topk_load_single"]
    assert torch.equal(res[0]["topk_continued"], res[1]["topk_continued"])
    params, opt = make_optimizer(sparsity_k=0.3)
    with pytest.raises(ValueError, match="same number of ranks"):
        opt.load_state_dict(torch.load(out / "topk_full.pt", weights_only=True))
    # The selection differs from one process's, so only check that it trains as well.
    initial, final, w = res[0]["topk_regression"]
    assert torch.equal(w, res[1]["topk_regression"][2])
    _, single_final, _, _ = train_regression(sparsity_k=0.2)
    assert final < 0.05 * initial
    assert final < 2 * single_final + 0.01 * initial


def test_preflight_reports_per_rank_sizes_and_all_ranks_refuse(ranks):
    _, res = ranks
    single_message, single_largest = preflight(SMALL_FREE)
    assert "largest num_grads that fits: " in single_message
    for rank, (r, shard) in enumerate(zip(res, ("50,001", "50,000"))):
        message, largest = r["preflight_both"]
        assert "\n" not in message
        assert f"rank {rank} of 2 needs" in message and f"1024 x {shard} of 100,001 params x float32" in message
        assert "free 0.03 GiB" in message
        assert largest == res[0]["preflight_both"][1]  # every rank names the same size
        assert largest >= 1.9 * single_largest  # half the window per rank: about twice the rows
        assert r["fits_at_largest"] is None and r["fits_above_largest"] is not None
        # Rank 0 alone would fit; it refuses with rank 1 and names rank 1's limit.
        message_one, largest_one = r["preflight_one"]
        assert message_one is not None and largest_one == largest
        message_host, largest_host = r["preflight_host"]
        assert "times 2 ranks on this host" in message_host
        assert largest_host < 0.6 * largest
    assert "free 100.00 GiB" in res[0]["preflight_one"][0]
