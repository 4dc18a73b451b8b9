"""Momentum as an associative memory of the gradients (paper §4.4, eqs. 46–52).

Plain momentum m_{t+1} = β m_t + g_t is one gradient step on the dot-product objective ⟨m, g_t⟩ with retention β:
a linear memory that compresses the gradients into one matrix (eq. 33–34). Each optimiser here makes one part of
that memory more expressive, as the paper does, and steps θ_{t+1} = θ_t (1 − lr·λ) − lr · σ(m_{t+1}):

- `PreconditionedMomentum`: a richer value P(φ(g)) (eqs. 46–47, with eq. 51's feature map φ and eq. 52's output
  nonlinearity σ; σ = Newton–Schulz makes it Muon without Nesterov).
- `DeltaMomentum`: the L2 objective instead of the dot product (eqs. 48–49), i.e. the delta rule: before
  adding g the memory forgets part of what it holds along g, m ← m(βI − c ĝĝᵀ), so it can "learn to forget".
- `DeepMomentum` (DMGD, eq. 50): the memory is an MLP written by gradient descent on its own inner objective,
  through `nestlearn.memory.scan`, the same code as the model's memories; read at the current gradient as eq. 50
  prints it (`form="paper"`) or at a fixed key, a learned preconditioner (`form="preconditioner"`, the default).

Sign: the paper writes W ← W + m with m ← α m − η g; we store m with the opposite sign and the learning rate
outside, as torch.optim.SGD does, so that a learning-rate schedule acts on every step at once. For constant lr
the two are the same sequence of weights. Symbols in docs/notation.md.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .. import memory as mem
from ._common import SCALES, ParamwiseOptimizer, check_choice, check_range, scale_update
from .newton_schulz import as_matrix, newton_schulz

__all__ = ["PreconditionedMomentum", "DeltaMomentum", "DeepMomentum"]

PRECONDITIONERS = ("none", "rms")
FEATURE_MAPS = ("identity", "sign")
OUTPUTS = ("identity", "newton_schulz", "sign")


def _output(m: Tensor, output, ns_steps: int, scale: str) -> Tensor:
    """σ(m) of eq. 52. Newton–Schulz acts on matrices; a vector parameter keeps σ = identity."""
    if callable(output):
        return output(m)
    if output == "sign":
        return m.sign()
    if output == "newton_schulz" and m.dim() >= 2:
        return scale_update(newton_schulz(as_matrix(m), ns_steps), scale).view_as(m)
    return m


class _Momentum(ParamwiseOptimizer):
    """The shared step: value → momentum memory → output → decoupled weight decay and the parameter update."""

    name = "momentum"

    def _check(self, lr, momentum, weight_decay) -> None:
        check_range(self.name, "lr", lr, 0.0)
        check_range(self.name, "momentum", momentum, 0.0, 1.0)
        check_range(self.name, "weight_decay", weight_decay, 0.0)

    def _write(self, p: Tensor, g: Tensor, state: dict, group: dict) -> Tensor:
        raise NotImplementedError

    def _step_param(self, p, grad, state, group) -> None:
        state["step"] = state.get("step", 0) + 1
        update = self._write(p, grad, state, group)  # the memory's read-out after this step's write
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])


class PreconditionedMomentum(_Momentum):
    """m ← β m + P(φ(g)); θ ← θ − lr · σ(m) (eqs. 46–47, 51, 52).

    Args:
        momentum: β, the memory's retention (the paper's α_{i+1}).
        precondition: P. `none`, or `rms`: g / (√v̂ + eps) with v the bias-corrected EMA (β₂) of g², a diagonal
            memory of the gradients' scale. A callable (g, state) -> P(g) is also accepted.
        feature_map: φ (eq. 51): `identity`, `sign`, or a callable g -> φ(g) (e.g. a higher-order map).
        output: σ (eq. 52): `identity`, `newton_schulz` (Muon without Nesterov), `sign`, or a callable.
        ns_steps, scale: of the Newton–Schulz output (see Muon).
    """

    name = "PreconditionedMomentum"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        precondition="none",
        beta2: float = 0.999,
        eps: float = 1e-8,
        feature_map="identity",
        output="identity",
        ns_steps: int = 5,
        scale: str = "rms",
        weight_decay: float = 0.0,
    ):
        self._check(lr, momentum, weight_decay)
        check_range(self.name, "beta2", beta2, 0.0, 1.0, open_high=True)
        check_choice(self.name, "precondition", precondition, PRECONDITIONERS)
        check_choice(self.name, "feature_map", feature_map, FEATURE_MAPS)
        check_choice(self.name, "output", output, OUTPUTS)
        check_choice(self.name, "scale", scale, SCALES)
        defaults = dict(
            lr=lr,
            momentum=momentum,
            precondition=precondition,
            beta2=beta2,
            eps=eps,
            feature_map=feature_map,
            output=output,
            ns_steps=ns_steps,
            scale=scale,
            weight_decay=weight_decay,
        )
        super().__init__(params, defaults)

    def _write(self, p, g, state, group):
        fm = group["feature_map"]
        x = fm(g) if callable(fm) else g.sign() if fm == "sign" else g  # φ(g)
        pre = group["precondition"]
        if callable(pre):
            x = pre(x, state)
        elif pre == "rms":
            v = state.setdefault("exp_avg_sq", torch.zeros_like(p))
            v.mul_(group["beta2"]).addcmul_(g, g, value=1 - group["beta2"])
            x = x / ((v / (1 - group["beta2"] ** state["step"])).sqrt() + group["eps"])
        m = state.setdefault("momentum", torch.zeros_like(p))
        m.mul_(group["momentum"]).add_(x)
        return _output(m, group["output"], group["ns_steps"], group["scale"])


class DeltaMomentum(_Momentum):
    """m ← m(βI − c ĝĝᵀ) + g; θ ← θ − lr · m (eqs. 48–49), over each parameter flattened to one vector.

    The L2 objective on the momentum adds the delta rule's decay along the current gradient: before writing g
    the memory forgets part of what it holds along g, so it can "learn to forget" stale directions. How much, c:

    - `proximal` (default): c = ζ‖g‖² / (1 + ζ‖g‖²), the exact minimiser of the L2 objective plus the proximal
      term (Sherman–Morrison, as the paper derives DGD in eq. 57, without assuming ‖g‖ = 1). Always stable: the
      momentum along g is kept by a factor in (β − 1, β]; strong forgetting where gradients are large, little
      where they are small.
    - `normalized`: c = ζ, with ĝ = g/‖g‖ (DGD's ‖x‖ = 1 assumption).
    - `literal`: m(βI − ζ g gᵀ) as printed, i.e. c = ζ‖g‖²; diverges once ζ‖g‖² > 1 + β.

    ζ = `delta` (0 gives plain momentum, torch.optim.SGD).
    """

    name = "DeltaMomentum"
    FORMS = ("proximal", "normalized", "literal")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        delta: float = 0.01,
        form: str = "proximal",
        weight_decay: float = 0.0,
    ):
        self._check(lr, momentum, weight_decay)
        check_range(self.name, "delta", delta, 0.0)
        if form not in self.FORMS:
            raise ValueError(f"{self.name}: form={form!r} is not known; expected one of {list(self.FORMS)}")
        super().__init__(params, dict(lr=lr, momentum=momentum, delta=delta, form=form, weight_decay=weight_decay))

    def _write(self, p, g, state, group):
        m = state.setdefault("momentum", torch.zeros_like(p))
        gf, mf = g.reshape(-1), m.view(-1)
        sq = gf.pow(2).sum()
        g_hat = gf * sq.rsqrt().clamp(max=1e30)  # ĝ; a zero gradient gives ĝ = 0 and no forgetting
        zeta = group["delta"]
        c = {"proximal": zeta * sq / (1 + zeta * sq), "normalized": zeta, "literal": zeta * sq}[group["form"]]
        # m (βI − c ĝĝᵀ) = β m − c (m·ĝ) ĝ, then + g
        along = c * torch.dot(mf, g_hat)
        mf.mul_(group["momentum"]).sub_(g_hat * along).add_(gf)
        return m


class DeepMomentum(_Momentum):
    """DMGD (eq. 50): the momentum is an associative memory M written by gradient descent on its own objective.

    Each row r of a parameter (a matrix (rows, cols); vectors are one row; more dimensions flatten into the
    columns) has its own memory M_r. Every step writes the gradient row g_r as the value at a key k_r, then
    reads the update at the same key. `form` says which key:

        M_r ← M_0 + β (M_r − M_0) − η ∇_M ℓ(M_r; k_r, g_r)   ℓ = −⟨M(k), g⟩ (`dot`) or ½‖M(k) − g‖² (`l2`)
        θ_r ← θ_r − lr · M_r(k_r)                          (the MLP's learned part: M_r(k_r) − k_r)

    - `form="paper"`: eq. 50 as printed, W_{i+1} = W_i + m_{i+1}(u_i): the memory is applied to the current
      gradient, k_r = ĝ_r = g_r/‖g_r‖, and its read of the gradient is the update. The key is the gradient's
      direction, not the gradient itself (a departure, docs/deviations.md): with the raw gradient as key the
      read of an MLP whose weights are written with the gradient scales like ‖g‖³, so the step size would
      depend on the gradient's scale cubed. For the MLP memory a write at ĝ_j moves the read at ĝ_i by
      J(ĝ_i) J(ĝ_j)ᵀ g_j: past gradients come back weighted by how alike their directions are in the memory's
      features, a momentum that recalls the gradients of similar directions; the weight can be negative, and
      training was unstable above small learning rates where it was measured.
    - `form="preconditioner"` (the default, chosen by measurement, docs/optimizers.md): a fixed unit key
      k_r = c (every coordinate d^(−1/2)), so the memory is not read at the gradient: the MLP is a write
      preconditioner, the read-out moving by J(c) J(c)ᵀ g per write, a matrix that the memory changes as it is
      written.

    With `memory="linear"` and the dot objective both forms are exactly torch.optim.SGD(momentum=β) (η = 1):
    momentum is the linear case. The linear memory is the paper's momentum m of eqs. 33–34, which has no input
    (M(x) = W x at the constant key 1, a (cols, 1) matrix: M(u) = m whatever u is), so `form` does not change
    it; a linear map read at ĝ would weight each past gradient by its cosine with the current one instead. With
    `memory="mlp"` the memory is the residual MLP of eq. 89, M(x) = x + W₁σ(W₂x), read as M(k) − k. W₁ starts at
    zero, so the first read-out is a positive multiple of g per row, as for momentum; W₂ starts N(0, 1) from a
    fixed seed.

    Retention pulls the memory back to its initial state M_0 (`retain_to="init"`, the default), as the model's
    memories do: M_r ← M_0 + β (M_r − M_0) − η ∇ℓ. W₁'s M_0 is zero, so for W₁ (and for the linear memory, hence
    the SGD reduction) nothing changes; W₂ returns to its random start instead of decaying to zero. With
    `retain_to="zero"` W₂ decays by β every step while its writes (∝ W₁ᵀg) shrink with W₁: the memory reaches the
    dead all-zero state, its read-out goes to zero and the parameters stop moving (docs/optimizers.md).

    Args:
        momentum: β, the memory's retention. inner_lr: η. memory: mlp | linear. objective: dot | l2.
        form: `preconditioner` (default: fixed key) or `paper` (eq. 50: keyed and read at the gradient's
            direction); only the MLP memory differs.
        hidden: the MLP's hidden width per row. activation: its σ. seed: of W₂'s initial values.
        retain_to: `init` (default) or `zero`, what the retention β pulls the memory towards.
    """

    name = "DeepMomentum"
    FORMS = ("preconditioner", "paper")

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        momentum: float = 0.9,
        inner_lr: float = 1.0,
        memory: str = "mlp",
        objective: str = "dot",
        hidden: int = 2,
        activation: str = "gelu",
        weight_decay: float = 0.0,
        seed: int = 0,
        retain_to: str = "init",
        form: str = "preconditioner",
    ):
        self._check(lr, momentum, weight_decay)
        check_range(self.name, "inner_lr", inner_lr, 0.0)
        check_range(self.name, "hidden", hidden, 1)
        for name, value, allowed in (
            ("memory", memory, mem.MEMORIES),
            ("objective", objective, mem.OBJECTIVES),
            ("activation", activation, tuple(mem.ACTIVATIONS)),
        ):
            if value not in allowed:
                raise ValueError(f"{self.name}: {name}={value!r} is not known; expected one of {list(allowed)}")
        check_choice(self.name, "retain_to", retain_to, ("init", "zero"))
        if form not in self.FORMS:
            raise ValueError(f"{self.name}: form={form!r} is not known; expected one of {list(self.FORMS)}")
        defaults = dict(
            lr=lr,
            momentum=momentum,
            inner_lr=inner_lr,
            memory=memory,
            objective=objective,
            hidden=hidden,
            activation=activation,
            weight_decay=weight_decay,
            retain_to=retain_to,
            form=form,
        )
        super().__init__(params, defaults)
        self.seed = seed

    def _init_memory(self, rows: Tensor, group: dict, index: int) -> mem.MemoryState:
        n, d = rows.shape
        kw = {"dtype": torch.promote_types(rows.dtype, torch.float32), "device": rows.device}
        if group["memory"] == "linear":
            return mem.MemoryState({"W": torch.zeros(1, n, d, 1, **kw)})
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + index)  # same on every process
        w2 = torch.randn(1, n, group["hidden"], d, generator=gen).to(**kw)
        return mem.MemoryState({"W1": torch.zeros(1, n, d, group["hidden"], **kw), "W2": w2})

    def _key(self, rows: Tensor, group: dict) -> Tensor:
        """k (1, n, 1, width): the constant key 1 of the linear memory; for the MLP, the fixed unit key c
        (`preconditioner`) or each row's gradient direction ĝ_r (`paper`; a zero row gives ĝ = 0)."""
        n, d = rows.shape
        dtype = torch.promote_types(rows.dtype, torch.float32)  # at least float32, as the memory
        if group["memory"] == "linear":
            return rows.new_ones((1, n, 1, 1), dtype=dtype)
        if group.get("form", "preconditioner") == "paper":  # a state saved before `form` existed: preconditioner
            r = rows.to(dtype)  # scaled to a largest entry of 1 first, so that a tiny gradient's ‖g‖² cannot underflow
            r = r / r.abs().amax(-1, keepdim=True).clamp_min(torch.finfo(dtype).tiny)
            return torch.nn.functional.normalize(r, dim=-1)[None, :, None, :]
        return rows.new_full((1, n, 1, d), d**-0.5, dtype=dtype)  # c, ‖c‖ = 1

    def _write(self, p, g, state, group):
        rows = g.reshape(1, -1) if g.dim() < 2 else as_matrix(g)  # (n, d)
        if "memory" not in state:
            index = sum(1 for _ in self.state) - 1
            weights = self._init_memory(rows, group, index).weights
            state["memory"] = weights
            state["memory_init"] = {name: w.clone() for name, w in weights.items()}  # M_0, where retention pulls
        c = self._key(rows, group)
        v = rows.to(c.dtype)[None, :, None, :]  # (1, n, 1, d): one token per row
        gate = torch.ones(c.shape[:3], dtype=c.dtype, device=c.device)
        opts = dict(memory=group["memory"], activation=group["activation"])
        # a state saved before retain_to existed has no M_0: its memory then keeps retaining towards zero
        origin = state.get("memory_init") if group.get("retain_to", "init") == "init" else None
        _, new = mem.scan(
            c,
            c,
            v,
            gate * group["inner_lr"],
            gate * group["momentum"],
            state=mem.MemoryState(state["memory"]),
            objective=group["objective"],
            chunk_size=1,
            check_values=False,
            origin=origin,
            **opts,
        )
        state["memory"] = {name: w.contiguous() for name, w in new.weights.items()}
        out = mem.read(c, new, **opts)  # (1, n, 1, d)
        if group["memory"] == "mlp":
            out = out - c  # the residual MLP's learned part W₁σ(W₂c)
        return out.reshape(p.shape).to(p.dtype)
