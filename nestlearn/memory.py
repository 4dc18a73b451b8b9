"""The associative memory: fast weights written token by token by gradient descent on an inner objective.

Everything in nestlearn stands on this one primitive (paper §3–4 and §8; Titans eqs. 9–18). A memory M maps keys
to values; each token t writes (k_t, v_t) into it with one step on ℓ(M; k_t, v_t), at its own learning rate η_t,
retention α_t and, optionally, momentum β_t; a read returns M(q_t). The same code serves the Titans memory, each
memory of self-modifying Titans, in-context CMS levels and the deep-momentum optimizers.

    memory      `linear`: M(x) = W x, a matrix per head;  `mlp`: M(x) = x + W1 σ(W2 x)            (eq. 89)
    objective   `l2`: ℓ = ½‖M(k) − v‖²;  `dot`: ℓ = −⟨M(k), v⟩                                     (eqs. 92–93)
    rule        `gd`:  M_t = α_t M_{t−1} − η_t ∇ℓ(M_{t−1}; k_t, v_t)
                `dgd`: M_t = M_{t−1}(α_t I − η_t k_t k_tᵀ) − η_t ∇ℓ(M_{t−1}; k_t, v_t)               (eq. 88)
    origin      what retention pulls towards: zero above (the paper), or weights O, typically the meta-learned
                initial state: the rule then acts on M − O, M_t = O + α_t (M_{t−1} − O) − η_t ∇ℓ. An MLP memory
                retained towards zero reaches the all-zero state, where it can never learn again (each layer's
                gradient goes through the other), within about 1,000 tokens at α ≈ 0.98 (docs/deviations.md)
    momentum    S_t = β_t S_{t−1} − η_t ∇ℓ, and S_t replaces −η_t ∇ℓ above                  (Titans eqs. 10–14)
    chunks      gradients of a chunk of C tokens are taken at the weights the chunk started from (eq. 90);
                retention, momentum and the DGD factor still run token by token. C = 1 is the online recurrence.
    read        `dual`: y_t = M_t(q_t);  `snapshot`: y_t reads the chunk's starting weights (eq. 90 as printed)
    self_target the value written is the memory's own read v̂_t = M_{t0−1}(v_t) at the chunk's starting weights
                (eq. 87, self-modifying Titans), not v_t itself

Shapes: q, k (b, h, t, d); v (b, h, t, o); lr, retention, momentum (b, h, t); weights (b, h, out, in), or
(h, out, in) for an initial state shared by the batch. Symbols: docs/notation.md; choices: docs/deviations.md.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .ops.chunked import chunked_scan
from .ops.common import ACTIVATIONS, MEMORIES, OBJECTIVES, READS, RULES, apply_memory, autocast_enabled, autocast_off
from .ops.naive import naive_scan
from .state import MemoryState

__all__ = ["MemoryState", "init_state", "read", "scan", "IMPLS"]

IMPLS = ("reference", "chunked")


def init_state(
    num_heads: int,
    dim: int,
    *,
    memory: str = "mlp",
    dim_out: int | None = None,
    hidden: int | None = None,
    hidden_mult: int = 4,
    momentum: bool = False,
    batch_size: int | None = None,
    generator: torch.Generator | None = None,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> MemoryState:
    """A fresh initial state.

    A linear memory starts at zero. An MLP memory starts with both layers drawn from N(0, 1/fan_in): at zero it
    would never learn, since the gradient of each layer is multiplied by the other layer's weights.

    Args:
        num_heads, dim: heads and key width d. `dim_out`: value width o (linear only; the MLP is residual, so o = d).
        hidden: the MLP's hidden width f; default `hidden_mult * dim`.
        momentum: also return a zero momentum S_0.
        batch_size: None for an unbatched (h, out, in) state shared by the batch.
    """
    lead = (num_heads,) if batch_size is None else (batch_size, num_heads)
    kw = {"dtype": dtype, "device": device}
    if memory == "linear":
        weights = {"W": torch.zeros(*lead, dim_out or dim, dim, **kw)}
    elif memory == "mlp":
        if dim_out not in (None, dim):
            raise ValueError(f"dim_out={dim_out}: the residual MLP memory maps d to d, so dim_out must equal dim={dim}")
        f = hidden or hidden_mult * dim
        weights = {
            "W1": torch.randn(*lead, dim, f, generator=generator, **kw) / math.sqrt(f),
            "W2": torch.randn(*lead, f, dim, generator=generator, **kw) / math.sqrt(dim),
        }
    else:
        raise ValueError(f"memory={memory!r} is not known; expected one of {list(MEMORIES)}")
    mom = {n: torch.zeros_like(w) for n, w in weights.items()} if momentum else None
    return MemoryState(weights, mom)


def read(q: Tensor, state: MemoryState, *, memory: str = "mlp", activation: str = "gelu") -> Tensor:
    """M(q) without writing: q (b, h, t, d) -> (b, h, t, o)."""
    _check_option("memory", memory, MEMORIES)
    _check_option("activation", activation, tuple(ACTIVATIONS))
    _check_qkv("q", q, None, None, None)
    if state is None:
        raise ValueError("read needs a state: the memory to read from (see init_state or the state returned by scan)")
    weights = _batched_state(MemoryState(state.weights), memory, q, q.shape[-1], None, None).weights
    return apply_memory(weights, q, memory, activation)


def scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retention: Tensor,
    momentum: Tensor | None = None,
    *,
    memory: str = "mlp",
    objective: str = "l2",
    rule: str = "gd",
    chunk_size: int = 16,
    read: str = "dual",
    state: MemoryState | None = None,
    impl: str = "chunked",
    activation: str = "gelu",
    check_values: bool = True,
    checkpoint: bool = False,
    max_grad_norm: float | None = None,
    compile: bool = False,
    self_target: bool = False,
    origin: dict[str, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Write (k_t, v_t) for every token into the memory and read M(q_t), in one causal pass.

    Args:
        q, k: (b, h, t, d) queries and keys. v: (b, h, t, o) values; o = d for the MLP memory.
        lr: (b, h, t) η_t ≥ 0. retention: (b, h, t) α_t in [0, 1], 1 keeps everything.
        momentum: (b, h, t) β_t in [0, 1], or None for no momentum.
        memory, objective, rule, read: see the module docstring.
        chunk_size: C ≥ 1 tokens whose gradients share the chunk's starting weights.
        state: the weights (and momentum) to start from; None starts a linear memory at zero. Gradients flow into it.
        impl: `chunked` (fast, the default) or `reference` (token by token, the ground truth).
        activation: σ of the MLP memory, one of gelu, silu, tanh, relu, identity.
        check_values: check that the gates are finite and in range (a reduction and, on GPU, a synchronisation
            per gate). Layers whose gates are in range by construction (sigmoids) pass False; shapes and options
            are always checked.
        checkpoint: `chunked` only: run the n chunks in groups of ⌈√n⌉ under torch.utils.checkpoint, so that the
            backward pass keeps the weights only at group boundaries and recomputes one group at a time: O(√n)
            weight-sized tensors instead of O(n), for one more forward pass (docs/benchmarks.md).

        max_grad_norm: clip each token's inner gradient (all layers of the memory together) to this norm before it
            is written, g_t ← g_t · min(1, c / ‖g_t‖), as titans-pytorch does; None (the paper) does not clip.
        compile: `chunked` only: run each chunk's step through `torch.compile` (fused kernels, one graph reused by
            every chunk; the first call compiles, about a minute on 2 CPU cores). Same results up to float rounding.
            Each new shape or set of options compiles again; past dynamo's recompile limit (8 by default,
            `torch._dynamo.config.recompile_limit`) the step runs eager, with dynamo's warning.
        self_target: write v̂_t = M_{t0−1}(v_t), the memory's own output at v_t from the weights its chunk started
            from (eq. 87: each memory of self-modifying Titans generates its own target), instead of v_t. Needs o = d.
            v̂ is a constant of the inner gradient and differentiable for the outer one, as any value is.
        origin: weights shaped like the state's, (h, out, in) or (b, h, out, in), that retention pulls towards:
            M_t = O + α_t (M_{t−1} − O) + …, and DGD's (α_t I − η_t k_t k_tᵀ) acts on M − O (module docstring).
            Layers pass their meta-learned initial state, so that a memory forgets back to it and never decays to
            the dead all-zero state. None (the paper's form) retains towards zero. Gradients flow into it.

    Returns:
        y (b, h, t, o) and the final MemoryState, batched (b, h, out, in).
    """
    if isinstance(q, Tensor) and autocast_enabled(q.device.type):
        # Under autocast (`--precision bf16`) the recurrence runs in float32 with autocast off: its state is written
        # C-token update after update, where bfloat16's 8-bit mantissa would round most of each update away, and the
        # layers around it hand it a mix of float32 and bfloat16. y comes back in float32; autocast casts it on use.
        def f32(x):
            return x.float() if isinstance(x, Tensor) and x.is_floating_point() else x

        with autocast_off(q.device.type):
            return scan(
                f32(q),
                f32(q) if k is q else f32(k),
                f32(v),
                f32(lr),
                f32(retention),
                f32(momentum),
                memory=memory,
                objective=objective,
                rule=rule,
                chunk_size=chunk_size,
                read=read,
                state=state.to(torch.float32) if isinstance(state, MemoryState) else state,
                impl=impl,
                activation=activation,
                check_values=check_values,
                checkpoint=checkpoint,
                max_grad_norm=max_grad_norm,
                compile=compile,
                self_target=self_target,
                origin=None if origin is None else {n: f32(w) for n, w in origin.items()},
            )
    _check_option("memory", memory, MEMORIES)
    _check_option("objective", objective, OBJECTIVES)
    _check_option("rule", rule, RULES)
    _check_option("read", read, READS)
    _check_option("impl", impl, IMPLS)
    _check_option("activation", activation, tuple(ACTIVATIONS))
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size={chunk_size!r} must be a positive int (1 is the plain online recurrence)")
    _check_qkv("q", q, None, None, None)
    bh, T, d = q.shape[:2], q.shape[2], q.shape[3]
    _check_qkv("k", k, bh, T, d)
    _check_qkv("v", v, bh, T, d if memory == "mlp" else None)
    if self_target and v.shape[-1] != d:
        raise ValueError(
            f"self_target=True reads the memory at v, so v's width must be the key width {d}; got {v.shape[-1]}"
        )
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    lr = _check_gate("lr", lr, q, low=0.0, high=None, values=check_values)
    retention = _check_gate("retention", retention, q, low=0.0, high=1.0, values=check_values)
    if momentum is not None:
        momentum = _check_gate("momentum", momentum, q, low=0.0, high=1.0, values=check_values)
    state = _batched_state(state, memory, q, d, v.shape[-1], momentum)
    if origin is not None:
        if not isinstance(origin, dict):
            raise ValueError(
                f"origin must be a dict of weights like state.weights, or None; got {type(origin).__name__}"
            )
        origin = _batched_state(MemoryState(origin), memory, q, d, v.shape[-1], None, what="origin").weights
    if T == 0:
        return v.new_zeros(*bh, 0, v.shape[-1]), state
    if state.offset >= chunk_size:
        raise ValueError(
            f"state.offset={state.offset} tokens into a chunk, but chunk_size={chunk_size}: continue a stream with "
            "the chunk_size that wrote it"
        )
    if max_grad_norm is not None and not (isinstance(max_grad_norm, (int, float)) and max_grad_norm > 0):
        raise ValueError(f"max_grad_norm={max_grad_norm!r} must be a positive number, or None for no clipping")
    opts = dict(
        memory=memory,
        objective=objective,
        rule=rule,
        chunk_size=chunk_size,
        read=read,
        activation=activation,
        max_grad_norm=max_grad_norm,
        self_target=self_target,
        origin=origin,
    )
    if impl == "reference":
        return naive_scan(q, k, v, lr, retention, momentum, state, **opts)
    return chunked_scan(q, k, v, lr, retention, momentum, state, **opts, checkpoint=checkpoint, compile=compile)


