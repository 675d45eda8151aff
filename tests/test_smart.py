"""SMART (Jiang et al. 2020): divergences on hand-computed distributions, the perturbation's ε-ball, a closed-form
adversarial answer, gradients into the encoder, the Bregman EMA, and an end-to-end run with GSE."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from minbert.config import BertConfig
from minbert.model import BertModel
from minbert.multitask import MultitaskBert, MultitaskConfig
from minbert.smart import SmartRegularizer, adversarial_perturbation, divergence, smart_loss

LN9 = math.log(9.0)


# ------------------------------------------------------------------------------------------------ divergences

def test_symmetric_kl_softmax_hand_computed():
    p, q = torch.tensor([[0.5, 0.5]]), torch.tensor([[0.9, 0.1]])
    # KL(p||q) + KL(q||p) = sum (p - q)(ln p - ln q) = -0.4 ln(5/9) + 0.4 ln 5 = 0.4 ln 9
    assert divergence(p.log(), q.log(), "logits").item() == pytest.approx(0.4 * LN9, rel=1e-6)
    # logits are shift-invariant
    assert divergence(p.log() + 3.0, q.log() - 1.0, "logits").item() == pytest.approx(0.4 * LN9, rel=1e-6)
    # matches torch's KL both ways, batch-averaged
    a, b = torch.randn(4, 5), torch.randn(4, 5)
    kl = F.kl_div(b.log_softmax(-1), a.log_softmax(-1), log_target=True, reduction="batchmean") + \
        F.kl_div(a.log_softmax(-1), b.log_softmax(-1), log_target=True, reduction="batchmean")
    assert divergence(a, b, "logits").item() == pytest.approx(kl.item(), rel=1e-5)


def test_symmetric_kl_bernoulli_hand_computed():
    # p = sigmoid(0) = 0.5, q = sigmoid(ln 9) = 0.9: the same two-point distributions as above -> 0.4 ln 9
    a, b = torch.tensor([0.0]), torch.tensor([LN9])
    assert divergence(a, b, "binary").item() == pytest.approx(0.4 * LN9, rel=1e-6)
    # equals the softmax divergence of the logits [0, a] and [0, b]
    x, y = torch.randn(6), torch.randn(6)
    two_class = divergence(torch.stack([torch.zeros(6), x], 1), torch.stack([torch.zeros(6), y], 1), "logits")
    assert divergence(x, y, "binary").item() == pytest.approx(two_class.item(), rel=1e-5)
    assert divergence(x, x, "binary").item() == 0.0


def test_score_divergence_is_mse():
    assert divergence(torch.tensor([1.0, 3.0]), torch.tensor([2.0, 0.0]), "score").item() == pytest.approx(5.0)
    with pytest.raises(ValueError, match="unknown head output kind"):
        divergence(torch.zeros(1), torch.zeros(1), "nope")


# ------------------------------------------------------------------------------------------------ perturbation

W = torch.tensor([[1.0, -2.0, 0.5], [0.5, 1.0, -1.0]], dtype=torch.float64)  # ||W||_1 = 6, ||W||_inf = 2


def linear_forward(xs):
    """f(x) = <x, W> per example: a regression output whose adversarial perturbation is known in closed form."""
    return (xs[0] * W).sum((1, 2))


def test_adversarial_perturbation_closed_form():
    # MSE(f(x + δ), f(x)) = mean_b <δ_b, W>^2; the normalized ascent direction is sign(<δ_b, W>) W / ||W||_inf,
    # whose entries are at least 0.25 in size; with η = 1 every entry of δ overshoots the ε = 0.1 ball, so after
    # one step δ_b = ε sign(<δ_b, W>) sign(W) and the divergence is (ε ||W||_1)^2 = 0.36 for every example.
    torch.manual_seed(0)
    x = torch.randn(5, 2, 3, dtype=torch.float64)
    clean = linear_forward([x])
    (delta,) = adversarial_perturbation(linear_forward, [x], clean, "score", steps=1, eta=1.0, epsilon=0.1, sigma=0.05)
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.1))
    signs = torch.sign((delta * W).sum((1, 2)))
    torch.testing.assert_close(delta, 0.1 * signs.view(-1, 1, 1) * torch.sign(W).expand_as(delta))
    reg = smart_loss(linear_forward, [x], clean, "score", steps=1, eta=1.0, epsilon=0.1, sigma=0.05)
    assert reg.item() == pytest.approx(0.36)


@pytest.mark.parametrize("steps", [0, 1, 3])
def test_perturbation_never_exceeds_epsilon(steps):
    torch.manual_seed(1)
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    eps = 1e-5
    deltas = adversarial_perturbation(linear_forward, [x], linear_forward([x]), "score", steps=steps, eta=1e-3,
                                      epsilon=eps, sigma=1e-5)
    assert deltas[0].abs().max().item() <= eps
    assert not deltas[0].requires_grad


def tiny_model(seed: int = 0, dropout: float = 0.1) -> MultitaskBert:
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=60, hidden_size=16, num_hidden_layers=2, num_attention_heads=2, intermediate_size=32,
                     hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    return MultitaskBert(BertModel(cfg), MultitaskConfig(tasks=["sst", "qqp", "sts"], pooling="mean",
                                                         head_dropout=dropout))


def tiny_batch(task: str, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 60, (4, 7), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    batch = {"input_ids": ids * mask, "attention_mask": mask}
    if task != "sst":
        batch["input_ids_b"] = torch.randint(1, 60, (4, 5), generator=g)
        batch["attention_mask_b"] = torch.ones(4, 5, dtype=torch.long)
    batch["labels"] = {"sst": torch.tensor([0, 1, 3, 4]), "qqp": torch.tensor([0, 1, 1, 0]),
                       "sts": torch.tensor([0.0, 1.5, 4.0, 5.0])}[task]
    return batch


@pytest.mark.parametrize("task", ["sst", "qqp", "sts"])
def test_zero_ball_and_zero_noise_give_zero(task):
    model = tiny_model().eval()  # no dropout: the clean and perturbed passes are the same function
    batch = tiny_batch(task)
    embeds = model.embed_inputs(batch)
    out = model.forward_embedded(task, embeds, batch)
    reg = SmartRegularizer(lam=5.0, epsilon=0.0, sigma=0.0)(model, task, embeds, batch, out)
    assert reg.item() == 0.0
    # σ = 0 alone: at δ = 0 the divergence is at its minimum, its gradient is zero, so δ stays 0
    reg = SmartRegularizer(lam=5.0, epsilon=1e-3, sigma=0.0, steps=2)(model, task, embeds, batch, out)
    assert reg.item() == 0.0


@pytest.mark.parametrize("task", ["sst", "qqp", "sts"])
def test_regularizer_is_lambda_times_divergence_and_reaches_the_encoder(task):
    model = tiny_model(dropout=0.0)
    batch = tiny_batch(task)
    embeds = model.embed_inputs(batch)
    out = model.forward_embedded(task, embeds, batch)
    torch.manual_seed(5)
    reg = SmartRegularizer(lam=5.0, epsilon=1e-2, sigma=1e-3, eta=1e-1)(model, task, embeds, batch, out)
    torch.manual_seed(5)
    plain = smart_loss(lambda xs: model.forward_embedded(task, xs, batch), embeds, out, model.heads[task].kind,
                       steps=1, eta=1e-1, epsilon=1e-2, sigma=1e-3)
    assert reg.item() > 0 and reg.item() == pytest.approx(5.0 * plain.item(), rel=1e-5)
    assert all(p.requires_grad for p in model.parameters())  # the ascent's freezing is undone
    reg.backward()
    enc = model.encoder
    for p in (enc.embeddings.word.weight, enc.layers[0].qkv.weight, enc.layers[1].ffn_out.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_ascent_increases_the_divergence():
    model = tiny_model(dropout=0.0)
    batch = tiny_batch("sst")
    embeds = model.embed_inputs(batch)
    out = model.forward_embedded("sst", embeds, batch)
    fwd = lambda xs: model.forward_embedded("sst", xs, batch)  # noqa: E731
    torch.manual_seed(3)
    random_only = smart_loss(fwd, embeds, out, "logits", steps=0, epsilon=1e-2, sigma=1e-3)
    torch.manual_seed(3)
    adversarial = smart_loss(fwd, embeds, out, "logits", steps=1, eta=1.0, epsilon=1e-2, sigma=1e-3)
    assert adversarial.item() > 10 * random_only.item()


def test_bregman_term_and_ema_update():
    model = tiny_model(dropout=0.0)
    batch = tiny_batch("qqp")
    smart = SmartRegularizer(lam=0.0, bregman=True, bregman_mu=2.0, bregman_beta=0.9)
    embeds = model.embed_inputs(batch)
    out = model.forward_embedded("qqp", embeds, batch)
    assert smart(model, "qqp", embeds, batch, out).item() == pytest.approx(0.0, abs=1e-12)  # θ̃ = θ_0 at first
    theta0 = [p.detach().clone() for p in model.parameters()]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1)
    smart.after_step(model)
    for e, p, p0 in zip(smart.ema.module.parameters(), model.parameters(), theta0):
        torch.testing.assert_close(e, 0.9 * p0 + 0.1 * p.detach())  # θ̃ <- β θ̃ + (1 - β) θ
    embeds = model.embed_inputs(batch)
    out = model.forward_embedded("qqp", embeds, batch)
    term = smart(model, "qqp", embeds, batch, out)
    anchor = smart.ema.module("qqp", batch)
    assert term.item() == pytest.approx(2.0 * divergence(out, anchor, "binary").item(), rel=1e-5)
    assert term.item() > 0
    term.backward()
    assert model.encoder.layers[0].qkv.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in smart.ema.parameters())


def test_bregman_anchor_survives_a_resume():
    model = tiny_model(dropout=0.0)
    batch = tiny_batch("sts")
    smart = SmartRegularizer(lam=0.0, bregman=True, bregman_beta=0.5)
    smart(model, "sts", model.embed_inputs(batch), batch, model("sts", batch))
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    smart.after_step(model)
    state = smart.state_dict()
    resumed = SmartRegularizer(lam=0.0, bregman=True, bregman_beta=0.5)
    resumed.load_state_dict(state)  # before the copy exists: kept until the first call creates it
    out = model("sts", batch)
    a = smart(model, "sts", model.embed_inputs(batch), batch, out)
    b = resumed(model, "sts", model.embed_inputs(batch), batch, out)
    assert a.item() > 0 and a.item() == pytest.approx(b.item(), rel=1e-6)
    for x, y in zip(smart.ema.parameters(), resumed.ema.parameters()):
        assert torch.equal(x, y)
    assert SmartRegularizer().state_dict() == {}


def test_from_args_defaults_are_the_reports():
    from minbert.cli import train_parser

    args = train_parser().parse_args(["--smart"])
    smart = SmartRegularizer.from_args(args)
    assert (smart.lam, smart.eta, smart.epsilon, smart.sigma, smart.steps) == (5.0, 1e-3, 1e-5, 1e-5, 1)
    assert (smart.bregman, smart.bregman_mu, smart.bregman_beta) == (False, 1.0, 0.99)


def test_bregman_needs_smart(small_data, capsys):
    from minbert.cli import train_main

    with pytest.raises(SystemExit) as e:
        train_main(["--data_dir", str(small_data), "--bregman"])
    assert e.value.code == 2 and "--bregman is part of SMART" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["--bregman"]])
def test_end_to_end_smart_with_gse(small_data, tmp_path, extra):
    from minbert.cli import train_main

    out = tmp_path / "run"
    code = train_main(["--model_name_or_path", "bert-tiny", "--data_dir", str(small_data), "--combiner", "gse",
                       "--smart", "--max_train_samples", "32", "--max_eval_samples", "16", "--max_steps_per_epoch",
                       "2", "--num_train_epochs", "1", "--per_device_train_batch_size", "8", "--logging_steps", "1",
                       "--output_dir", str(out), *extra])
    assert code == 0
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss_sst" in r]
    assert len(losses) == 2 and all(math.isfinite(r[f"loss_{t}"]) for r in losses for t in ("sst", "qqp", "sts"))
    assert all(r["bad_steps"] == 0 for r in losses)
    assert json.loads((out / "args.json").read_text())["smart"] is True
    assert (out / "results.json").is_file()
