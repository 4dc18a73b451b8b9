"""M3, Multi-scale Momentum Muon (paper §7.2, Algorithm 1, eq. 75): the Continuum Memory System applied to the
momentum. A fast momentum and a slow one, written every step and every f steps, each orthogonalised by
Newton–Schulz, summed and divided by the square root of a second moment:

    every step t:            M¹ ← M¹ + β₁ g_t        V ← V + β₂ g_t²         O¹ = NewtonSchulz(M¹)
    every f steps (t ≡ 0):   M² ← M² + β₃ Σ_{i=t−f+1..t} g_i                 O² = NewtonSchulz(M²)
    θ ← θ − lr · s((O¹ + α O²) / (√V + ε))

The slow branch written at step t (a multiple of f) is used from step t + 1 on, as in the algorithm, where the
slow memory is refreshed at the start of each block of f steps with the previous block's gradients.

`form="literal"` writes the algorithm's memories as printed: sums without decay. `form="ema"` (the default, chosen
by measurement, docs/results.md) uses exponential averages M¹ ← β₁M¹ + (1−β₁)g, V ← β₂V + (1−β₂)g² with bias
correction, and M² ← β₃M² + (1−β₃)·(mean of the block's gradients). The algorithm's labels for β₂/β₃ disagree with
eq. 75 (docs/deviations.md, ambiguity #15); here β₂ is the second moment and β₃ the slow momentum. s is the update
scale (`scale`): `rms` (default) rescales the update to RMS 0.2 so one learning rate serves the matrices and the
AdamW-stepped vectors; `none` is the algorithm's (s = identity).

The step size follows from both. Algorithm 1 exactly is `form="literal", scale="none"`: V then grows like t, so
the step shrinks like 1/√t, as in AdaGrad (for a constant gradient and α = 0, ‖Δθ_t‖ = ‖Δθ_1‖/√t). With the default
`scale="rms"` every update has RMS 0.2 · lr whatever the form, which cancels that shrinkage: V divides the update
coordinate by coordinate but no longer sets its size, and a learning-rate schedule alone decides how the step
shrinks (both tested).

Parameters with fewer than 2 dimensions (and groups with `muon=False`) are stepped by AdamW.
"""

from __future__ import annotations

import torch

from ._common import SCALES, ParamwiseOptimizer, adamw_, check_choice, check_range, scale_update
from .newton_schulz import as_matrix, newton_schulz

__all__ = ["M3"]

FORMS = ("ema", "literal")


class M3(ParamwiseOptimizer):
    """Args:
    lr: learning rate. betas: (β₁ fast momentum, β₂ second moment, β₃ slow momentum). alpha: α, the slow
    branch's weight (0 turns it off). slow_period: f, steps between writes of the slow memory. form: ema | literal.
    second_moment: divide by √V + ε (False: by 1). ns_steps, scale, weight_decay: as in Muon (`scale="none"` with
    `form="literal"` is Algorithm 1, whose step shrinks like 1/√t; the default `rms` fixes the update's RMS).
    adamw_betas, eps: of the AdamW part (and ε of the division by √V).
    """

    name = "M3"

    def __init__(
        self,
        params,
        lr: float = 1e-3,
        betas: tuple[float, float, float] = (0.9, 0.95, 0.99),
        alpha: float = 1.0,
        slow_period: int = 8,
        form: str = "ema",
        second_moment: bool = True,
        ns_steps: int = 5,
        scale: str = "rms",
        weight_decay: float = 0.0,
        adamw_betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
    ):
        check_range("M3", "lr", lr, 0.0)
        if len(betas) != 3:
            raise ValueError(f"M3: betas={betas!r} must be three numbers (β₁ fast, β₂ second moment, β₃ slow)")
        for i, b in enumerate(betas):
            check_range("M3", f"betas[{i}]", b, 0.0, 1.0, open_high=True)
        check_range("M3", "alpha", alpha, 0.0)
        if isinstance(slow_period, bool) or not isinstance(slow_period, int) or slow_period < 1:
            raise ValueError(f"M3: slow_period={slow_period!r} must be a positive int (steps between slow writes)")
        check_choice("M3", "form", form, FORMS)
        check_choice("M3", "scale", scale, SCALES)
        check_range("M3", "weight_decay", weight_decay, 0.0)
        check_range("M3", "ns_steps", ns_steps, 1)
        defaults = dict(
            lr=lr,
            betas=tuple(betas),
            alpha=alpha,
            slow_period=slow_period,
            form=form,
            second_moment=second_moment,
            ns_steps=ns_steps,
            scale=scale,
            weight_decay=weight_decay,
            adamw_betas=tuple(adamw_betas),
            eps=eps,
            muon=None,
        )
        super().__init__(params, defaults)

    def _step_param(self, p, grad, state, group) -> None:
        if p.dim() < 2 or group["muon"] is False:
            adamw_(p, grad, state, group["lr"], group["adamw_betas"], group["eps"], group["weight_decay"])
            return
        update = self._update(p, grad, state, group)
        p.mul_(1 - group["lr"] * group["weight_decay"])
        p.add_(update, alpha=-group["lr"])

    def _update(self, p, g, state, group):
        b1, b2, b3 = group["betas"]
        ema = group["form"] == "ema"
        if not state:
            state["step"] = 0
            for name in ("fast", "second_moment", "slow", "block_sum", "slow_out"):
                state[name] = torch.zeros_like(p)
        state["step"] += 1
        t, f = state["step"], group["slow_period"]
        fast, v = state["fast"], state["second_moment"]
        if ema:
            fast.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        else:
            fast.add_(g, alpha=b1)
            v.addcmul_(g, g, value=b2)
        state["block_sum"].add_(g)
        o = newton_schulz(as_matrix(fast), group["ns_steps"]).view_as(p)  # O¹
        if group["alpha"] > 0:
            o = o + group["alpha"] * state["slow_out"]  # + α O² of the blocks before this one
        if group["second_moment"]:
            v_hat = v / (1 - b2**t) if ema else v
            o = o / (v_hat.sqrt() + group["eps"])
        out = scale_update(as_matrix(o), group["scale"]).view_as(p)
        if t % f == 0:  # end of a block: write the slow memory, used from the next step on
            slow = state["slow"]
            if ema:
                slow.mul_(b3).add_(state["block_sum"], alpha=(1 - b3) / f)
            else:
                slow.add_(state["block_sum"], alpha=b3)
            state["block_sum"].zero_()
            if group["alpha"] > 0:
                state["slow_out"] = newton_schulz(as_matrix(slow), group["ns_steps"]).view_as(p)
        return out
