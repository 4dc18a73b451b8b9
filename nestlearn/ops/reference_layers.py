"""Slow, obvious references of the layers built on the memory: self-modifying Titans and the in-context CMS level.

Each is a loop over tokens that reads like the paper, written out from the equations, independently of
`nestlearn.memory.scan` (neither its chunked path nor its token-by-token reference `naive.py` is called): the
update rule, the chunk snapshots and the reads are spelled out here, once more. Only σ is shared. The inner
gradient ∇ℓ is taken by autograd (torch.func.grad), not by hand. tests/test_references.py checks that the fast
layers give the same outputs, final states and outer gradients, and that a planted mistake in a fast layer is
caught.

    self_modifying_titans(layer, x, state)   `nestlearn.sm_titans.SelfModifyingTitans`, paper eqs. 83–97
    in_context_level(level, h, state)        `nestlearn.cms.InContextLevel`, eq. 71 with the level's own objective

Shared notation: a memory is {"W1": (b, h, d, f), "W2": (b, h, f, d)} per head, M(x) = x + W1 σ(W2 x) (eq. 89) for
a column vector x; token t (0-based within the call) sits at p = offset + t of the stream, and its chunk of C
tokens started at the weights M_{t0−1} ("the chunk's weights" below), where t0 = C·⌊p/C⌋. For every write:

    g_t  = ∇_M ½‖M_{t0−1}(k_t) − v_t‖²        at the chunk's weights (eq. 90); v_t a constant of the inner step
    g_t ← g_t · min(1, c / ‖g_t‖)              optional clip, ‖·‖ over both layers (max_grad_norm; deviations §2)
    U_t  = S_t = β_t S_{t−1} − η_t g_t          with momentum (Titans eqs. 10–14), else U_t = −η_t g_t
    GD:  M_t = O + α_t (M_{t−1} − O) + U_t                                        (eq. 5 with retention)
    DGD: W2_t = O2 + (W2_{t−1} − O2)(α_t I − η_t k_t k_tᵀ) + U_t; W1 as in GD    (eq. 88, on the key's layer)

with O the origin retention pulls towards: the memory's initial (meta-learned) state with `retain_to="init"`,
zero with "zero" (the paper).

    b batch, t tokens, h heads, d head width, f memory hidden width
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import grad

from ..state import MemoryState
from .common import activation

if TYPE_CHECKING:
    from ..cms import InContextLevel
    from ..sm_titans import SelfModifyingTitans

__all__ = ["self_modifying_titans", "in_context_level"]

Weights = dict[str, Tensor]  # {"W1": (b, h, d, f), "W2": (b, h, f, d)}


def memory_read(M: Weights, x: Tensor, sigma) -> Tensor:
    """M(x) = x + W1 σ(W2 x) (eq. 89) for x (b, h, d): every head's memory reads its own vector."""
    z = (M["W2"] @ x.unsqueeze(-1)).squeeze(-1)  # W2 x: (b, h, f)
    return x + (M["W1"] @ sigma(z).unsqueeze(-1)).squeeze(-1)  # (b, h, d)


