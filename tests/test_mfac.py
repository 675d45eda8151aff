"""Tests for the M-FAC optimizer (minbert/methods/optim/mfac.py) and optimizer helpers."""

import copy
import io

import pytest
import torch

from minbert.methods.optim import MFAC, MFACMemoryError, build_optimizer, parse_optim_args
import minbert.methods.optim.mfac as mfac_module

SHAPES = [(4, 5), (10,), (5, 4)]  # d = 50, split over parameters of different shapes
D = 50


def make_params(dtype=torch.float64, device="cpu", seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=dtype).to(device).requires_grad_() for s in SHAPES]


def flat(tensors):
    return torch.cat([t.reshape(-1) for t in tensors])


def set_grads(params, flat_grad):
    for p, g in zip(params, flat_grad.split([p.numel() for p in params])):
        p.grad = g.view_as(p).to(p.dtype).clone()


def take_update(opt, params, flat_grad):
    """Apply one step with lr=1 from p=0 and return u (the step is p -= u)."""
    for p in params:
        p.data.zero_()
    set_grads(params, flat_grad)
    opt.step()
    return -flat([p.detach() for p in params])


def dense_reference(window, g, damp, m):
    """Explicit F^{-1} g with F = damp * I + (1/m) sum_i g_i g_i^T."""
    G = torch.stack(window)
    F = damp * torch.eye(G.shape[1], dtype=G.dtype) + G.T @ G / m
    return torch.linalg.inv(F) @ g, F


def regression_problem(d=256, n=4096):
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(n, d, generator=gen) * torch.logspace(0, -2, d)  # ill-conditioned features
    y = X @ torch.randn(d, generator=gen) + 0.01 * torch.randn(n, generator=gen)
    return X, y


# ----------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("m", [8, 13])
def test_update_equals_dense_inverse_before_and_after_wrap(m):
    damp = 1e-2
    params = make_params()
    opt = MFAC(params, lr=1.0, num_grads=m, damp=damp)
    gen = torch.Generator().manual_seed(1)
    window = []
    for t in range(4 * m + 3):  # fills the ring, then wraps several times
        g = torch.randn(D, generator=gen, dtype=torch.float64)
        window = (window + [g])[-m:]
        expected, _ = dense_reference(window, g, damp, m)
        got = take_update(opt, params, g)
        rel = (got - expected).norm() / expected.norm()
        assert rel < 1e-8, f"step {t}: relative error {rel:.2e}"


def test_tiny_damp_is_solved_to_machine_precision():
    # With damp=1e-6 the explicit inverse itself is inaccurate (cond(F) ~ 1e7),
    # so check the residual F u = g instead.
    m, damp = 8, 1e-6
    params = make_params()
    opt = MFAC(params, lr=1.0, num_grads=m, damp=damp)
    gen = torch.Generator().manual_seed(2)
    window = []
    for _ in range(3 * m):
        g = torch.randn(D, generator=gen, dtype=torch.float64)
        window = (window + [g])[-m:]
        _, F = dense_reference(window, g, damp, m)
        u = take_update(opt, params, g)
        assert (F @ u - g).norm() / g.norm() < 1e-12


def test_missing_grads_count_as_zero():
    m, damp = 4, 1e-2
    params = make_params()
    opt = MFAC(params, lr=1.0, num_grads=m, damp=damp)
    gen = torch.Generator().manual_seed(3)
    window = []
    for t in range(6):
        g = torch.randn(D, generator=gen, dtype=torch.float64)
        if t % 2:
            g[20:30] = 0.0  # the (10,) parameter gets no gradient this step
        window = (window + [g])[-m:]
        expected, _ = dense_reference(window, g, damp, m)
        for p in params:
            p.data.zero_()
        set_grads(params, g)
        if t % 2:
            params[1].grad = None
        opt.step()
        got = -flat([p.detach() for p in params])
        assert torch.allclose(got, expected, rtol=1e-9, atol=1e-12)


