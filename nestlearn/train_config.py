"""What a training run depends on: `TrainConfig` (every field a `nestlearn train` flag), the model config and the
learning-rate schedule it implies, and which fields a resumed run may change.

A config is checked when it is made (choices, ranges, the optimizer's arguments), so that a bad flag fails before
any data is prepared; `from_args` layers the flags given over --config's file over the saved config of a run to
resume (`nestlearn train --out-dir RUN` alone resumes RUN as it was started) over the defaults.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import presets, pretrained
from .checkpoint import CHECKPOINTS, TRAIN_CONFIG_FILE
from .config import LORA_TARGETS, RETAIN_TO, LoRAConfig, ModelConfig
from .optim import OPTIMIZERS
from .runtime import check_device

__all__ = [
    "TrainConfig",
    "parse_periods",
    "model_config_of",
    "optimizer_factory",
    "lr_at",
    "RUN_FIELDS",
    "SCHEDULE_FIELDS",
]


def _help(text: str, **kwargs) -> Any:
    return field(metadata={"help": text}, **kwargs)


@dataclass
class TrainConfig:
    """Everything a training run depends on; saved as out_dir/train_config.json."""

    # model
    preset: str = _help("model: transformer, titans, hope or hope_attention", default="hope")
    size: str = _help("model size (nestlearn.presets.SIZES)", default="tiny")
    model_config: str | None = _help("a config.json to build the model from instead of --preset/--size", default=None)
    seq_len: int | None = _help("tokens per training window (default: the preset's seq_len)", default=None)
    memory_checkpoint: bool = _help(
        "recompute the memories' chunks in backward (in groups of √n): much less memory "
        "for titans/hope, a little more time",
        default=False,
    )
    retain_to: str | None = _help(
        "what the memories' retention pulls towards: init (their meta-learned initial "
        "state) or zero (the paper's weight decay: MLP memories die on long streams; "
        "docs/deviations.md) (default: the preset's, init)",
        default=None,
    )
    retention_init: float | None = _help(
        "the memories' retention α_t at initialisation, in (0, 1) (default: the preset's, 0.982)", default=None
    )
    cms_signal: str | None = _help(
        "what the in-context CMS levels learn from: local (a per-head memory with its own objective) or task (eq. "
        "71: full-width MLPs stepped on the next-token loss every C tokens; docs/deviations.md) (default: the "
        "preset's, task for hope and hope_attention)",
        default=None,
    )
    task_lr: float | None = _help("--cms-signal task: η of every in-context level (default: 1e-3)", default=None)
    meta_grad: str | None = _help(
        "--cms-signal task: first_order (each inner gradient a constant) or full (second order) (default: first_order)",
        default=None,
    )
    task_rate: str | None = _help(
        "--cms-signal task: η_t constant (task_lr) or data (task_lr times a learned factor per token; needs "
        "--meta-grad full) (default: constant)",
        default=None,
    )
    task_blocks: int | None = _help(
        "--cms-signal task: how many of the last blocks learn in context (default: all)", default=None
    )
    # a pretrained start (docs/pretrained.md)
    init: str | None = _help(
        "a pretrained model folder to start from (a Hugging Face Llama, e.g. from `nestlearn fetch-model "
        "smollm2-135m`, or a nestlearn Transformer): the preset (transformer or hope_attention) is built at its "
        "shape with its tokenizer, and every CMS level starts from the block's MLP (paper §7.3)",
        default=None,
    )
    stack: str | None = _help(
        "--init: how the CMS levels start from one MLP and still equal it: copies (every level a copy, averaged) "
        "or residual (a chain; the faster levels' down projections start at zero) (default: copies)",
        default=None,
    )
    adapter: str | None = _help(
        "a memory pathway beside attention, its output zero at first: titans or sm_titans (default: none)", default=None
    )
    adapter_blocks: int | None = _help("--adapter: how many of the last blocks carry it (default: all)", default=None)
    window: int | None = _help(
        "sliding-window attention: each token sees the last WINDOW tokens (default: the model's; full)", default=None
    )
    freeze: str = _help(
        "base: train only the memory pathways (adapters, LoRA, CMS levels with a period), the rest frozen; none",
        default="none",
    )
    lora_rank: int | None = _help(
        "LoRA of this rank on attention's and the MLPs' projections (default: no LoRA)", default=None
    )
    lora_alpha: float | None = _help("--lora-rank: the scale alpha (default: 2 × rank)", default=None)
    lora_targets: str | None = _help(
        "--lora-rank: comma-separated projections among qkv,proj,up,down (default: all four)", default=None
    )
    # data
    data: str = _help(
        "corpus name (nestlearn fetch-data --list), a text/JSONL file or folder, a folder with "
        "train/validation/test.txt, or a JSON spec (docs/data.md)",
        default="wiki",
    )
    tokenizer: str = _help(
        "'bytes', 'bpe:VOCAB' (trained on the train split) or a folder with tokenizer.json", default="bytes"
    )
    data_root: str | None = _help("corpus cache (default: $NESTLEARN_DATA or ~/.cache/nestlearn)", default=None)
    shards: str | None = _help("folder of token shards (default: under the corpus cache)", default=None)
    # optimisation
    steps: int = _help("optimizer steps in all (a resumed run continues up to this)", default=1000)
    stop_at: int | None = _help(
        "stop after this step with a checkpoint, to resume later (jobs with time limits)", default=None
    )
    batch_size: int = _help("sequences per optimizer step, over all processes and micro-batches", default=16)
    grad_accum: int = _help("micro-batches per optimizer step (per process)", default=1)
    optimizer: str = _help(
        "the outer optimizer: adamw, muon, m3, deep_momentum, delta_momentum or "
        "preconditioned_momentum (docs/optimizers.md)",
        default="adamw",
    )
    optimizer_args: str = _help(
        "more keyword arguments of the optimizer, as JSON, e.g. '{\"slow_period\": 4}' "
        "for m3 (docs/optimizers.md lists them)",
        default="{}",
    )
    update_periods: str | None = _help(
        "the CMS update periods C^(ℓ) in tokens, fastest first, comma-separated, "
        "'none' for every step (e.g. 16,128,1024,none); periods shorter than "
        "--seq-len are in-context levels, the others outer levels stepped every "
        "C/seq_len steps (default: the preset's)",
        default=None,
    )
    lr: float = _help("peak learning rate", default=1e-3)
    min_lr_ratio: float = _help("final learning rate of the cosine schedule, as a fraction of --lr", default=0.1)
    warmup_steps: int = _help("linear warm-up steps", default=100)
    weight_decay: float = _help(
        "weight decay of the linear maps' weights only (not embeddings, memories' initial "
        "states, convolutions, norms, biases, gates' read-outs; docs/training.md)",
        default=0.1,
    )
    beta1: float = _help("AdamW β1 (also of the AdamW part of muon and m3)", default=0.9)
    beta2: float = _help("AdamW β2 (also of the AdamW part of muon and m3)", default=0.95)
    grad_clip: float = _help("clip the global gradient norm to this (0: off)", default=1.0)
    carry_state: bool = _help("carry the model state across consecutive segments (truncated BPTT)", default=False)
    # speed
    device: str = _help("auto, cpu, cuda or cuda:N", default="auto")
    threads: int | None = _help(
        "CPU threads for torch (default: torch's choice, one per core); when other work shares the CPU, "
        "the free cores (docs/training.md, 'Sharing the CPU')",
        default=None,
    )
    precision: str = _help("auto (bf16 autocast on GPU, fp32 on CPU), fp32 or bf16", default="auto")
    compile: bool = _help(
        "torch.compile: the memories' per-chunk step where the model has memories (one graph for "
        "every chunk, LanguageModel.compile_chunks), else the whole model",
        default=False,
    )
    parallel: str = _help("under torchrun: ddp or fsdp (FSDP2, one shard per block)", default="ddp")
    # evaluation, logging, checkpoints
    out_dir: str = _help("run folder: metrics.jsonl, TensorBoard events, checkpoints/", default="runs/default")
    eval_every: int = _help("validate every N steps (0: only at the end)", default=200)
    eval_tokens: int = _help("validation tokens per evaluation (0: the whole split)", default=65536)
    log_every: int = _help("write training metrics every N steps", default=10)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", default=500)
    save_every_minutes: float = _help(
        "also checkpoint when this many minutes have passed since the last save (0: off)", default=0.0
    )
    keep_last: int = _help("checkpoints to keep", default=2)
    tensorboard: str = _help("auto (if the tensorboard package is installed), on or off", default="auto")
    progress: bool = _help("show a progress bar", default=True)
    seed: int = _help("seed of the initial weights and of the data order", default=0)
    resume: str = _help("auto (resume if out_dir has a checkpoint), never, or a checkpoint folder", default="auto")

    @staticmethod
    def choices() -> dict[str, list[str]]:
        return {
            "preset": list(presets.PRESETS),
            "size": list(presets.SIZES),
            "optimizer": list(OPTIMIZERS),
            "precision": ["auto", "fp32", "bf16"],
            "parallel": ["ddp", "fsdp"],
            "tensorboard": ["auto", "on", "off"],
            "cms_signal": ["local", "task"],
            "meta_grad": ["first_order", "full"],
            "task_rate": ["constant", "data"],
            "stack": ["copies", "residual"],
            "adapter": ["titans", "sm_titans"],
            "freeze": ["none", "base"],
        }

    def __post_init__(self) -> None:
        for name, allowed in self.choices().items():
            if getattr(self, name) not in allowed and not (getattr(self, name) is None and _is_optional_field(name)):
                raise ValueError(f"{name}={getattr(self, name)!r} is not one of {allowed}")
        for name in ("steps", "batch_size", "grad_accum", "keep_last"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        for name in (
            "warmup_steps",
            "eval_every",
            "eval_tokens",
            "log_every",
            "save_every",
            "save_every_minutes",
            "grad_clip",
            "lr",
        ):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 0")
        if self.stop_at is not None and not 1 <= self.stop_at <= self.steps:
            raise ValueError(f"stop_at={self.stop_at} must lie in [1, steps={self.steps}]")
        if self.seq_len is not None and self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 1")
        if self.threads is not None and self.threads < 1:
            raise ValueError(f"threads={self.threads} must be >= 1 (or unset: torch's choice)")
        try:
            check_device(self.device)
        except ValueError as e:
            raise ValueError(f"device={e}") from None
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.retain_to not in (None, *RETAIN_TO):
            raise ValueError(f"retain_to={self.retain_to!r} is not one of {list(RETAIN_TO)}")
        if self.retention_init is not None and not 0 < self.retention_init < 1:
            raise ValueError(
                f"retention_init={self.retention_init} must lie strictly between 0 and 1 (α_t at "
                "initialisation; 0.982 by default)"
            )
        for name in ("adapter_blocks", "window", "lora_rank"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be >= 1")
        needs = (
            ("stack", "init"),
            ("adapter_blocks", "adapter"),
            ("lora_alpha", "lora_rank"),
            ("lora_targets", "lora_rank"),
        )
        for flag, base in needs:
            if getattr(self, flag) is not None and getattr(self, base) is None:
                raise ValueError(
                    f"--{flag.replace('_', '-')} does nothing without --{base.replace('_', '-')}: give both, or neither"
                )
        if self.init is not None and self.model_config is not None:
            raise ValueError("--init and --model-config both say what to build: give one (--init builds at its shape)")
        if self.init is not None:  # a bad folder or architecture is named before anything is written
            pretrained.stacked_config(pretrained.source_config(self.init), self.preset, stack=self.stack or "copies")
        self.periods()  # parse errors now, not after the data is prepared
        optimizer_factory(self)([{"params": [nn.Parameter(torch.zeros(2, 2))], "weight_decay": 0.0}])

    def periods(self) -> tuple[int | None, ...] | None:
        """--update-periods as a tuple (None where 'none'), or None for the preset's."""
        return None if self.update_periods is None else parse_periods(self.update_periods)

    def optimizer_kwargs(self) -> dict:
        try:
            extra = json.loads(self.optimizer_args)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"optimizer_args={self.optimizer_args!r} is not JSON ({e}); write e.g. '{{\"slow_period\": 4}}'"
            ) from e
        if not isinstance(extra, dict):
            raise ValueError(f"optimizer_args={self.optimizer_args!r} must be a JSON object of keyword arguments")
        return extra

    # --- files and flags ---

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2) + "\n"

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> TrainConfig:
        data = json.loads(Path(path).read_text())
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"{path}: unknown fields {sorted(unknown)}; valid fields: `nestlearn train --help`")
        return cls(**data)

    @classmethod
    def add_arguments(
        cls, parser: argparse.ArgumentParser, exclude: tuple[str, ...] = (), defaults: dict | None = None
    ) -> None:
        """One flag per field, named after it (--out-dir for out_dir), with the field's help and default; a command
        that builds on TrainConfig leaves out the fields it sets itself (`exclude`) and shows its own `defaults`."""
        parser.add_argument("--config", help="a saved train_config.json; flags given with it override it")
        hints, choices = typing.get_type_hints(cls), cls.choices()
        for f in dataclasses.fields(cls):
            if f.name in exclude:
                continue
            flag, typ, text = "--" + f.name.replace("_", "-"), hints[f.name], f.metadata["help"]
            if defaults and f.name in defaults:
                text = text.split(" (default")[0] + f" (default: {defaults[f.name]})"
            elif "default" not in text:
                text += f" (default: {f.default})"
            if typ is bool:
                parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=text)
            else:
                base = next(t for t in typing.get_args(typ) if t is not type(None)) if _is_optional(typ) else typ
                parser.add_argument(flag, type=base, default=None, choices=choices.get(f.name), help=text)

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> TrainConfig:
        """The flags given, over --config's file, over (when --out-dir holds a run to resume) that run's saved
        config, over the defaults: `nestlearn train --out-dir RUN` alone resumes RUN as it was started."""
        base = dataclasses.asdict(cls.from_file(args.config)) if args.config else {}
        given = {f.name: v for f in dataclasses.fields(cls) if (v := getattr(args, f.name, None)) is not None}
        out_dir = Path(given.get("out_dir", base.get("out_dir", cls.out_dir)))
        saved = out_dir / TRAIN_CONFIG_FILE
        resuming = given.get("resume", base.get("resume", cls.resume)) == "auto" and any(
            (out_dir / CHECKPOINTS).glob("step-*")
        )
        if resuming and saved.is_file() and not args.config:
            base = {**dataclasses.asdict(cls.from_file(saved)), "resume": "auto"}
        return cls(**{**base, **given})


