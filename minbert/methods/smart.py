"""SMART: smoothness-inducing adversarial regularization, with an optional Bregman proximal-point term
(Jiang et al., "SMART: Robust and Efficient Fine-Tuning ...", ACL 2020, arXiv 1911.03437).

The training objective of §3 is  min_θ L(θ) + λ R_s(θ)  (+ μ D_Breg(θ, θ̃) with the proximal point), where

    R_s(θ) = 1/n Σ_i  ℓ_s(f(x_i + δ_i; θ), f(x_i; θ))

x_i is the embedding-layer output of example i (the report's §4.4: "the first embedding layer") and δ_i an
adversarial perturbation found by ``steps`` gradient-ascent steps from random noise ν ~ N(0, σ²I). ℓ_s is the
symmetric KL divergence for classification (softmax for SST, Bernoulli for the QQP logit) and the squared error for
regression (STS). Three forms of δ (``projection``), each following a named reference:

* ``"library"`` (default): the authors' MT-DNN library as it computes δ today (namisan/mt-dnn
  mt_dnn/perturbation.py at commit 676b48b; archinetai/smart-pytorch smart_pytorch.py at 5ea2d4b runs the same
  loop). Starting from ν = σ·N(0, I): repeat K times  g = ∇_ν Σ_batch ℓ_s(f(x + ν), f(x).detach());
  ν ← (ν + η g) / (max_h |ν + η g| + ε)  per token (max over the hidden vector); then δ = ν. The ascent loss is
  summed over the batch, as both references sum it (mt-dnn: stable_kl(..., reduce=False) and
  mse_loss(reduction="sum"); smart-pytorch's sym_kl_loss: reduction="sum"). Each token's largest |δ| is about
  1, not η; ε = 1e-5 (the report's) only stabilises the division. A token whose gradient is zero (padding, or an
  eval-mode gradient that underflows) keeps its normalized noise: δ = ν / (max|ν| + ε), never zero.
  (mt-dnn's ascent loss is a one-sided KL; minbert uses ℓ_s, the symmetric KL of smart-pytorch's sym_kl_loss.)
* ``"library_early"``: the library's early form (namisan/mt-dnn mt_dnn/perturbation.py at commit 0d6201e;
  minbert's default before 2026-12, then called ``none``, still accepted as an alias). The ascent direction is
  normalized per token, d = g / (max_h |g_h| + ε) with g the gradient of the batch-MEAN ℓ_s at x + ν, and
  δ = η·d (the noise only chooses where the first gradient is taken), no projection: the largest |δ| of a token
  is about η. ε defaults to 1e-30 here: the per-token gradients are about 1e-10 in eval mode (minilm-l6), so the
  report's 1e-5 would shrink δ to about 1e-8 instead of η.
* ``"ball"``: the paper's Algorithm 1 read literally: start from x + ν, step by η·g / ||g||_∞ (per example),
  project onto the max-norm ball ||δ||_∞ ≤ ε after each step. With ε = 1e-5 next to embedding entries of order
  1, this δ is too small to change the output measurably (docs/multitask.md, "SMART: the size of δ").

Memory: the report's SMART + GSE run died out of memory. Here the ascent passes differentiate only with respect to
the perturbation (``torch.autograd.grad`` on δ, with the model's parameters frozen and the clean embeddings
detached, so autograd saves only what the input gradient needs), and each ascent graph is freed before the next
pass. Only the final perturbed pass, which the training gradient needs, keeps its graph.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from minbert.io.settings import setting

# The report's settings (§4.4), also the paper's defaults: λ, η, ε, σ; plus the Bregman proximal point's μ, β.
SMART_LAMBDA, SMART_ETA, SMART_EPSILON, SMART_SIGMA, SMART_STEPS = 5.0, 1e-3, 1e-5, 1e-5, 1
BREGMAN_MU, BREGMAN_BETA = 1.0, 0.99
# The form of δ (module docstring): "library" = MT-DNN 676b48b / smart-pytorch, "library_early" = MT-DNN 0d6201e,
# "ball" = the paper-literal ε-ball.
SMART_PROJECTIONS = ("library", "library_early", "ball")
SMART_PROJECTION = "library"
# Names an older minbert wrote to args.json: "none" was the MT-DNN 0d6201e form (the default until 2026-12).
LEGACY_PROJECTIONS = {"none": "library_early"}


def projection_flag(text: str) -> str:
    """--smart_projection's reader: the legacy name ``none`` (MT-DNN 0d6201e, minbert's default before 2026-12) is
    library_early; any other value goes to the choices check unchanged."""
    return LEGACY_PROJECTIONS.get(text, text)


@dataclass
class SmartSettings:
    """SMART's flags (in the multitask group)."""

    smart: bool = setting(False, help="add SMART's smoothness-inducing adversarial regularizer to every task loss "
                                      "(Jiang et al. 2020)")
    smart_steps: int = setting(SMART_STEPS, bounds=(0, None), help="SMART: ascent steps on the perturbation")
    smart_lambda: float = setting(SMART_LAMBDA, bounds=(0, None), help="SMART: regularizer weight lambda")
    smart_eta: float = setting(SMART_ETA, bounds=(0, None), help="SMART: ascent step size eta")
    smart_projection: str = setting(
        SMART_PROJECTION, choices=SMART_PROJECTIONS, parse=projection_flag,
        help="SMART's perturbation: library = the MT-DNN library today (namisan/mt-dnn perturbation.py "
             "at 676b48b, as archinetai/smart-pytorch): noise, then per token (noise + eta * grad) / "
             "(max|noise + eta * grad| + epsilon), so |delta| is about 1; library_early = its early form "
             "(mt-dnn 0d6201e, minbert's default before 2026-12, old name none): x + eta * per-token "
             "normalized gradient, |delta| about eta; ball = the paper's Algorithm 1 read literally "
             "(projected into the max-norm ball of radius epsilon); docs/multitask.md")
    smart_epsilon: float | None = setting(
        None, bounds=(0, None),
        help="SMART: with library the normalization's stabiliser (default 1e-5, the report's); with ball "
             "the max-norm radius (default 1e-5); with library_early the stabiliser (default 1e-30)")
    smart_sigma: float = setting(SMART_SIGMA, bounds=(0, None), help="SMART: initial noise std sigma")
    bregman: bool = setting(False, help="with --smart: add the Bregman proximal-point term against an EMA copy of "
                                        "the model")
    bregman_mu: float = setting(BREGMAN_MU, bounds=(0, None), help="Bregman proximal point: weight mu")
    bregman_beta: float = setting(
        BREGMAN_BETA, bounds=(0, 1),
        help="Bregman proximal point: EMA momentum beta (theta~ <- beta*theta~ + (1-beta)*theta after each step)")

    @property
    def ball(self) -> bool:
        """SMART with the paper-literal projection, which needs float32 (--bf16 auto turns bfloat16 off)."""
        return self.smart and self.smart_projection == "ball"