def write(
    M: Weights,
    S: Weights | None,
    M_chunk: Weights,
    O: Weights | None,
    k: Tensor,
    v: Tensor,
    eta: Tensor,
    alpha: Tensor,
    beta: Tensor | None,
    *,
    rule: str,
    max_grad_norm: float | None,
    sigma,
) -> tuple[Weights, Weights | None]:
    """One token's write of a memory (the module docstring's rule): k, v (b, h, d), η, α, β (b, h).
    M is M_{t−1}, M_chunk the chunk's weights M_{t0−1}; returns M_t and S_t."""

    def loss(W: Weights) -> Tensor:  # ½‖M(k) − v‖², summed over (b, h): each head's gradient sees its own term only
        return 0.5 * (memory_read(W, k, sigma) - v).pow(2).sum()

    g = grad(loss)(M_chunk)  # {"W1": (b, h, d, f), "W2": (b, h, f, d)}, at the chunk's weights (eq. 90)
    if max_grad_norm is not None:
        norm = torch.sqrt(g["W1"].pow(2).sum((-2, -1)) + g["W2"].pow(2).sum((-2, -1)))  # ‖g_t‖ per head: (b, h)
        g = {n: g[n] * (max_grad_norm / norm).clamp(max=1.0)[..., None, None] for n in g}
    eta, alpha = eta[..., None, None], alpha[..., None, None]  # (b, h, 1, 1)
    if S is not None:
        S = {n: beta[..., None, None] * S[n] - eta * g[n] for n in g}  # Titans eq. 10: S_t = β_t S_{t−1} − η_t g_t
        U = S
    else:
        U = {n: -eta * g[n] for n in g}
    O = O if O is not None else {n: torch.zeros_like(w) for n, w in M.items()}
    new = {"W1": O["W1"] + alpha * (M["W1"] - O["W1"]) + U["W1"]}  # the output layer: plain retention
    if rule == "dgd":  # eq. 88: (α_t I − η_t k_t k_tᵀ) acts on the layer whose input is k (deviations: ambiguity #1)
        eye = torch.eye(k.shape[-1], dtype=k.dtype, device=k.device)
        A = alpha * eye - eta * (k.unsqueeze(-1) @ k.unsqueeze(-2))  # (b, h, d, d)
        new["W2"] = O["W2"] + (M["W2"] - O["W2"]) @ A + U["W2"]
    else:
        new["W2"] = O["W2"] + alpha * (M["W2"] - O["W2"]) + U["W2"]
    return new, S


def _batched(W: Weights | None, b: int) -> Weights | None:
    """(h, out, in) initial weights shared by the batch -> (b, h, out, in); batched weights unchanged."""
    if W is None:
        return None
    return {n: w.expand(b, *w.shape[-3:]) if w.dim() == 3 else w for n, w in W.items()}


# --- self-modifying Titans (paper §8.2–8.3) ---