def parse_periods(text: str) -> tuple[int | None, ...]:
    """'16,128,none' -> (16, 128, None): CMS update periods in tokens, fastest first."""
    out = []
    for item in str(text).split(","):
        item = item.strip().lower()
        if item == "none":
            out.append(None)
        elif item.isdigit() and int(item) > 0:
            out.append(int(item))
        else:
            raise ValueError(
                f"update_periods={text!r}: {item!r} is not a positive number of tokens or 'none'; "
                "write e.g. 16,128,1024,none"
            )
    return tuple(out)


def _is_optional_field(name: str) -> bool:
    return _is_optional(typing.get_type_hints(TrainConfig)[name])


def _is_optional(typ: Any) -> bool:
    return isinstance(typ, types.UnionType) and type(None) in typing.get_args(typ)


def model_config_of(config: TrainConfig, vocab_size: int) -> ModelConfig:
    if config.init:  # the source's shape and vocabulary (which may be padded beyond its tokenizer's)
        source = pretrained.source_config(config.init)
        model_config = pretrained.stacked_config(
            source, config.preset, update_periods=config.periods(), stack=config.stack or "copies"
        )
    else:
        if config.model_config:
            model_config = ModelConfig.from_dict(json.loads(Path(config.model_config).read_text()))
        else:
            # the signal decides the levels' form, so the preset solves its CMS width for it
            signal = {"signal": config.cms_signal} if config.cms_signal and config.preset in presets.WITH_SIGNAL else {}
            model_config = presets.PRESETS[config.preset](config.size, **signal)
        model_config.vocab_size = vocab_size  # the tokenizer decides
    if config.seq_len is not None:
        model_config.seq_len = config.seq_len
    if config.periods() is not None:
        if model_config.cms is None:
            raise ValueError(f"--update-periods: {model_config.name} has no Continuum Memory System to set")
        # new levels: periods shorter than the training window are in-context, the others outer (docs/training.md)
        cms = dataclasses.replace(model_config.cms, update_periods=config.periods(), outer_from=model_config.seq_len)
        model_config = dataclasses.replace(model_config, cms=cms)
    if config.memory_checkpoint:
        for sub in (model_config.titans, model_config.sm_titans, model_config.cms):
            if sub is not None:
                sub.checkpoint = True
    retention = {
        k: v for k, v in (("retain_to", config.retain_to), ("retention_init", config.retention_init)) if v is not None
    }
    if retention:  # every memory: the mixers' and the in-context CMS levels'; dataclasses.replace checks the values
        for name in ("titans", "sm_titans", "cms"):
            setattr(model_config, name, dataclasses.replace(getattr(model_config, name), **retention))
    task = {
        k: v
        for k, v in (
            ("signal", config.cms_signal),
            ("task_lr", config.task_lr),
            ("meta_grad", config.meta_grad),
            ("task_rate", config.task_rate),
            ("task_blocks", config.task_blocks),
        )
        if v is not None
    }
    if task:
        model_config = dataclasses.replace(model_config, cms=dataclasses.replace(model_config.cms, **task))
    extra = {}
    if config.adapter:
        extra.update(adapter=config.adapter, adapter_blocks=config.adapter_blocks)
    if config.window:
        extra["attention"] = dataclasses.replace(model_config.attention, window=config.window)
    if config.lora_rank:
        targets = tuple(t.strip() for t in config.lora_targets.split(",")) if config.lora_targets else LORA_TARGETS
        alpha = config.lora_alpha if config.lora_alpha is not None else 2.0 * config.lora_rank
        extra["lora"] = LoRAConfig(rank=config.lora_rank, alpha=alpha, targets=targets)
    return dataclasses.replace(model_config, **extra) if extra else model_config


