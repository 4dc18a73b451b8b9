"""Every layer against its slow reference (nestlearn/ops/reference_layers.py), in float64: the outputs, the final
state and the outer gradients of every parameter and of the input agree; and a mistake planted in a fast layer
(η and α read out swapped, a CMS level reading its own chunk's write) makes the comparison fail."""

from __future__ import annotations

import itertools

import pytest
import torch

from nestlearn import cms, sm_titans
from nestlearn.cms import InContextLevel
from nestlearn.config import CMSConfig, SelfModConfig
from nestlearn.ops import reference_layers
from nestlearn.sm_titans import SelfModifyingTitans
from nestlearn.state import MemoryState

DTYPE = torch.float64
TOL = 1e-10  # measured: the largest difference is ~2e-14 (outputs, states and gradients)
B, T, DIM, HEADS = 2, 13, 8, 2  # T = 13: three chunks of 4 and a piece, one and a half chunks of 8


def _perturbed(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    """The module in float64 with every parameter moved off its initialisation, so that every path matters."""
    module = module.to(DTYPE)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            scale = 0.5 if name.startswith("readout") else 0.1  # η_t, α_t vary with the memories' read-outs
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=DTYPE))
    return module


def _leaves(state) -> dict[str, object]:
    """Every tensor (and offset) of a layer's state, by name."""
    if isinstance(state, torch.Tensor):
        return {"": state}
    if isinstance(state, MemoryState):
        out = {"offset": state.offset}
        for group in ("weights", "momentum", "snapshot"):
            tensors = getattr(state, group)
            out[group] = tensors is None
            for n, w in (tensors or {}).items():
                out[f"{group}.{n}"] = w
        return out
    return {f"{k}.{n}": v for k, sub in state.items() for n, v in _leaves(sub).items()}


def _in_pieces(f, x: torch.Tensor, state, sizes: list[int]):
    """Feed x in pieces of these sizes with the state carried; the outputs concatenated and the last state."""
    ys = []
    for piece in x.split(sizes, dim=1):
        y, state = f(piece, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state


def _run(f, module: torch.nn.Module, x: torch.Tensor, init_state, sizes: list[int]):
    """Outputs, final state, and the gradients of a fixed scalar function of both, for the input and every parameter."""
    y, state = _in_pieces(f, x, init_state(), sizes)
    leaves = {n: v for n, v in _leaves(state).items() if isinstance(v, torch.Tensor)}
    g = torch.Generator().manual_seed(1)
    loss = (y * torch.randn(y.shape, generator=g, dtype=DTYPE)).sum()
    for v in leaves.values():  # reaches the parameters through the final state too
        loss = loss + (v * torch.randn(v.shape, generator=g, dtype=DTYPE)).sum()
    wrt = [x, *module.parameters()]
    grads = torch.autograd.grad(loss, wrt, allow_unused=True)
    names = ["input", *(n for n, _ in module.named_parameters())]
    return (
        y,
        _leaves(state),
        {n: torch.zeros_like(w) if d is None else d for n, w, d in zip(names, wrt, grads, strict=True)},
    )


def _assert_same(fast, ref, module, x, init_state, sizes) -> None:
    y_f, state_f, grads_f = _run(fast, module, x, init_state, sizes)
    y_r, state_r, grads_r = _run(ref, module, x, init_state, sizes)
    torch.testing.assert_close(y_f, y_r, rtol=TOL, atol=TOL)
    assert state_f.keys() == state_r.keys()
    for name in state_f:
        if isinstance(state_f[name], torch.Tensor):
            torch.testing.assert_close(state_f[name], state_r[name], rtol=TOL, atol=TOL, msg=f"state {name}")
        else:
            assert state_f[name] == state_r[name], f"state {name}: {state_f[name]} != {state_r[name]}"
    for name in grads_f:
        torch.testing.assert_close(grads_f[name], grads_r[name], rtol=TOL, atol=TOL, msg=f"gradient of {name}")


# --- self-modifying Titans ---


def _sm_layer(**overrides) -> SelfModifyingTitans:
    torch.manual_seed(0)
    config = SelfModConfig(**{"chunk_size": 4, "memory_chunk_size": 8, "hidden_mult": 2, "max_lr": 0.5, **overrides})
    return _perturbed(SelfModifyingTitans(DIM, HEADS, config), seed=2)


def _check_sm(layer: SelfModifyingTitans, sizes: tuple[int, ...] = (T,)) -> None:
    x = torch.randn(B, sum(sizes), DIM, generator=torch.Generator().manual_seed(3), dtype=DTYPE, requires_grad=True)

    def ref(x, state):
        return reference_layers.self_modifying_titans(layer, x, state)

    _assert_same(layer, ref, layer, x, lambda: layer.init_state(B, dtype=DTYPE), list(sizes))


@pytest.mark.parametrize(
    "rule, read, retain_to, momentum",
    list(itertools.product(["gd", "dgd"], ["dual", "snapshot"], ["init", "zero"], [True, False])),
)
def test_self_modifying_titans_matches_its_reference(rule, read, retain_to, momentum):
    _check_sm(_sm_layer(rule=rule, read=read, retain_to=retain_to, momentum=momentum))


@pytest.mark.parametrize(
    "overrides",
    [
        {"adaptive_q": True},
        {"normalize_values": False},
        {"max_grad_norm": None},  # the paper's unclipped step
        {"max_grad_norm": 0.4},  # about the median gradient norm: some tokens clipped, some not
        {"chunk_size": 4, "memory_chunk_size": 4},
        {"chunk_size": 1, "memory_chunk_size": 2},  # the online recurrence for the generating memories
        {"chunk_size": 2, "memory_chunk_size": 8, "read": "snapshot"},
        {"activation": "silu", "lr_init": 0.05, "retention_init": 0.9},
        {"checkpoint": True},
    ],
    ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()),
)
def test_self_modifying_titans_options_match_the_reference(overrides):
    _check_sm(_sm_layer(**overrides))


