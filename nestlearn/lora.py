"""Low-rank adapters (LoRA, Hu et al. 2021) on a model's attention and MLP projections, through `peft`.

    W x  →  W x + (alpha / rank) · B A x          A (rank, in), B (out, rank) = 0 at first: the model starts as its base

Targets (`LoRAConfig.targets`) name projections of two module kinds only, found by type: `qkv` (q, k and v fused)
and `proj` of softmax attention (`attention.Attention`), `up` (gate and up fused) and `down` of every SwiGLU MLP
(`cms.SwiGLU`: the outer CMS levels). The Titans and self-modifying Titans mixers and memory adapters (which also have
a `qkv` and an `out.proj`) and in-context CMS levels (whose weights are per-sequence state) are never adapted.

peft wraps each adapted `nn.Linear` in a LoRA layer, which renames its weight: `blocks.0.mixer.qkv.weight` becomes
`blocks.0.mixer.qkv.base_layer.weight`, beside `….qkv.lora_A.default.weight` and `….qkv.lora_B.default.weight`.
`load_base` loads a plain model's state dict into an adapted one; `merge_lora` folds the adapters into the base
weights and removes them, which gives a plain model again (that `save_pretrained(format="hf")` can export).

peft is optional (the `hf` extra); it is imported only where an adapter is added or merged.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from .attention import Attention
from .cms import SwiGLU
from .config import LoRAConfig, ModelConfig

__all__ = [
    "add_lora",
    "merge_lora",
    "load_base",
    "lora_targets",
    "lora_parameters",
    "mark_only_lora_trainable",
    "parameter_counts",
]

ADAPTER = "default"  # peft's adapter name: one adapter per model
OWNERS = {"qkv": Attention, "proj": Attention, "up": SwiGLU, "down": SwiGLU}  # target -> the module that owns it


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            "LoRA needs the optional dependency peft: pip install 'nestlearn[hf]' (or pip install peft)"
        ) from e
    return peft


def _lora_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(name, module) of every peft LoRA layer in `model`; none when peft is not installed (then none can exist)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return []
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoraLayer)]


def lora_targets(model: nn.Module, targets: tuple[str, ...]) -> list[str]:
    """The names of the `nn.Linear`s that `targets` select: the projections of every `Attention` and `SwiGLU`."""
    out = []
    for name, module in model.named_modules():
        for target in targets:
            if isinstance(module, OWNERS[target]) and isinstance(getattr(module, target, None), nn.Linear):
                out.append(f"{name}.{target}" if name else target)
    return out


def _no_match(model: nn.Module, config: LoRAConfig) -> str:
    attention = sum(isinstance(m, Attention) for m in model.modules())
    mlps = sum(isinstance(m, SwiGLU) for m in model.modules())
    mixer = getattr(getattr(model, "config", None), "mixer", "?")
    return (
        f"LoRAConfig.targets={config.targets} match no projection of this model: `qkv` and `proj` are those of "
        f"softmax attention (this model has {attention} attention module(s); its mixer is {mixer!r}), `up` and "
        f"`down` those of SwiGLU MLPs, the outer CMS levels (it has {mlps}; in-context levels hold their weights in "
        "the per-sequence state and cannot be adapted). Choose targets that this model has"
    )


def add_lora(model: nn.Module, config: LoRAConfig) -> nn.Module:
    """Add LoRA adapters of `config` to `model` in place and return it; its logits are unchanged (B = 0).

    Every parameter keeps its `requires_grad` (peft would freeze all but the adapters: `mark_only_lora_trainable`
    does that on request). `model.config.lora` becomes `config`, so that `save_pretrained` and `load` round-trip."""
    if not isinstance(config, LoRAConfig):
        raise ValueError(f"add_lora needs a LoRAConfig (nestlearn.config); got {type(config).__name__}")
    if _lora_layers(model):
        raise ValueError("this model has LoRA adapters already: merge them first (nestlearn.lora.merge_lora(model))")
    names = lora_targets(model, config.targets)
    if not names:
        raise ValueError(_no_match(model, config))
    peft = _peft()
    trainable = [(p, p.requires_grad) for p in model.parameters()]
    pattern = "|".join(re.escape(n) for n in names)  # peft matches a string with re.fullmatch: exactly these
    peft_config = peft.LoraConfig(
        r=config.rank, lora_alpha=config.alpha, target_modules=pattern, lora_dropout=0.0, bias="none"
    )
    had_peft_config = hasattr(model, "peft_config")
    peft.inject_adapter_in_model(peft_config, model, adapter_name=ADAPTER)
    if not had_peft_config and hasattr(model, "peft_config"):
        del model.peft_config  # peft's bookkeeping; the model's own config says what it has
    for p, flag in trainable:  # peft froze every parameter but the adapters'
        p.requires_grad_(flag)
    adapted = {name for name, _ in _lora_layers(model)}
    if adapted != set(names):
        raise RuntimeError(f"peft adapted {sorted(adapted)}, expected {sorted(names)}")
    model_config = getattr(model, "config", None)
    if isinstance(model_config, ModelConfig) and model_config.lora != config:
        model.config = dataclasses.replace(model_config, lora=config)
    return model


@torch.no_grad()
def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight, W ← W + (alpha / rank) B A, and put the plain `nn.Linear` back in
    place of the LoRA layer; `model.config.lora` becomes None. The logits are the adapted model's (to float rounding),
    and the model is a plain one again: `save_pretrained(path, format="hf")` exports it. In place; returns it.
    The base weights keep their `requires_grad` (False after `mark_only_lora_trainable`)."""
    layers = _lora_layers(model)
    if not layers:
        raise ValueError("this model has no LoRA adapters to merge (add them with nestlearn.lora.add_lora)")
    for name, layer in layers:
        base = layer.get_base_layer()
        for adapter in list(layer.lora_A):
            base.weight += layer.get_delta_weight(adapter).to(base.weight.dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, base)
    model_config = getattr(model, "config", None)
    if isinstance(model_config, ModelConfig):
        model.config = dataclasses.replace(model_config, lora=None)
    return model


