"""The continual-learning protocol's settings and its model: `ContinualConfig` (every option of `nestlearn continual`,
checked on creation, with what each strategy needs of the start) and `make_model`, the model a run trains from the
preset or from a pretrained model, its base frozen as the strategy says (nestlearn.evals.continual runs it)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import presets, pretrained
from ..config import ADAPTERS, LORA_TARGETS, LoRAConfig
from ..data.tokenizer import ByteTokenizer
from ..runtime import check_device
from .streams import STREAMS

__all__ = [
    "STRATEGIES",
    "FROZEN_BASE",
    "DEFAULT_LORA_RANK",
    "ContinualConfig",
    "make_model",
    "build_model",
    "pretrained_config",
    "level_stack",
]

STRATEGIES = ("finetune", "ewc", "replay", "levels", "lora", "adapter", "cms-levels", "memorize", "none")
# a memory pathway trained on a frozen pretrained base (--init); memorize: the in-context levels learn as they read,
# no parameter is trained
FROZEN_BASE = ("lora", "adapter", "cms-levels", "memorize")
REPLAY_FROM = ("tasks", "general")  # replay: a buffer of earlier tasks' rows, or general text (wiki's train split)
ON_HOPE_ATTENTION = ("cms-levels", "memorize")  # CMS levels stacked from the pretrained MLP (§7.3)
DEFAULT_LORA_RANK = 8  # --strategy lora without --lora-rank (alpha: 2 × rank, as `nestlearn train`)
# the settings of one strategy (or two): given with another strategy, they are an error that names both
OWN_SETTINGS = {
    "update_periods": ("levels", "cms-levels", "memorize"),
    "lora_rank": ("lora",),
    "lora_alpha": ("lora",),
    "lora_targets": ("lora",),
    "adapter": ("adapter",),
    "adapter_blocks": ("adapter",),
    "task_blocks": ("memorize",),
}


@dataclass
class ContinualConfig:
    stream: str = "languages"
    tasks: list[str] | None = None
    preset: str | None = None  # None: transformer (hope_attention for cms-levels)
    size: str = "debug"
    strategy: str = "finetune"
    update_periods: str | None = None  # levels, cms-levels: the CMS periods, e.g. "16,128,2048"; default: the preset's
    steps_per_task: int = 200
    batch_size: int = 8
    seq_len: int = 256
    lr: float = 3e-3
    warmup_steps: int = 20
    ewc_lambda: float = 100.0
    ewc_batches: int = 8
    replay_fraction: float = 0.25
    replay_batches: int = 8
    replay_from: str = "tasks"  # replay: rows of earlier tasks (a buffer), or "general": wiki's train split
    classes_per_task: int = 1
    people_per_set: int = 8  # facts: invented people per fact set (4 facts each, 2 test questions per fact)
    # facts: the set's statements put in every test prompt; bbc: labelled training articles of every candidate class
    few_shot: int = 0  # (the base reading instead of learning)
    # general ability kept, measured before the stream and after it: bits per byte on this many tokens of wiki's test
    # split, and exact match / F1 on this many SQuAD v2 dev questions in context (nestlearn.evals.general); 0: off
    general_tokens: int = 0
    general_qa: int = 0
    init_from: str | None = None  # §7.3: a trained byte-level checkpoint whose weights and MLPs start the model
    eval_tokens: int = 16384
    eval_items: int = 0  # classification streams (bbc): validation examples scored per task, 0 for all
    seed: int = 0
    data_root: str | None = None
    progress: bool = True
    # a pretrained model (a Hugging Face Llama folder or a nestlearn Transformer): its shape, weights and tokenizer
    init: str | None = None
    # a pretrained start into hope_attention: copies (default) or residual (docs/pretrained.md)
    stack: str | None = None
    lora_rank: int | None = None  # lora: the adapters' rank (default 8)
    lora_alpha: float | None = None  # lora: their scale alpha (default 2 × rank)
    lora_targets: str | None = None  # lora: comma-separated among qkv,proj,up,down (default all four)
    adapter: str | None = None  # adapter: titans (default) or sm_titans
    adapter_blocks: int | None = None  # adapter: how many of the last blocks carry it (default all)
    task_blocks: int | None = None  # memorize: how many of the last blocks' in-context levels learn (default all)
    # where the model trains and is scored: auto (cuda if visible, else cpu), cpu, cuda, cuda:N; float32 everywhere.
    # Not part of a run's identity: a run saved on one device resumes on another
    device: str = "auto"

    def __post_init__(self) -> None:
        check_device(self.device)
        if self.stream not in STREAMS:
            raise ValueError(f"stream={self.stream!r} is not known; expected one of {list(STREAMS)}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy={self.strategy!r} is not known; expected one of {list(STRATEGIES)}")
        if self.preset is None:
            self.preset = "hope_attention" if self.strategy in ON_HOPE_ATTENTION else "transformer"
        if self.preset not in presets.PRESETS:
            raise ValueError(f"preset={self.preset!r} is not known; expected one of {list(presets.PRESETS)}")
        for name in (
            "steps_per_task",
            "batch_size",
            "seq_len",
            "ewc_batches",
            "replay_batches",
            "classes_per_task",
            "eval_tokens",
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("lora_rank", "adapter_blocks", "task_blocks"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name}={value!r} must be a positive int")
        for name in ("people_per_set",):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r} must be a positive int")
        for name in ("few_shot", "general_tokens", "general_qa", "eval_items"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r} must be an int >= 0")
        if self.eval_items and self.stream != "bbc":
            raise ValueError(
                f"--eval-items {self.eval_items} caps the examples a classification task scores: it needs --stream "
                f"bbc, not {self.stream} (language streams score --eval-tokens; facts every question of a set)"
            )
        if self.few_shot and self.stream not in ("facts", "bbc"):
            raise ValueError(
                f"--few-shot puts examples in every test prompt (a fact set's statements, or labelled articles of "
                f"each class): it needs --stream facts or bbc, not {self.stream}"
            )
        if self.replay_from not in REPLAY_FROM:
            raise ValueError(f"replay_from={self.replay_from!r} is not known; expected one of {list(REPLAY_FROM)}")
        if self.replay_from != "tasks" and self.strategy != "replay":
            raise ValueError(
                f"--replay-from {self.replay_from} says what the replay strategy replays: use --strategy replay with "
                f"it (this run's strategy is {self.strategy})"
            )
        if not 0 < self.replay_fraction < 1:
            raise ValueError(f"replay_fraction={self.replay_fraction} must lie in (0, 1)")
        if self.lr <= 0 or self.ewc_lambda < 0:
            raise ValueError(f"lr={self.lr} must be > 0 and ewc_lambda={self.ewc_lambda} >= 0")
        for name, strategies in OWN_SETTINGS.items():
            if getattr(self, name) is not None and self.strategy not in strategies:
                flag, which = "--" + name.replace("_", "-"), " or ".join(f"--strategy {s}" for s in strategies)
                whose = " and ".join(
                    [", ".join(strategies[:-1]), strategies[-1]] if len(strategies) > 1 else strategies
                )
                raise ValueError(
                    f"{flag} ({name}) is the {whose} strategy's setting: use {which} with it "
                    f"(this run's strategy is {self.strategy})"
                )
        self._check_start()
        if self.strategy == "lora":
            self.lora_rank = self.lora_rank or DEFAULT_LORA_RANK
            self.lora_alpha = 2.0 * self.lora_rank if self.lora_alpha is None else float(self.lora_alpha)
            self.lora_config()  # checks alpha and the targets now
        if self.strategy == "adapter":
            self.adapter = self.adapter or ADAPTERS[0]
            if self.adapter not in ADAPTERS:
                raise ValueError(f"adapter={self.adapter!r} is not known; expected one of {list(ADAPTERS)}")

    def _check_start(self) -> None:
        """What the model starts from, and what each strategy needs of it."""
        if self.init is not None and self.init_from is not None:
            raise ValueError(
                "--init and --init-from both say what to start from: give one (--init DIR for a pretrained model; "
                "--init-from is the older byte-level stacking into a titans or hope preset)"
            )
        if self.strategy in FROZEN_BASE and not self.pretrained_start:
            raise ValueError(
                f"--strategy {self.strategy} trains a memory pathway on a frozen pretrained base: give --init DIR (a "
                "Hugging Face Llama folder, e.g. the one `nestlearn fetch-model smollm2-135m` prints, or a nestlearn "
                "Transformer checkpoint)"
            )
        if self.strategy in ON_HOPE_ATTENTION and self.preset != "hope_attention":
            raise ValueError(
                f"--strategy {self.strategy} stacks CMS levels into hope_attention (§7.3): drop --preset {self.preset}"
            )
        if self.stack is not None:
            if self.stack not in pretrained.STACKS:
                raise ValueError(f"stack={self.stack!r} is not known; expected one of {list(pretrained.STACKS)}")
            if not self.pretrained_start or self.preset != "hope_attention":
                raise ValueError(
                    "--stack says how CMS levels start from a pretrained MLP: it needs --init and a hope_attention "
                    "model (--preset hope_attention or --strategy cms-levels)"
                )
        if self.init is not None and self.preset not in pretrained.PRESETS_FROM_SOURCE:
            raise ValueError(
                f"--init builds {' or '.join(pretrained.PRESETS_FROM_SOURCE)} from the pretrained Transformer; a "
                f"{self.preset} has a token mixer with no weights to start from: use --strategy adapter for a memory "
                "beside attention (or --init-from to stack a byte-level checkpoint's MLPs into it)"
            )
        if self.pretrained_start and self.preset == "transformer" and self.update_periods is not None:
            raise ValueError(
                "--update-periods on a pretrained Transformer makes CMS levels of its MLP: use --preset hope_attention "
                "(or --strategy cms-levels), so that every level starts from the MLP and the model from its source"
            )

    @property
    def pretrained_start(self) -> bool:
        """Whether the model starts from a pretrained Transformer through `nestlearn.pretrained` (equal logits at
        start): with --init, and with --init-from into a transformer or hope_attention."""
        return self.init is not None or (self.init_from is not None and self.preset in pretrained.PRESETS_FROM_SOURCE)

    def lora_config(self) -> LoRAConfig | None:
        if self.strategy != "lora":
            return None
        targets = tuple(t.strip() for t in self.lora_targets.split(",")) if self.lora_targets else LORA_TARGETS
        return LoRAConfig(rank=self.lora_rank, alpha=self.lora_alpha, targets=targets)


def make_model(config: ContinualConfig, start: bool = True):
    """(model, tokenizer): the model a run trains, its base frozen as the strategy says, and the tokenizer its stream
    is read with. Without a pretrained start: the preset at `config.size`, byte-level (with `init_from` into a
    titans or hope preset, its weights from that checkpoint by `level_stack`). With one (`config.pretrained_start`):
    the source's shape and tokenizer, stacked and initialised by `nestlearn.pretrained` so that it starts with the
    source's logits. `start=False` leaves the weights as built (a resumed run loads its own), so the source's weights
    are not read; the frozen flags, which no state dict holds, are set either way."""
    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..data.tokenizer import load_tokenizer
    from ..lora import mark_only_lora_trainable
    from ..model import build

    if not config.pretrained_start:
        return _byte_level_model(config, start), ByteTokenizer()
    folder = resolve_checkpoint(config.init or config.init_from)
    model = build(pretrained_config(config, folder))
    if start:
        source, tokenizer = load_checkpoint(folder)
        pretrained.initialise(model, source)
    else:
        tokenizer = load_tokenizer(folder)
    if config.strategy == "memorize":
        _check_memorize(model, config)
        model.requires_grad_(False)  # nothing is trained: the in-context levels learn as they read (eq. 71)
    elif config.strategy == "lora":
        mark_only_lora_trainable(model)  # the factors only: not even the CMS levels of a hope_attention
    elif config.strategy in FROZEN_BASE:
        pretrained.freeze(model, "base")  # adapters, and CMS levels with a period of their own
    return model, tokenizer


def build_model(config: ContinualConfig, start: bool = True):
    """The model of `make_model`, without its tokenizer."""
    return make_model(config, start)[0]


def pretrained_config(config: ContinualConfig, folder: str | Path):
    """The ModelConfig of a pretrained start: `config.preset` at the source's shape (`pretrained.stacked_config`,
    periods shorter than --seq-len in context, the others outer levels), with the strategy's LoRA or adapter."""
    from ..train_config import parse_periods

    source = pretrained.source_config(folder)
    if source.lora is not None:  # pretrained.initialise would not find the adapted weights under their new names
        raise ValueError(
            f"{folder} has LoRA adapters (rank {source.lora.rank}): fold them into its weights first "
            "(nestlearn.lora.merge_lora(model), then model.save_pretrained(DIR)) and start from that"
        )
    periods = parse_periods(config.update_periods) if config.update_periods is not None else None
    model_config = pretrained.stacked_config(
        source, config.preset, update_periods=periods, stack=config.stack or "copies"
    )
    model_config = dataclasses.replace(model_config, seq_len=config.seq_len)
    if config.preset == "hope_attention":  # which levels are outer follows this run's window, as in `train`
        model_config = dataclasses.replace(
            model_config, cms=dataclasses.replace(model_config.cms, outer_from=config.seq_len)
        )
    extra: dict = {}
    if config.strategy == "lora":
        extra["lora"] = config.lora_config()
    if config.strategy == "adapter":
        extra.update(adapter=config.adapter, adapter_blocks=config.adapter_blocks)
    if config.strategy == "memorize":  # --lr is η of the in-context levels
        cms = dataclasses.replace(model_config.cms, task_lr=config.lr, task_blocks=config.task_blocks)
        extra["cms"] = cms
    return dataclasses.replace(model_config, **extra) if extra else model_config


