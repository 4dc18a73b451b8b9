"""The paper's optimizers as torch optimizers (paper §4, §7.2), and `Levels`, which steps each group of
parameters at its own period (eq. 71). docs/optimizers.md has the equations, options and measurements."""

from .levels import LevelGroup, Levels
from .m3 import M3
from .momentum import DeepMomentum, DeltaMomentum, PreconditionedMomentum
from .muon import Muon
from .newton_schulz import newton_schulz, polar

__all__ = ["M3", "DeepMomentum", "DeltaMomentum", "LevelGroup", "Levels", "Muon", "PreconditionedMomentum",
           "newton_schulz", "polar", "OPTIMIZERS"]  # fmt: skip

OPTIMIZERS = ("adamw", "muon", "m3", "deep_momentum", "delta_momentum", "preconditioned_momentum")
