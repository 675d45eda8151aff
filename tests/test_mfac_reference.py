"""M-FAC against IST-DASLab/M-FAC optim.py (commit 835320e), transcribed below: the default step (weight decay
added to the gradient before the window, damped momentum v = μ v + (1 - μ) u), the older forms behind
``decoupled_weight_decay`` / ``dampening``, and a check that the inverse-Fisher product is what moves the
parameters (a plain-gradient step does not match)."""
import pytest
import torch

from minbert.methods.optim import MFAC


class HInvSlow:
    """optim.py's naive Woodbury oracle (class HInvSlow), transcribed: H = (damp I + 1/m sum_i g_i g_i^T)^-1."""

    def __init__(self, grads, damp=1e-5):
        m, d = grads.shape
        H = torch.diag(torch.full([d], 1.0 / damp, dtype=grads.dtype, device=grads.device))
        for i in range(m):
            g = grads[i, :]
            Hg = H.matmul(g)
            H -= torch.outer(Hg, Hg) / (m + g.dot(Hg))
        self.H = H

    def mul(self, x):
        return self.H.matmul(x)


class ReferenceMFAC:
    """optim.py's MFAC.step(), transcribed line by line; the window (a ring of ``ngrads`` rows, zero until
    filled, as HInvFastUpMulti starts from zeros) is inverted with HInvSlow instead of the dynamic algorithm,
    which optim.py's own test checks against it. ``plain=True`` replaces F^-1 g by g (the naive step)."""

    def __init__(self, params, lr, momentum, weight_decay, ngrads, damp, plain=False):
        self.params, self.lr, self.momentum, self.weight_decay = list(params), lr, momentum, weight_decay
        d = sum(p.numel() for p in self.params)
        self.grads = torch.zeros(ngrads, d, dtype=torch.float64)
        self.last, self.m, self.damp, self.plain = 0, ngrads, damp, plain
        if self.momentum > 0:
            self.v = torch.zeros(d, dtype=torch.float64)

    @torch.no_grad()
    def step(self):
        g = []
        for p in self.params:
            if self.weight_decay > 0:
                tmp = p.grad + self.weight_decay * p
            else:
                tmp = p.grad
            g.append(tmp.reshape(-1))
        g = torch.cat(g)
        self.grads[self.last, :] = g  # HInvFastUpMulti.update_mul: replace the oldest gradient, then multiply
        tmp = g.clone() if self.plain else HInvSlow(self.grads.clone(), self.damp).mul(g)
        self.last = (self.last + 1) % self.m
        if self.momentum > 0:
            self.v = self.momentum * self.v + (1 - self.momentum) * tmp
            tmp = self.v
        count = 0
        for p in self.params:
            p.add_(tmp[count:(count + p.numel())].reshape(p.shape), alpha=-self.lr)
            count += p.numel()


def _run(make_opt, steps=7, seed=0):
    """Parameters after ``steps`` steps on fixed random gradients (the same for every optimizer)."""
    gen = torch.Generator().manual_seed(seed)
    params = [torch.nn.Parameter(torch.randn(3, 4, generator=gen, dtype=torch.float64)),
              torch.nn.Parameter(torch.randn(5, generator=gen, dtype=torch.float64))]
    opt = make_opt(params)
    for _ in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, dtype=torch.float64)
        opt.step()
    return torch.cat([p.detach().reshape(-1) for p in params])


SETTINGS = dict(lr=0.1, momentum=0.9, weight_decay=0.05)


@pytest.mark.parametrize("damp", [1e-2, 1e-5])
def test_default_step_matches_the_reference(damp):
    # 7 steps over a window of 4: the ring wraps, momentum and weight decay are on
    ours = _run(lambda ps: MFAC(ps, num_grads=4, damp=damp, check_memory=False, **SETTINGS))
    ref = _run(lambda ps: ReferenceMFAC(ps, ngrads=4, damp=damp, **{
        "lr": SETTINGS["lr"], "momentum": SETTINGS["momentum"], "weight_decay": SETTINGS["weight_decay"]}))
    torch.testing.assert_close(ours, ref, rtol=1e-9, atol=1e-9)


def test_the_inverse_fisher_product_matters():
    """A step on the plain gradient (F^-1 g replaced by g) ends far from the reference: the test above would
    catch an M-FAC that lost its preconditioner."""
    start = _run(lambda ps: ReferenceMFAC(ps, ngrads=4, damp=1e-2, lr=0.0, momentum=0.9, weight_decay=0.05))
    ref = _run(lambda ps: ReferenceMFAC(ps, ngrads=4, damp=1e-2, **SETTINGS))
    plain = _run(lambda ps: ReferenceMFAC(ps, ngrads=4, damp=1e-2, plain=True, **SETTINGS))
    ours = _run(lambda ps: MFAC(ps, num_grads=4, damp=1e-2, check_memory=False, **SETTINGS))
    moved = (ref - start).norm()
    assert (plain - ref).norm() > 0.5 * moved  # the naive step is a different step, not a rounding of it
    assert (ours - ref).norm() < 1e-9 * moved


def test_older_forms_are_options():
    """decoupled_weight_decay=True and dampening=0: minbert's form before 2026-12 (b = μ b + u, p -= lr wd p)."""

    class Old(ReferenceMFAC):
        @torch.no_grad()
        def step(self):
            g = torch.cat([p.grad.reshape(-1) for p in self.params])
            self.grads[self.last, :] = g
            u = HInvSlow(self.grads.clone(), self.damp).mul(g)
            self.last = (self.last + 1) % self.m
            self.v = self.momentum * self.v + u
            count = 0
            for p in self.params:
                p.mul_(1 - self.lr * self.weight_decay)
                p.add_(self.v[count:(count + p.numel())].reshape(p.shape), alpha=-self.lr)
                count += p.numel()

    ours = _run(lambda ps: MFAC(ps, num_grads=4, damp=1e-2, check_memory=False, dampening=0.0,
                                decoupled_weight_decay=True, **SETTINGS))
    old = _run(lambda ps: Old(ps, ngrads=4, damp=1e-2, **SETTINGS))
    torch.testing.assert_close(ours, old, rtol=1e-9, atol=1e-9)
    new = _run(lambda ps: MFAC(ps, num_grads=4, damp=1e-2, check_memory=False, **SETTINGS))
    assert not torch.allclose(ours, new)


def test_a_checkpoint_of_the_older_form_resumes_in_that_form():
    """A state dict written before dampening existed (no key in its param groups) resumes as it was trained."""
    p = torch.nn.Parameter(torch.ones(3, dtype=torch.float64))
    p.grad = torch.ones(3, dtype=torch.float64)
    opt = MFAC([p], num_grads=2, check_memory=False, momentum=0.5, weight_decay=0.1)
    opt.step()
    state = opt.state_dict()
    for g in state["param_groups"]:
        del g["dampening"]
    fresh = MFAC([p], num_grads=2, check_memory=False, momentum=0.5, weight_decay=0.1)
    fresh.load_state_dict(state)
    assert fresh.decoupled_weight_decay and fresh.param_groups[0]["dampening"] == 0.0
    resumed = MFAC([p], num_grads=2, check_memory=False, momentum=0.5, weight_decay=0.1)
    resumed.load_state_dict(opt.state_dict())
    assert not resumed.decoupled_weight_decay and resumed.param_groups[0]["dampening"] is None
