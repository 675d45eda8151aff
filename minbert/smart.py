"""SMART: smoothness-inducing adversarial regularization, with an optional Bregman proximal-point term
(Jiang et al., "SMART: Robust and Efficient Fine-Tuning ...", ACL 2020, arXiv 1911.03437).

The training objective of §3 is  min_θ L(θ) + λ R_s(θ)  (+ μ D_Breg(θ, θ̃) with the proximal point), where

    R_s(θ) = 1/n Σ_i  max_{||x̃_i - x_i||_∞ ≤ ε}  ℓ_s(f(x̃_i; θ), f(x_i; θ))

and x_i is the embedding-layer output of example i (the report's §4.4: "the first embedding layer"). The inner
max is approximated as in Algorithm 1: start from x_i + ν, ν ~ N(0, σ²I), then take ``steps`` ascent steps of size
η along the gradient normalized by its max-norm, projecting the perturbation back into the ε max-norm ball after
each. ℓ_s is the symmetric KL divergence for classification (softmax for SST, Bernoulli for the QQP logit) and
the squared error for regression (STS).

Memory: the report's SMART + GSE run died out of memory. Here the ascent passes differentiate only with respect to
the perturbation (``torch.autograd.grad`` on δ, with the model's parameters frozen and the clean embeddings
detached, so autograd saves only what the input gradient needs), and each ascent graph is freed before the next
pass. Only the final perturbed pass, which the training gradient needs, keeps its graph.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

# The report's settings (§4.4), also the paper's defaults: λ, η, ε, σ; plus the Bregman proximal point's μ, β.
SMART_LAMBDA, SMART_ETA, SMART_EPSILON, SMART_SIGMA, SMART_STEPS = 5.0, 1e-3, 1e-5, 1e-5, 1
BREGMAN_MU, BREGMAN_BETA = 1.0, 0.99


def divergence(a: torch.Tensor, b: torch.Tensor, kind: str) -> torch.Tensor:
    """ℓ_s between two head outputs, averaged over the batch.

    ``logits`` (softmax over classes): KL(p||q) + KL(q||p) = Σ_k (p_k - q_k)(log p_k - log q_k).
    ``binary`` (one logit, Bernoulli p = σ(a), q = σ(b)): the same sum over {1, 0} reduces to (p - q)(a - b),
    since log(p / (1 - p)) = a.
    ``score`` (regression): the squared error (a - b)².
    """
    if a.dtype in (torch.float16, torch.bfloat16):  # mixed precision: compute the divergence in float32
        a, b = a.float(), b.float()
    if kind == "logits":
        log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
        return ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1).mean()
    if kind == "binary":
        return ((torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)).mean()
    if kind == "score":
        return F.mse_loss(a, b)
    raise ValueError(f"SMART: unknown head output kind {kind!r} (logits, binary, score)")


@contextmanager
def frozen(params: Iterable[nn.Parameter]):
    """Temporarily stop ``params`` from requiring grad, so a pass differentiated only with respect to its input
    does not save the activations that parameter gradients would need."""
    changed = [p for p in params if p.requires_grad]
    for p in changed:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in changed:
            p.requires_grad_(True)


def adversarial_perturbation(
    forward: Callable[[list[torch.Tensor]], torch.Tensor],
    embeds: list[torch.Tensor],
    clean_output: torch.Tensor,
    kind: str,
    steps: int = SMART_STEPS,
    eta: float = SMART_ETA,
    epsilon: float = SMART_EPSILON,
    sigma: float = SMART_SIGMA,
    frozen_params: Iterable[nn.Parameter] = (),
    noise: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> list[torch.Tensor]:
    """The perturbations δ (one per sentence tensor in ``embeds``, shape (batch, seq, hidden)) of Algorithm 1:
    δ ← ν ~ N(0, σ²I); then ``steps`` times: g = ∇_δ ℓ_s(f(x + δ), f(x)) with f(x) detached, g̃ = g / ||g||_∞
    (per example, over all its sentences' tokens), δ ← Π_{||δ||_∞ ≤ ε}(δ + η g̃). The initial noise is projected
    too, so |δ| ≤ ε elementwise even with ``steps=0``. Returned detached.

    ``noise`` maps ``embeds`` to standard normal tensors of their shapes (default: ``torch.randn_like`` of
    each); under torchrun each rank draws its rows of the global batch's noise (distributed.batch_noise)."""
    embeds = [e.detach() for e in embeds]
    target = clean_output.detach()
    if noise is None:
        deltas = [(torch.randn_like(e) * sigma).clamp_(-epsilon, epsilon) for e in embeds]
    else:
        deltas = [(nu * sigma).clamp_(-epsilon, epsilon) for nu in noise(embeds)]
    with frozen(frozen_params):
        for _ in range(steps):
            for d in deltas:
                d.requires_grad_(True)
            div = divergence(forward([e + d for e, d in zip(embeds, deltas)]), target, kind)
            grads = torch.autograd.grad(div, deltas)  # frees this pass's graph
            del div
            # ||g_i||_∞ of each example i over both sentences of a pair; a zero gradient stays a zero step.
            g_max = torch.stack([g.abs().flatten(1).amax(1) for g in grads]).amax(0)
            g_max = g_max.clamp_min(torch.finfo(g_max.dtype).tiny).view(-1, *([1] * (grads[0].dim() - 1)))
            deltas = [(d.detach() + eta * g / g_max).clamp_(-epsilon, epsilon) for d, g in zip(deltas, grads)]
            del grads
    return deltas


def smart_loss(
    forward: Callable[[list[torch.Tensor]], torch.Tensor],
    embeds: list[torch.Tensor],
    clean_output: torch.Tensor,
    kind: str,
    steps: int = SMART_STEPS,
    eta: float = SMART_ETA,
    epsilon: float = SMART_EPSILON,
    sigma: float = SMART_SIGMA,
    frozen_params: Iterable[nn.Parameter] = (),
    noise: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> torch.Tensor:
    """R_s(θ) for one batch (unweighted): ℓ_s(f(x + δ; θ), f(x; θ)) at the adversarial δ of
    :func:`adversarial_perturbation`. ``forward`` maps embedding-layer outputs to the head's output. Gradients
    flow to θ through both outputs, and to the embedding layer through x; δ itself is a constant."""
    deltas = adversarial_perturbation(forward, embeds, clean_output, kind, steps, eta, epsilon, sigma, frozen_params,
                                      noise)
    perturbed = forward([e + d for e, d in zip(embeds, deltas)])
    return divergence(perturbed, clean_output, kind)


class SmartRegularizer:
    """The training loop's SMART hook: ``loss + regularizer(model, task, embeds, batch, clean_output)``.

    Returns λ R_s(θ), plus μ ℓ_s(f(x; θ), f(x; θ̃)) with ``bregman``: the proximal-point term against θ̃, an
    exponential moving average of the parameters (θ̃ ← β θ̃ + (1 - β) θ after every training step, starting
    from θ_0; Algorithm 1's momentum Bregman proximal point). The average model runs without dropout and
    without gradients.
    """

    def __init__(self, lam: float = SMART_LAMBDA, steps: int = SMART_STEPS, eta: float = SMART_ETA,
                 epsilon: float = SMART_EPSILON, sigma: float = SMART_SIGMA, bregman: bool = False,
                 bregman_mu: float = BREGMAN_MU, bregman_beta: float = BREGMAN_BETA):
        self.lam, self.steps, self.eta, self.epsilon, self.sigma = lam, steps, eta, epsilon, sigma
        self.bregman, self.bregman_mu, self.bregman_beta = bregman, bregman_mu, bregman_beta
        self.ema: AveragedModel | None = None  # θ̃, created at the first call (θ̃_1 = θ_0)
        self._ema_state: dict | None = None  # θ̃ from a resumed run, loaded when the copy is created

    @classmethod
    def from_args(cls, args) -> "SmartRegularizer":
        return cls(lam=args.smart_lambda, steps=args.smart_steps, eta=args.smart_eta, epsilon=args.smart_epsilon,
                   sigma=args.smart_sigma, bregman=args.bregman, bregman_mu=args.bregman_mu,
                   bregman_beta=args.bregman_beta)

    def __call__(self, model: nn.Module, task: str, embeds: list[torch.Tensor], batch: dict[str, torch.Tensor],
                 clean_output: torch.Tensor,
                 noise: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """``noise``: the initial perturbation's source (see :func:`adversarial_perturbation`)."""
        kind = model.heads[task].kind

        def forward(xs: list[torch.Tensor]) -> torch.Tensor:
            return model.forward_embedded(task, xs, batch)

        reg = self.lam * smart_loss(forward, embeds, clean_output, kind, self.steps, self.eta, self.epsilon,
                                    self.sigma, frozen_params=model.parameters(), noise=noise)
        if self.bregman:
            reg = reg + self.bregman_mu * self.bregman_term(model, task, batch, clean_output)
        return reg

    def bregman_term(self, model: nn.Module, task: str, batch: dict[str, torch.Tensor],
                     clean_output: torch.Tensor) -> torch.Tensor:
        """ℓ_s(f(x; θ), f(x; θ̃)): gradients flow through f(x; θ) only."""
        if self.ema is None:
            self.ema = ema_copy(model, self.bregman_beta)
            if self._ema_state is not None:
                self.ema.load_state_dict(self._ema_state)
                self._ema_state = None
        with torch.no_grad():
            anchor = self.ema.module(task, batch)
        return divergence(clean_output, anchor, model.heads[task].kind)

    def after_step(self, model: nn.Module) -> None:
        """θ̃ ← β θ̃ + (1 - β) θ (called by the training loop after each training step)."""
        if self.ema is not None:
            self.ema.update_parameters(model)

    # Resumable state (saved with the training checkpoint): the Bregman anchor θ̃.
    def state_dict(self) -> dict:
        if self.ema is not None:
            return {"ema": {k: v.detach().clone() for k, v in self.ema.state_dict().items()}}
        return {"ema": self._ema_state} if self._ema_state is not None else {}

    def load_state_dict(self, state: dict) -> None:
        self._ema_state = state.get("ema")
        if self.ema is not None and self._ema_state is not None:
            self.ema.load_state_dict(self._ema_state)
            self._ema_state = None


def ema_copy(model: nn.Module, beta: float) -> AveragedModel:
    """A frozen copy of ``model`` whose ``update_parameters(model)`` does θ̃ ← β θ̃ + (1 - β) θ."""
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(beta), use_buffers=False)
    # AveragedModel copies (instead of averaging) on its first update; do that first update now, on the same
    # parameters it was built from, so that every later update is the EMA formula.
    ema.update_parameters(model)
    ema.eval()
    ema.requires_grad_(False)
    for p in ema.parameters():
        p.grad = None  # deepcopy copies any gradient the model holds
    return ema


__all__ = ["SmartRegularizer", "smart_loss", "adversarial_perturbation", "divergence", "ema_copy"]