def test_per_group_lr_weight_decay_and_momentum():
    m, damp = 4, 1e-2
    params = make_params()
    groups = [
        {"params": params[:2], "lr": 0.1, "weight_decay": 0.5},
        {"params": params[2:], "lr": 0.01, "momentum": 0.9},
    ]
    # minbert's older forms (decoupled decay, undamped momentum); the default is tests/test_mfac_reference.py
    opt = MFAC(groups, num_grads=m, damp=damp, decoupled_weight_decay=True, dampening=0.0)
    gen = torch.Generator().manual_seed(4)
    window, buf = [], torch.zeros(20, dtype=torch.float64)
    for _ in range(6):
        g = torch.randn(D, generator=gen, dtype=torch.float64)
        window = (window + [g])[-m:]
        u, _ = dense_reference(window, g, damp, m)
        before = flat([p.detach() for p in params]).clone()
        set_grads(params, g)
        opt.step()
        after = flat([p.detach() for p in params])
        buf = 0.9 * buf + u[30:]
        assert torch.allclose(after[:30], before[:30] * (1 - 0.1 * 0.5) - 0.1 * u[:30], rtol=1e-9, atol=1e-12)
        assert torch.allclose(after[30:], before[30:] - 0.01 * buf, rtol=1e-9, atol=1e-12)


def test_cholesky_failure_falls_back_to_eigh(monkeypatch):
    params = make_params()
    opt = MFAC(params, num_grads=4, damp=1e-2)
    gen = torch.Generator().manual_seed(5)
    for _ in range(5):
        set_grads(params, torch.randn(D, generator=gen, dtype=torch.float64))
        opt.step()
    y_chol = opt._solve_unit(4, 2)
    real = torch.linalg.cholesky_ex
    monkeypatch.setattr(torch.linalg, "cholesky_ex", lambda A: (real(A)[0], torch.tensor(1)))
    y_eigh = opt._solve_unit(4, 2)
    assert torch.allclose(y_chol, y_eigh, rtol=1e-9)


# ----------------------------------------------------------------------------- checkpoints


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(momentum=0.9, weight_decay=0.1),
        dict(sparsity_k=7, momentum=0.5),
        dict(window_dtype=torch.bfloat16),
    ],
    ids=["dense", "momentum", "sparse", "bf16"],
)
def test_state_dict_round_trip_is_bit_identical(kwargs):
    m = 5
    gen = torch.Generator().manual_seed(6)
    grads = [torch.randn(D, generator=gen) for _ in range(20)]
    params = make_params(torch.float32)
    opt = MFAC(params, lr=0.01, num_grads=m, damp=1e-3, **kwargs)
    for g in grads[:7]:  # mid-run: the ring has wrapped once
        set_grads(params, g)
        opt.step()

    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    params2 = [p.detach().clone().requires_grad_() for p in params]
    opt2 = MFAC(params2, lr=123.0, num_grads=m, damp=1e-3, **kwargs)  # lr is restored from the checkpoint
    opt2.load_state_dict(torch.load(buffer, weights_only=True))

    for g in grads[7:]:
        for ps, o in ((params, opt), (params2, opt2)):
            set_grads(ps, g)
            o.step()
    for p, q in zip(params, params2):
        assert torch.equal(p, q)


def test_load_state_dict_rejects_mismatched_config():
    opt = MFAC(make_params(), num_grads=4)
    with pytest.raises(ValueError, match="num_grads"):
        MFAC(make_params(), num_grads=5).load_state_dict(opt.state_dict())
    with pytest.raises(ValueError, match="mfac"):
        MFAC(make_params(), num_grads=4).load_state_dict(torch.optim.SGD(make_params(), lr=1).state_dict())


# ----------------------------------------------------------------------------- memory preflight


def test_preflight_error_is_one_line_with_needed_free_and_largest(monkeypatch):
    free = 30 * 2**20  # 30 MiB
    monkeypatch.setattr(mfac_module, "free_memory_bytes", lambda device: free)
    params = [torch.zeros(100_000, requires_grad=True)]  # dense fp32 window at m=1024: 0.38 GiB
    with pytest.raises(MFACMemoryError) as info:
        MFAC(params, num_grads=1024)
    message = str(info.value)
    assert isinstance(info.value, MemoryError)
    assert "\n" not in message
    assert "needed 0.40 GiB" in message and "free 0.03 GiB" in message
    largest = int(message.split("largest num_grads that fits: ")[1].split()[0])
    assert 0 < largest < 1024
    MFAC(params, num_grads=largest)  # fits exactly at the reported size
    with pytest.raises(MFACMemoryError):
        MFAC(params, num_grads=largest + 1)
    # Compressed windows need far less memory and the preflight accounts for that.
    with pytest.raises(MFACMemoryError, match="largest num_grads that fits: ") as info:
        MFAC(params, num_grads=1024, window_dtype=torch.bfloat16)
    assert int(str(info.value).split("fits: ")[1].split()[0]) > 1.5 * largest
    MFAC(params, num_grads=1024, sparsity_k=0.005)


