"""Properties of the associative memory that the paper and the README promise, for both implementations:
causality, batch isolation, streaming, the reductions to linear attention and the gated delta rule, and clear
errors for bad input."""

from __future__ import annotations

import pytest
import torch

from nestlearn.memory import MemoryState, init_state, read, scan

from .conftest import make_inputs, state_tensors

IMPLS = ["reference", "chunked"]
CONFIGS = [  # (memory, objective, rule, momentum, read)
    ("mlp", "l2", "dgd", True, "dual"),
    ("mlp", "dot", "gd", False, "snapshot"),
    ("linear", "l2", "dgd", False, "dual"),
    ("linear", "dot", "gd", True, "snapshot"),
]
SEQ = ("q", "k", "v", "lr", "retention", "momentum")


def opts_of(memory, objective, rule, read, chunk_size=4):
    return dict(memory=memory, objective=objective, rule=rule, read=read, chunk_size=chunk_size)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("t", [0, 5, 7])  # 5 sits inside the second chunk of 4, 7 ends it
def test_output_at_t_ignores_later_tokens(impl, config, t):
    memory, objective, rule, momentum, rd = config
    inputs = make_inputs(memory, momentum)
    y, _ = scan(**inputs, **opts_of(memory, objective, rule, rd), impl=impl)
    perturbed = dict(inputs)
    for name in SEQ:
        if inputs[name] is not None:
            x = inputs[name].clone()
            x[:, :, t + 1 :] = torch.rand_like(x[:, :, t + 1 :])  # in range for every gate
            perturbed[name] = x
    y2, _ = scan(**perturbed, **opts_of(memory, objective, rule, rd), impl=impl)
    torch.testing.assert_close(y2[:, :, : t + 1], y[:, :, : t + 1], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[:, :, t + 1 :], y[:, :, t + 1 :])  # the perturbation did reach later outputs


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
def test_sequences_in_a_batch_do_not_interact(impl, config):
    memory, objective, rule, momentum, rd = config
    inputs = make_inputs(memory, momentum, b=3)
    y, state = scan(**inputs, **opts_of(memory, objective, rule, rd), impl=impl)
    perturbed = dict(inputs)
    for name in SEQ:
        if inputs[name] is not None:
            x = inputs[name].clone()
            x[1] = torch.rand_like(x[1])
            perturbed[name] = x
    y2, state2 = scan(**perturbed, **opts_of(memory, objective, rule, rd), impl=impl)
    for i in (0, 2):
        torch.testing.assert_close(y2[i], y[i], rtol=0, atol=1e-12)
        for name, w in state_tensors(state).items():
            torch.testing.assert_close(state_tensors(state2)[name][i], w[i], rtol=0, atol=1e-12)
    assert not torch.allclose(y2[1], y[1])


