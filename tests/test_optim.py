"""The paper's optimizers: their reductions to known optimizers, the math properties the paper states, the torch
optimizer API (state_dict round trip, closures) and the errors for bad settings."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from nestlearn.optim import M3, DeepMomentum, DeltaMomentum, Muon, PreconditionedMomentum, newton_schulz, polar

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "experiments"))
import toy_momentum  # noqa: E402

SHAPES = [(6, 4), (3, 5), (7,), (4, 2, 3)]


def params_like(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g, dtype=torch.float64)) for s in SHAPES]


def grads(step: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1000 + step)
    return [torch.randn(*s, generator=g, dtype=torch.float64) for s in SHAPES]


def run(make, steps: int, seed: int = 0, params=None):
    params = params if params is not None else params_like(seed)
    opt = make(params)
    for t in range(steps):
        for p, g in zip(params, grads(t), strict=True):
            p.grad = g.clone()
        opt.step()
    return params, opt


def test_deep_momentum_with_linear_memory_and_dot_objective_equals_sgd_momentum():
    ours, _ = run(lambda ps: DeepMomentum(ps, lr=0.05, momentum=0.9, memory="linear", objective="dot"), 6)
    ref, _ = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


@pytest.mark.parametrize("retain_to", ["init", "zero"])
def test_deep_momentum_mlp_memory_stays_alive_and_keeps_descending(retain_to):
    # least squares, 400 steps. Retention towards zero (the paper's decay) takes the MLP memory to the dead
    # all-zero state: W₂ falls from ~13 to ~0.03, the read-out vanishes and the loss stalls with a large gradient
    # left. Towards its initial state the memory stays alive and the loss keeps falling (issue #18).
    torch.manual_seed(0)
    A, b = torch.randn(64, 32), torch.randn(64)
    w = torch.nn.Parameter(torch.zeros(32, 4))
    opt = DeepMomentum([w], lr=1e-2, momentum=0.9, retain_to=retain_to)
    losses = []
    for _ in range(400):
        loss = ((A @ w).sum(1) - b).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    w2 = opt.state[w]["memory"]["W2"].norm().item()
    progress = losses[199] - losses[-1]  # what the last 200 steps gained
    if retain_to == "init":
        assert w2 > 10 and progress > 5e-3, (w2, progress)
    else:
        assert w2 < 0.1 and progress < 1e-3, (w2, progress)


def test_deep_momentum_mlp_starts_like_momentum_and_then_departs_from_it():
    # W₁ = 0 at the start: the first read-out is η‖σ(W₂c)‖² g, a positive multiple of g per row.
    p = torch.nn.Parameter(torch.zeros(3, 4))
    opt = DeepMomentum([p], lr=1.0)
    g = torch.randn(3, 4)
    p.grad = g.clone()
    opt.step()
    ratio = -p.detach() / g
    assert torch.allclose(ratio, ratio[:, :1].expand_as(ratio), rtol=1e-4) and (ratio > 0).all()
    mlp, _ = run(lambda ps: DeepMomentum(ps, lr=0.05), 4)
    sgd, _ = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 4)
    assert all(torch.isfinite(a).all() for a in mlp)
    assert max((a - b).abs().max().item() for a, b in zip(mlp, sgd, strict=True)) > 1e-3


def test_newton_schulz_keeps_the_singular_vectors_and_pushes_singular_values_near_one():
    g = torch.randn(24, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    o = newton_schulz(g)
    s = torch.linalg.svdvals(o)
    assert 0.6 < s.min() and s.max() < 1.25, s
    torch.testing.assert_close(polar(o), polar(g), atol=1e-6, rtol=0)  # same U Vᵀ as the exact polar factor
    torch.testing.assert_close(newton_schulz(g.T), o.T)  # tall and wide agree
    assert newton_schulz(torch.zeros(3, 5)).abs().max() == 0


def test_muon_update_of_a_fresh_momentum_has_singular_values_near_one():
    p = torch.nn.Parameter(torch.zeros(32, 16, dtype=torch.float64))
    p.grad = torch.randn(32, 16, dtype=torch.float64)
    Muon([p], lr=1.0, scale="none", nesterov=False).step()
    s = torch.linalg.svdvals(p.detach())
    assert 0.6 < s.min() and s.max() < 1.25, s


def test_m3_without_slow_branch_or_second_moment_equals_muon_without_nesterov():
    m3, _ = run(lambda ps: M3(ps, lr=0.02, alpha=0.0, second_moment=False, weight_decay=0.1), 5)
    muon, _ = run(lambda ps: Muon(ps, lr=0.02, momentum=0.9, nesterov=False, weight_decay=0.1), 5)
    for a, b in zip(m3, muon, strict=True):  # up to Newton–Schulz's ε in its normalisation: M¹ is (1 − β) × Muon's m
        torch.testing.assert_close(a, b, atol=1e-7, rtol=0)


def test_m3_literal_follows_algorithm_1():
    """A line-by-line transcription of Algorithm 1 (f = 3, α = 0.5, no rescaling) as the slow reference."""
    b1, b2, b3, alpha, f, lr, eps = 0.9, 0.95, 0.99, 0.5, 3, 0.01, 1e-8
    theta = params_like()[0].detach().clone()
    m1, m2, v = (torch.zeros_like(theta) for _ in range(3))
    o2 = torch.zeros_like(theta)
    gs = [grads(t)[0] for t in range(8)]
    for k in range(3):  # lower-frequency iterations
        if k > 0:
            m2 = m2 + b3 * sum(gs[(k - 1) * f : k * f])
            o2 = newton_schulz(m2)
        for t in range(k * f, min((k + 1) * f, len(gs))):
            m1 = m1 + b1 * gs[t]
            v = v + b2 * gs[t] ** 2
            theta = theta - lr * (newton_schulz(m1) + alpha * o2) / (v.sqrt() + eps)
    ours, _ = run(
        lambda ps: M3(ps, lr=lr, betas=(b1, b2, b3), alpha=alpha, slow_period=f, form="literal", scale="none", eps=eps),
        8,
    )
    torch.testing.assert_close(ours[0].detach(), theta, atol=1e-10, rtol=0)


@pytest.mark.parametrize(
    "make",
    [
        lambda ps: Muon(ps, lr=0.01, weight_decay=0.1),
        lambda ps: M3(ps, lr=0.01, weight_decay=0.1, adamw_betas=(0.9, 0.95)),
    ],
    ids=["muon", "m3"],
)
def test_vector_parameters_step_exactly_like_adamw(make):
    ours, _ = run(make, 4)
    ref, _ = run(lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.95), weight_decay=0.1), 4)
    torch.testing.assert_close(ours[2], ref[2], atol=0, rtol=0)  # the (7,) vector


def test_preconditioned_momentum_with_newton_schulz_output_is_muon_without_nesterov():
    ours, _ = run(lambda ps: PreconditionedMomentum([ps[0], ps[1]], lr=0.02, output="newton_schulz"), 4)
    muon, _ = run(lambda ps: Muon([ps[0], ps[1]], lr=0.02, momentum=0.9, nesterov=False), 4)
    for a, b in zip(ours[:2], muon[:2], strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_preconditioned_and_delta_momentum_reduce_to_sgd_momentum():
    ref, _ = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=0), 5)
    for make in (lambda ps: PreconditionedMomentum(ps, lr=0.05), lambda ps: DeltaMomentum(ps, lr=0.05, delta=0.0)):
        ours, _ = run(make, 5)
        for a, b in zip(ours, ref, strict=True):
            torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_delta_momentum_forgets_the_momentum_along_the_gradient():
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    opt = DeltaMomentum([p], lr=1.0, momentum=0.9, delta=0.9, form="normalized")
    p.grad = torch.tensor([1.0, 0.0], dtype=torch.float64)
    opt.step()  # m = (1, 0)
    p.grad = torch.tensor([2.0, 0.0], dtype=torch.float64)
    opt.step()  # m (0.9 I − 0.9 e₁e₁ᵀ) + g = (0, 0) + (2, 0)
    torch.testing.assert_close(opt.state[p]["momentum"], torch.tensor([2.0, 0.0], dtype=torch.float64))


def test_delta_momentum_reaches_the_toy_minimum_in_fewer_steps_than_momentum():
    out = toy_momentum.main(["--plot", "", "--lrs", "0.005", "0.01"])
    (momentum, _), (delta, _) = out["momentum"], out["delta"]
    assert delta is not None and momentum is not None and delta < momentum, out


ALL = {
    "muon": lambda ps: Muon(ps, lr=0.01),
    "m3": lambda ps: M3(ps, lr=0.01, slow_period=2),
    "m3-literal": lambda ps: M3(ps, lr=0.01, slow_period=2, form="literal"),
    "deep_momentum": lambda ps: DeepMomentum(ps, lr=0.01),
    "delta_momentum": lambda ps: DeltaMomentum(ps, lr=0.01, delta=0.5),
    "preconditioned": lambda ps: PreconditionedMomentum(ps, lr=0.01, precondition="rms", output="newton_schulz"),
}


@pytest.mark.parametrize("name", list(ALL))
def test_state_dict_round_trip_continues_exactly(name):
    straight, _ = run(ALL[name], 5)
    params, opt = run(ALL[name], 3)
    sd = opt.state_dict()
    fresh = [torch.nn.Parameter(p.detach().clone()) for p in params]
    opt2 = ALL[name](fresh)
    opt2.load_state_dict(sd)
    for t in range(3, 5):
        for p, g in zip(fresh, grads(t), strict=True):
            p.grad = g.clone()
        opt2.step()
    for a, b in zip(straight, fresh, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(ALL))
def test_step_calls_the_closure_and_returns_its_loss(name):
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = ALL[name]([p])

    def closure():
        opt.zero_grad()
        loss = (p**2).sum()
        loss.backward()
        return loss

    before = p.detach().clone()
    loss = opt.step(closure)
    assert isinstance(loss, torch.Tensor) and math.isfinite(loss.item())
    assert not torch.equal(before, p.detach())


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda ps: Muon(ps, lr=-1e-3), "lr=-0.001"),
        (lambda ps: M3(ps, lr=-1.0), "lr=-1.0"),
        (lambda ps: DeepMomentum(ps, lr=-1.0), "lr=-1.0"),
        (lambda ps: DeltaMomentum(ps, lr=-1.0), "lr=-1.0"),
        (lambda ps: PreconditionedMomentum(ps, lr=-1.0), "lr=-1.0"),
        (lambda ps: Muon(ps, momentum=1.0), "momentum=1.0"),
        (lambda ps: M3(ps, slow_period=0), "slow_period=0"),
        (lambda ps: M3(ps, betas=(0.9, 0.9)), "three numbers"),
        (lambda ps: M3(ps, form="adam"), "form='adam'"),
        (lambda ps: DeltaMomentum(ps, form="x"), "form='x'"),
        (lambda ps: DeepMomentum(ps, memory="deep"), "memory='deep'"),
        (lambda ps: PreconditionedMomentum(ps, output="tanh"), "output='tanh'"),
        (lambda ps: Muon(ps, scale="big"), "scale='big'"),
    ],
)
def test_bad_settings_raise_errors_that_name_the_value(make, match):
    with pytest.raises(ValueError, match=match.replace("(", r"\(").replace(")", r"\)")):
        make([torch.nn.Parameter(torch.zeros(2, 2))])


def test_a_negative_learning_rate_set_later_is_refused_at_step():
    p = torch.nn.Parameter(torch.zeros(2, 2))
    opt = Muon([p], lr=0.1)
    opt.param_groups[0]["lr"] = -0.1
    p.grad = torch.ones(2, 2)
    with pytest.raises(ValueError, match="lr=-0.1"):
        opt.step()
