"""Training on token shards: one loop for every preset, on one process or many (torchrun: DDP or FSDP2).

    nestlearn train --preset hope --size tiny --data wiki --steps 2000 --out-dir runs/hope-tiny
    torchrun --nproc_per_node 2 -m nestlearn.cli train --preset hope --parallel fsdp ...

Every field of `TrainConfig` is a flag (`nestlearn train --help`); `--config FILE` reads a saved one
(`out_dir/train_config.json`), flags given after it override it.

Data. A step reads `batch_size` windows of `seq_len + 1` tokens from the train shard. The windows of step s are a
pure function of (seed, s), so that a run resumed at step s reads exactly what an uninterrupted run would have,
and the global batch is the same whatever the number of processes and micro-batches it is cut into: process r
of W takes rows r, r + W, ... of each micro-batch's slice. With `carry_state`, row j instead walks through its own
contiguous stretch of the token stream, segment after segment, and the model's state is carried (detached:
truncated backprop through time) from one step to the next; it starts afresh when the stretch wraps around.

Checkpoints (`nestlearn.checkpoint`) are written atomically every `save_every` steps and at the end; a run
restarted with the same out_dir resumes from its newest one, exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import math
import os
import random
import shutil
import signal
import sys
import time
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import presets
from .checkpoint import (
    CHECKPOINTS,
    TRAIN_CONFIG_FILE,
    checkpoint_problem,
    decode_state,
    newest_intact,
    read_trainer,
    resolve_checkpoint,
    save_checkpoint,
)
from .config import RETAIN_TO, ModelConfig
from .data.batches import gather, lane_starts, window_starts
from .data.corpora import data_dir, load_split
from .data.shards import open_shard, prepare
from .data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe
from .evaluate import evaluate
from .interrupt import Interrupted, SaveClock, StopRequest
from .model import LanguageModel, build
from .optim import OPTIMIZERS
from .options import parser
from .runtime import Dist, autocast, flush_subnormals, resolve_device, set_threads, setup_distributed

__all__ = ["TrainConfig", "train", "prepare_data", "model_config_of", "make_optimizer", "param_groups"]


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
    # data
    data: str = _help(
        "corpus name (nestlearn fetch-data --list) or a folder with train/validation/test.txt", default="wiki"
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
        }

    def __post_init__(self) -> None:
        for name, allowed in self.choices().items():
            if getattr(self, name) not in allowed:
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
        if self.device != "auto":
            try:
                torch.device(self.device)
            except RuntimeError:
                raise ValueError(f"device={self.device!r} is not a device: use auto, cpu, cuda or cuda:N") from None
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"min_lr_ratio={self.min_lr_ratio} must lie in [0, 1]")
        if self.retain_to not in (None, *RETAIN_TO):
            raise ValueError(f"retain_to={self.retain_to!r} is not one of {list(RETAIN_TO)}")
        if self.retention_init is not None and not 0 < self.retention_init < 1:
            raise ValueError(
                f"retention_init={self.retention_init} must lie strictly between 0 and 1 (α_t at "
                "initialisation; 0.982 by default)"
            )
        self.periods()  # parse errors now, not after the data is prepared
        _optimizer_class(self)([{"params": [nn.Parameter(torch.zeros(2, 2))], "weight_decay": 0.0}])

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


def _is_optional(typ: Any) -> bool:
    return isinstance(typ, types.UnionType) and type(None) in typing.get_args(typ)


# --- data ---


def shard_dir_of(config: TrainConfig) -> Path:
    """Where the shards of (data, tokenizer) live: --shards, or <corpus cache>/shards/<corpus>-<tokenizer>."""
    if config.shards:
        return Path(config.shards)
    source = Path(config.data)
    if source.is_dir():  # a local corpus: its folder name and a digest of its path
        full = str(source.resolve())
        name = f"{source.resolve().name}-{hashlib.sha256(full.encode()).hexdigest()[:10]}"
    else:
        name = config.data
    if config.tokenizer == "bytes":
        tag = "bytes"
    elif config.tokenizer.startswith("bpe:"):
        tag = "bpe" + config.tokenizer.removeprefix("bpe:")
    else:
        tag = "tok-" + hashlib.sha256(str(Path(config.tokenizer).resolve()).encode()).hexdigest()[:10]
    return data_dir_of(config) / "shards" / f"{name}-{tag}"


def prepare_data(config: TrainConfig, *, progress: bool = True) -> tuple[Path, Tokenizer]:
    """Token shards of config.data with config.tokenizer, made once and found afterwards. Returns their folder."""
    out = shard_dir_of(config)
    if config.tokenizer == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    elif config.tokenizer.startswith("bpe:"):
        vocab = config.tokenizer.removeprefix("bpe:")
        if not vocab.isdigit():
            raise ValueError(f"tokenizer={config.tokenizer!r}: expected bpe:VOCAB with an integer, e.g. bpe:8192")
        if (out / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(out)  # trained before on this corpus (training again gives the same file)
        else:
            train_docs = load_split(config.data, "train", config.data_root)
            tokenizer = train_bpe(train_docs, int(vocab), length=len(train_docs), progress=progress)
    else:
        tokenizer = load_tokenizer(config.tokenizer)
    prepare(config.data, tokenizer, out, root=config.data_root, progress=progress)
    return out, tokenizer


def shards_for(
    data: str, tokenizer: Tokenizer, data_root: str | None = None, splits=("test",), progress: bool = True
) -> Path:
    """Shards of `data` made with a given tokenizer (a checkpoint's), under a folder named by its fingerprint."""
    source = Path(data)
    name = f"{source.resolve().name}-local" if source.is_dir() else data
    root = Path(data_root) if data_root else data_dir()
    out = root / "shards" / f"{name}-{tokenizer.kind}-{tokenizer.fingerprint[:12]}"
    prepare(data, tokenizer, out, splits, root=data_root, progress=progress)
    return out


def data_dir_of(config: TrainConfig) -> Path:
    return Path(config.data_root) if config.data_root else data_dir()


def wrap(model: LanguageModel, config: TrainConfig, env: Dist, device: torch.device) -> nn.Module:
    if env.world == 1:
        return model
    if config.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (env.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# --- model, optimizer, schedule ---


def model_config_of(config: TrainConfig, vocab_size: int) -> ModelConfig:
    if config.model_config:
        model_config = ModelConfig.from_dict(json.loads(Path(config.model_config).read_text()))
    else:
        model_config = presets.PRESETS[config.preset](config.size)
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
    return model_config


def _optimizer_class(config: TrainConfig):
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


def param_groups(model: nn.Module, weight_decay: float, orthogonalise: bool = False) -> list[dict]:
    """The parameter-group policy (docs/training.md): the weights of linear maps, every `nn.Linear` but an untied
    output head, are decayed and, when `orthogonalise` (muon, m3), orthogonalised; nothing else is either: the
    embedding and head, the memories' initial states, the causal convolutions' weights, self-modifying Titans'
    read-outs and gate biases, norms and biases (AdamW inside muon and m3, which Jordan et al. advise for
    embeddings; decay would pull α's bias of 4 towards 0 and the initial states towards the dead zero state)."""
    linear = {
        id(m.weight) for name, m in model.named_modules() if isinstance(m, nn.Linear) and name.split(".")[-1] != "head"
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in linear], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in linear], "weight_decay": 0.0},
    ]
    if orthogonalise:
        groups[1]["muon"] = False
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """config.optimizer over `param_groups`: linear maps decayed (and orthogonalised by muon and m3), the rest not."""
    return _optimizer_class(config)(param_groups(model, config.weight_decay, config.optimizer in ("muon", "m3")))