def test_free_memory_bytes_cpu_is_positive():
    free = mfac_module.free_memory_bytes(torch.device("cpu"))
    assert free is None or free > 0


# ----------------------------------------------------------------------------- compressed windows


def test_bfloat16_window_runs_and_matches_fp32():
    gen = torch.Generator().manual_seed(7)
    grads = [torch.randn(D, generator=gen) for _ in range(12)]
    p32, pbf = make_params(torch.float32), make_params(torch.float32)
    o32 = MFAC(p32, lr=1.0, num_grads=4, damp=1e-2)
    obf = MFAC(pbf, lr=1.0, num_grads=4, damp=1e-2, window_dtype="bf16")
    assert obf._window.dtype == torch.bfloat16
    for g in grads:
        u32, ubf = take_update(o32, p32, g), take_update(obf, pbf, g)
        assert torch.isfinite(ubf).all()
        assert torch.nn.functional.cosine_similarity(u32, ubf, dim=0) > 0.99


@pytest.mark.parametrize("pattern", ["random", "strided_spikes", "ties"])
def test_fast_topk_is_exact(pattern):
    d, k = 1 << 17, 1000
    opt = MFAC([torch.zeros(d, requires_grad=True)], num_grads=2, sparsity_k=k)
    scores = torch.rand(d, generator=torch.Generator().manual_seed(10))
    if pattern == "strided_spikes":  # the large entries sit between the sampled positions
        scores = scores * 1e-3
        scores[3::8][: 2 * k] += 1.0
    elif pattern == "ties":
        scores = torch.ones(d)
    got = opt._topk_indices(scores.clone())
    assert got.numel() == k and torch.equal(got, got.sort().values) and got.unique().numel() == k
    assert torch.equal(scores[got].sort().values, torch.topk(scores, k).values.sort().values)


def test_sparse_window_with_k_equal_d_equals_dense():
    gen = torch.Generator().manual_seed(8)
    dense_params, sparse_params = make_params(), make_params()
    dense = MFAC(dense_params, lr=1.0, num_grads=6, damp=1e-3)
    sparse = MFAC(sparse_params, lr=1.0, num_grads=6, damp=1e-3, sparsity_k=1.0)
    assert sparse.sparsity_k == D
    for _ in range(15):
        g = torch.randn(D, generator=gen, dtype=torch.float64)
        assert torch.allclose(take_update(sparse, sparse_params, g), take_update(dense, dense_params, g), rtol=1e-9)


