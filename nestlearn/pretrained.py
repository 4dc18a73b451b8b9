"""Starting from a pretrained model: ad-hoc level stacking (paper §7.3), memory adapters, LoRA and a frozen base.

    source = nestlearn.load("path/to/smollm2")                    # a Hugging Face Llama folder or a nestlearn one
    config = stacked_config(source.config, "hope_attention")      # the source's shape, CMS levels (16, 128, None)
    model = initialise(build(config), source)                      # every level starts from the block's MLP
    freeze(model, "base")                                          # train the memory pathways only

§7.3 starts every CMS level of a block from that block's pretrained MLP, MLP_0^(f_ℓ) = MLP_pretrained, and lets
each learn at its own rate. A chain of k copies is not the source's MLP (MLP ∘ MLP ≠ MLP), so the levels are
combined so that the model starts exactly as its source (docs/deviations.md, "level stacking"):
- `stack="copies"` (default): every level a full copy, combined by the independent variant (eq. 74) with the
  aggregation weights uniform: Σ_ℓ (1/k) MLP(x) = MLP(x).
- `stack="residual"`: the sequential chain (eq. 73) in which every level starts from the MLP's gate and up
  projections, the slowest keeps its down projection and the faster ones start with a zero down projection, so
  they add nothing until they learn.
Either way the logits equal the source's before any update, and stay equal while every η is 0.

In-context levels (period shorter than the training window) are task-loss levels (eq. 71, `CMSConfig.signal=
"task"`): full-width SwiGLU fast weights that can start from the pretrained MLP, where the per-head local levels
cannot.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from . import hf
from .cms import SwiGLU, TaskLevel
from .config import ADAPTERS, ModelConfig
from .lora import parameter_counts
from .model import LanguageModel
from .presets import HOPE_PERIODS

__all__ = [
    "STACKS",
    "PRESETS_FROM_SOURCE",
    "FREEZE",
    "source_config",
    "stacked_config",
    "initialise",
    "freeze",
    "count",
]

STACKS = ("copies", "residual")
PRESETS_FROM_SOURCE = ("transformer", "hope_attention")  # what a pretrained Transformer can become in place
FREEZE = ("none", "base")


def source_config(path: str | Path) -> ModelConfig:
    """The ModelConfig of a model folder without reading its weights: a Hugging Face Llama's or a nestlearn one's."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"{path} is not a model folder (no config.json): give a Hugging Face Llama folder (e.g. the path "
            "`nestlearn fetch-model smollm2-135m` prints) or a nestlearn checkpoint"
        )
    if hf.is_hf_folder(path):
        return hf.config_from_hf(hf.read_hf_config(path), source=str(path))
    return ModelConfig.from_dict(json.loads((path / "config.json").read_text()))


def stacked_config(
    source: ModelConfig, preset: str = "hope_attention", *, update_periods=None, stack: str = "copies"
) -> ModelConfig:
    """The config of `preset` at the source's shape: a Transformer as it is, or Hope-Attention whose CMS levels
    (default periods 16, 128 and one every optimizer step) are all seeded from the source's MLP by `initialise`."""
    if preset not in PRESETS_FROM_SOURCE:
        raise ValueError(
            f"preset {preset!r} cannot be made from a pretrained Transformer in place (its token mixer would have no "
            f"weights to start from): use one of {list(PRESETS_FROM_SOURCE)}, and add a memory pathway with an "
            f"adapter ({' or '.join(ADAPTERS)})"
        )
    if stack not in STACKS:
        raise ValueError(f"stack={stack!r}: expected one of {list(STACKS)} (docs/pretrained.md)")
    _check_source(source)
    if preset == "transformer":
        return dataclasses.replace(source, cms=dataclasses.replace(source.cms))
    periods = tuple(update_periods) if update_periods is not None else HOPE_PERIODS
    cms = dataclasses.replace(
        source.cms,
        update_periods=periods,
        outer_from=source.seq_len,
        signal="task",  # the only in-context levels that can start from an MLP
        variant="independent" if stack == "copies" and len(periods) > 1 else "sequential",
    )
    return dataclasses.replace(source, cms=cms, name=f"hope_attention:{source.name}")