def lora_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The adapters' parameters by name (`….lora_A.default.weight`, `….lora_B.default.weight`); {} without LoRA."""
    out = {}
    for name, layer in _lora_layers(model):
        for pname, p in layer.named_parameters():
            if not pname.startswith("base_layer."):
                out[f"{name}.{pname}"] = p
    return out


def mark_only_lora_trainable(model: nn.Module) -> nn.Module:
    """Freeze every parameter but the adapters' (requires_grad False), for LoRA fine-tuning. Returns the model."""
    lora = {id(p) for p in lora_parameters(model).values()}
    if not lora:
        raise ValueError("this model has no LoRA adapters: nothing would train (add them with add_lora first)")
    for p in model.parameters():
        p.requires_grad_(id(p) in lora)
    return model


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(trainable, frozen): how many parameter entries have requires_grad, and how many do not (shared counted once)."""
    trainable = frozen = 0
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        else:
            frozen += p.numel()
    return trainable, frozen


def load_base(model: nn.Module, state_dict: Mapping[str, Tensor]) -> nn.Module:
    """Load a plain model's state dict (e.g. `pretrained.state_dict()`) into the LoRA model `model`: `x.weight` goes
    to `x.base_layer.weight` where `x` is adapted; the adapters keep their values (B = 0: the model is then its base).
    A state dict with the adapted names (a LoRA model's own) loads too, adapters included. Every other parameter and
    buffer must be there, and nothing else may be: missing or unexpected names are an error. Returns the model."""
    own = model.state_dict()
    renamed = {key.replace(".base_layer.", ".", 1): key for key in own if ".base_layer." in key}
    lora = set(lora_parameters(model))
    mapped = {renamed.get(key, key): value for key, value in state_dict.items()}
    unexpected = sorted(k for k in state_dict if renamed.get(k, k) not in own)
    missing = sorted(k for k in own if k not in mapped and k not in lora)
    if missing or unexpected:
        raise ValueError(
            f"the state dict does not match this model's base: missing {missing[:5]}{' …' if len(missing) > 5 else ''}"
            f", unexpected {unexpected[:5]}{' …' if len(unexpected) > 5 else ''}"
        )
    model.load_state_dict(mapped, strict=False)
    return model