def make_levels(model: LanguageModel, optimizer: torch.optim.Optimizer, config: TrainConfig):
    """Levels over `optimizer` when the model has outer CMS levels with a period (eq. 71), else None."""
    from .optim import Levels

    levels = model.levels()
    if all(lv.period is None for lv in levels):
        return None
    if config.parallel == "fsdp" and dist.is_initialized():
        raise ValueError(
            "outer CMS levels with a period (--update-periods) are not supported with --parallel fsdp "
            "yet: use --parallel ddp"
        )
    wrapped = Levels(optimizer, levels)  # DDP and torch.compile keep the module's parameter objects
    wrapped.due(model.config.seq_len)  # a period that is not a multiple of the window fails now, not at step 1
    return wrapped


def lr_at(step: int, config: TrainConfig) -> float:
    """Linear warm-up to --lr, then cosine down to min_lr_ratio · lr at the last step. step counts from 0."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    span = max(1, config.steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / span)
    floor = config.min_lr_ratio * config.lr
    return floor + (config.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


# --- evaluation ---


# --- the loop ---


class Metrics:
    """JSONL lines in out_dir/metrics.jsonl, and the same scalars to TensorBoard when it is on."""

    def __init__(self, out_dir: Path, mode: str, enabled: bool):
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - lives as long as the run
        if mode != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError as e:
                if mode == "on":
                    raise ValueError("--tensorboard on needs the tensorboard package: pip install tensorboard") from e

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _drop_metrics_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in lines))
    os.replace(tmp, path)


# What a resumed run may change. RUN_FIELDS define the run (its model, data, order and optimizer): another value
# is another run, refused. SCHEDULE_FIELDS change the numbers from the resumed step on; they are accepted and named,
# as is every other field (how the run is executed and recorded), so that nothing changes silently.
RUN_FIELDS = (
    "preset",
    "size",
    "model_config",
    "seq_len",
    "retain_to",
    "retention_init",
    "data",
    "tokenizer",
    "batch_size",
    "seed",
    "carry_state",
    "optimizer",
    "optimizer_args",
    "update_periods",
)
SCHEDULE_FIELDS = ("steps", "lr", "min_lr_ratio", "warmup_steps", "weight_decay", "beta1", "beta2", "grad_clip")


def _say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"nestlearn train: {text}", file=sys.stderr, flush=True)


def _resume_point(out_dir: Path, config: TrainConfig, main: bool) -> Path | None:
    """The checkpoint to resume from, after checking that the folder's run is this run and naming what changed.
    A newest checkpoint that does not read back whole (a save cut short) is moved aside as corrupt-step-N, and
    the run resumes from the newest one that does."""
    if config.resume not in ("auto", "never"):
        path = resolve_checkpoint(config.resume)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(
                f"--resume {config.resume}: {path} cannot be read ({problem}); the checkpoint is corrupt or "
                "incomplete: use an earlier one (checkpoints/step-*)"
            )
        return path
    if not (out_dir / CHECKPOINTS).is_dir() or not any((out_dir / CHECKPOINTS).glob("step-*")):
        return None
    if config.resume == "never":
        raise ValueError(
            f"{out_dir} already holds checkpoints; pass --resume auto to continue that run or choose another --out-dir"
        )
    found, bad = newest_intact(out_dir)
    if found is None:
        detail = "; ".join(f"{p.name}: {why}" for p, why in bad)
        raise ValueError(
            f"no checkpoint in {out_dir / CHECKPOINTS} can be read ({detail}): the run cannot resume. Delete "
            f"{out_dir / CHECKPOINTS} to start it afresh, or choose another --out-dir"
        )
    for path, why in bad:
        aside = path.with_name("corrupt-" + path.name)
        if main:  # out of the way of `latest_checkpoint` and of keep_last's pruning
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
        _say(f"{path} cannot be read ({why}): moved to {aside.name}; resuming from {found.name} instead")
    saved = TrainConfig.from_file(found / TRAIN_CONFIG_FILE)
    changed = {f.name: (getattr(saved, f.name), getattr(config, f.name)) for f in dataclasses.fields(TrainConfig)}
    changed = {k: v for k, v in changed.items() if v[0] != v[1] and k != "resume"}
    refused = {k: v for k, v in changed.items() if k in RUN_FIELDS}
    if refused:
        detail = ", ".join(f"--{k.replace('_', '-')} {a!r} there, {b!r} now" for k, (a, b) in refused.items())
        raise ValueError(
            f"{out_dir} holds a different run ({detail}): these define the run. Drop them to resume it, "
            "or choose another --out-dir"
        )
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        note = (
            " (the schedule and the optimizer's settings change from the resumed step on)"
            if set(changed) & set(SCHEDULE_FIELDS)
            else ""
        )
        _say(f"changed since the run was saved: {detail}{note}")
    return found


def _last_validation(path: Path, step: int) -> dict:
    """The validation metrics metrics.jsonl holds for `step`, or {} when it has none."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    found = [x for x in lines if x.get("kind") == "validation" and x.get("step") == step]
    return {k: v for k, v in found[-1].items() if k not in ("kind", "step")} if found else {}


