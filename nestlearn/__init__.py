"""nestlearn: Nested Learning (Behrouz et al., NeurIPS 2025) in PyTorch.

    from nestlearn import presets, build, load
    model = build(presets.transformer("tiny"))
    logits, state = model(tokens)                  # state: per sequence
    logits, state = model(more_tokens, state)      # continue where the last call stopped

The associative memory (`nestlearn.memory.scan`) is the primitive the models are built on.
"""

from . import memory, presets
from .config import AttentionConfig, CMSConfig, ModelConfig, SelfModConfig, TitansConfig
from .memory import MemoryState, init_state, scan
from .model import LanguageModel, ModelState, build, load

__all__ = [
    "memory",
    "presets",
    "build",
    "load",
    "LanguageModel",
    "ModelState",
    "ModelConfig",
    "AttentionConfig",
    "TitansConfig",
    "SelfModConfig",
    "CMSConfig",
    "MemoryState",
    "init_state",
    "scan",
]
__version__ = "0.1.0"