def projection_name(projection: str) -> str:
    """The current name of a --smart_projection value (legacy aliases mapped); unknown names are refused."""
    projection = LEGACY_PROJECTIONS.get(projection, projection)
    if projection not in SMART_PROJECTIONS:
        raise ValueError(f"SMART: unknown projection {projection!r} ({', '.join(SMART_PROJECTIONS)})")
    return projection


def default_epsilon(projection: str) -> float:
    """ε when none is given. ``library``: the report's 1e-5 (the denominator's stabiliser; MT-DNN's own default is
    1e-6). ``ball``: the report's radius 1e-5. ``library_early``: 1e-30, a pure stabiliser (it keeps a padding
    token's zero gradient a zero step). The report's 1e-5 is no stabiliser there: in eval mode the per-token
    gradients at the initial noise are about 1e-10 (minilm-l6, docs/multitask.md), so g / (max|g| + 1e-5) would
    shrink δ to about 1e-8 instead of η."""
    return 1e-30 if projection_name(projection) == "library_early" else SMART_EPSILON


def divergence(a: torch.Tensor, b: torch.Tensor, kind: str, reduction: str = "mean") -> torch.Tensor:
    """ℓ_s between two head outputs, averaged over the batch (``reduction="sum"``: summed over it).

    ``logits`` (softmax over classes): KL(p||q) + KL(q||p) = Σ_k (p_k - q_k)(log p_k - log q_k).
    ``binary`` (one logit, Bernoulli p = σ(a), q = σ(b)): the same sum over {1, 0} reduces to (p - q)(a - b),
    since log(p / (1 - p)) = a.
    ``score`` (regression): the squared error (a - b)².
    """
    if a.dtype in (torch.float16, torch.bfloat16):  # mixed precision: compute the divergence in float32
        a, b = a.float(), b.float()
    if reduction not in ("mean", "sum"):
        raise ValueError(f"SMART: unknown reduction {reduction!r} (mean, sum)")
    if kind == "logits":
        log_p, log_q = a.log_softmax(-1), b.log_softmax(-1)
        per_example = ((log_p.exp() - log_q.exp()) * (log_p - log_q)).sum(-1)
        return per_example.mean() if reduction == "mean" else per_example.sum()
    if kind == "binary":
        per_example = (torch.sigmoid(a) - torch.sigmoid(b)) * (a - b)
        return per_example.mean() if reduction == "mean" else per_example.sum()
    if kind == "score":
        return F.mse_loss(a, b, reduction=reduction)
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