def test_sparse_window_reduces_loss_and_tracks_dense_updates():
    X, y = regression_problem()
    steps, m, batch = 200, 32, 64

    def train(**kwargs):
        w = torch.zeros(X.shape[1], requires_grad=True)
        opt = MFAC([w], lr=0.3, num_grads=m, damp=1.0, **kwargs)
        gen = torch.Generator().manual_seed(0)
        grads = []
        for _ in range(steps):
            idx = torch.randint(0, len(X), (batch,), generator=gen)
            loss = ((X[idx] @ w - y[idx]) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            grads.append(w.grad.clone())
            opt.step()
        with torch.no_grad():
            return ((X @ w - y) ** 2).mean().item(), torch.stack(grads)

    initial = (y**2).mean().item()
    dense_loss, grads = train()
    sparse_loss, _ = train(sparsity_k=0.1)
    assert sparse_loss < 0.05 * initial
    assert sparse_loss < 1.5 * dense_loss

    # Replay the same gradient stream through both: error feedback makes the
    # accumulated sparse update align with the dense one.
    def replay(**kwargs):
        w = torch.zeros(X.shape[1], requires_grad=True)
        opt = MFAC([w], lr=1.0, num_grads=m, damp=1.0, **kwargs)
        return torch.stack([take_update(opt, [w], g) for g in grads])

    u_dense, u_sparse = replay(), replay(sparsity_k=0.1)
    cos = torch.nn.functional.cosine_similarity
    assert cos(u_dense.sum(0), u_sparse.sum(0), dim=0) > 0.95
    assert cos(u_dense, u_sparse, dim=1).mean() > 0.6


# ----------------------------------------------------------------------------- helpers


def test_parse_optim_args_both_forms():
    expected = {"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}
    assert parse_optim_args('{"lr": 1e-4, "num_grads": 1024, "damp": 1e-6}') == expected
    assert parse_optim_args("lr: 1e-4, num_grads: 1024, damp: 1e-6") == expected
    assert parse_optim_args("lr=1e-4,num_grads=1024, damp=1e-6") == expected
    parsed = parse_optim_args("num_grads: 1024, amsgrad: true, window_dtype: bfloat16, betas: (0.9, 0.98), x: 'a,b'")
    assert parsed == {"num_grads": 1024, "amsgrad": True, "window_dtype": "bfloat16", "betas": (0.9, 0.98), "x": "a,b"}
    assert isinstance(parsed["num_grads"], int)
    assert parse_optim_args("") == {} and parse_optim_args(None) == {}
    with pytest.raises(ValueError):
        parse_optim_args("lr 1e-4")


def test_build_optimizer():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))
    opt = build_optimizer("MFAC", model.parameters(), 1e-3, 0.01, parse_optim_args("num_grads: 4, damp: 1e-4"))
    assert isinstance(opt, MFAC) and opt.num_grads == 4 and opt.damp == 1e-4
    assert opt.param_groups[0]["lr"] == 1e-3 and opt.param_groups[0]["weight_decay"] == 0.01

    decay = [p for n, p in model.named_parameters() if n.endswith("weight") and p.dim() > 1]
    no_decay = [p for n, p in model.named_parameters() if not (n.endswith("weight") and p.dim() > 1)]
    groups = [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]
    opt = build_optimizer("mfac", groups, 1e-3, 0.01, {"lr": 1e-4, "num_grads": 4})
    assert [g["weight_decay"] for g in opt.param_groups] == [0.01, 0.0]
    assert all(g["lr"] == 1e-4 for g in opt.param_groups)  # optim_args override the lr argument
    model(torch.randn(2, 4)).sum().backward()
    opt.step()

    adamw = build_optimizer("AdamW", copy.deepcopy(groups), 1e-3, 0.01, {"betas": [0.9, 0.98]})
    assert isinstance(adamw, torch.optim.AdamW) and adamw.param_groups[0]["betas"] == (0.9, 0.98)

    with pytest.raises(ValueError, match="unknown optimizer 'sgdx'"):
        build_optimizer("sgdx", model.parameters(), 1e-3, 0.0, {})
    with pytest.raises(ValueError, match="allowed keys: lr, num_grads, damp") as info:
        build_optimizer("mfac", model.parameters(), 1e-3, 0.0, {"num_grad": 4})
    assert "num_grad" in str(info.value) and "\n" not in str(info.value)


# ----------------------------------------------------------------------------- CUDA


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("kwargs", [dict(), dict(sparsity_k=10), dict(window_dtype=torch.bfloat16)])
def test_cuda_matches_cpu(kwargs):
    gen = torch.Generator().manual_seed(9)
    grads = [torch.randn(D, generator=gen) for _ in range(12)]
    cpu_params, gpu_params = make_params(torch.float32), make_params(torch.float32, "cuda")
    cpu = MFAC(cpu_params, lr=1.0, num_grads=4, damp=1e-2, **kwargs)
    gpu = MFAC(gpu_params, lr=1.0, num_grads=4, damp=1e-2, **kwargs)
    for g in grads:
        u_cpu = take_update(cpu, cpu_params, g)
        u_gpu = take_update(gpu, gpu_params, g.cuda()).cpu()
        assert torch.allclose(u_cpu, u_gpu, rtol=1e-3, atol=1e-4)