@pytest.mark.parametrize("read", ["dual", "snapshot"])
def test_self_modifying_titans_stream_cut_inside_chunks_matches_the_reference(read):
    # cuts at 6 and 11: the generating memories 2 and 3 tokens into a chunk of 4, M_memory 6 and 3 into one of 8
    _check_sm(_sm_layer(read=read), sizes=(6, 5, 2))


def test_swapping_the_eta_and_alpha_readouts_is_caught(monkeypatch):
    """A fast layer that reads η_t out of M_α and α_t out of M_η no longer matches the reference."""
    layer = _sm_layer()
    chunk = sm_titans._chunk

    class Swapped:  # the layer, with the read-outs g_η and g_α (and their biases) exchanged
        def __getattr__(self, name):
            value = getattr(layer, name)
            return value.flip(0) if name in ("readout", "readout_bias") else value

    monkeypatch.setattr(sm_titans, "_chunk", lambda self, *args: chunk(Swapped(), *args))
    with pytest.raises(AssertionError, match="not close"):
        _check_sm(layer)


# --- the in-context CMS level ---


def _level(period: int = 4, **overrides) -> InContextLevel:
    torch.manual_seed(0)
    return _perturbed(InContextLevel(DIM, HEADS, period, CMSConfig(**{"max_lr": 0.5, **overrides})), seed=4)


def _check_level(level: InContextLevel, sizes: tuple[int, ...] = (T,)) -> None:
    h = torch.randn(B, sum(sizes), DIM, generator=torch.Generator().manual_seed(5), dtype=DTYPE, requires_grad=True)

    def ref(h, state):
        return reference_layers.in_context_level(level, h, state)

    _assert_same(level, ref, level, h, lambda: level.init_state(B), list(sizes))


@pytest.mark.parametrize("retain_to", ["init", "zero"])
@pytest.mark.parametrize("max_grad_norm", [None, 2.0, 1.0])  # 2.0: about the median norm; 1.0 the default
def test_in_context_level_matches_its_reference(retain_to, max_grad_norm):
    _check_level(_level(retain_to=retain_to, max_grad_norm=max_grad_norm))


@pytest.mark.parametrize("period", [1, 3, 16])  # 16 > T: the level reads its initial weights throughout
def test_in_context_level_periods_match_the_reference(period):
    _check_level(_level(period))


def test_in_context_level_stream_cut_inside_chunks_matches_the_reference():
    _check_level(_level(4), sizes=(6, 5, 2))


def test_a_cms_level_reading_its_own_chunks_write_is_caught(monkeypatch):
    """A fast level that reads the weights after each token's write (dual) instead of the last completed chunk's
    no longer matches the reference."""
    level = _level()
    scan = cms.scan
    monkeypatch.setattr(cms, "scan", lambda *args, **kw: scan(*args, **{**kw, "read": "dual"}))
    with pytest.raises(AssertionError, match="not close"):
        _check_level(level)


def test_the_references_never_call_the_memory_primitive(monkeypatch):
    """The references are re-derived, not built on `scan` or its token-by-token reference."""
    from nestlearn import memory
    from nestlearn.ops import chunked, naive

    def refuse(*args, **kwargs):
        raise AssertionError("a reference called the memory primitive")

    for module, name in [
        (memory, "scan"),
        (memory, "naive_scan"),
        (memory, "chunked_scan"),
        (naive, "naive_scan"),
        (chunked, "chunked_scan"),
        (sm_titans, "scan"),
        (cms, "scan"),
    ]:
        monkeypatch.setattr(module, name, refuse)
    layer, level = _sm_layer(), _level()
    x = torch.randn(B, T, DIM, dtype=DTYPE)
    reference_layers.self_modifying_titans(layer, x, layer.init_state(B, dtype=DTYPE))
    reference_layers.in_context_level(level, x, level.init_state(B))