def train(config: TrainConfig) -> dict:
    """Run (or resume) a training run. Returns the final validation metrics and the training speed."""
    from tqdm import tqdm

    env = setup_distributed(config.device)
    device = resolve_device(config.device, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    flush_subnormals(device)
    micro = config.batch_size // (env.world * config.grad_accum)
    if micro * env.world * config.grad_accum != config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} must be a multiple of processes × grad_accum = "
            f"{env.world} × {config.grad_accum}"
        )
    set_threads(config.threads, device)
    out_dir = Path(config.out_dir)
    resume_from = _resume_point(out_dir, config, env.main)
    trainer = read_trainer(resume_from) if resume_from is not None else None
    last = config.stop_at or config.steps
    if trainer is not None and trainer["step"] >= last:
        what = "finished" if last == config.steps else f"stopped at --stop-at {last}"
        _say(
            f"{out_dir} is already {what}: step {trainer['step']} of {config.steps} ({resume_from}); nothing to "
            f"train. Raise --steps (or --stop-at) to train on; `nestlearn eval {out_dir}` evaluates it"
        )
        return {"step": trainer["step"], "finished": True, **_last_validation(out_dir / "metrics.jsonl", last)}
    if trainer is not None:
        _say(f"resuming {out_dir} from step {trainer['step']} of {config.steps} ({resume_from.name})")
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        shard_dir, tokenizer = prepare_data(config, progress=config.progress)
    if env.world > 1:
        dist.barrier()  # rank 0 made the shards; the others only read them
        if not env.main:
            shard_dir = shard_dir_of(config)
            tokenizer = load_tokenizer(shard_dir)
    train_tokens, _ = open_shard(shard_dir / "train", tokenizer)
    val_tokens, val_meta = open_shard(shard_dir / "validation", tokenizer)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model_config = model_config_of(config, tokenizer.vocab_size)
    model = build(model_config).to(device)
    T = model_config.seq_len
    step, carried = 0, None
    optimizer_sd = None
    if resume_from is not None:
        from safetensors.torch import load_model

        load_model(model, resume_from / "model.safetensors", device=str(device))
        step, optimizer_sd = trainer["step"], trainer["optimizer"]
        torch.set_rng_state(trainer["torch_rng"])
        random.setstate(trainer["python_rng"])
        carried = decode_state(trainer["carried"])  # one list of micro-batch states per process
        if len(carried) != env.world:
            raise ValueError(
                f"{resume_from} was saved by {len(carried)} processes; resume with as many "
                f"(now {env.world}), or restart without --carry-state"
            )
        carried = [None if s is None else s.to(device) for s in carried[env.rank]]
    net = wrap(model, config, env, device)
    if config.compile and model.has_memories():
        model.compile_chunks()  # a whole-model graph would unroll every chunk of the sequence
    elif config.compile:
        net = torch.compile(net)
    if config.parallel == "fsdp" and env.world > 1 and config.optimizer not in ("adamw",):
        raise ValueError(
            f"--optimizer {config.optimizer} needs whole parameters and FSDP shards them: use --parallel "
            "ddp, or adamw with fsdp"
        )
    optimizer = make_optimizer(net, config)
    levels = make_levels(model, optimizer, config)  # steps outer CMS levels at their periods (eq. 71)
    if optimizer_sd is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # a level that has not been stepped yet rightly has no optimizer state: not strict then
        options = StateDictOptions(full_state_dict=True, strict=levels is None)
        set_optimizer_state_dict(net, optimizer, optimizer_sd, options=options)
        if levels is not None:
            if "levels" not in trainer:
                raise ValueError(
                    f"{resume_from} has no state for the outer CMS levels; resume with the run's own --update-periods"
                )
            levels.load_levels_state_dict(trainer["levels"])
            # set_optimizer_state_dict first runs a zero-gradient step to create every state; a level never
            # stepped before the save had none, and must not start with a step count of 1
            for name, p in model.named_parameters():
                if name not in optimizer_sd["state"]:
                    optimizer.state.pop(p, None)
    if env.main:  # lines an interrupted run wrote after its last checkpoint (all of them if it saved none)
        _drop_metrics_after(out_dir / "metrics.jsonl", step)
    metrics = Metrics(out_dir, config.tensorboard, env.main)
    if env.main:
        (out_dir / TRAIN_CONFIG_FILE).write_text(config.to_json())
    if carried is None or not config.carry_state:
        carried = [None] * config.grad_accum

    def state_dicts() -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(step: int) -> None:
        model_sd, optim_sd = state_dicts()  # a collective under FSDP: every rank takes part
        every = [carried]
        if env.world > 1:  # the carried states of every process (small: one memory state per row)
            every = [None] * env.world if env.main else None
            dist.gather_object(carried, every, dst=0)
        if env.main:
            extra = {} if levels is None else {"levels": levels.levels_state_dict()}
            save_checkpoint(
                out_dir, step, model, model_sd, optim_sd, tokenizer, config.to_json(), config.keep_last, every, extra
            )
        if env.world > 1:
            dist.barrier()

    def validate(step: int) -> dict:
        result = evaluate(model, val_tokens, val_meta, T, micro, config.eval_tokens, device, config.precision)
        metrics.log(step, "validation", result)
        return result

    bar = tqdm(
        total=config.steps,
        initial=step,
        desc=model_config.name,
        unit="step",
        disable=not (config.progress and env.main),
        dynamic_ncols=True,
    )
    seen, t_start, window_t0, window_tokens = 0, time.perf_counter(), time.perf_counter(), 0
    net.train()
    stop, clock = StopRequest("the current step"), SaveClock(config.save_every_minutes)
    with stop:  # SIGINT/SIGTERM: finish the step, save, raise Interrupted (a second signal stops at once)
        while step < last:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            if config.carry_state:
                starts, fresh = lane_starts(step, config.batch_size, len(train_tokens), T)
                if fresh:
                    carried = [None] * config.grad_accum
            else:
                starts = window_starts(config.seed, step, config.batch_size, len(train_tokens), T + 1)
            loss_sum = 0.0
            for m in range(config.grad_accum):
                rows = starts[m * micro * env.world : (m + 1) * micro * env.world][env.rank :: env.world]
                x = gather(train_tokens, rows, T + 1).to(device)
                sync = m == config.grad_accum - 1 or env.world == 1 or config.parallel != "ddp"
                ddp = getattr(net, "_orig_mod", net)  # under torch.compile, no_sync lives on the wrapped DDP module
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast(device, config.precision):  # the forward only, as torch.amp recommends
                        logits, state = net(x[:, :-1], carried[m])
                        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
                    (loss / config.grad_accum).backward()
                if config.carry_state:
                    carried[m] = state.detach()
                loss_sum += loss.item()
                # Gone before the next forward: kept alive, this step's graph leftovers fragment the heap, and Hope's
                # next step ran 1.3x slower on CPU (fresh memory faulted in; docs/benchmarks.md)
                del logits, state, loss
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if levels is not None:
                levels.step(tokens=T)  # each row's stream advanced by T tokens
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += config.batch_size * T
            window_tokens += config.batch_size * T
            loss_value, flags = loss_sum / config.grad_accum, [float(stop.requested), float(clock.due())]
            if env.world > 1:  # one collective: the mean loss, and whether any process was signalled or is due
                t = torch.tensor([loss_value, *flags], dtype=torch.float64)
                dist.all_reduce(t)
                loss_value, flags = t[0].item() / env.world, t[1:].tolist()
            stop_now, save_now = flags[0] > 0, flags[1] > 0
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training loss is {loss_value} at step {step}: lower --lr or raise --warmup-steps"
                )
            bar.update(1)
            if step % config.log_every == 0 or step == last:
                now = time.perf_counter()
                tps = window_tokens / (now - window_t0)
                values = {
                    "loss": loss_value,
                    "lr": lr_at(step - 1, config),
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tps,
                    "tokens": seen,
                }
                metrics.log(step, "train", values)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}")
                window_t0, window_tokens = now, 0
            if config.eval_every and step % config.eval_every == 0 and step < last:
                validate(step)
            if step < last and (stop_now or save_now or (config.save_every and step % config.save_every == 0)):
                save(step)
                clock.reset()
            if stop_now and step < last:
                bar.close()
                metrics.close()
                signum = stop.signum or signal.SIGTERM  # a process that was not signalled stops with the others
                raise Interrupted(
                    signum,
                    f"stopped by {signal.Signals(signum).name} at step {step} of {config.steps}; saved "
                    f"{out_dir / CHECKPOINTS / f'step-{step:08d}'}. Resume with the same command, or "
                    f"`nestlearn train --out-dir {out_dir}`",
                )
        bar.close()
        train_seconds = time.perf_counter() - t_start
        result = validate(step)
        save(step)
        metrics.close()
        # tokens over the wall time of the loop, periodic validation and checkpoints included
        result["train_tokens_per_s"] = seen / train_seconds if seen else float("nan")
        return result


def main(argv: list[str] | None = None) -> int:
    p = parser("nestlearn train", __doc__.split("\n\n")[0])
    TrainConfig.add_arguments(p)
    args = p.parse_args(argv)
    try:
        config = TrainConfig.from_args(args)
    except (ValueError, TypeError, FileNotFoundError) as e:
        p.error(str(e))
    try:
        result = train(config)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
