"""nestlearn: Nested Learning (Behrouz et al., NeurIPS 2025) in PyTorch.

The associative memory (`nestlearn.memory`) is the primitive everything else is built on.
"""

from . import memory
from .memory import MemoryState, init_state, scan

__all__ = ["memory", "MemoryState", "init_state", "scan"]
__version__ = "0.1.0"
