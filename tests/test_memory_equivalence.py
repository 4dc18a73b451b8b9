"""The chunk-parallel memory equals the token-by-token reference: outputs, final state and gradients of every
tensor argument, for every memory × objective × rule × momentum × read mode and awkward chunk sizes."""

from __future__ import annotations

import itertools

import pytest
import torch

from nestlearn.memory import scan
from nestlearn.ops.chunked import _Transition, segprod
from nestlearn.ops.common import apply_memory

from .conftest import make_inputs, state_tensors, tensors_of

TOL = {torch.float64: 1e-8, torch.float32: 1e-4}
GRID = list(itertools.product(["linear", "mlp"], ["l2", "dot"], ["gd", "dgd"], [False, True], ["dual", "snapshot"]))


def assert_close(name: str, ref: torch.Tensor, out: torch.Tensor, tol: float) -> None:
    err = (ref - out).abs().max().item() if ref.numel() else 0.0
    scale = max(1.0, ref.abs().max().item() if ref.numel() else 0.0)
    assert err <= tol * scale, f"{name}: max abs error {err:.3g} > {tol:g} x {scale:.3g}"


def assert_both_match(inputs: dict, opts: dict, tol: float) -> None:
    """Reference and chunked agree on outputs, final state and the gradient of every argument."""
    (ref, ref_grads, _), (out, grads, _) = run_both(inputs, opts)
    for name in ref:
        assert_close(name, ref[name], out[name], tol)
    for i, (gr, gc) in enumerate(zip(ref_grads, grads, strict=True)):
        assert gr is not None and gc is not None, f"argument {i} received no gradient"
        assert_close(f"grad of argument {i}", gr, gc, tol)


def run_both(inputs: dict, opts: dict, seed: int = 1):
    """Forward and backward through both implementations with the same random cotangents."""
    results = []
    for impl in ("reference", "chunked"):
        y, state = scan(**inputs, **opts, impl=impl)
        outs = {"y": y, **state_tensors(state)}
        g = torch.Generator().manual_seed(seed)
        loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype)).sum() for o in outs.values())
        grads = torch.autograd.grad(loss, tensors_of(inputs), allow_unused=True)
        results.append((outs, grads, state.offset))
    return results


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("chunk_size", [1, 4, 16])
@pytest.mark.parametrize(
    ("memory", "objective", "rule", "momentum", "read"), GRID, ids=["-".join(map(str, c)) for c in GRID]
)
def test_chunked_matches_reference(memory, objective, rule, momentum, read, chunk_size, dtype):
    # T = 11: chunk sizes 4 and 16 leave a partial last chunk
    inputs = make_inputs(memory, momentum, dtype=dtype, requires_grad=True)
    opts = dict(memory=memory, objective=objective, rule=rule, chunk_size=chunk_size, read=read, activation="gelu")
    (ref, ref_grads, ref_offset), (out, grads, offset) = run_both(inputs, opts)
    tol = TOL[dtype]
    assert offset == ref_offset == 11 % chunk_size
    assert ref.keys() == out.keys()
    for name in ref:
        assert_close(name, ref[name], out[name], tol)
    for i, (gr, gc) in enumerate(zip(ref_grads, grads, strict=True)):
        assert gr is not None and gc is not None, f"argument {i} received no gradient"
        assert torch.isfinite(gc).all()
        assert_close(f"grad of argument {i}", gr, gc, tol)


@pytest.mark.parametrize("activation", ["silu", "tanh", "relu", "identity"])
def test_chunked_matches_reference_for_every_activation(activation):
    inputs = make_inputs("mlp", True, requires_grad=True)
    opts = dict(memory="mlp", objective="l2", rule="dgd", chunk_size=4, read="dual", activation=activation)
    assert_both_match(inputs, opts, 1e-8)


@pytest.mark.parametrize(
    ("memory", "rule", "momentum"), [("linear", "dgd", True), ("mlp", "gd", True), ("mlp", "dgd", False)]
)
def test_chunked_matches_reference_from_mid_chunk_state(memory, rule, momentum):
    # a state that stopped 3 tokens into a chunk of 4 carries a snapshot; its gradient must match too
    first = make_inputs(memory, momentum, T=3, seed=1)
    opts = dict(memory=memory, objective="l2", rule=rule, chunk_size=4, read="dual")
    _, mid = scan(**first, **opts)
    assert mid.offset == 3 and mid.snapshot is not None
    inputs = make_inputs(memory, momentum, T=9, seed=2)
    inputs["state"] = mid.detach()
    for x in tensors_of(inputs):
        x.requires_grad_(True)
    assert_both_match(inputs, opts, 1e-8)


