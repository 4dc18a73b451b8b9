"""The Titans neural long-term memory as a token mixer (Titans §3, eqs. 9–18; Nested Learning §8).

    x ─ Linear → q, k, v ─ causal depthwise conv (width 4) ─ SiLU ─ split heads ─ ℓ2-norm q, k
      ─ Linear → η_t = max_lr·σ(·), α_t = σ(·), β_t = σ(·)            per token and head
      ─ scan: the MLP memory M(x) = x + W1 σ(W2 x) written with (k_t, v_t), momentum and retention, read at q_t
      ─ RMSNorm per head ─ ⊙ SiLU(x W_g) (output gate) ─ Linear → y

The memory's initial weights W1, W2 are parameters, meta-learned by the outer loop through every write (eq. 73).

    b batch, t tokens, h heads, d head width, f memory hidden width
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TitansConfig, lr_gate_bias, retention_gate_bias
from .memory import init_state, scan
from .state import MemoryState

__all__ = ["CausalConv", "MemoryOutput", "TitansMixer", "mlp_memory_parameters"]


def mlp_memory_parameters(num_heads: int, dim: int, hidden: int) -> tuple[nn.Parameter, nn.Parameter]:
    """W1 (h, d, f), W2 (h, f, d): a meta-learned initial MLP memory per head (eq. 73), drawn as `init_state`."""
    w = init_state(num_heads, dim, memory="mlp", hidden=hidden).weights
    return nn.Parameter(w["W1"]), nn.Parameter(w["W2"])


class MemoryOutput(nn.Module):
    """Titans' output: RMSNorm per head, a SiLU gate computed from the layer's input, the output projection."""

    def __init__(self, dim: int, head_dim: int):
        super().__init__()
        self.norm = nn.RMSNorm(head_dim, eps=1e-6)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, o: Tensor, x: Tensor) -> Tensor:
        """o: (b, h, t, d) memory reads; x: (b, t, dim) the layer's input. Returns (b, t, dim)."""
        b, h, t, d = o.shape
        o = self.norm(o).transpose(1, 2).reshape(b, t, h * d)  # (b, t, h·d)
        return self.proj(o * F.silu(self.gate(x)))


class CausalConv(nn.Module):
    """Depthwise causal convolution over time; its state is the last width − 1 inputs."""

    def __init__(self, channels: int, width: int):
        super().__init__()
        self.width = width
        self.weight = nn.Parameter(torch.zeros(channels, width))
        with torch.no_grad():
            self.weight[:, -1] = 1.0  # starts as the identity: the mixer works from the first step
            self.weight.add_(torch.randn(channels, width) * 0.02)

    def init_state(self, batch_size: int, device=None, dtype=None) -> Tensor:
        return torch.zeros(batch_size, self.width - 1, self.weight.shape[0], device=device, dtype=dtype)

    def forward(self, x: Tensor, cache: Tensor) -> tuple[Tensor, Tensor]:
        t = x.shape[1]
        ext = torch.cat([cache, x], dim=1)  # (b, width − 1 + t, c)
        windows = ext.unfold(1, self.width, 1)  # (b, t, c, width)
        y = (windows * self.weight).sum(-1)  # (b, t, c)
        return y, ext[:, t:]


class TitansMixer(nn.Module):
    """State: {"conv": (b, width − 1, 3·dim), "memory": MemoryState}."""

    def __init__(self, dim: int, num_heads: int, config: TitansConfig):
        super().__init__()
        self.config, self.num_heads, self.head_dim = config, num_heads, dim // num_heads
        d, f = self.head_dim, config.hidden_mult * self.head_dim
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.conv = CausalConv(3 * dim, config.conv_width)
        self.num_gates = 3 if config.momentum else 2
        self.gates = nn.Linear(dim, self.num_gates * num_heads)  # η, α (and β) per head
        with torch.no_grad():
            self.gates.weight.mul_(0.1)
            bias = self.gates.bias.view(self.num_gates, num_heads)
            bias[0].fill_(lr_gate_bias(config))  # η = lr_init, max_lr / 2 by default
            bias[1].fill_(retention_gate_bias(config))  # α ≈ 0.98 by default: retain most of the memory
            if config.momentum:
                bias[2].fill_(0.0)  # β ≈ 0.5
        self.W1, self.W2 = mlp_memory_parameters(num_heads, d, f)  # M_0, one per head
        self.out = MemoryOutput(dim, d)
        self.compile_chunks = False  # torch.compile each chunk's step (LanguageModel.compile_chunks)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        # the initial weights are the parameters themselves, so the LM loss reaches them through every write
        return {
            "conv": self.conv.init_state(batch_size, device, dtype),
            "memory": MemoryState({"W1": self.W1, "W2": self.W2}),
        }

    def origin(self) -> dict[str, Tensor] | None:
        """What retention pulls the memory towards: M_0 with `retain_to="init"`, zero (None) with "zero"."""
        return {"W1": self.W1, "W2": self.W2} if self.config.retain_to == "init" else None

    def forward(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        b, t, dim = x.shape
        h, d, cfg = self.num_heads, self.head_dim, self.config
        u, conv = self.conv(self.qkv(x), state["conv"])  # (b, t, 3·dim)
        q, k, v = F.silu(u).view(b, t, 3, h, d).permute(2, 0, 3, 1, 4)  # (b, h, t, d) each
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        g = self.gates(x).view(b, t, self.num_gates, h).permute(2, 0, 3, 1)  # (gates, b, h, t)
        lr = cfg.max_lr * torch.sigmoid(g[0])
        retention, momentum = torch.sigmoid(g[1]), torch.sigmoid(g[2]) if cfg.momentum else None
        o, memory = scan(
            q,
            k,
            v,
            lr,
            retention,
            momentum,
            memory="mlp",
            objective="l2",
            rule=cfg.rule,
            chunk_size=cfg.chunk_size,
            read=cfg.read,
            state=state["memory"],
            activation=cfg.activation,
            check_values=False,
            checkpoint=cfg.checkpoint,
            max_grad_norm=cfg.max_grad_norm,
            compile=self.compile_chunks,
            origin=self.origin(),
        )
        return self.out(o, x), {"conv": conv, "memory": memory}
