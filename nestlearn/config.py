"""Configs of the language model and its parts: dataclasses whose defaults are the paper's, checked on creation.

Every model (Transformer++, Titans, Hope, Hope-Attention) is a `ModelConfig` of the one `LanguageModel` class; the
presets in `nestlearn.presets` are functions returning these. Symbols: docs/notation.md; choices: docs/deviations.md.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .ops.common import ACTIVATIONS

__all__ = [
    "AttentionConfig",
    "TitansConfig",
    "SelfModConfig",
    "CMSConfig",
    "LoRAConfig",
    "ModelConfig",
    "MIXERS",
    "lr_gate_bias",
    "retention_gate_bias",
]

MIXERS = ("attention", "titans", "sm_titans")


def _fail(cls: str, name: str, value: Any, rule: str) -> None:
    raise ValueError(f"{cls}.{name}={value!r}: {rule}")


def _check_positive_ints(config: Any, names: tuple[str, ...]) -> None:
    for name in names:
        v = getattr(config, name)
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            _fail(type(config).__name__, name, v, "must be a positive int")


RETAIN_TO = ("init", "zero")


def _check_retain_to(config: Any) -> None:
    if config.retain_to not in RETAIN_TO:
        _fail(
            type(config).__name__,
            "retain_to",
            config.retain_to,
            "expected 'init' (retention pulls the memory back to its meta-learned initial state) or 'zero' "
            "(the paper's weight decay, under which an MLP memory dies within ~1,000 tokens)",
        )


def _check_memory_options(config: Any) -> None:
    """The options every memory mixer shares: activation, rule, read mode, max_lr, retain_to."""
    cls = type(config).__name__
    _check_retain_to(config)
    _check_retention_init(config)
    if config.activation not in ACTIVATIONS:
        _fail(cls, "activation", config.activation, f"expected one of {sorted(ACTIVATIONS)}")
    if config.rule not in ("gd", "dgd"):
        _fail(cls, "rule", config.rule, "expected 'gd' or 'dgd'")
    if config.read not in ("dual", "snapshot"):
        _fail(cls, "read", config.read, "expected 'dual' or 'snapshot'")
    if not 0 < config.max_lr:
        _fail(cls, "max_lr", config.max_lr, "must be positive")
    if config.lr_init is not None and not 0 < config.lr_init < config.max_lr:
        _fail(
            cls,
            "lr_init",
            config.lr_init,
            f"must lie strictly between 0 and max_lr={config.max_lr}, or be None (max_lr / 2)",
        )
    _check_clip(config)


def lr_gate_bias(config: Any) -> float:
    """The bias that makes η_t = max_lr · sigmoid(·) start at `lr_init` (logit(lr_init / max_lr)); 0 for None."""
    if config.lr_init is None:
        return 0.0
    p = config.lr_init / config.max_lr
    return math.log(p / (1 - p))


def retention_gate_bias(config: Any) -> float:
    """The bias that makes α_t = sigmoid(·) start at `retention_init` (its logit); 4 (α ≈ 0.982) for None."""
    if config.retention_init is None:
        return 4.0
    return math.log(config.retention_init / (1 - config.retention_init))


def _check_retention_init(config: Any) -> None:
    r = config.retention_init
    if r is not None and not 0 < r < 1:
        _fail(
            type(config).__name__,
            "retention_init",
            r,
            "must lie strictly between 0 and 1 (α_t at initialisation; 1 − α is the share forgotten per token), "
            "or be None (0.982)",
        )


def _check_clip(config: Any) -> None:
    if config.max_grad_norm is not None and not config.max_grad_norm > 0:
        _fail(type(config).__name__, "max_grad_norm", config.max_grad_norm, "must be positive, or None for no clip")


@dataclass
class AttentionConfig:
    """Causal softmax attention with RoPE (Transformer++)."""

    window: int | None = None  # None: full causal attention; an int: each token sees the last `window` tokens
    rope_base: float = 10000.0
    # grouped-query attention (Llama 2/3, SmolLM2): heads of keys and values, each shared by num_heads / kv_heads
    # query heads; None: one per query head (multi-head attention)
    kv_heads: int | None = None

    def __post_init__(self) -> None:
        if self.window is not None and (isinstance(self.window, bool) or self.window < 1):
            _fail("AttentionConfig", "window", self.window, "must be None (full attention) or a positive int")
        kv = self.kv_heads
        if kv is not None and (isinstance(kv, bool) or not isinstance(kv, int) or kv < 1):
            _fail("AttentionConfig", "kv_heads", kv, "must be a positive int, or None (one per query head)")
        if self.rope_base <= 0:
            _fail("AttentionConfig", "rope_base", self.rope_base, "must be positive")


@dataclass
class TitansConfig:
    """The Titans neural long-term memory as a token mixer (Titans §3; eqs. 9–18)."""

    chunk_size: int = 16  # Titans App. E
    hidden_mult: int = 4  # memory MLP hidden width = hidden_mult × head_dim (Titans §3.3: expansion 4)
    activation: str = "gelu"
    momentum: bool = True
    rule: str = "gd"  # Titans writes with GD; "dgd" is the Nested Learning rule (eq. 88)
    read: str = "dual"
    conv_width: int = 4  # causal depthwise convolution after the q, k, v projections (Titans §3.3)
    max_lr: float = 0.1  # η_t = max_lr · sigmoid(x W_η)
    # η_t at initialisation; None: max_lr / 2. With rule="dgd" and max_lr up to 2 the transition's eigenvalue along
    # k_t, α_t − η_t, can go negative (state tracking, docs/deviations.md); then start η small, e.g. 0.05
    lr_init: float | None = None
    # clip each token's inner gradient to this norm before it is written (titans-pytorch's max_grad_norm). Without
    # it the MLP memories diverged at `tiny`; None is the paper's unclipped update (docs/deviations.md §2)
    max_grad_norm: float | None = 1.0
    # what retention α_t pulls the memory towards: "init", its meta-learned initial state M_0 (M_t = M_0 + α_t (M_{t−1}
    # − M_0) − η_t ∇ℓ), or "zero", the paper's weight decay, under which every MLP memory reaches the all-zero state
    # (where it can never learn again) within ~1,000 tokens of a stream (docs/deviations.md)
    retain_to: str = "init"
    # α_t at initialisation (per token: the memory keeps α of what it holds); None: sigmoid(4) ≈ 0.982, a time
    # constant of 1 / (1 − α) ≈ 55 tokens
    retention_init: float | None = None
    checkpoint: bool = False  # keep memories every ⌈√n⌉ chunks, recompute in backward: less memory (docs/benchmarks.md)

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("chunk_size", "hidden_mult", "conv_width"))
        _check_memory_options(self)


@dataclass
class SelfModConfig:
    """Self-modifying Titans (paper §8, eqs. 83–93): memories for k, v, η, α and the main memory, each writing its
    own target v̂_□ = M_□(v_t) with DGD. Open points of the paper are flags here; docs/deviations.md."""

    chunk_size: int = 16  # C for M_k, M_v, M_η, M_α (Titans App. E: 16)
    memory_chunk_size: int = 16  # C for M_memory; a multiple of chunk_size (ambiguity #5)
    hidden_mult: int = 4  # hidden width of every memory MLP = hidden_mult × head_dim
    activation: str = "gelu"
    rule: str = "dgd"  # eq. 88; "gd" is the Table 6 ablation "w/o DGD"
    momentum: bool = True  # Table 6 ablates "w/o Momentum", so Hope has one (ambiguity #3)
    adaptive_q: bool = False  # "q_t = x_t W_q, the only non-adaptive projection" (ambiguity #4)
    # ℓ2-normalise the generated values v_t, as q and k are: the targets v̂ = M_□(v_t) otherwise feed back into
    # the memories that generate v_t and can diverge (docs/deviations.md)
    normalize_values: bool = True
    read: str = "dual"  # how the main memory is read inside a chunk
    conv_width: int = 4  # "local convolutions with window size of 4"
    max_lr: float = 0.1  # η_t = max_lr · sigmoid(readout of M_η(x_t)) (ambiguity #2)
    # η_t at initialisation; None: max_lr / 2. max_lr up to 2 lets DGD's transition α_t − η_t along k_t go negative
    # (state tracking: parity, docs/deviations.md); then start η small, e.g. 0.05
    lr_init: float | None = None
    # clip each token's inner gradient to this norm before it is written (titans-pytorch's max_grad_norm). Without
    # it the MLP memories diverged at `tiny`; None is the paper's unclipped update (docs/deviations.md §2)
    max_grad_norm: float | None = 1.0
    # what retention α_t pulls the memory towards: "init", its meta-learned initial state M_0 (M_t = M_0 + α_t (M_{t−1}
    # − M_0) − η_t ∇ℓ), or "zero", the paper's weight decay, under which every MLP memory reaches the all-zero state
    # (where it can never learn again) within ~1,000 tokens of a stream (docs/deviations.md)
    retain_to: str = "init"
    # α_t at initialisation (per token: the memory keeps α of what it holds); None: sigmoid(4) ≈ 0.982, a time
    # constant of 1 / (1 − α) ≈ 55 tokens
    retention_init: float | None = None
    checkpoint: bool = False  # keep memories every ⌈√n⌉ chunks, recompute in backward: less memory (docs/benchmarks.md)

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("chunk_size", "memory_chunk_size", "hidden_mult", "conv_width"))
        _check_memory_options(self)
        if self.memory_chunk_size % self.chunk_size:
            _fail(
                "SelfModConfig",
                "memory_chunk_size",
                self.memory_chunk_size,
                f"must be a multiple of chunk_size={self.chunk_size}",
            )


@dataclass
class CMSConfig:
    """Continuum Memory System: a chain of MLP levels, level ℓ updated every update_periods[ℓ] tokens (§7).

    A level whose period is at least `outer_from` is an outer level: ordinary parameters that carry their period
    for the optimizer (eq. 71); a shorter period makes an in-context level. A Transformer's MLP is one outer level.
    `outer_from` is fixed when the config is made (the model's seq_len then), so that training or evaluating at
    another length never changes the architecture: an in-context level whose period is longer than the window
    reads its initial weights throughout a window, and what it writes is read only when the state is carried
    across windows (`--carry-state`, streaming evaluation, `memorize`).
    """

    # C^(ℓ) in tokens, fastest first. None: an ordinary MLP stepped with every optimizer step, like the rest of the
    # model (the Transformer's MLP, "frequency 1 in pre-training", paper Fig. 5). The default is one such level.
    update_periods: tuple[int | None, ...] = (None,)
    # periods ≥ this are outer levels, shorter ones in-context; None: ModelConfig.seq_len when the config is made
    outer_from: int | None = None
    hidden_mult: float = 8 / 3  # SwiGLU hidden width = hidden_mult × dim, rounded up to a multiple of 32
    hidden_size: int | None = None  # the SwiGLU hidden width exactly (a pretrained model's); None: from hidden_mult
    # in-context levels (period < seq_len): an MLP memory per head, written every C^(ℓ) tokens (docs/deviations.md)
    # "sequential" chain (eq. 73, Hope's eq. 97), "independent" weighted sum (eq. 74), or "nested" (eq. 72): the
    # sequential chain in which a level's fast weights go back to their meta-learned initial state every time the
    # next slower level updates
    variant: str = "sequential"
    memory_hidden_mult: int = 4  # hidden width of an in-context level's MLP = memory_hidden_mult × head_dim
    # η_t of an in-context level = max_lr · sigmoid(h_t W_η). 0.1 (the memories' bound) let the sum of a 16-token
    # chunk's steps outgrow the MLP's curvature and diverge in training (docs/deviations.md)
    max_lr: float = 0.02
    # clip each token's inner gradient to this norm before it is written (titans-pytorch's max_grad_norm). Without
    # it the MLP memories diverged at `tiny`; None is the paper's unclipped update (docs/deviations.md §2)
    max_grad_norm: float | None = 1.0
    retain_to: str = "init"  # in-context levels: retention towards their initial state, or "zero" (TitansConfig)
    retention_init: float | None = None  # in-context levels: α_t at initialisation; None: ≈ 0.982 (TitansConfig)
    checkpoint: bool = False  # the same for in-context levels: keep every ⌈√n⌉-th chunk's weights, recompute the rest
    # What an in-context level learns from. "local": a per-head MLP memory written with its own objective
    # ½‖M(k_t) − v_t‖² and retention (the fields above; docs/deviations.md). "task": eq. 71 as written, a full-width
    # SwiGLU MLP (the outer levels' form) whose weights θ are per-sequence fast state and take one step every C^(ℓ)
    # tokens on the model's next-token loss over those tokens, θ ← θ − task_lr Σ_t ∇_θ ℓ_NTP(θ; x_t), no retention
    signal: str = "local"
    task_lr: float = 1e-3  # "task": η^(ℓ), on the gradient summed over the level's period
    # "task": η_t^(ℓ) = task_lr (constant) or task_lr · 2σ(w·e_t + b), a learned rate per token from its embedding,
    # one factor shared by every level so that one backward per chunk still serves all ("data"; needs meta_grad
    # "full": the rate's parameters are learned only through the inner gradients, which first order drops)
    task_rate: str = "constant"
    # "task": the outer gradient through the inner steps (eq. 73): "first_order" treats each inner gradient as a
    # constant (θ_0 gets the gradient of the identity path), "full" differentiates through it (second order)
    meta_grad: str = "first_order"
    # "task": how many of the last blocks learn in context (None: all); the others read their θ_0 unchanged, as
    # TTT-E2E updates only the last quarter, to trade cost for what is learned
    task_blocks: int | None = None

    def __post_init__(self) -> None:
        self.update_periods = tuple(self.update_periods)
        periods = [p for p in self.update_periods if p is not None]
        if not self.update_periods:
            _fail("CMSConfig", "update_periods", self.update_periods, "needs at least one level")
        if any(isinstance(p, bool) or not isinstance(p, int) or p < 1 for p in periods):
            _fail("CMSConfig", "update_periods", self.update_periods, "every period must be a positive int or None")
        if periods != sorted(periods):
            _fail("CMSConfig", "update_periods", self.update_periods, "list the levels fastest first (ascending)")
        if self.hidden_mult <= 0:
            _fail("CMSConfig", "hidden_mult", self.hidden_mult, "must be positive")
        hs = self.hidden_size
        if hs is not None and (isinstance(hs, bool) or not isinstance(hs, int) or hs < 1):
            _fail("CMSConfig", "hidden_size", hs, "must be a positive int, or None (hidden_mult × dim)")
        o = self.outer_from
        if o is not None and (isinstance(o, bool) or not isinstance(o, int) or o < 1):
            _fail(
                "CMSConfig",
                "outer_from",
                o,
                "must be a positive int (periods at least this are outer levels), or None (the seq_len)",
            )
        _check_clip(self)
        _check_retain_to(self)
        _check_retention_init(self)
        if self.signal not in ("local", "task"):
            _fail("CMSConfig", "signal", self.signal, "expected 'local' (the level's own objective) or 'task' (eq. 71)")
        if not (isinstance(self.task_lr, (int, float)) and math.isfinite(self.task_lr) and self.task_lr >= 0):
            _fail("CMSConfig", "task_lr", self.task_lr, "must be a finite number >= 0 (0: the levels read θ_0 only)")
        if self.meta_grad not in ("first_order", "full"):
            _fail("CMSConfig", "meta_grad", self.meta_grad, "expected 'first_order' or 'full'")
        if self.task_rate not in ("constant", "data"):
            _fail("CMSConfig", "task_rate", self.task_rate, "expected 'constant' or 'data' (learned per token)")
        if self.signal == "task" and self.task_rate == "data" and self.meta_grad != "full":
            _fail(
                "CMSConfig",
                "task_rate",
                self.task_rate,
                "a per-token rate is learned only through the inner gradients, which meta_grad='first_order' treats "
                "as constants (it would never move): use meta_grad='full', or task_rate='constant'",
            )
        tb = self.task_blocks
        if tb is not None and (isinstance(tb, bool) or not isinstance(tb, int) or tb < 0):
            _fail("CMSConfig", "task_blocks", tb, "must be an int >= 0 (the last blocks that learn), or None (all)")
        if self.variant not in ("sequential", "independent", "nested"):
            _fail(
                "CMSConfig",
                "variant",
                self.variant,
                "expected 'sequential' (eq. 73), 'independent' (eq. 74) or 'nested' (eq. 72)",
            )
        if self.variant == "nested":
            for fast, slow in itertools.pairwise(periods):
                if slow % fast:
                    _fail(
                        "CMSConfig",
                        "update_periods",
                        self.update_periods,
                        f"nested levels reset at the next slower level's updates, so each period must divide the "
                        f"next one ({fast} does not divide {slow})",
                    )


LORA_TARGETS = ("qkv", "proj", "up", "down")


@dataclass
class LoRAConfig:
    """Low-rank adapters (Hu et al. 2021) on the attention and MLP projections: W x + (alpha / rank) B A x, B = 0 at
    first, so that the model starts equal to its base. Targets name the projections: `qkv` and `proj` of attention,
    `up` (gate and up, fused) and `down` of every SwiGLU MLP (outer CMS levels)."""

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        _check_positive_ints(self, ("rank",))
        if not self.alpha > 0:
            _fail("LoRAConfig", "alpha", self.alpha, "must be positive")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            _fail("LoRAConfig", "targets", self.targets, f"expected a non-empty subset of {list(LORA_TARGETS)}")


ADAPTERS = ("titans", "sm_titans")


@dataclass
class ModelConfig:
    """One language model: embedding → blocks (norm → mixer → residual; norm → CMS → residual) → norm → head."""

    vocab_size: int = 256
    dim: int = 64
    num_layers: int = 2
    num_heads: int = 4
    seq_len: int = 512  # training context; fixes CMSConfig.outer_from (periods ≥ it are outer levels) when None
    mixer: str = "attention"
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    titans: TitansConfig = field(default_factory=TitansConfig)
    sm_titans: SelfModConfig = field(default_factory=SelfModConfig)
    cms: CMSConfig = field(default_factory=CMSConfig)
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    name: str = "custom"
    # a memory pathway beside the mixer (a memory adapter on a pretrained model): "titans" or "sm_titans", configured
    # by `titans` / `sm_titans`, its output projection zero at first so the block starts as its base; None: none
    adapter: str | None = None
    adapter_blocks: int | None = None  # how many of the last blocks carry the adapter (None: all)
    lora: LoRAConfig | None = None  # low-rank adapters on the projections; None: none

    def __post_init__(self) -> None:
        _check_positive_ints(self, ("vocab_size", "dim", "num_layers", "num_heads", "seq_len"))
        if self.dim % self.num_heads:
            _fail("ModelConfig", "dim", self.dim, f"must be divisible by num_heads={self.num_heads}")
        if (self.dim // self.num_heads) % 2:
            _fail("ModelConfig", "dim", self.dim, "dim / num_heads must be even for RoPE; change dim or num_heads")
        if self.mixer not in MIXERS:
            _fail("ModelConfig", "mixer", self.mixer, f"expected one of {list(MIXERS)}")
        subs = (
            ("attention", AttentionConfig),
            ("titans", TitansConfig),
            ("sm_titans", SelfModConfig),
            ("cms", CMSConfig),
        )
        if isinstance(self.lora, dict):
            self.lora = LoRAConfig(**self.lora)
        elif self.lora is not None and not isinstance(self.lora, LoRAConfig):
            _fail("ModelConfig", "lora", self.lora, "must be a LoRAConfig or None")
        if self.adapter is not None and self.adapter not in ADAPTERS:
            _fail("ModelConfig", "adapter", self.adapter, f"expected one of {list(ADAPTERS)}, or None")
        ab = self.adapter_blocks
        if ab is not None and (isinstance(ab, bool) or not isinstance(ab, int) or not 0 < ab <= self.num_layers):
            _fail("ModelConfig", "adapter_blocks", ab, f"must be an int in [1, num_layers={self.num_layers}], or None")
        for name, cls in subs:
            v = getattr(self, name)
            if isinstance(v, dict):
                setattr(self, name, cls(**v))
            elif not isinstance(v, cls):
                _fail("ModelConfig", name, v, f"must be a {cls.__name__}")
        kv = self.attention.kv_heads
        if kv is not None and self.num_heads % kv:
            _fail("ModelConfig", "num_heads", self.num_heads, f"must be a multiple of attention.kv_heads={kv}")
        if self.cms.outer_from is None:  # fixed now: a later change of seq_len leaves the architecture alone
            self.cms = dataclasses.replace(self.cms, outer_from=self.seq_len)

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown ModelConfig fields {unknown}; known fields: {sorted(known)}")
        d = dict(d)
        for name in ("titans", "sm_titans", "cms"):
            # a config saved before `retain_to` existed was trained with retention towards zero: keep it so
            if isinstance(d.get(name), dict) and "retain_to" not in d[name]:
                d[name] = {**d[name], "retain_to": "zero"}
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