def _normalized_direction(grads: list[torch.Tensor], epsilon: float, projection: str) -> list[torch.Tensor]:
    """The ascent direction g̃ of each sentence tensor's gradient g (batch, seq, hidden).

    ``library_early`` (MT-DNN 0d6201e): g / (max |g| over each token's hidden vector + ε), so every token that moves the output
    gets a step whose largest entry is about η, as long as ε is far below its gradient (:func:`default_epsilon`).
    ``ball`` (Algorithm 1): g / ||g_i||_∞, the max-norm of example i over all its sentences' tokens. A zero
    gradient stays a zero step in both."""
    if projection == "library_early":
        tiny = torch.finfo(grads[0].dtype).tiny  # a zero gradient stays a zero step in any float type
        return [g / (g.abs().amax(-1, keepdim=True) + epsilon).clamp_min(tiny) for g in grads]
    g_max = torch.stack([g.abs().flatten(1).amax(1) for g in grads]).amax(0)
    g_max = g_max.clamp_min(torch.finfo(g_max.dtype).tiny).view(-1, *([1] * (grads[0].dim() - 1)))
    return [g / g_max for g in grads]


def adversarial_perturbation(
    forward: Callable[[list[torch.Tensor]], torch.Tensor],
    embeds: list[torch.Tensor],
    clean_output: torch.Tensor,
    kind: str,
    steps: int = SMART_STEPS,
    eta: float = SMART_ETA,
    epsilon: float | None = None,
    sigma: float = SMART_SIGMA,
    frozen_params: Iterable[nn.Parameter] = (),
    noise: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    projection: str = SMART_PROJECTION,
) -> list[torch.Tensor]:
    """The perturbations δ (one per sentence tensor in ``embeds``, shape (batch, seq, hidden)), returned detached.

    Every form starts at ν ~ N(0, σ²I) and takes ``steps`` ascent steps on the gradient of ℓ_s(f(x + δ), f(x)),
    with f(x) detached (the module docstring names each form's reference):

    * ``projection="library"`` (default, MT-DNN 676b48b / smart-pytorch): ν ← (ν + η g) / (max_h |ν + η g| + ε)
      per token, g the gradient of ℓ_s summed over the batch; δ = ν. With ``steps=0`` δ is the noise ν.
    * ``projection="library_early"`` (MT-DNN 0d6201e; legacy name ``none``): δ ← η g̃ at the first step (the
      noise is dropped: the perturbed input is x + η·direction), δ ← δ + η g̃ at any later one, with the per-token
      g̃ = g / (max_h |g_h| + ε) of the batch-mean ℓ_s; no bound on δ. With ``steps=0`` δ is the noise ν.
    * ``projection="ball"`` (Algorithm 1 read literally): δ ← Π_{||δ||_∞ ≤ ε}(δ + η g / ||g||_∞), the max-norm
      per example; the initial noise is projected too, so |δ| ≤ ε elementwise even with ``steps=0``.

    ``noise`` maps ``embeds`` to standard normal tensors of their shapes (default: ``torch.randn_like`` of
    each); under torchrun each rank draws its rows of the global batch's noise (distributed.batch_noise)."""
    projection = projection_name(projection)
    epsilon = default_epsilon(projection) if epsilon is None else epsilon
    embeds = [e.detach() for e in embeds]
    target = clean_output.detach()
    nus = [torch.randn_like(e) for e in embeds] if noise is None else noise(embeds)
    deltas = [nu * sigma for nu in nus]
    if projection == "ball":
        deltas = [d.clamp_(-epsilon, epsilon) for d in deltas]
    # The references sum the ascent loss over the batch in the library form (see the module docstring).
    reduction = "sum" if projection == "library" else "mean"
    with frozen(frozen_params):
        for step in range(steps):
            for d in deltas:
                d.requires_grad_(True)
            div = divergence(forward([e + d for e, d in zip(embeds, deltas)]), target, kind, reduction)
            grads = torch.autograd.grad(div, deltas)  # frees this pass's graph
            del div
            if projection == "library":
                # ν + η g, then normalized per token by its max-norm over the hidden vector (+ ε)
                moved = [d.detach() + eta * g for d, g in zip(deltas, grads)]
                del grads
                deltas = [m / (m.abs().amax(-1, keepdim=True) + epsilon) for m in moved]
                continue
            directions = _normalized_direction(grads, epsilon, projection)
            del grads
            if projection == "ball":
                deltas = [(d.detach() + eta * g).clamp_(-epsilon, epsilon) for d, g in zip(deltas, directions)]
            elif step == 0:
                deltas = [eta * g for g in directions]
            else:
                deltas = [d.detach() + eta * g for d, g in zip(deltas, directions)]
    return [d.detach() for d in deltas]