# --- validation: every error names the argument, what it expected and what it got ---


def _check_option(name: str, value, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not known; expected one of {list(allowed)}")


def _check_qkv(name: str, x, bh, T, d) -> None:
    if not isinstance(x, Tensor) or x.dim() != 4:
        got = f"shape {tuple(x.shape)}" if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(f"{name} must be a 4-D tensor (batch, heads, time, dim); got {got}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor; got dtype {x.dtype}")
    if bh is not None and (tuple(x.shape[:2]) != tuple(bh) or x.shape[2] != T):
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected (batch, heads, time) = {(*bh, T)} like q")
    if d is not None and x.shape[3] != d:
        what = "the MLP memory is residual, so v must have q's width" if name == "v" else "k must have q's width"
        raise ValueError(f"{name} has feature dim {x.shape[3]}, expected {d}: {what}")


def _check_gate(name: str, x, q: Tensor, low: float, high: float | None, values: bool = True) -> Tensor:
    want = tuple(q.shape[:3])
    if not isinstance(x, Tensor) or tuple(x.shape) != want:
        got = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
        raise ValueError(
            f"{name} must have shape (batch, heads, time) = {want}, one value per token and head; got {got}"
        )
    x = x.to(q.dtype)
    if not values:
        return x
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf; it must be finite (check what produces it)")
    if (x < low).any() or (high is not None and (x > high).any()):
        rng = f"[{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{name} must lie in {rng}; got values in [{x.min().item():.4g}, {x.max().item():.4g}]")
    return x


