"""Multi-frequency levels for any optimizer (paper eq. 71): each level's parameters are stepped once every
`period` tokens of the stream, with their gradient summed over the period,

    θ^(ℓ)_{i+1} = θ^(ℓ)_i − η^(ℓ) Σ_{t=i−C^(ℓ)}^{i} ∇_θ L(θ^(ℓ)_t; x_t)   if i ≡ 0 (mod C^(ℓ)),   unchanged otherwise.

`Levels` wraps an optimizer (nestlearn's or torch's). Between a level's steps its gradients are added into a
per-parameter sum held here, and on the level's step the sum plus this step's gradient is handed to the optimizer;
the parameters of levels that are not due are hidden from the optimizer (grad None), so it neither moves them nor
advances their state (AdamW's step count, Muon's momentum). A level of period None is stepped every step.

A step advances the stream by `tokens` tokens per sequence (the training window, seq_len), so a period must be
a multiple of it: level ℓ is then stepped every C^(ℓ) / tokens optimizer steps.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

__all__ = ["Levels", "LevelGroup"]


@dataclass
class LevelGroup:
    """A level: its parameters, its period C (tokens; None: every step) and the tokens seen since its last step."""

    name: str
    period: int | None
    params: list[nn.Parameter]
    tokens: int = 0
    steps: int = field(default=0)


def _check_period(name: str, period) -> None:
    if period is not None and (isinstance(period, bool) or not isinstance(period, int) or period < 1):
        raise ValueError(
            f"level {name!r}: period={period!r} must be a positive number of tokens, or None to step "
            "the level at every optimizer step"
        )


class Levels:
    """Step each level of parameters at its own period (eq. 71).

    Args:
        optimizer: any torch optimizer over (at least) the parameters of the levels.
        levels: `model.levels()` (nestlearn.model.Level: name, period, params), or a list of (regex, period)
            pairs matched against `named_parameters` by `re.search`; the first match wins, a pattern that matches
            no parameter is an error, and unmatched parameters form the level "base", stepped every step.
        named_parameters: (name, parameter) pairs, needed with patterns.
        periods: {level name: period} overriding the periods of `levels` (an unknown name is an error).

    Every parameter of the optimizer must belong to exactly one level.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, levels, *, named_parameters=None, periods=None):
        self.optimizer = optimizer
        self.levels = self._assign(levels, named_parameters)
        by_name = {lv.name: lv for lv in self.levels}
        for name, period in (periods or {}).items():
            if name not in by_name:
                raise ValueError(f"periods names level {name!r}, which does not exist; levels: {sorted(by_name)}")
            by_name[name].period = period
        for lv in self.levels:
            _check_period(lv.name, lv.period)
        in_levels = [id(p) for lv in self.levels for p in lv.params]
        if len(set(in_levels)) != len(in_levels):
            raise ValueError("a parameter belongs to two levels; each must be in exactly one")
        in_opt = {id(p) for g in optimizer.param_groups for p in g["params"]}
        if set(in_levels) != in_opt:
            raise ValueError(
                f"the levels hold {len(set(in_levels))} parameters and the optimizer {len(in_opt)}: "
                "give the optimizer exactly the parameters of the levels"
            )
        self.grad_sums: dict[int, Tensor] = {}  # id(param) -> gradient summed since its level's last step

    @staticmethod
    def _assign(levels, named_parameters) -> list[LevelGroup]:
        levels = list(levels)
        if all(hasattr(lv, "params") and hasattr(lv, "period") for lv in levels):
            return [LevelGroup(lv.name, lv.period, list(lv.params.values())) for lv in levels]
        if named_parameters is None:
            raise ValueError("levels given as (pattern, period) pairs need named_parameters=model.named_parameters()")
        named = list(named_parameters)
        groups: list[LevelGroup] = []
        taken: set[str] = set()
        for item in levels:
            if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
                raise ValueError(f"a level must be a (regex, period) pair or a model.levels() entry; got {item!r}")
            pattern, period = item
            _check_period(pattern, period)
            hits = [p for n, p in named if n not in taken and re.search(pattern, n)]
            if not hits:
                raise ValueError(
                    f"level pattern {pattern!r} matches no parameter (not already taken by an earlier "
                    f"pattern); parameter names look like {named[0][0]!r}"
                )
            taken |= {n for n, _ in named if n not in taken and re.search(pattern, n)}
            groups.append(LevelGroup(pattern, period, hits))
        rest = [p for n, p in named if n not in taken]
        if rest:
            groups.append(LevelGroup("base", None, rest))
        return groups

    # --- stepping ---

    def due(self, tokens: int) -> list[LevelGroup]:
        """The levels that step after `tokens` more tokens (no state is changed)."""
        out = []
        for lv in self.levels:
            if lv.period is None:
                out.append(lv)
                continue
            if lv.period % tokens:
                raise ValueError(
                    f"level {lv.name!r} has period {lv.period} tokens, but each step advances the "
                    f"stream by {tokens}: use a period that is a multiple of {tokens}, or a window "
                    f"length that divides {lv.period}"
                )
            if lv.tokens + tokens >= lv.period:
                out.append(lv)
        return out

    @torch.no_grad()
    def step(self, tokens: int) -> list[str]:
        """One optimizer step after `tokens` tokens of each sequence; returns the names of the levels stepped."""
        if isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1:
            raise ValueError(f"tokens={tokens!r} must be a positive int: the tokens per sequence this step consumed")
        due = {id(lv) for lv in self.due(tokens)}
        for lv in self.levels:
            stepping = id(lv) in due
            lv.tokens = 0 if stepping else lv.tokens + tokens
            for p in lv.params:
                total = self.grad_sums.pop(id(p), None)
                if p.grad is not None:
                    total = p.grad if total is None else total.add_(p.grad)
                if stepping:
                    p.grad = total
                else:
                    if total is not None:
                        self.grad_sums[id(p)] = total.clone() if total is p.grad else total
                    p.grad = None  # hidden from the optimizer until the level is due
        self.optimizer.step()
        names = []
        for lv in self.levels:
            if id(lv) in due:
                lv.steps += 1
                names.append(lv.name)
        return names

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self):
        return self.optimizer.param_groups

    # --- checkpoints: the wrapped optimizer's state is saved by its own state_dict ---

    def _index(self) -> dict[int, int]:
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        return {id(p): i for i, p in enumerate(params)}

    def levels_state_dict(self) -> dict:
        """What Levels adds to the optimizer's own state: the token counters and the pending gradient sums."""
        index = self._index()
        return {
            "levels": {lv.name: {"period": lv.period, "tokens": lv.tokens, "steps": lv.steps} for lv in self.levels},
            "grad_sums": {index[k]: v.detach().clone() for k, v in self.grad_sums.items()},
        }

    def load_levels_state_dict(self, sd: dict) -> None:
        names = {lv.name for lv in self.levels}
        if set(sd["levels"]) != names:
            raise ValueError(f"checkpoint levels {sorted(sd['levels'])} differ from this model's {sorted(names)}")
        for lv in self.levels:
            saved = sd["levels"][lv.name]
            if saved["period"] != lv.period:
                raise ValueError(
                    f"level {lv.name!r}: the checkpoint has period {saved['period']}, this run "
                    f"{lv.period}; resume with the same periods"
                )
            lv.tokens, lv.steps = saved["tokens"], saved["steps"]
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        self.grad_sums = {id(params[int(i)]): v.to(params[int(i)]) for i, v in sd["grad_sums"].items()}

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), **self.levels_state_dict()}

    def load_state_dict(self, sd: dict) -> None:
        self.optimizer.load_state_dict(sd["optimizer"])
        self.load_levels_state_dict(sd)
