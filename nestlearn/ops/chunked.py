"""Chunk-parallel associative memory: the same recurrence as `naive.py`, with no Python loop over tokens.

Inside a chunk every gradient is taken at the chunk's starting weights M_0 (eq. 90, Titans eqs. 16–18), so each
token's gradient is a rank-1 outer product a_l b_lᵀ computed in parallel:

    linear:  W:  a = e, b = k                      e = M_0(k) − v (l2) or −v (dot)
    mlp:     W1: a = e, b = h = σ(k W2ᵀ)           W2: a = δ = (e W1) ⊙ σ'(k W2ᵀ), b = k

Retention and momentum are linear recurrences, unrolled with segment products (0-based tokens i, l of a chunk):

    Dα[i, l] = Π_{l<j≤i} α_j      Pα[i] = Π_{j≤i} α_j      (Dβ, Pβ alike for the momentum β)
    K = Dα Dβ (momentum) or Dα    dS = Dα Pβ                   coefficient of −η_l a_l b_lᵀ and of S_0 in M_i
    M_i = Pα[i] M_0 + dS[i] S_0 − Σ_{l≤i} K[i, l] η_l a_l b_lᵀ  − Σ_{l≤i} Dα[i, l] η_l u_l k_lᵀ   (last term: dgd)

DGD (eq. 88) adds −η_i u_i k_iᵀ with u_i = M_{i−1} k_i, which depends on the recurrence itself. Writing u_i out
with the formula above at row i−1 gives a unit lower-triangular system (the UT transform of DeltaNet):

    u_i + Σ_{l<i} Dα[i−1, l] η_l (k_lᵀ k_i) u_l
        = Pα[i−1] M_0 k_i + dS[i−1] S_0 k_i − Σ_{l<i} K[i−1, l] η_l (b_lᵀ k_i) a_l

With an origin O (retention towards O instead of zero, `memory.scan`'s `origin`) the same formulas hold for the
deviation M − O: M_i gains (1 − Pα[i]) O, and u_i = (M_{i−1} − O) k_i.

Reads of M_i(q_i) ("dual" form) are then masked (C × C) matmuls, and the end-of-chunk state is the formula at its
last token (`_Transition`, with a hand-written backward). A self-generated target (eq. 87) replaces v_l by M_0(v_l),
read in the same pass as M_0(k_l). Only the chunks run in a Python loop, because the next chunk's gradients need
this chunk's weights. A length that C does not divide is padded, and the last chunk's state is read at its last real
token.

    b batch, h heads, n chunks, c/C tokens in a chunk, d key feature, o value feature, f MLP hidden width
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor

from ..state import MemoryState
from .common import KEY_SIDE, apply_memory, apply_weight, autocast_off, backprop_activation
from .common import activation as get_activation

__all__ = ["chunked_scan", "segprod"]


def segprod(x: Tensor) -> Tensor:
    """Segment products D[..., i, l] = Π_{l<j≤i} x_j for i ≥ l (1 on the diagonal), 0 above it.

    A cumulative product down a masked matrix: no division, so zeros in x are fine (mamba's segsum, in products).
    x: (..., C) -> (..., C, C).
    """
    C = x.shape[-1]
    strict = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1)
    lower = torch.ones(C, C, dtype=torch.bool, device=x.device).tril()
    X = torch.where(strict, x.unsqueeze(-1).expand(*x.shape, C), torch.ones((), dtype=x.dtype, device=x.device))
    return torch.where(lower, X.cumprod(dim=-2), torch.zeros((), dtype=x.dtype, device=x.device))


def _prev(x: Tensor, dim: int, first: float) -> Tensor:
    """Shift one token later along `dim` (row i holds what row i−1 held), filling row 0 with `first`."""
    pad = [0, 0] * (x.dim() - 1 - (dim % x.dim())) + [1, 0]
    return F.pad(x, pad, value=first).narrow(dim, 0, x.shape[dim])


def _t(x: Tensor) -> Tensor:
    return x.transpose(-1, -2)


def _dot(x: Tensor, y: Tensor) -> Tensor:
    """⟨x, y⟩ per matrix of a (B, m, n) batch."""
    return torch.linalg.vecdot(x.flatten(1), y.flatten(1))


class _Transition(torch.autograd.Function):
    """The state at a chunk's end from the state at its start (module docstring, at i = end):

        M' = pM M + (1 − pM) O + sM S − Lᵀ R        S' = pS S − Λᵀ R

    (without momentum no S terms; without an origin no O term). M, S, O: (B, out, in); L, Λ: (B, C, out);
    R: (B, C, in); pM, sM, pS: (B,), a scalar per memory (Pα, dS and Pβ at the chunk's last token).

    Written by hand because on CPU this is where the time goes: autograd over mul, addcmul and baddbmm writes a
    weight-sized temporary for each scalar's gradient ((g ⊙ M).sum()) and keeps the scaled copies; here the forward
    writes each output once, in place, and the backward writes only the weight gradients it must, taking the
    scalars' gradients as dot products. tests/test_memory_equivalence.py checks it against autograd
    over the same formula and by finite differences."""

    @staticmethod
    def forward(ctx, M, S, L, Lam, R, pM, sM, pS, O=None):
        new_M = torch.mul(M, pM[:, None, None])
        if O is not None:
            new_M.addcmul_(O, (1 - pM)[:, None, None])
        if S is not None:
            new_M.addcmul_(S, sM[:, None, None])
        new_M.baddbmm_(L.transpose(1, 2), R, alpha=-1)
        new_S = None
        if S is not None:
            new_S = torch.mul(S, pS[:, None, None]).baddbmm_(Lam.transpose(1, 2), R, alpha=-1)
        ctx.save_for_backward(M, S, L, Lam, R, pM, sM, pS, O)
        ctx.device_type = M.device.type
        ctx.set_materialize_grads(False)
        return new_M, new_S

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_M, g_S):
        # as the forward ran (memory.scan turns autocast off): a backward called under autocast would otherwise run
        # these products in bfloat16 and accumulate them into float32 tensors
        with autocast_off(ctx.device_type):
            return _Transition._backward(ctx, g_M, g_S)

    @staticmethod
    def _backward(ctx, g_M, g_S):
        M, S, L, Lam, R, pM, sM, pS, O = ctx.saved_tensors
        need = ctx.needs_input_grad
        dM = dS = dL = dLam = dR = dpM = dsM = dpS = dO = None
        if g_M is not None:
            if need[0]:
                dM = g_M * pM[:, None, None]
            if O is not None and need[8]:
                dO = g_M * (1 - pM)[:, None, None]
            if need[1] and S is not None:
                dS = g_M * sM[:, None, None]
            if need[2]:
                dL = -torch.bmm(R, g_M.transpose(1, 2))  # (B, C, out)
            if need[4]:
                dR = -torch.bmm(L, g_M)  # (B, C, in)
            if need[5]:
                dpM = _dot(g_M, M) if O is None else _dot(g_M, M) - _dot(g_M, O)
            if need[6] and S is not None:
                dsM = _dot(g_M, S)
        if g_S is not None and S is not None:
            if need[1]:
                dS = g_S * pS[:, None, None] if dS is None else dS.addcmul_(g_S, pS[:, None, None])
            if need[3]:
                dLam = -torch.bmm(R, g_S.transpose(1, 2))
            if need[4]:
                dR = -torch.bmm(Lam, g_S) if dR is None else dR.baddbmm_(Lam, g_S, alpha=-1)
            if need[7]:
                dpS = _dot(g_S, S)
        return dM, dS, dL, dLam, dR, dpM, dsM, dpS, dO


def _transition(M, S, L, Lam, R, pM, sM, pS, O=None):
    """`_Transition` on (b, h, ·, ·) tensors: flattens the leading axes and restores them."""
    n = M.dim() - 2  # leading axes, (b, h)

    def flat(x: Tensor | None) -> Tensor | None:
        return None if x is None else x.reshape(-1, *x.shape[n:])

    new_M, new_S = _Transition.apply(*(flat(x) for x in (M, S, L, Lam, R, pM, sM, pS, O)))
    return new_M.view(M.shape), (None if new_S is None else new_S.view(S.shape))


def chunked_scan(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retention: Tensor,
    momentum: Tensor | None,
    state: MemoryState,
    *,
    memory: str,
    objective: str,
    rule: str,
    chunk_size: int,
    read: str,
    activation: str,
    checkpoint: bool = False,
    max_grad_norm: float | None = None,
    compile: bool = False,
    self_target: bool = False,
    origin: dict[str, Tensor] | None = None,
) -> tuple[Tensor, MemoryState]:
    """Same contract as `naive_scan`. A state that stopped part-way through a chunk (offset r > 0) first finishes
    that chunk, C − r tokens whose gradients use the saved snapshot, then continues in whole chunks."""
    T, C, r = q.shape[2], chunk_size, state.offset
    opts = dict(memory=memory, objective=objective, rule=rule, read=read, activation=activation, checkpoint=checkpoint)
    opts["q_is_k"] = q is k  # a snapshot read at the keys reuses the gradient's forward pass
    opts["max_grad_norm"], opts["compile"], opts["self_target"] = max_grad_norm, compile, self_target
    # contiguous once per call, so that no chunk's transition copies an expanded (shared) origin again
    opts["origin"] = None if origin is None else {n: o.contiguous() for n, o in origin.items()}
    W, S = state.weights, state.momentum

    def part(lo: int, hi: int) -> tuple[Tensor, ...]:
        return (
            q[:, :, lo:hi],
            k[:, :, lo:hi],
            v[:, :, lo:hi],
            lr[:, :, lo:hi],
            retention[:, :, lo:hi],
            (None if momentum is None else momentum[:, :, lo:hi]),
        )

    ys, head = [], 0
    if r:
        head = min(C - r, T)
        y, W, S, _ = _scan_chunks(*part(0, head), W, S, state.snapshot, C - r, **opts)
        ys.append(y)
        if head < C - r:  # the chunk is still not finished
            return y, MemoryState(W, S, state.snapshot, r + head)
    offset, last_start = (T - head) % C, None
    if T > head:
        y, W, S, last_start = _scan_chunks(*part(head, T), W, S, None, C, **opts)
        ys.append(y)
    return torch.cat(ys, dim=2), MemoryState(W, S, last_start if offset else None, offset)


def _scan_chunks(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    lr: Tensor,
    retention: Tensor,
    momentum: Tensor | None,
    W: dict[str, Tensor],
    S: dict[str, Tensor] | None,
    snapshot: dict[str, Tensor] | None,
    C: int,
    *,
    memory: str,
    objective: str,
    rule: str,
    read: str,
    activation: str,
    checkpoint: bool,
    q_is_k: bool = False,
    max_grad_norm: float | None = None,
    compile: bool = False,
    self_target: bool = False,
    origin: dict[str, Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor], dict[str, Tensor] | None, dict[str, Tensor]]:
    """Chunks of C tokens from weights W (and momentum S). The first chunk takes its gradients and snapshot reads
    at `snapshot` if given, else at W. Returns y, the final W and S, and the weights the last chunk started from."""
    b, h, T, _ = q.shape
    # Fewer tokens than a chunk (decoding: one token a call) form one chunk of T: the kernels' first T rows are
    # those of a chunk of C, so this is exact, and padding to C would do C/T times the work (128× for one token
    # of a CMS level with period 128)
    C = min(C, T)
    n = -(-T // C)
    pad = n * C - T
    dgd, has_S = rule == "dgd", momentum is not None
    if pad:
        # The last chunk's state is read at its last real token (row `end` below), and every kernel is lower
        # triangular, so padded tokens never reach an output or the state; η = 0, α = β = 1 keeps them inert anyway.
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        lr = F.pad(lr, (0, pad), value=0.0)
        retention = F.pad(retention, (0, pad), value=1.0)
        if has_S:
            momentum = F.pad(momentum, (0, pad), value=1.0)

    # chunks first, so that the loop below indexes contiguous (b, h, C, ·) blocks
    def chunks(x: Tensor) -> Tensor:
        return x.reshape(b, h, n, C, *x.shape[3:]).movedim(2, 0).contiguous()

    k, v = chunks(k), chunks(v)  # (n, b, h, C, ·)
    q = k if q_is_k else chunks(q)
    eta, alpha = chunks(lr), chunks(retention)  # (n, b, h, C)
    eta_col = eta.unsqueeze(-2)  # (n, b, h, 1, C): η_l on column l

    # --- per-chunk kernels of the linear recurrences, all chunks at once ---
    D_a = segprod(alpha)  # (n, b, h, C, C)
    P_a = alpha.cumprod(-1)  # (n, b, h, C)
    if has_S:
        beta = chunks(momentum)
        D_b = segprod(beta)
        P_b = beta.cumprod(-1)
        K = D_a @ D_b  # coefficient of −η_l a_l b_lᵀ in M_i
        dS = (D_a @ P_b.unsqueeze(-1)).squeeze(-1)  # coefficient of S_0 in M_i, (n, b, h, C)
    else:
        K = D_a
    dual = read == "dual"  # a snapshot read needs none of the read kernels
    KK = k @ _t(k) if dgd or (dual and q_is_k) else None  # (n, b, h, C, C): k_iᵀ k_l
    if dual:
        KQ = KK if q_is_k else q @ _t(k)  # q_iᵀ k_l
        A_read = K * eta_col * KQ  # weight of a_l in the read of the key-side weight at token i
    if dgd:
        unit_L = _prev(D_a, -2, 0.0) * eta_col * KK + torch.eye(C, dtype=q.dtype, device=q.device)  # row i: Dα[i−1]
        R_grad = _prev(K, -2, 0.0) * eta_col * KK
        P_a_prev = _prev(P_a, -1, 1.0).unsqueeze(-1)  # (n, b, h, C, 1)
        dS_prev = _prev(dS, -1, 0.0).unsqueeze(-1) if has_S else None
        if dual:
            B_read = D_a * eta_col * KQ  # weight of u_l in the read at token i

    kernels = dict(q=q, k=k, v=v, eta=eta, eta_col=eta_col, P_a=P_a, K=K, D_a=D_a)
    if dual:
        kernels["A_read"] = A_read
    if has_S:
        kernels.update(dS=dS, D_b=D_b, P_b=P_b)
    if dgd:
        kernels.update(unit_L=unit_L, R_grad=R_grad, P_a_prev=P_a_prev)
        if dual:
            kernels["B_read"] = B_read
        if has_S:
            kernels["dS_prev"] = dS_prev
    # Unbind once: indexing [c] in the loop would make autograd build a full-size zero gradient per chunk, O(n²).
    unbound = [x.unbind(0) for x in kernels.values()]
    per_chunk = [dict(zip(kernels, xs, strict=True)) for xs in zip(*unbound, strict=True)]
    flags = dict(
        memory=memory,
        objective=objective,
        rule=rule,
        read=read,
        activation=activation,
        q_is_k=q_is_k,
        max_grad_norm=max_grad_norm,
        self_target=self_target,
    )
    fn = _compiled_step() if compile else _step

    def step(c: int, W: dict, S: dict | None, Wg: dict | None):
        end = C - 1 if c < n - 1 else (T - 1) % C  # the chunk's last real token
        return fn(per_chunk[c], W, S, Wg, origin, end=end, **flags)

    def run(c0: int, c1: int, W: dict, S: dict | None):
        """Chunks c0..c1−1; also returns the weights the last of them started from (where its gradients were)."""
        ys = []
        for c in range(c0, c1):
            Wg = snapshot if (c == 0 and snapshot is not None) else None  # where this chunk's gradients are taken
            start = W if Wg is None else Wg
            y, W, S = step(c, W, S, Wg)
            ys.append(y)
        return torch.stack(ys, dim=0), W, S, start

    # checkpoint: groups of ⌈√n⌉ chunks, of which backward keeps only the boundary weights and recomputes one group
    # at a time: O(√n) weight-sized tensors alive instead of O(n), for one extra forward pass.
    group = math.isqrt(n - 1) + 1 if checkpoint else n
    ys = []
    for c0 in range(0, n, group):
        c1 = min(n, c0 + group)
        if checkpoint:
            y, W, S, start = torch.utils.checkpoint.checkpoint(run, c0, c1, W, S, use_reentrant=False)
        else:
            y, W, S, start = run(c0, c1, W, S)
        ys.append(y)

    y = torch.cat(ys, dim=0).movedim(0, 2).reshape(b, h, n * C, -1)[:, :, :T]
    return y, W, S, start


@functools.cache
def _compiled_step():
    """`_step` under torch.compile, made on first use: one fused graph per chunk shape and set of options, reused by
    every chunk of every call (the chunks are padded to C, so a scan has at most two: whole chunks and its last)."""
    return torch.compile(_step, dynamic=False)


def _step(
    ch: dict[str, Tensor],
    W: dict[str, Tensor],
    S: dict[str, Tensor] | None,
    Wg: dict[str, Tensor] | None,
    O: dict[str, Tensor] | None,
    *,
    end: int,
    memory: str,
    objective: str,
    rule: str,
    read: str,
    activation: str,
    q_is_k: bool,
    max_grad_norm: float | None,
    self_target: bool,
):
    """One chunk from weights W (momentum S), its gradients taken at Wg (None: at W), retention towards the origin
    O (None: towards zero); `ch` holds the chunk's inputs and kernels (see `_scan_chunks`), `end` its last real
    token. Returns y, W and S after the chunk.

    A pure function of its arguments, so that `torch.compile` can fuse it once and reuse it for every chunk."""
    sigma, _ = get_activation(activation)
    key, dgd, dual, has_S = KEY_SIDE[memory], rule == "dgd", read == "dual", S is not None
    same = Wg is None
    Wg = W if same else Wg
    qc, kc, vc = ch["q"], ch["k"], ch["v"]  # (b, h, C, ·)
    pa = ch["P_a"].unsqueeze(-1)  # (b, h, C, 1)

    # gradient factors g_l = a_l b_lᵀ at the chunk's starting weights: a (b, h, C, out), b (b, h, C, in). With a
    # self-generated target the same forward pass also reads v̂ = M_0(v) (eq. 87): one product of 2C rows.
    C = kc.shape[-2]
    x = torch.cat([kc, vc], dim=-2) if self_target else kc  # (b, h, C or 2C, d)
    z = apply_weight(x, Wg[key])  # (b, h, ·, o) linear, (b, h, ·, f) mlp
    if memory == "linear":
        out = z
    else:
        hz = sigma(z)
        out = x + apply_weight(hz, Wg["W1"])  # (b, h, ·, d)
        hk = hz[..., :C, :]  # (b, h, C, f)
    zk, pred = z[..., :C, :], out[..., :C, :]
    if self_target:
        vc = out[..., C:, :]  # v̂
    e = pred - vc if objective == "l2" else -vc
    if memory == "linear":
        factors = {"W": (e, kc)}
    else:
        delta = backprop_activation(activation, e @ Wg["W1"], zk)  # (b, h, C, f): e backpropagated through W1 and σ
        factors = {"W1": (e, hk), "W2": (delta, kc)}
    if max_grad_norm is not None:
        # ‖a bᵀ‖_F = ‖a‖ ‖b‖ per token and layer; scaling e scales every layer's factor (δ is linear in e)
        sq = sum((a * a).sum(-1, keepdim=True) * (bb * bb).sum(-1, keepdim=True) for a, bb in factors.values())
        scale = max_grad_norm * torch.rsqrt(sq.clamp(min=max_grad_norm**2))  # (b, h, C, 1)
        e = e * scale
        factors = {name: (a * scale, bb) for name, (a, bb) in factors.items()}
    a_key = factors[key][0]

    if dgd:
        # u_i = M_{i−1} k_i by the unit lower-triangular solve (module docstring)
        Mk = zk if same else apply_weight(kc, W[key])
        if O is not None:  # u_i = (M_{i−1} − O) k_i: DGD acts on the deviation from the origin
            Mk = Mk - apply_weight(kc, O[key])
        rhs = ch["P_a_prev"] * Mk - ch["R_grad"] @ a_key
        if has_S:
            rhs = rhs + ch["dS_prev"] * apply_weight(kc, S[key])
        u = torch.linalg.solve_triangular(ch["unit_L"], rhs, upper=False, unitriangular=True)  # (b, h, C, ·)

    if dual:  # y_i = M_i(q_i)
        z = pa * apply_weight(qc, W[key]) - ch["A_read"] @ a_key  # M_i q_i for the key-side weight
        if O is not None:
            z = z + (1 - pa) * apply_weight(qc, O[key])
        if has_S:
            z = z + ch["dS"].unsqueeze(-1) * apply_weight(qc, S[key])
        if dgd:
            z = z - ch["B_read"] @ u
        if memory == "linear":
            y = z
        else:
            hq = sigma(z)  # (b, h, C, f)
            A1 = ch["K"] * ch["eta_col"] * (hq @ _t(hk))  # weight of e_l in W1_i hq_i
            y1 = pa * apply_weight(hq, W["W1"]) - A1 @ e
            if O is not None:
                y1 = y1 + (1 - pa) * apply_weight(hq, O["W1"])
            if has_S:
                y1 = y1 + ch["dS"].unsqueeze(-1) * apply_weight(hq, S["W1"])
            y = qc + y1
    elif q_is_k:  # snapshot read at the keys (CMS levels, generating memories): the prediction already is M_0(q)
        y = pred
    else:  # snapshot: y_i = M_0(q_i)
        y = apply_memory(Wg, qc, memory, activation)

    # state after the chunk's last real token: the formula for M_i at i = end
    wK = (ch["K"][..., end, :] * ch["eta"]).unsqueeze(-1)  # (b, h, C, 1): weight of a_l b_lᵀ
    new_W, new_S = {}, {}
    pM, sM, pS, wS = ch["P_a"][..., end], None, None, None  # (b, h)
    if has_S:
        sM, pS = ch["dS"][..., end], ch["P_b"][..., end]
        wS = (ch["D_b"][..., end, :] * ch["eta"]).unsqueeze(-1)
    for name, (a, bb) in factors.items():
        left = a * wK
        if dgd and name == key:  # the DGD term shares the right factor k_l: one matmul for both
            left = left + u * (ch["D_a"][..., end, :] * ch["eta"]).unsqueeze(-1)
        Sn = S[name] if has_S else None
        On = None if O is None else O[name]
        new_W[name], new_S[name] = _transition(W[name], Sn, left, None if Sn is None else a * wS, bb, pM, sM, pS, On)
    return y, new_W, new_S if has_S else None