def _batched_state(
    state: MemoryState | None,
    memory: str,
    q: Tensor,
    d: int,
    o: int | None,
    momentum: Tensor | None,
    what: str = "state",
) -> MemoryState:
    b, h = q.shape[:2]
    if state is None:
        if memory == "mlp":
            raise ValueError(
                "state=None with memory='mlp': an MLP memory at zero weights never learns (each layer's gradient "
                "goes through the other). Pass state=nestlearn.memory.init_state(heads, dim, memory='mlp') or a "
                "learned initial state."
            )
        state = init_state(
            h, d, memory="linear", dim_out=o, momentum=momentum is not None, dtype=q.dtype, device=q.device
        )
    if not isinstance(state, MemoryState):
        raise ValueError(f"state must be a MemoryState or None; got {type(state).__name__}")
    if memory == "linear":
        want = {"W": (-1 if o is None else o, d)}
    else:
        f = state.weights["W2"].shape[-2] if "W2" in state.weights else -1
        want = {"W1": (d, f), "W2": (f, d)}
    if momentum is None and state.momentum is not None:
        raise ValueError(
            "state carries momentum but momentum=None: pass the per-token momentum β, or drop it from state"
        )
    if momentum is not None and state.momentum is None:
        zeros = {n: torch.zeros_like(w) for n, w in state.weights.items()}
        state = MemoryState(state.weights, zeros, state.snapshot, state.offset)

    def where(group: str) -> str:
        return what if what != "state" else f"state.{group}"

    def expand(group: str, name: str, w: Tensor) -> Tensor:
        out_in = want[name]
        ok_tail = all(want_ == -1 or got == want_ for got, want_ in zip(w.shape[-2:], out_in, strict=True))
        if w.dim() not in (3, 4) or not ok_tail or w.shape[-3] != h or (w.dim() == 4 and w.shape[0] != b):
            shape = f"(batch={b} or none, heads={h}, {out_in[0]}, {out_in[1]})".replace("-1", "hidden")
            raise ValueError(f"{where(group)}[{name!r}] has shape {tuple(w.shape)}; expected {shape}")
        if w.dtype != q.dtype or w.device != q.device:
            raise ValueError(
                f"{where(group)}[{name!r}] is {w.dtype} on {w.device}, but q is {q.dtype} on {q.device}; "
                f"use {what}.to(q) first"
            )
        return w.expand(b, *w.shape[-3:]) if w.dim() == 3 else w

    def group(name: str) -> dict[str, Tensor] | None:
        tensors = getattr(state, name)
        if tensors is None:
            return None
        if set(tensors) != set(want):
            raise ValueError(f"{where(name)} has keys {sorted(tensors)}; memory={memory!r} expects {sorted(want)}")
        return {n: expand(name, n, w) for n, w in tensors.items()}

    if not isinstance(state.offset, int) or state.offset < 0:
        raise ValueError(f"state.offset={state.offset!r} must be an int >= 0 (tokens into the current chunk)")
    if state.offset and state.snapshot is None:
        raise ValueError(f"state.offset={state.offset} is inside a chunk but state.snapshot is None; it needs both")
    return MemoryState(group("weights"), group("momentum"), group("snapshot") if state.offset else None, state.offset)