def test_chunked_passes_gradcheck():
    # finite differences, independent of both implementations' autograd
    inputs = make_inputs("mlp", True, b=1, h=1, T=5, d=3, hidden=4, requires_grad=True)
    names = [n for n in ("q", "k", "v", "lr", "retention", "momentum")]
    opts = dict(memory="mlp", objective="l2", rule="dgd", chunk_size=2)

    def f(*xs):
        args = dict(zip(names, xs[: len(names)], strict=True))
        state = inputs["state"]
        y, s = scan(
            **args,
            **opts,
            state=type(state)(
                dict(zip(sorted(state.weights), xs[6:8], strict=True)),
                dict(zip(sorted(state.momentum), xs[8:10], strict=True)),
            ),
        )
        return y, *s.weights.values()

    assert torch.autograd.gradcheck(f, tuple(tensors_of(inputs)))


def test_segprod_is_products_over_segments():
    x = torch.tensor([0.5, 0.0, 2.0, 3.0], dtype=torch.float64)
    D = segprod(x)
    for i in range(4):
        for l in range(4):
            want = torch.prod(x[l + 1 : i + 1]) if i >= l else 0.0
            assert D[i, l].item() == pytest.approx(float(want))


@pytest.mark.slow
@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_chunked_matches_reference_on_a_longer_stream(memory):
    # 70 tokens in chunks of 16 (a partial last chunk), wider heads, float32 as in training
    inputs = make_inputs(memory, True, dtype=torch.float32, T=70, d=16, hidden=32, requires_grad=True)
    opts = dict(memory=memory, objective="l2", rule="dgd", chunk_size=16, read="dual")
    assert_both_match(inputs, opts, 1e-4)


@pytest.mark.parametrize(
    ("memory", "rule", "momentum"), [("linear", "dgd", True), ("mlp", "dgd", True), ("mlp", "gd", False)]
)
def test_checkpointed_chunks_give_the_same_outputs_and_gradients(memory, rule, momentum):
    # 10 chunks: checkpoint groups of 4, 4 and 2, the last one partial
    inputs = make_inputs(memory, momentum, T=37, requires_grad=True)
    opts = dict(memory=memory, objective="l2", rule=rule, chunk_size=4)
    eager, checkpointed = outputs_and_gradients(inputs, opts), outputs_and_gradients(inputs, opts, checkpoint=True)
    for a, b in zip(eager, checkpointed, strict=True):
        assert_close("checkpointed", a, b, 1e-12)


def outputs_and_gradients(inputs: dict, opts: dict, **extra) -> list[torch.Tensor]:
    """y, the final state and the gradient of a fixed linear function of both with respect to every input."""
    y, state = scan(**inputs, **opts, **extra)
    outs = [y, *state_tensors(state).values()]
    loss = sum((o * torch.linspace(-1, 1, o.numel(), dtype=o.dtype).view(o.shape)).sum() for o in outs)
    return outs + list(torch.autograd.grad(loss, tensors_of(inputs)))


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["gd", "dgd"])
def test_snapshot_read_at_the_keys_matches_reference(memory, rule):
    # q is k (CMS levels, Hope's generating memories): the chunked path reuses the gradient's forward pass as the read
    inputs = make_inputs(memory, True, requires_grad=True)
    inputs["q"] = inputs["k"]
    opts = dict(memory=memory, objective="l2", rule=rule, chunk_size=4, read="snapshot")
    assert_both_match(inputs, opts, 1e-8)


@pytest.mark.parametrize(("memory", "objective"), [("linear", "l2"), ("mlp", "l2"), ("mlp", "dot")])
@pytest.mark.parametrize("rule", ["gd", "dgd"])
@pytest.mark.parametrize("read", ["dual", "snapshot"])
def test_clipped_inner_gradients_match_reference(memory, objective, rule, read):
    # a clip below the typical gradient norm, so that most tokens are clipped and some are not
    inputs = make_inputs(memory, True, requires_grad=True)
    opts = dict(memory=memory, objective=objective, rule=rule, chunk_size=4, read=read, max_grad_norm=0.5)
    assert_both_match(inputs, opts, 1e-8)
    y_clip, _ = scan(**inputs, **opts)
    y_free, _ = scan(**inputs, **{**opts, "max_grad_norm": None})
    assert not torch.allclose(y_clip, y_free)  # the clip is active on these inputs
    with pytest.raises(ValueError, match="max_grad_norm=0 must be a positive number"):
        scan(**inputs, **{**opts, "max_grad_norm": 0})