def _check_memorize(model, config: ContinualConfig) -> None:
    """memorize needs in-context levels that learn, and rows that end on every one's period (`task_cms.commit`)."""
    periods = sorted({lv.period for _, _, lv in model.task_levels})
    if not periods:
        raise ValueError(
            f"--strategy memorize learns through in-context CMS levels, and --update-periods "
            f"{config.update_periods or 'the default'} gives none that learns: give a period shorter than --seq-len "
            f"{config.seq_len}, e.g. --update-periods 64,none (and --task-blocks at least 1)"
        )
    layers = model.config.num_layers
    if config.task_blocks is not None and config.task_blocks > layers:
        raise ValueError(f"--task-blocks {config.task_blocks}: the model has {layers} blocks; give at most {layers}")
    bad = [p for p in periods if config.seq_len % p]
    if bad:
        raise ValueError(
            f"--strategy memorize keeps what each row taught its in-context levels, so a row (--seq-len "
            f"{config.seq_len}) must end on every level's period; {bad} do not divide it"
        )


def _byte_level_model(config: ContinualConfig, start: bool):
    """The preset at `config.size`, byte-level; with `init_from` (a titans or hope preset), shaped like that
    checkpoint and started from it by `level_stack`."""
    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..model import build
    from ..train_config import parse_periods

    model_config = dataclasses.replace(
        presets.PRESETS[config.preset](config.size), seq_len=config.seq_len, vocab_size=ByteTokenizer().vocab_size
    )  # every stream is byte-level
    source = None
    if config.init_from is not None:
        source, tokenizer = load_checkpoint(resolve_checkpoint(config.init_from))
        s = source.config
        if s.vocab_size != model_config.vocab_size or not isinstance(tokenizer, ByteTokenizer):
            raise ValueError(
                f"init_from={config.init_from!r} has vocabulary {s.vocab_size}; stacking into {config.preset} reads "
                f"the streams byte-level ({model_config.vocab_size}): train it with --tokenizer bytes, or start a "
                "transformer or hope_attention with --init, which reads them with the model's own tokenizer"
            )
        cms = dataclasses.replace(model_config.cms, hidden_mult=s.cms.hidden_mult, hidden_size=s.cms.hidden_size)
        model_config = dataclasses.replace(
            model_config, num_layers=s.num_layers, dim=s.dim, num_heads=s.num_heads, cms=cms
        )
    if config.update_periods is not None:
        # new levels: periods shorter than the training window are in-context, the others outer (as `train`)
        cms = dataclasses.replace(
            model_config.cms, update_periods=parse_periods(config.update_periods), outer_from=model_config.seq_len
        )
        model_config = dataclasses.replace(model_config, cms=cms)  # checks the periods
    model = build(model_config)
    if source is not None and start:
        level_stack(model, source)
    return model