@pytest.mark.parametrize("impls", [("reference", "reference"), ("chunked", "chunked"), ("chunked", "reference")])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: "-".join(map(str, c)))
@pytest.mark.parametrize("cuts", [(4,), (5,), (1, 2, 9)], ids=["on-chunk", "mid-chunk", "three-cuts"])
def test_streaming_with_carried_state_equals_one_call(impls, config, cuts):
    memory, objective, rule, momentum, rd = config
    inputs = make_inputs(memory, momentum, T=13)
    opts = opts_of(memory, objective, rule, rd)
    y, state = scan(**inputs, **opts, impl="reference")
    bounds = [0, *cuts, 13]
    carried, pieces = inputs["state"], []
    for i, (lo, hi) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
        part = {n: None if inputs[n] is None else inputs[n][:, :, lo:hi] for n in SEQ}
        y_part, carried = scan(**part, **opts, state=carried, impl=impls[i % 2])
        pieces.append(y_part)
    torch.testing.assert_close(torch.cat(pieces, dim=2), y, rtol=0, atol=1e-10)
    assert carried.offset == state.offset == 13 % 4
    for name, w in state_tensors(state).items():
        torch.testing.assert_close(state_tensors(carried)[name], w, rtol=0, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("chunk_size", [1, 4])
def test_linear_dot_gd_is_causal_linear_attention(impl, chunk_size):
    # eqs. 14–18: with α = 1 from M_0 = 0, M_t = Σ_{s≤t} η_s v_s k_sᵀ, so o_t = Σ_{s≤t} η_s v_s (k_sᵀ q_t)
    x = make_inputs("linear", False)
    ones = torch.ones_like(x["lr"])
    y, _ = scan(
        x["q"], x["k"], x["v"], x["lr"], ones, memory="linear", objective="dot", chunk_size=chunk_size, impl=impl
    )
    scores = (x["q"] @ x["k"].transpose(-1, -2)) * x["lr"].unsqueeze(-2)  # (b, h, t, s): η_s k_sᵀ q_t
    want = scores.tril() @ x["v"]
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_linear_l2_is_the_gated_delta_recurrence(impl, rule):
    x = make_inputs("linear", False)
    q, k, v, eta, alpha = x["q"], x["k"], x["v"], x["lr"], x["retention"]
    y, state = scan(q, k, v, eta, alpha, memory="linear", objective="l2", rule=rule, chunk_size=1, impl=impl)
    b, h, T, d = q.shape
    S = torch.zeros(b, h, d, d, dtype=q.dtype)
    want = []
    for t in range(T):
        kt, vt = k[:, :, t, :, None], v[:, :, t, :, None]  # column vectors (b, h, d, 1)
        a, e = alpha[:, :, t, None, None], eta[:, :, t, None, None]
        erase = S @ kt @ kt.transpose(-1, -2)  # S k kᵀ
        write = vt @ kt.transpose(-1, -2)  # v kᵀ
        # gd: S_t = α_t S − η_t (S k − v) kᵀ;  dgd adds the preconditioner S(αI − η k kᵀ): one more erase
        S = a * S - e * erase + e * write - (e * erase if rule == "dgd" else 0)
        want.append((S @ q[:, :, t, :, None]).squeeze(-1))
    torch.testing.assert_close(y, torch.stack(want, dim=2), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(state.weights["W"], S, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("impl", IMPLS)
def test_dgd_at_lr_two_reflects_the_memory_along_the_key(impl):
    # η = 2, α = 1, ‖k‖ = 1 and no gradient (dot objective, v = 0): M_t = M_{t−1}(I − 2 k kᵀ), a Householder
    # reflection, so M k changes sign at every token and the rest of M stays: the negative eigenvalue that lets a
    # DGD memory track parity (docs/deviations.md). Nothing may cap η at 1.
    x = make_inputs("linear", False)
    b, h, T, d = x["q"].shape
    g = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(b, h, 1, d, generator=g, dtype=x["q"].dtype), dim=-1)
    k = k.expand(b, h, T, d)
    W0 = torch.randn(b, h, d, d, generator=g, dtype=k.dtype)
    y, state = scan(
        k,
        k,
        torch.zeros_like(k),
        torch.full((b, h, T), 2.0, dtype=k.dtype),
        torch.ones(b, h, T, dtype=k.dtype),
        memory="linear",
        objective="dot",
        rule="dgd",
        chunk_size=4,
        state=MemoryState({"W": W0}),
        impl=impl,
    )
    Mk = (W0 @ k[:, :, 0, :, None]).squeeze(-1)  # (b, h, d)
    signs = torch.tensor([(-1.0) ** (t + 1) for t in range(T)], dtype=k.dtype)  # read after token t's write
    torch.testing.assert_close(y, signs[:, None] * Mk[:, :, None], rtol=1e-9, atol=1e-9)
    reflect = torch.eye(d, dtype=k.dtype) - 2 * k[:, :, :1].transpose(-1, -2) @ k[:, :, :1]
    want = W0 @ torch.linalg.matrix_power(reflect, T)
    torch.testing.assert_close(state.weights["W"], want, rtol=1e-9, atol=1e-9)


def test_momentum_one_and_no_retention_decay_accumulates_writes():
    # β = 1, α = 1, dot: S_t = S_{t−1} + η_t v_t k_tᵀ and M_t = M_{t−1} + S_t, so M_T = Σ_s (T − s) η_s v_s k_sᵀ
    x = make_inputs("linear", True)
    ones = torch.ones_like(x["lr"])
    _, state = scan(x["q"], x["k"], x["v"], x["lr"], ones, ones, memory="linear", objective="dot", chunk_size=4)
    T = x["q"].shape[2]
    weight = (T - torch.arange(T, dtype=x["lr"].dtype)) * x["lr"]  # (b, h, t)
    want = (x["v"] * weight.unsqueeze(-1)).transpose(-1, -2) @ x["k"]
    torch.testing.assert_close(state.weights["W"], want, rtol=1e-10, atol=1e-10)


def test_snapshot_read_sees_no_write_of_its_own_chunk():
    x = make_inputs("linear", False)
    zero = MemoryState({"W": torch.zeros_like(x["state"].weights["W"])})
    y, _ = scan(
        x["q"], x["k"], x["v"], x["lr"], x["retention"], memory="linear", read="snapshot", chunk_size=4, state=zero
    )
    assert torch.all(y[:, :, :4] == 0) and not torch.all(y[:, :, 4:8] == 0)


def test_read_is_the_memory_applied_to_queries():
    x = make_inputs("mlp", False)
    y, state = scan(**x, memory="mlp", chunk_size=1)
    # the last token's dual-form read is M_T(q_T)
    torch.testing.assert_close(read(x["q"][:, :, -1:], state, memory="mlp"), y[:, :, -1:])


def test_zero_length_sequence_returns_the_state_unchanged():
    x = make_inputs("linear", False, T=0)
    y, state = scan(**x, memory="linear")
    assert y.shape == (2, 2, 0, 4)
    torch.testing.assert_close(state.weights["W"], x["state"].weights["W"].expand(2, -1, -1, -1))


# --- bad input: a ValueError that names the argument and what it expected ---


def good(**overrides):
    x = make_inputs("mlp", True)
    return {**x, **overrides}


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"k": torch.randn(2, 2, 10, 4)}, r"^k has shape"),
        ({"k": torch.randn(2, 2, 11, 3)}, r"^k has feature dim 3"),
        ({"v": torch.randn(2, 2, 11, 5)}, r"^v has feature dim 5.*residual"),
        ({"q": torch.randn(2, 11, 4)}, r"^q must be a 4-D tensor"),
        ({"lr": torch.rand(2, 2, 10)}, r"^lr must have shape \(batch, heads, time\)"),
        ({"momentum": torch.rand(2, 11)}, r"^momentum must have shape"),
        ({"memory": "deep"}, r"^memory='deep' is not known; expected one of \['linear', 'mlp'\]"),
        ({"objective": "huber"}, r"^objective='huber' is not known"),
        ({"rule": "adam"}, r"^rule='adam' is not known"),
        ({"read": "late"}, r"^read='late' is not known"),
        ({"impl": "triton"}, r"^impl='triton' is not known"),
        ({"activation": "swish"}, r"^activation='swish' is not known"),
        ({"chunk_size": 0}, r"^chunk_size=0 must be a positive int"),
        ({"chunk_size": -4}, r"^chunk_size=-4 must be a positive int"),
        ({"chunk_size": 2.0}, r"^chunk_size=2.0 must be a positive int"),
        ({"lr": torch.full((2, 2, 11), float("nan"), dtype=torch.float64)}, r"^lr contains NaN"),
        ({"lr": -torch.ones(2, 2, 11, dtype=torch.float64)}, r"^lr must lie in >= 0"),
        ({"retention": 2 * torch.ones(2, 2, 11, dtype=torch.float64)}, r"^retention must lie in \[0.0, 1.0\]"),
        ({"momentum": None}, r"^state carries momentum but momentum=None"),
        ({"state": None}, r"^state=None with memory='mlp'"),
        ({"state": MemoryState({"W": torch.zeros(2, 4, 4)})}, r"^state.weights has keys \['W'\]"),
        ({"state": init_state(3, 4, dtype=torch.float64)}, r"^state.weights\['W1'\] has shape \(3, 4, 16\)"),
        ({"state": init_state(2, 4)}, r"^state.weights\['W1'\] is torch.float32"),
    ],
    ids=lambda x: x if isinstance(x, str) else None,
)
def test_bad_input_raises_a_value_error_naming_it(overrides, match):
    with pytest.raises(ValueError, match=match):
        scan(**good(**overrides))


def test_continuing_with_another_chunk_size_is_refused():
    x = make_inputs("linear", False)
    _, state = scan(**x, memory="linear", chunk_size=8)  # 11 tokens: 3 into the second chunk
    with pytest.raises(ValueError, match=r"state.offset=3 .* chunk_size=2"):
        scan(**{**x, "state": state}, memory="linear", chunk_size=2)
