"""One language model for every architecture of the paper: the file to read first.

    tokens ─ embedding ─ N × [ x + mixer(RMSNorm(x)) ; x + CMS(RMSNorm(x)) ] ─ RMSNorm ─ head (tied) ─ logits

The mixer is `attention` (Transformer++, Hope-Attention), `titans` (the Titans memory) or `sm_titans`
(self-modifying Titans, Hope's); the CMS is a chain of MLP levels (paper §7). Models differ only in their
`ModelConfig`, so comparisons are fair by construction.
State is explicit and per sequence: `logits, state = model(tokens, state)`; nothing is kept on a module between
calls, so sequences never share a memory (docs/deviations.md).

    b batch, t tokens, V vocabulary
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import hf
from .attention import Attention
from .cms import CMS, InContextLevel, SwiGLU
from .config import ModelConfig
from .lora import add_lora
from .sm_titans import SelfModifyingTitans
from .state import tree_map
from .task_cms import task_forward, task_levels
from .titans import TitansMixer

__all__ = ["LanguageModel", "ModelState", "Level", "build", "load", "tree_map", "sample_next"]

CONFIG_FILE, WEIGHTS_FILE = "config.json", "model.safetensors"
MEMORY_MODULES = (SelfModifyingTitans, TitansMixer, InContextLevel)  # what `compile_chunks` switches


@dataclass
class ModelState:
    """Per-sequence state of every layer: {"mixer": ..., "cms": ...} per block (KV cache, conv cache, memories).

    `task`, for a model with task-loss CMS levels only: the stream position, and the tokens of the chunk in progress
    with every layer's state at its start (`chunk`, `start`), from which the chunk is computed again, whole, when
    the rest of it arrives in a later call (its inner step needs the gradient through all of it)."""

    layers: list[dict]
    task: dict | None = None

    def detach(self) -> ModelState:
        """Cut the autograd graph between segments (truncated backprop through time)."""
        return ModelState(tree_map(Tensor.detach, self.layers), tree_map(Tensor.detach, self.task))

    def to(self, *args, **kwargs) -> ModelState:
        move = lambda x: x.to(*args, **kwargs)  # noqa: E731
        return ModelState(tree_map(move, self.layers), tree_map(move, self.task))


@dataclass
class Level:
    """A group of parameters that the outer optimizer steps together, at one update period."""

    name: str
    period: int | None  # tokens between two updates; None: every optimizer step
    params: dict[str, nn.Parameter]


class Block(nn.Module):
    """x + mixer(RMSNorm(x)) [+ adapter(RMSNorm(x))]; then x + CMS(RMSNorm(x)).

    The adapter, when the config has one for this block, is a memory pathway (Titans or self-modifying Titans) that
    reads what the mixer reads and adds to its output, as Titans' memory-as-a-gate variant sums its branches; its
    output projection starts at zero, so a pretrained block starts unchanged (`LanguageModel.__init__`)."""

    def __init__(self, config: ModelConfig, index: int = 0):
        super().__init__()
        self.norm1 = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.mixer = _mixer(config.mixer, config)
        self.adapter = None
        if config.adapter is not None and index >= config.num_layers - (config.adapter_blocks or config.num_layers):
            self.adapter = _mixer(config.adapter, config)
        self.norm2 = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.cms = CMS(config.dim, config.num_heads, config.seq_len, config.cms)

    def init_state(self, batch_size: int, device=None, dtype=None) -> dict:
        state = {"mixer": self.mixer.init_state(batch_size, device, dtype), "cms": self.cms.init_state(batch_size)}
        if self.adapter is not None:
            state["adapter"] = self.adapter.init_state(batch_size, device, dtype)
        return state

    def forward(self, x: Tensor, state: dict) -> tuple[Tensor, dict]:
        n = self.norm1(x)
        h, mixer_state = self.mixer(n, state["mixer"])
        new = {"mixer": mixer_state}
        if self.adapter is not None:
            a, new["adapter"] = self.adapter(n, state["adapter"])
            h = h + a
        x = x + h
        h, new["cms"] = self.cms(self.norm2(x), state["cms"])
        return x + h, new


def _mixer(kind: str, config: ModelConfig) -> nn.Module:
    if kind == "attention":
        return Attention(config.dim, config.num_heads, config.attention)
    if kind == "titans":
        return TitansMixer(config.dim, config.num_heads, config.titans)
    return SelfModifyingTitans(config.dim, config.num_heads, config.sm_titans)


class LanguageModel(nn.Module):
    """A causal language model built from a `ModelConfig`; see `nestlearn.presets` for the paper's models."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.dim)
        self.blocks = nn.ModuleList(Block(config, i) for i in range(config.num_layers))
        self.norm = nn.RMSNorm(config.dim, eps=config.norm_eps)
        self.head = None if config.tie_embeddings else nn.Linear(config.dim, config.vocab_size, bias=False)
        for name, p in self.named_parameters():
            # Linear and embedding weights: N(0, 0.02); memories, convs, gates and read-outs keep their own init
            if p.dim() == 2 and not any(s in name for s in (".conv.", ".gates.", "readout")):
                nn.init.normal_(p, std=0.02)
        for blk in self.blocks:
            if blk.adapter is not None:  # the adapter adds nothing at first: the block is its base's
                nn.init.zeros_(blk.adapter.out.proj.weight)
        self.task_levels = task_levels(self.blocks, config)
        # η_t's per-token factor of task-loss levels (CMSConfig.task_rate="data"): 2σ(0) = 1 at first, task_lr itself
        self.task_rate = None
        if self.task_levels and config.cms.task_rate == "data":
            self.task_rate = nn.Linear(config.dim, 1)
            nn.init.zeros_(self.task_rate.weight)
            nn.init.zeros_(self.task_rate.bias)
        if config.lora is not None:
            add_lora(self, config.lora)

    # --- state ---

    def init_state(self, batch_size: int) -> ModelState:
        """A fresh state for `batch_size` sequences. Memories start from their meta-learned initial values."""
        p = self.embed.weight
        layers = [blk.init_state(batch_size, p.device, p.dtype) for blk in self.blocks]
        task = {"position": 0, "chunk": None, "start": None, "learn": None}  # task_forward's chunk in progress
        return ModelState(layers, task if self.task_levels else None)

    # --- forward ---

    def forward(
        self,
        tokens: Tensor,
        state: ModelState | None = None,
        *,
        check_tokens: bool = True,
        learn: Tensor | None = None,
    ) -> tuple[Tensor, ModelState]:
        """tokens: int64 (b, t). Returns logits (b, t, V) and the state after the last token.

        check_tokens: check that every token is in [0, vocab_size), one host-device synchronisation per call; off
        for tokens known to be valid (`generate` feeds back its own samples), so that a GPU never waits on it.
        learn: bool (b, t), for the in-context task-loss levels: which tokens' next-token predictions drive their
        steps (None: every one; False for padding, which is not text to learn from)."""
        if not isinstance(tokens, Tensor) or tokens.dim() != 2 or tokens.dtype not in (torch.int64, torch.int32):
            got = f"{tuple(tokens.shape)} {tokens.dtype}" if isinstance(tokens, Tensor) else type(tokens).__name__
            raise ValueError(f"tokens must be an int64 tensor of shape (batch, time); got {got}")
        checkable = check_tokens and tokens.numel() and tokens.device.type != "meta"  # meta tensors have no values
        if checkable and ((tokens < 0) | (tokens >= self.config.vocab_size)).any():
            raise ValueError(
                f"tokens must lie in [0, vocab_size={self.config.vocab_size}); got [{tokens.min()}, {tokens.max()}]"
            )
        if state is None:
            state = self.init_state(tokens.shape[0])
        elif not isinstance(state, ModelState) or len(state.layers) != len(self.blocks):
            raise ValueError("state must be the ModelState returned by this model (or model.init_state)")
        if learn is not None and (not self.task_levels or learn.shape != tokens.shape or learn.dtype != torch.bool):
            raise ValueError(
                f"learn masks the in-context task-loss levels' next-token loss: a bool tensor shaped like tokens "
                f"{tuple(tokens.shape)}, for a model with learning task-loss levels; got {learn.dtype} "
                f"{tuple(learn.shape)} for a model with {len(self.task_levels)} such levels"
            )
        if self.task_levels:  # eq. 71 in context: chunk by chunk, each level stepping on the task loss
            logits, layers, task = task_forward(self, tokens, state.layers, state.task, learn)
            return logits, ModelState(layers, task)
        logits, layers = self.forward_blocks(tokens, state.layers)
        return logits, ModelState(layers)

    def forward_blocks(
        self, tokens: Tensor, layers: list[dict], *, first: int = 0, hidden: Tensor | None = None
    ) -> tuple[Tensor, list[dict]]:
        """The forward pass proper: logits (b, t, V) and every block's new state, task-loss levels read, not written.
        With `first` > 0, blocks before it are skipped (their states kept) and `hidden` (b, t, dim) is their output."""
        x = self.embed(tokens) if hidden is None else hidden  # (b, t, dim)
        x, new = self.run_blocks(x, layers, first, len(self.blocks))
        x = self.norm(x)
        return (x @ self.embed.weight.T if self.head is None else self.head(x)), new  # (b, t, V)

    def run_blocks(self, x: Tensor, layers: list[dict], lo: int, hi: int) -> tuple[Tensor, list[dict]]:
        """Blocks lo..hi−1 on x (b, t, dim); the returned layers are `layers` with those blocks' states replaced."""
        new = list(layers)
        for i in range(lo, hi):
            x, new[i] = self.blocks[i](x, layers[i])
        return x, new

    def loss(self, tokens: Tensor, state: ModelState | None = None) -> tuple[Tensor, ModelState]:
        """Mean next-token cross-entropy of tokens[:, 1:] given tokens[:, :-1]."""
        logits, state = self(tokens[:, :-1], state)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1)), state

    @torch.no_grad()
    def generate(
        self,
        prompt: Tensor,
        max_new_tokens: int,
        temperature: float = 0.0,
        top_k: int | None = None,
        state: ModelState | None = None,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Continue `prompt` (b, t) or (t,) by `max_new_tokens` tokens, one at a time with the state carried.

        temperature 0 is greedy decoding. Returns the prompt and the new tokens, (b, t + max_new_tokens).
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens={max_new_tokens} must be >= 0")
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        squeeze = prompt.dim() == 1
        tokens = prompt[None] if squeeze else prompt
        if tokens.shape[1] == 0:
            raise ValueError("prompt is empty: give at least one token to condition on")
        out = [tokens]
        logits, state = self(tokens, state)
        for i in range(max_new_tokens):
            nxt = sample_next(logits, temperature, top_k, generator)
            out.append(nxt)
            if i + 1 < max_new_tokens:
                logits, state = self(nxt, state, check_tokens=False)  # sampled from the vocabulary
        result = torch.cat(out, dim=1)
        return result[0] if squeeze else result

    # --- levels ---

    def levels(self) -> list[Level]:
        """Every parameter in exactly one group, with its update period (paper §3.2, eq. 71): the outer CMS levels of
        each block, and `base` for everything stepped every optimizer step (embeddings, projections, the
        meta-learned initial states of in-context memories and levels, and CMS levels of period None)."""
        groups: dict[str, Level] = {}
        for name, p in self.named_parameters():
            parts = name.split(".")
            level = self.blocks[int(parts[1])].cms.levels[int(parts[4])] if parts[2:4] == ["cms", "levels"] else None
            if isinstance(level, SwiGLU) and level.period is not None:
                key, period = ".".join(parts[:5]), level.period  # an outer CMS level, stepped every `period` tokens
            else:
                key, period = "base", None
            groups.setdefault(key, Level(key, period, {})).params[name] = p
        return sorted(groups.values(), key=lambda lv: (lv.period is None, lv.period or 0, lv.name))

    def set_window(self, window: int | None) -> LanguageModel:
        """Limit every attention to the last `window` tokens (None: full causal attention), in place, as for a model
        built with `AttentionConfig.window`: to measure what a window loses (and a memory recovers) on a model
        trained with full attention. The config follows, so that what is saved or reported says so. Returns self."""
        layers = [m for m in self.modules() if isinstance(m, Attention)]
        if not layers:
            raise ValueError(f"{self.config.name or 'this model'} has no attention layer to give a window")
        if self.config.attention is None:  # attention only in memory adapters' blocks: never the case today
            raise ValueError("the model's config has no attention settings to record the window in")
        attention = dataclasses.replace(self.config.attention, window=window)  # checks the value
        for m in layers:
            m.config = dataclasses.replace(m.config, window=window)
        self.config = dataclasses.replace(self.config, attention=attention)
        return self

    def has_memories(self) -> bool:
        """Whether any block has an in-context memory (a Titans or self-modifying Titans mixer, an in-context level)."""
        return any(isinstance(m, MEMORY_MODULES) for m in self.modules())

    def compile_chunks(self, enable: bool = True) -> LanguageModel:
        """Run the memories' per-chunk work through `torch.compile`: every whole chunk of self-modifying Titans (its
        generation, targets and writes), and each chunk step of the Titans memory and in-context CMS levels. One fused
        graph is reused by every chunk and block, so compiling costs a minute or two once (2 CPU cores) instead of
        unrolling a graph over every chunk of the sequence; results equal eager up to float rounding
        (docs/benchmarks.md). A stream's partial first and last pieces, and decoding, run eager. Returns self."""
        for module in self.modules():
            if isinstance(module, MEMORY_MODULES):
                module.compile_chunks = enable
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # --- checkpoints ---

    def save_pretrained(self, path: str | os.PathLike, format: str = "nestlearn", tokenizer=None) -> None:
        """Write config.json and model.safetensors into the folder `path`, each atomically.

        format: "nestlearn" (every architecture; `load` reads it) or "hf", the Hugging Face `LlamaForCausalLM`
        layout that `transformers` reads, for a model that has one (a Transformer; Hope-Attention with outer CMS
        levels only, folded into one MLP where that is exact; `nestlearn.hf`); other models are refused, saying why.
        tokenizer: saved beside the weights when given (its tokenizer.json)."""
        from safetensors.torch import save_file, save_model

        if format not in ("nestlearn", "hf"):
            raise ValueError(f"format={format!r}: expected 'nestlearn' or 'hf' (Hugging Face LlamaForCausalLM)")
        path = Path(path)
        if format == "hf":
            why = hf.exportable(self.config)
            if why is not None:
                raise ValueError(f"this {self.config.name} model cannot be saved in the Hugging Face layout: {why}")
            sd = self.state_dict()
            eos = getattr(tokenizer, "eos_id", None)
            config_text = json.dumps(hf.hf_config_of(self.config, sd, eos), indent=2)
            tensors = hf.state_dict_to_hf(self.config, sd)  # before any file is written: a refusal writes nothing
            path.mkdir(parents=True, exist_ok=True)
            _atomic_write(path / CONFIG_FILE, lambda f: Path(f).write_text(config_text))
            _atomic_write(path / WEIGHTS_FILE, lambda f: save_file(tensors, f, metadata={"format": "pt"}))
        else:
            path.mkdir(parents=True, exist_ok=True)
            _atomic_write(path / CONFIG_FILE, lambda f: Path(f).write_text(self.config.to_json()))
            _atomic_write(path / WEIGHTS_FILE, lambda f: save_model(self, f, metadata={"format": "pt"}))
        if tokenizer is not None:
            tokenizer.save(path)


def sample_next(
    logits: Tensor, temperature: float = 0.0, top_k: int | None = None, generator: torch.Generator | None = None
) -> Tensor:
    """The next token (b, 1) from the last position of logits (b, t, V): greedy at temperature 0, else sampled
    from softmax(logits / temperature), restricted to the top_k likeliest when top_k is given."""
    last = logits[:, -1].float()  # (b, V)
    if temperature == 0:
        return last.argmax(-1, keepdim=True)
    last = last / temperature
    if top_k is not None:
        kth = last.topk(min(top_k, last.shape[-1]), dim=-1).values[:, -1:]
        last = last.masked_fill(last < kth, float("-inf"))
    return torch.multinomial(last.softmax(-1), 1, generator=generator)


def _atomic_write(target: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def build(config: ModelConfig) -> LanguageModel:
    """The model of a config: `build(presets.hope("tiny"))`."""
    if not isinstance(config, ModelConfig):
        raise ValueError(f"build needs a ModelConfig (see nestlearn.presets); got {type(config).__name__}")
    return LanguageModel(config)


def load(path: str | os.PathLike, device: str | torch.device = "cpu") -> LanguageModel:
    """A model saved by `save_pretrained`, or a Hugging Face Llama-family folder (`LlamaForCausalLM`: config.json and
    safetensors weights), which becomes a `transformer` model with the same logits (`nestlearn.hf`)."""
    from safetensors.torch import load_model

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a folder: give a model folder (config.json and model.safetensors)")
    if hf.is_hf_folder(path):
        config = hf.config_from_hf(hf.read_hf_config(path), source=str(path))
        weights = hf.state_dict_from_hf(hf.read_hf_weights(path), config, source=str(path))
        model = LanguageModel(config)
        model.load_state_dict(weights)
        return model.to(device)
    for f in (CONFIG_FILE, WEIGHTS_FILE):
        if not (path / f).is_file():
            raise FileNotFoundError(f"{path / f} does not exist: is {path} a folder written by save_pretrained?")
    try:
        config = ModelConfig.from_dict(json.loads((path / CONFIG_FILE).read_text()))
    except (json.JSONDecodeError, TypeError) as e:
        raise ValueError(f"{path / CONFIG_FILE} is not a valid nestlearn config: {e}") from e
    model = LanguageModel(config)
    load_model(model, path / WEIGHTS_FILE, device=str(device))
    return model.to(device)