def optimizer_factory(config: TrainConfig):
    """A constructor of config.optimizer taking param groups; bad arguments raise here, naming the optimizer."""
    from . import optim

    cls, kwargs = optim.optimizer_class(config.optimizer), dict(lr=config.lr)
    if config.optimizer in ("adamw", "muon"):
        kwargs["betas"] = (config.beta1, config.beta2)
    elif config.optimizer == "m3":
        kwargs["adamw_betas"] = (config.beta1, config.beta2)
    kwargs.update(config.optimizer_kwargs())

    def make(groups):
        try:
            return cls(groups, **kwargs)
        except TypeError as e:
            raise ValueError(
                f"--optimizer-args for {config.optimizer}: {e} (docs/optimizers.md lists the arguments)"
            ) from e

    return make


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to --lr, then cosine down to min_lr_ratio · lr at the last step. step counts from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


RUN_FIELDS = (
    "preset",
    "size",
    "model_config",
    "seq_len",
    "retain_to",
    "retention_init",
    "cms_signal",
    "task_lr",
    "meta_grad",
    "task_rate",
    "task_blocks",
    "data",
    "tokenizer",
    "batch_size",
    "seed",
    "carry_state",
    "optimizer",
    "optimizer_args",
    "update_periods",
    "init",
    "stack",
    "adapter",
    "adapter_blocks",
    "window",
    "freeze",
    "lora_rank",
    "lora_alpha",
    "lora_targets",
)
SCHEDULE_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")