@pytest.mark.slow  # compiles the chunk step (15 s to a minute on 2 cores)
def test_compiled_chunk_step_matches_eager():
    # the richest path: MLP memory, DGD, momentum, dual read, clip, and a partial last chunk
    inputs = make_inputs("mlp", True, dtype=torch.float32, T=23, requires_grad=True)
    opts = dict(memory="mlp", objective="l2", rule="dgd", chunk_size=4, read="dual", max_grad_norm=0.5)
    eager, compiled = outputs_and_gradients(inputs, opts), outputs_and_gradients(inputs, opts, compile=True)
    for a, b in zip(eager, compiled, strict=True):
        assert_close("compiled", a, b, 1e-4)


@pytest.mark.parametrize("memory", ["linear", "mlp"])
@pytest.mark.parametrize("rule", ["gd", "dgd"])
@pytest.mark.parametrize("read", ["dual", "snapshot"])
@pytest.mark.parametrize("q_is_k", [False, True])
def test_self_generated_targets_match_reference(memory, rule, read, q_is_k):
    # eq. 87: the memory writes its own read v̂_t = M_{t0−1}(v_t); the chunked path reads v̂ in the prediction's pass
    inputs = make_inputs(memory, True, requires_grad=True)
    if q_is_k:
        inputs["q"] = inputs["k"]
    opts = dict(memory=memory, objective="l2", rule=rule, chunk_size=4, read=read, max_grad_norm=2.0, self_target=True)
    assert_both_match(inputs, opts, 1e-8)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_self_generated_target_is_the_memory_read_at_the_chunk_start(impl):
    # in one chunk every v̂_t is the initial memory read at v_t: the same as writing those values explicitly
    inputs = make_inputs("mlp", True)
    v_hat = apply_memory(inputs["state"].weights, inputs["v"], "mlp", "gelu")  # unbatched weights broadcast
    opts = dict(memory="mlp", objective="l2", rule="dgd", chunk_size=11, impl=impl)
    y_self, s_self = scan(**inputs, **opts, self_target=True)
    y_explicit, s_explicit = scan(**{**inputs, "v": v_hat}, **opts)
    torch.testing.assert_close(y_self, y_explicit)
    for name, w in state_tensors(s_self).items():
        torch.testing.assert_close(w, state_tensors(s_explicit)[name])
    assert not torch.allclose(y_self, scan(**inputs, **opts)[0])  # and not the same as writing v itself
    with pytest.raises(ValueError, match="self_target=True reads the memory at v"):
        lin = make_inputs("linear", False)
        scan(**{**lin, "v": lin["v"][..., :3]}, memory="linear", self_target=True)


def test_a_call_shorter_than_a_chunk_costs_its_own_length():
    # decoding writes one token a call: the chunked path must not pad it to a whole chunk (128x the work for a CMS
    # level of period 128). Matrix-product FLOPs of 3 tokens with chunk_size=128 equal those with chunk_size=3
    from torch.utils.flop_counter import FlopCounterMode

    inputs = make_inputs("mlp", True, T=3)
    flops = []
    for chunk_size in (3, 128):
        with FlopCounterMode(display=False) as counter:
            scan(**inputs, memory="mlp", rule="dgd", chunk_size=chunk_size, read="dual")
        flops.append(counter.get_total_flops())
    assert flops[0] == flops[1] > 0, flops


TRANSITION_CASES = [(False, "weights"), (True, "both"), (True, "weights"), (True, "momentum")]