def self_modifying_titans(layer: SelfModifyingTitans, x: Tensor, state: dict) -> tuple[Tensor, dict]:
    """The forward pass of `SelfModifyingTitans`, token by token: x (b, t, dim) and the layer's state in, the output
    (b, t, dim) and the state after the last token out, in the layer's own format.

    Per token t, at stream position p:
        x̃_t, q̃_t = SiLU(causal depthwise conv of x_t W_in)                         (§8.3: conv of width 4)
        at p ≡ 0 (mod C): M_□,chunk = M_□ for □ ∈ {k, v, η, α (, q)}; at p ≡ 0 (mod C_mem): M_mem,chunk = M_mem
        k_t = M_k,chunk(x̃_t)/‖·‖, v_t = M_v,chunk(x̃_t) (/‖·‖ with normalize_values)   (eq. 86; eq. 90)
        η_t = max_lr σ(⟨w_η, M_η,chunk(x̃_t)⟩ + b_η),  α_t = σ(⟨w_α, M_α,chunk(x̃_t)⟩ + b_α)   (ambiguity #2)
        q_t = q̃_t/‖·‖ (eq. 83; M_q,chunk(x̃_t)/‖·‖ with adaptive_q),  β_t = σ(x_t W_β + b_β) with momentum
        for □ ∈ {k, v, η, α (, q), memory}: v̂_□,t = M_□,chunk(v_t), then write (k_t, v̂_□,t)   (eqs. 87–88)
        o_t = M_mem(q_t) (read="dual") or M_mem,chunk(q_t) (read="snapshot")      (eqs. 90, 94)
        y_t = W_o (RMSNorm(o_t) ⊙ SiLU(W_g x_t))                                    (Titans' output)
    """
    cfg = layer.config
    b, T, dim = x.shape
    h, d = layer.num_heads, layer.head_dim
    sigma = activation(cfg.activation)[0]
    gen_names = list(layer.names)  # the generating memories, stacked along the head axis in this order
    names = [*gen_names, "memory"]
    C = {**dict.fromkeys(gen_names, cfg.chunk_size), "memory": cfg.memory_chunk_size}

    # --- unstack the state: one {"W1", "W2"} of (b, h, ·, ·) per memory ---
    def unstack(stacked: Weights | None) -> dict[str, Weights | None]:
        if stacked is None:
            return dict.fromkeys(gen_names)
        stacked = _batched(stacked, b)  # (b, m·h, ·, ·)
        return {name: {n: w[:, i * h : (i + 1) * h] for n, w in stacked.items()} for i, name in enumerate(gen_names)}

    gen, mem = state["gen"], state["memory"]
    M = {**unstack(gen.weights), "memory": _batched(mem.weights, b)}
    S = {**unstack(gen.momentum), "memory": _batched(mem.momentum, b)}
    if cfg.momentum:  # a memory without momentum yet starts it at zero
        S = {name: S[name] or {n: torch.zeros_like(w) for n, w in M[name].items()} for name in names}
    M_chunk = {**unstack(gen.snapshot if gen.offset else None), "memory": _batched(mem.snapshot, b)}
    offset = {**dict.fromkeys(gen_names, gen.offset), "memory": mem.offset}
    if cfg.retain_to == "init":  # O: each memory's meta-learned initial state M_□,0
        O = {
            **unstack({"W1": layer.gen_W1, "W2": layer.gen_W2}),
            "memory": _batched({"W1": layer.mem_W1, "W2": layer.mem_W2}, b),
        }
    else:
        O = dict.fromkeys(names)

    window = state["conv"]  # (b, width − 1, 2·dim): the conv's last inputs, oldest first
    u = x @ layer.inp.weight.T  # (b, t, 2·dim): x_t and the static q_t, before the conv
    ys = []
    for t in range(T):
        # causal depthwise conv: c_t = Σ_j w_j ⊙ u_{t−width+1+j}, then SiLU
        window = torch.cat([window, u[:, t : t + 1]], dim=1)  # (b, width, 2·dim)
        c_t = (window * layer.conv.weight.T).sum(1)  # (b, 2·dim)
        window = window[:, 1:]
        x_t, q_t = F.silu(c_t).view(b, 2, h, d).unbind(1)  # (b, h, d) each
        beta = torch.sigmoid(x[:, t] @ layer.beta.weight.T + layer.beta.bias) if cfg.momentum else None  # (b, h)

        for name in names:  # a new chunk starts from the weights the previous one ended with
            if (offset[name] + t) % C[name] == 0:
                M_chunk[name] = M[name]

        # eq. 90: k, v, η, α (and q) of this token come from the memories as they were when its chunk started
        y = {name: memory_read(M_chunk[name], x_t, sigma) for name in gen_names}  # (b, h, d) each
        k = F.normalize(y["k"], dim=-1)
        v = F.normalize(y["v"], dim=-1) if cfg.normalize_values else y["v"]
        w, bias = layer.readout, layer.readout_bias  # (2, h, d), (2, h): g_η and g_α
        eta = cfg.max_lr * torch.sigmoid((y["lr"] * w[0]).sum(-1) + bias[0])  # (b, h)
        alpha = torch.sigmoid((y["retention"] * w[1]).sum(-1) + bias[1])  # (b, h)
        q = F.normalize(y["q"] if cfg.adaptive_q else q_t, dim=-1)

        # eqs. 87–88: every memory writes its own target v̂_□ = M_□,chunk(v_t) at the shared key k_t
        for name in names:
            v_hat = memory_read(M_chunk[name], v, sigma)  # (b, h, d)
            M[name], S[name] = write(
                M[name],
                S[name],
                M_chunk[name],
                O[name],
                k,
                v_hat,
                eta,
                alpha,
                beta,
                rule=cfg.rule,
                max_grad_norm=cfg.max_grad_norm,
                sigma=sigma,
            )

        # eq. 94: the read of the main memory, after this token's write (dual) or at the chunk's weights (snapshot)
        o = memory_read(M["memory"] if cfg.read == "dual" else M_chunk["memory"], q, sigma)  # (b, h, d)

        # Titans' output: RMSNorm per head, a SiLU gate from x_t, the output projection
        norm = layer.out.norm
        o = o * torch.rsqrt(o.pow(2).mean(-1, keepdim=True) + norm.eps) * norm.weight  # (b, h, d)
        gate = F.silu(x[:, t] @ layer.out.gate.weight.T)  # (b, dim)
        ys.append((o.reshape(b, dim) * gate) @ layer.out.proj.weight.T)  # (b, dim)

    def final(group: list[str], chunk: int, start: int) -> MemoryState:
        """The state of a group of memories (the generating ones stacked along the head axis, as the layer keeps it)."""
        new_offset = (start + T) % chunk

        def stack(ws: dict) -> Weights | None:
            if ws[group[0]] is None:
                return None
            return {n: torch.cat([ws[name][n] for name in group], dim=1) for n in ("W1", "W2")}  # (b, m·h, ·, ·)

        return MemoryState(stack(M), stack(S), stack(M_chunk) if new_offset else None, new_offset)

    new_state = {
        "conv": window,
        "gen": final(gen_names, cfg.chunk_size, gen.offset),
        "memory": final(["memory"], cfg.memory_chunk_size, mem.offset),
    }
    return torch.stack(ys, dim=1) if ys else x.new_zeros(b, 0, dim), new_state


