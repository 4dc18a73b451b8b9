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


@pytest.mark.parametrize("form", DeepMomentum.FORMS)
def test_deep_momentum_with_linear_memory_and_dot_objective_equals_sgd_momentum(form):
    ours, _ = run(lambda ps: DeepMomentum(ps, lr=0.05, momentum=0.9, memory="linear", objective="dot", form=form), 6)
    ref, _ = run(lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9), 6)
    for a, b in zip(ours, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def _dmgd_reference(w0: torch.Tensor, gs: list[torch.Tensor], memory0: dict, form: str, lr, beta, eta) -> torch.Tensor:
    """Eq. 50 for one row, written out with plain autograd: M(x) = x + W₁σ(W₂x); per step, one gradient step on
    ℓ = −⟨M(k), g⟩ with retention β towards M_0, then θ ← θ − lr (M(k) − k) at the new weights. `paper`: k = ĝ;
    `preconditioner`: k = c, every entry d^(−1/2)."""
    W0 = {n: w[0, 0].clone() for n, w in memory0.items()}  # (d, h), (h, d)
    W = {n: w.clone() for n, w in W0.items()}
    theta = w0.clone()
    d = theta.numel()

    def M(weights, x):
        return x + weights["W1"] @ torch.nn.functional.gelu(weights["W2"] @ x)

    for g in gs:
        k = g / g.norm() if form == "paper" else torch.full((d,), d**-0.5, dtype=g.dtype)
        leaves = {n: w.clone().requires_grad_(True) for n, w in W.items()}
        loss = -(M(leaves, k) * g).sum()
        grads = torch.autograd.grad(loss, list(leaves.values()))
        W = {n: W0[n] + beta * (W[n] - W0[n]) - eta * gr for (n, gr) in zip(W, grads, strict=True)}
        theta = theta - lr * (M(W, k) - k)
    return theta


@pytest.mark.parametrize("form", DeepMomentum.FORMS)
def test_deep_momentum_mlp_memory_follows_eq_50_written_out(form):
    # `paper` writes and reads the memory at the gradient's direction (eq. 50: W_{i+1} = W_i + m_{i+1}(u_i)),
    # `preconditioner` at a fixed key; each against the recurrence written out independently with autograd.
    gen = torch.Generator().manual_seed(0)
    w0 = torch.randn(5, generator=gen, dtype=torch.float64)
    gs = [torch.randn(5, generator=gen, dtype=torch.float64) * s for s in (1.0, 0.1, 3.0, 1.0, 0.5, 2.0)]
    p = torch.nn.Parameter(w0.clone())
    opt = DeepMomentum([p], lr=0.1, momentum=0.8, inner_lr=0.7, hidden=3, form=form)
    for g in gs:
        p.grad = g.clone()
        opt.step()
    expected = _dmgd_reference(w0, gs, opt.state[p]["memory_init"], form, lr=0.1, beta=0.8, eta=0.7)
    torch.testing.assert_close(p.detach(), expected, rtol=1e-10, atol=1e-10)
    other = "preconditioner" if form == "paper" else "paper"
    assert (p.detach() - _dmgd_reference(w0, gs, opt.state[p]["memory_init"], other, 0.1, 0.8, 0.7)).abs().max() > 1e-3


def test_deep_momentum_paper_form_is_keyed_by_the_gradient_direction():
    # the key is ĝ, not g: the first update is η‖σ(W₂ĝ)‖² g, linear in the gradient's scale (a key g would make it
    # cubic); a zero row has ĝ = 0 and never moves
    a, b = (torch.nn.Parameter(torch.zeros(3, 4, dtype=torch.float64)) for _ in range(2))
    opt_a, opt_b = (DeepMomentum([x], lr=0.1, form="paper") for x in (a, b))
    g = grads(0)[0][:3, :4].clone()
    g[1] = 0.0
    a.grad, b.grad = g.clone(), 1e-6 * g
    opt_a.step()
    opt_b.step()
    torch.testing.assert_close(b.detach(), 1e-6 * a.detach(), rtol=1e-6, atol=0)  # M(k) − k: k cancels
    for t in range(1, 4):
        a.grad = grads(t)[0][:3, :4].clone()
        a.grad[1] = 0.0
        opt_a.step()
    assert (a.detach()[1] == 0).all() and (a.detach()[[0, 2]] != 0).all()


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


def _m3_step_sizes(steps: int, **kw) -> list[float]:
    """‖Δθ_t‖ of the matrix under a constant gradient, t = 1..steps."""
    p = torch.nn.Parameter(torch.zeros(6, 4, dtype=torch.float64))
    g = grads(0)[0]
    opt, sizes = M3([p], lr=0.01, **kw), []
    for _ in range(steps):
        before = p.detach().clone()
        p.grad = g.clone()
        opt.step()
        sizes.append((p.detach() - before).norm().item())
    return sizes


def test_m3_literal_without_rescaling_shrinks_its_step_like_one_over_sqrt_t():
    # Algorithm 1 (form="literal", scale="none"): V = t β₂ g², M¹ = t β₁ g, so ‖Δθ_t‖ = ‖Δθ_1‖/√t
    sizes = _m3_step_sizes(12, form="literal", scale="none", alpha=0.0)
    for t, size in enumerate(sizes, start=1):
        assert size * math.sqrt(t) == pytest.approx(sizes[0], rel=1e-5), (t, sizes)


@pytest.mark.parametrize("form", ["literal", "ema"])
def test_m3_default_rms_scale_cancels_the_shrinking_step(form):
    # the default scale="rms" gives every update RMS 0.2 · lr, so the literal form's 1/√t is gone
    sizes = _m3_step_sizes(12, form=form, slow_period=3)
    rms = 0.2 * 0.01 * math.sqrt(6 * 4)
    assert sizes == pytest.approx([rms] * 12, rel=1e-6), sizes


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
    "deep_momentum-paper": lambda ps: DeepMomentum(ps, lr=0.01, form="paper"),
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
        (lambda ps: DeepMomentum(ps, form="literal"), "form='literal'"),
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