def smart_loss(
    forward: Callable[[list[torch.Tensor]], torch.Tensor],
    embeds: list[torch.Tensor],
    clean_output: torch.Tensor,
    kind: str,
    steps: int = SMART_STEPS,
    eta: float = SMART_ETA,
    epsilon: float | None = None,
    sigma: float = SMART_SIGMA,
    frozen_params: Iterable[nn.Parameter] = (),
    noise: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None,
    projection: str = SMART_PROJECTION,
) -> torch.Tensor:
    """R_s(θ) for one batch (unweighted): ℓ_s(f(x + δ; θ), f(x; θ)) at the adversarial δ of
    :func:`adversarial_perturbation`. ``forward`` maps embedding-layer outputs to the head's output. Gradients
    flow to θ through both outputs, and to the embedding layer through x; δ itself is a constant."""
    deltas = adversarial_perturbation(forward, embeds, clean_output, kind, steps, eta, epsilon, sigma, frozen_params,
                                      noise, projection)
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
                 epsilon: float | None = None, sigma: float = SMART_SIGMA, bregman: bool = False,
                 bregman_mu: float = BREGMAN_MU, bregman_beta: float = BREGMAN_BETA,
                 projection: str = SMART_PROJECTION):
        projection = projection_name(projection)
        epsilon = default_epsilon(projection) if epsilon is None else epsilon
        self.lam, self.steps, self.eta, self.epsilon, self.sigma = lam, steps, eta, epsilon, sigma
        self.projection = projection
        self.bregman, self.bregman_mu, self.bregman_beta = bregman, bregman_mu, bregman_beta
        self.ema: AveragedModel | None = None  # θ̃, created at the first call (θ̃_1 = θ_0)
        self._ema_state: dict | None = None  # θ̃ from a resumed run, loaded when the copy is created
        self._last: dict[str, torch.Tensor] = {}  # λ R_s of the last call per task, detached (read lazily)

    @classmethod
    def from_settings(cls, smart: "SmartSettings") -> "SmartRegularizer":
        return cls(lam=smart.smart_lambda, steps=smart.smart_steps, eta=smart.smart_eta, epsilon=smart.smart_epsilon,
                   sigma=smart.smart_sigma, bregman=smart.bregman, bregman_mu=smart.bregman_mu,
                   bregman_beta=smart.bregman_beta, projection=smart.smart_projection)

    @property
    def last_values(self) -> dict[str, float]:
        """{task: λ R_s} of the last call for each task (without the Bregman term), for metrics.jsonl's
        ``smart_<task>``: a user can see that the regularizer is alive. Read as floats only here, so a GPU step
        does not wait for it."""
        return {task: float(v) for task, v in self._last.items()}

    def __call__(self, model: nn.Module, task: str, embeds: list[torch.Tensor], batch: dict[str, torch.Tensor],
                 clean_output: torch.Tensor,
                 noise: Callable[[list[torch.Tensor]], list[torch.Tensor]] | None = None) -> torch.Tensor:
        """``noise``: the initial perturbation's source (see :func:`adversarial_perturbation`)."""
        kind = model.heads[task].kind

        def forward(xs: list[torch.Tensor]) -> torch.Tensor:
            return model.forward_embedded(task, xs, batch)

        reg = self.lam * smart_loss(forward, embeds, clean_output, kind, self.steps, self.eta, self.epsilon,
                                    self.sigma, frozen_params=model.parameters(), noise=noise,
                                    projection=self.projection)
        self._last[task] = reg.detach()
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


__all__ = ["SmartRegularizer", "smart_loss", "adversarial_perturbation", "divergence", "ema_copy", "SMART_PROJECTIONS",
           "LEGACY_PROJECTIONS", "projection_name"]