# --- the in-context CMS level with its own objective (paper §7, eq. 71; docs/deviations.md #11) ---


def in_context_level(level: InContextLevel, h_in: Tensor, state: MemoryState) -> tuple[Tensor, MemoryState]:
    """The forward pass of `InContextLevel`, token by token: h (b, t, dim) and its MemoryState in, the output
    (b, t, dim) and the state after the last token out.

    Per token t, at stream position p, per head:
        at p ≡ 0 (mod C): M_chunk = M                     the weights of the last completed chunk
        k_t = h_t/‖h_t‖ (per head),  v_t = h_t W_v,  η_t = max_lr σ(h_t W_η + b_η),  α_t = σ(h_t W_α + b_α)
        y_t = W_out (M_chunk(k_t) − k_t) = W_out W1 σ(W2 k_t)     the read: the MLP part of M at the chunk's weights
        M ← O + α_t (M − O) − η_t clip(∇ ½‖M_chunk(k_t) − v_t‖²)   GD, gradients at the chunk's weights
    so the weights a read sees change every C tokens, by the chunk's gradients (eq. 71), each scaled by its η_t and
    by the retention of the tokens after it.
    """
    b, T, dim = h_in.shape
    H, d, C = level.num_heads, level.head_dim, level.period
    sigma = activation("gelu")[0]  # the level's memory uses scan's default σ
    M = _batched(state.weights, b)
    M_chunk = _batched(state.snapshot, b) if state.offset else M
    O = _batched({"W1": level.W1, "W2": level.W2}, b) if level.retain_to == "init" else None
    ys = []
    for t in range(T):
        if (state.offset + t) % C == 0:  # a chunk has been completed: reads now see its writes
            M_chunk = M
        h_t = h_in[:, t]  # (b, dim)
        k = F.normalize(h_t.view(b, H, d), dim=-1)  # (b, H, d)
        v = (h_t @ level.value.weight.T).view(b, H, d)  # (b, H, d)
        gates = (h_t @ level.gates.weight.T + level.gates.bias).view(b, 2, H)
        eta, alpha = level.max_lr * torch.sigmoid(gates[:, 0]), torch.sigmoid(gates[:, 1])  # (b, H) each
        y = memory_read(M_chunk, k, sigma) - k  # W1 σ(W2 k_t): (b, H, d)
        ys.append(y.reshape(b, dim) @ level.out.weight.T)  # (b, dim)
        M, _ = write(
            M, None, M_chunk, O, k, v, eta, alpha, None, rule="gd", max_grad_norm=level.max_grad_norm, sigma=sigma
        )
    offset = (state.offset + T) % C
    y = torch.stack(ys, dim=1) if ys else h_in.new_zeros(b, 0, dim)
    return y, MemoryState(M, None, M_chunk if offset else None, offset)
