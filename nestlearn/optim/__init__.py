"""The paper's optimizers as torch optimizers (paper §4, §7.2), and `Levels`, which steps each group of
parameters at its own period (eq. 71). docs/optimizers.md has the equations, options and measurements."""

import torch

from .levels import LevelGroup, Levels
from .m3 import M3
from .momentum import DeepMomentum, DeltaMomentum, PreconditionedMomentum
from .muon import Muon
from .newton_schulz import newton_schulz, polar

__all__ = [
    "M3",
    "DeepMomentum",
    "DeltaMomentum",
    "LevelGroup",
    "Levels",
    "Muon",
    "PreconditionedMomentum",
    "newton_schulz",
    "polar",
    "OPTIMIZERS",
    "optimizer_class",
]

OPTIMIZERS = ("adamw", "muon", "m3", "deep_momentum", "delta_momentum", "preconditioned_momentum")


def optimizer_class(name: str) -> type[torch.optim.Optimizer]:
    """The class of an optimizer named as on the command line (`--optimizer`)."""
    classes = {
        "adamw": torch.optim.AdamW,
        "muon": Muon,
        "m3": M3,
        "deep_momentum": DeepMomentum,
        "delta_momentum": DeltaMomentum,
        "preconditioned_momentum": PreconditionedMomentum,
    }
    if name not in classes:
        raise ValueError(f"optimizer={name!r} is not known; expected one of {list(OPTIMIZERS)}")
    return classes[name]