@torch.no_grad()
def level_stack(model, source) -> list[str]:
    """Paper §7.3 (ad-hoc level stacking) into a model whose token mixer the source does not have (titans, hope):
    start `model` from a trained `source` of the same width and depth. Every parameter with the same name and shape
    is copied (embeddings, norms), and every outer (SwiGLU) CMS level of block i starts from the source's MLP of
    block i, its first CMS level; in-context levels and memories keep their own initialisation, so the model does
    not start with the source's logits (a transformer or hope_attention does: `nestlearn.pretrained.initialise`).
    Returns the names of the parameters set."""
    from ..cms import SwiGLU

    src = dict(source.named_parameters())
    done = []
    for name, p in model.named_parameters():
        if name in src and src[name].shape == p.shape:
            p.copy_(src[name])
            done.append(name)
    for i, block in enumerate(model.blocks):
        mlp = source.blocks[i].cms.levels[0]
        if not isinstance(mlp, SwiGLU):
            raise ValueError(f"the source's block {i} has no MLP as its first CMS level to initialise levels from")
        gate, up = mlp.up.weight.chunk(2, dim=0)
        for j, level in enumerate(block.cms.levels):
            if isinstance(level, SwiGLU):
                level.load_mlp(gate, up, mlp.down.weight)
                done += [f"blocks.{i}.cms.levels.{j}.up.weight", f"blocks.{i}.cms.levels.{j}.down.weight"]
    return sorted(set(done))