@pytest.mark.parametrize(("momentum", "used"), TRANSITION_CASES)
@pytest.mark.parametrize("with_origin", [False, True])
def test_chunk_transition_backward_matches_autograd(momentum, used, with_origin):
    # the end-of-chunk state M' = pM M + sM S − Lᵀ R, S' = pS S − Λᵀ R has a hand-written backward (`_Transition`):
    # it must give autograd's gradients over the same formula, also when only one of M', S' reaches the loss
    g = torch.Generator().manual_seed(0)
    B, C, out, inp = 3, 4, 5, 6

    def r(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).requires_grad_()

    args = [r(B, out, inp), r(B, out, inp), r(B, C, out), r(B, C, out), r(B, C, inp), r(B), r(B), r(B)]
    args.append(r(B, out, inp) if with_origin else None)  # O: retention towards an origin
    if not momentum:
        args[1] = args[3] = args[6] = args[7] = None
    w_M, w_S = (torch.randn(B, out, inp, generator=g, dtype=torch.float64) for _ in range(2))

    def reference(M, S, L, Lam, R, pM, sM, pS, O):
        new_M = pM[:, None, None] * M - L.mT @ R
        if O is not None:
            new_M = new_M + (1 - pM)[:, None, None] * O
        if S is None:
            return new_M, None
        return new_M + sM[:, None, None] * S, pS[:, None, None] * S - Lam.mT @ R

    def loss(new_M, new_S):
        terms = []
        if used in ("both", "weights"):
            terms.append((w_M * new_M).sum())
        if used in ("both", "momentum") and new_S is not None:
            terms.append((w_S * new_S).sum())
        return sum(terms)

    tensors = [a for a in args if a is not None]
    want = torch.autograd.grad(loss(*reference(*args)), tensors, allow_unused=True)
    got = torch.autograd.grad(loss(*_Transition.apply(*args)), tensors, allow_unused=True)
    for i, (w, o) in enumerate(zip(want, got, strict=True)):
        if w is None:
            assert o is None or not o.any(), f"argument {i}: no gradient expected"
        else:
            assert o is not None, f"argument {i} received no gradient"
            assert_close(f"grad of argument {i}", w, o, 1e-12)

    def transition(*ts):  # finite differences too, independent of both backwards
        it = iter(ts)
        return tuple(x for x in _Transition.apply(*(None if a is None else next(it) for a in args)) if x is not None)

    assert torch.autograd.gradcheck(transition, tuple(tensors))


ORIGIN_GRID = list(itertools.product(["linear", "mlp"], ["gd", "dgd"], [False, True], ["dual", "snapshot"]))


@pytest.mark.parametrize("chunk_size", [1, 4])
@pytest.mark.parametrize(
    ("memory", "rule", "momentum", "read"), ORIGIN_GRID, ids=["-".join(map(str, c)) for c in ORIGIN_GRID]
)
def test_retention_towards_an_origin_matches_reference(memory, rule, momentum, read, chunk_size):
    # retention towards O (the meta-learned initial state in the layers) instead of zero: the chunked kernel adds
    # (1 − Pα) O to its reads and transitions and takes DGD's u on M − O; outputs, state and the gradient of every
    # argument, O's included, equal the reference's
    inputs = make_inputs(memory, momentum, requires_grad=True)
    g = torch.Generator().manual_seed(5)
    origin = {
        n: (torch.randn(w.shape, generator=g, dtype=w.dtype) * 0.3).requires_grad_()
        for n, w in inputs["state"].weights.items()
    }
    opts = dict(memory=memory, objective="l2", rule=rule, chunk_size=chunk_size, read=read, activation="gelu")
    results = []
    for impl in ("reference", "chunked"):
        y, state = scan(**inputs, **opts, impl=impl, origin=origin)
        outs = {"y": y, **state_tensors(state)}
        gen = torch.Generator().manual_seed(1)
        loss = sum((o * torch.randn(o.shape, generator=gen, dtype=o.dtype)).sum() for o in outs.values())
        results.append((outs, torch.autograd.grad(loss, [*tensors_of(inputs), *origin.values()], allow_unused=True)))
    (ref, ref_grads), (out, grads) = results
    for name in ref:
        assert_close(name, ref[name], out[name], 1e-8)
    for i, (gr, gc) in enumerate(zip(ref_grads, grads, strict=True)):
        assert gr is not None and gc is not None, f"argument {i} received no gradient"
        assert_close(f"grad of argument {i}", gr, gc, 1e-8)


@pytest.mark.parametrize("impl", ["reference", "chunked"])
def test_no_write_and_an_origin_decays_the_memory_to_the_origin(impl):
    # η = 0 leaves only retention: M_t − O = (Π α)(M_0 − O), so the memory moves towards O and not towards zero
    inputs = make_inputs("mlp", False, T=12)
    inputs["lr"] = torch.zeros_like(inputs["lr"])
    origin = {n: torch.randn(w.shape, dtype=w.dtype) for n, w in inputs["state"].weights.items()}
    _, state = scan(**inputs, memory="mlp", chunk_size=4, impl=impl, origin=origin)
    decay = inputs["retention"].prod(-1)[..., None, None]  # (b, h, 1, 1)
    for n, w0 in inputs["state"].weights.items():
        want = origin[n] + decay * (w0 - origin[n])
        assert torch.allclose(state.weights[n], want, atol=1e-10), n