def _check_source(source: ModelConfig) -> None:
    if source.lora is not None:
        raise ValueError(
            f"the source model ({source.name}) has LoRA adapters: merge them first (nestlearn.lora.merge_lora, or "
            "`nestlearn export` it to a Hugging Face folder and start from that)"
        )
    if source.mixer != "attention" or len(source.cms.update_periods) != 1 or source.adapter is not None:
        raise ValueError(
            f"the source model ({source.name}) must be a Transformer: attention and one MLP per block, as a "
            "Hugging Face Llama is; this one has mixer={source.mixer!r}, {len(source.cms.update_periods)} CMS levels"
        )


def initialise(model: LanguageModel, source: LanguageModel, stack: str | None = None) -> LanguageModel:
    """Copy the source into `model` (same width and depth): embeddings, norms and attention by name, and every CMS
    level of block i from the source's MLP of block i as `stack` says (None: read from the config: independent →
    copies, else residual). What the source lacks (adapters, LoRA, aggregation weights) keeps its initialisation,
    which is the identity on the output. Returns `model`."""
    _check_source(source.config)
    if stack is None:
        stack = "copies" if model.config.cms.variant == "independent" else "residual"
    if len(model.blocks) != len(source.blocks) or model.config.dim != source.config.dim:
        raise ValueError(
            f"the model ({model.config.num_layers} blocks of width {model.config.dim}) and its source "
            f"({source.config.num_layers} of width {source.config.dim}) must have the same shape"
        )
    src = {name: p for name, p in source.named_parameters() if ".cms." not in name}
    with torch.no_grad():
        for name, p in model.named_parameters():
            plain = name.replace(".base_layer", "")  # a LoRA-wrapped projection's own weight
            if plain in src:
                if src[plain].shape != p.shape:
                    raise ValueError(
                        f"{name}: shape {tuple(p.shape)} in the model, {tuple(src[plain].shape)} in the source"
                    )
                p.copy_(src[plain])
        for i, block in enumerate(model.blocks):
            mlp = source.blocks[i].cms.levels[0]
            gate, up = mlp.up.weight.chunk(2, dim=0)
            levels = list(block.cms.levels)
            for j, level in enumerate(levels):
                if not isinstance(level, (SwiGLU, TaskLevel)):
                    raise ValueError(
                        f"blocks.{i}.cms.levels.{j} is a per-head local in-context level, which cannot start from a "
                        "pretrained MLP: use task-loss levels (--cms-signal task, the default with --init)"
                    )
                down = mlp.down.weight
                if stack == "residual" and j < len(levels) - 1:
                    down = torch.zeros_like(down)  # adds nothing until it learns
                level.load_mlp(gate, up, down)
            if block.cms.config.variant == "independent":
                block.cms.agg_logits.zero_()  # uniform: the average of k copies of one MLP is that MLP
    return model


def _is_pathway(name: str, model: LanguageModel) -> bool:
    """A parameter of a memory pathway: an adapter, a LoRA factor, a CMS level with its own rate or its
    aggregation weight. Everything else is the base."""
    if ".adapter." in name or ".lora_" in name or name.endswith("cms.agg_logits"):
        return True
    parts = name.split(".")
    if parts[2:4] == ["cms", "levels"]:
        level = model.blocks[int(parts[1])].cms.levels[int(parts[4])]
        return not (isinstance(level, SwiGLU) and level.period is None)
    return False


def freeze(model: LanguageModel, what: str = "base") -> tuple[int, int]:
    """Freeze the base ("base": embeddings, attention, norms, head and MLPs stepped every step; "none": nothing), so
    that only the memory pathways (adapters, LoRA, CMS levels with their own period) train. Returns (trainable,
    frozen) parameter counts; an error when nothing would be left to train."""
    if what not in FREEZE:
        raise ValueError(f"freeze={what!r}: expected one of {list(FREEZE)}")
    for name, p in model.named_parameters():
        p.requires_grad_(what == "none" or _is_pathway(name, model))
    trainable, frozen = parameter_counts(model)
    if trainable == 0:
        raise ValueError(
            "--freeze base leaves nothing to train: this model has no memory pathway (add --adapter, --lora-rank, "
            "or CMS levels with --update-periods)"
        )
    return trainable, frozen


def count(model: nn.Module) -> str:
    """'N trainable, M frozen parameters'."""
    trainable, frozen = parameter_counts(model)
    return f"{trainable:,} trainable, {frozen:,} frozen parameters"
