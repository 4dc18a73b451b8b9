"""Learning after deployment: a trained model reads a stream and keeps learning, every level at its own rate.

    learner = Learner(model, lr=1e-3)                       # outer levels learn at 1e-3, the base level is frozen
    state, report = learner.memorize(stream)                # stream: int64 (b, n); state carried across calls
    state, report = learner.memorize(more, state)           # continue where the last call stopped
    learner.save("mem/", state); model, learner, state = Learner.load("mem/")

    nestlearn memorize runs/hope --data wiki --split validation --tokens 65536 --out-dir runs/hope-mem

The paper's continual learner (§3.2, §7) has two kinds of level, and `memorize` runs both:

- **in-context levels** (the Titans memories, self-modifying Titans, CMS levels with a period shorter than the
  context) learn in the forward pass: their fast weights are written every chunk / period and carried in the
  per-sequence state from one segment to the next;
- **outer levels** (`model.levels()`: CMS levels with a period C^(ℓ), and `base`, everything else) learn by the
  task loss, next-token cross-entropy on the stream, summed over C^(ℓ) tokens and stepped once per period with
  their optimizer (eq. 71, `nestlearn.optim.Levels`). A level with learning rate 0 is frozen: it is not given
  to the optimizer and gets no gradient.

A model with LoRA adapters (`nestlearn.lora.add_lora`, `nestlearn memorize --lora-rank R`) learns through them: its
factors form one more level, `lora`, stepped every segment at `lr` while `base` stays frozen (base_lr 0), so that a
pretrained model learns after deployment through its low-rank factors only.

The stream is read in segments of `segment` tokens (default: the model's seq_len), the state detached between
segments (truncated backprop, as in training with --carry-state). A period must be a multiple of the segment.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from .checkpoint import decode_state, encode_state
from .health import memories as _memories
from .health import memory_state as _memory_state
from .health import unhealthy, warn_about
from .model import LanguageModel, Level, ModelState, load
from .optim import OPTIMIZERS, Levels, optimizer_class

__all__ = ["Learner", "MemorizeReport", "memorize", "stream_loss"]

LEARNER_FILE = "learner.pt"
LORA_LEVEL = "lora"  # the LoRA factors of a model that has them: one level, stepped every segment at `lr`


@dataclass
class LevelReport:
    """An outer level: its period, learning rate, the optimizer steps it took and how far its weights moved."""

    name: str
    period: int | None
    lr: float
    steps: int
    change: float  # ‖θ_after − θ_before‖ / ‖θ_before‖ over the level's parameters


@dataclass
class MemoryReport:
    """An in-context memory: its chunk / period, the writes made in this call (chunks completed) and how far they
    moved its fast weights.

    `change` is ‖M_after − M_before‖ / ‖M_before‖, averaged over the batch, of the weights at the memory's last
    chunk boundary (the state's `snapshot` while a chunk is part-way through, else its weights): what the `writes`
    made. So it is 0 when `writes` is 0: the retention and the gradients of a chunk not yet complete, already folded
    into the running weights, are not counted until the chunk completes (a CMS level does not read them before)."""

    name: str
    period: int
    writes: int
    change: float


@dataclass
class MemorizeReport:
    """What one `memorize` call changed. Losses are mean next-token cross-entropy (nats). On the stream:
    `loss_before` read from a fresh state with the weights before the call, `loss_online` while memorizing (each
    segment before the outer levels saw it), `loss_after` read again from a fresh state with the new weights (what
    the outer levels kept of what they saw). On a held-out continuation of the stream, when one is given (what was
    learned, not what was seen): `held_out_before` with the old weights and a fresh state, `held_out_after` with
    the new weights and a fresh state (the outer levels' learning), `held_out_in_context` with the new weights and
    the state the stream ended in (the outer levels and the in-context memories together)."""

    tokens: int
    segments: int
    loss_before: float | None
    loss_online: float
    loss_after: float | None
    held_out_tokens: int = 0
    held_out_before: float | None = None
    held_out_after: float | None = None
    held_out_in_context: float | None = None
    levels: list[LevelReport] = field(default_factory=list)
    memories: list[MemoryReport] = field(default_factory=list)
    # memories that reached the dead state (nestlearn.health) and the stream position where each was first found
    dead_memories: dict[str, int] = field(default_factory=dict)
    stopped: bool = False  # ended early by a stop request (a signal): `tokens` were read of those given

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """The report as Markdown."""

        def f(x):
            return "" if x is None else f"{x:.4f}"

        lines = [
            f"{self.tokens} tokens per sequence in {self.segments} segments; loss on them (nats/token): before "
            f"{f(self.loss_before)}, online {f(self.loss_online)}, after {f(self.loss_after)}",
        ]
        if self.held_out_tokens:
            lines.append(
                f"on the next {self.held_out_tokens} tokens (held out): before {f(self.held_out_before)}, after "
                f"{f(self.held_out_after)} (fresh state), after with the memorized state "
                f"{f(self.held_out_in_context)}"
            )
        lines += [
            "",
            "| level | kind | period | lr | updates | relative change |",
            "| --- | --- | ---: | ---: | ---: | ---: |",
        ]
        for lv in self.levels:
            period = "every segment" if lv.period is None else lv.period
            lines.append(f"| {lv.name} | outer | {period} | {lv.lr:g} | {lv.steps} | {lv.change:.3g} |")
        for m in self.memories:
            lines.append(f"| {m.name} | in-context | {m.period} | | {m.writes} | {m.change:.3g} |")
        for name, at in self.dead_memories.items():
            lines.append(f"\nwarning: {name} reached the dead state by token {at} and could no longer learn")
        return "\n".join(lines)


def _carve(model: LanguageModel, periods: dict[str, int] | None) -> list[Level]:
    """`model.levels()`, with the LoRA factors (wherever they are) moved into the level `lora`, stepped every segment,
    and the `base` parameters whose names match each pattern of `periods` moved into a new outer level with that
    period."""
    from .lora import lora_parameters

    levels = [Level(lv.name, lv.period, dict(lv.params)) for lv in model.levels()]
    factors = set(lora_parameters(model))
    if factors:
        lora = Level(LORA_LEVEL, None, {})
        for lv in levels:
            for n in [n for n in lv.params if n in factors]:
                lora.params[n] = lv.params.pop(n)
        levels.append(lora)
    base = next((lv for lv in levels if lv.name == "base"), None)
    for pattern, period in (periods or {}).items():
        hits = {n: p for n, p in (base.params.items() if base else ()) if re.search(pattern, n)}
        if not hits:
            raise ValueError(
                f"periods pattern {pattern!r} matches no parameter of the base level; parameter names "
                "look like 'blocks.0.cms.levels.2.up.weight'"
            )
        for n in hits:
            del base.params[n]
        levels.append(Level(pattern, period, hits))
    return [lv for lv in levels if lv.params]


def _committed(state) -> dict[str, Tensor]:
    """A memory's weights at its last chunk boundary: what its completed writes made."""
    return state.snapshot if state.offset else state.weights


def _rows(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """(b, m, n) weights as (b, 1, m, n), the (batch, heads, out, in) layout `_relative_change` reads."""
    return {k: w.unsqueeze(1) for k, w in weights.items()}


def _relative_change(before: dict[str, Tensor], after: dict[str, Tensor]) -> float:
    num = sum(((after[k] - before[k]).float() ** 2).flatten(-3).sum(-1) for k in before)  # (b,) or ()
    den = sum((before[k].float() ** 2).flatten(-3).sum(-1) for k in before)
    return (num.sqrt() / den.sqrt().clamp_min(1e-12)).mean().item()


@torch.no_grad()
def stream_loss(model: LanguageModel, tokens: Tensor, segment: int, state: ModelState | None = None) -> float:
    """Mean next-token cross-entropy of a stream (b, n) read in segments with the state carried."""
    total, count = 0.0, 0
    for lo in range(0, tokens.shape[1] - 1, segment):
        x = tokens[:, lo : lo + segment + 1]
        logits, state = model(x[:, :-1], state)
        total += F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="sum").item()
        count += x[:, 1:].numel()
    return total / count


class Learner:
    """The outer levels of a deployed model with their learning rates, periods and optimizer (eq. 71).

    Args:
        model: a LanguageModel.
        lr: learning rate of every outer level with a period, and of the LoRA factors (the level `lora`, stepped
            every segment) of a model that has them (default None: 1e-3 where there are such levels). A model with
            none (a default Hope: its only outer level is `base`) refuses an explicit lr > 0, which would train
            nothing, and names the flags that make levels to train.
        base_lr: learning rate of `base`, the parameters stepped every step in training (embeddings,
            projections, meta-learned initial states, CMS levels of period None; with LoRA, the adapted weights
            under the factors). Default 0: frozen, the usual deployment; a positive value fine-tunes them on the
            stream every `segment` tokens.
        lrs: {level name: lr}, overriding the two above for single levels (names: `model.levels()`, plus the
            patterns of `periods`).
        periods: {regex: period in tokens}: make the base parameters whose names match an outer level of that
            period, e.g. {r"cms\\.levels\\.2\\.": 512} for Hope's SwiGLU level, which has no period in training.
        optimizer: one of nestlearn.optim.OPTIMIZERS (default adamw, no weight decay); optimizer_args: its
            keyword arguments.
        segment: tokens per forward pass (default: the model's seq_len).
    """

    def __init__(
        self,
        model: LanguageModel,
        lr: float | None = None,
        base_lr: float = 0.0,
        lrs: dict[str, float] | None = None,
        periods: dict[str, int] | None = None,
        optimizer: str = "adamw",
        optimizer_args: dict | None = None,
        segment: int | None = None,
    ):
        if not isinstance(model, LanguageModel):
            raise ValueError(f"Learner needs a nestlearn LanguageModel; got {type(model).__name__}")
        for name, value in (("lr", 0.0 if lr is None else lr), ("base_lr", base_lr), *(lrs or {}).items()):
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"learning rate {name}={value!r} must be a finite number >= 0 (0 freezes the level)")
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer={optimizer!r} is not known; expected one of {list(OPTIMIZERS)}")
        self.segment = segment or model.config.seq_len
        if isinstance(self.segment, bool) or not isinstance(self.segment, int) or self.segment < 1:
            raise ValueError(f"segment={segment!r} must be a positive number of tokens")
        self.model = model
        levels = _carve(model, periods)
        if lr is not None and lr > 0 and not _outer(levels, lrs):
            names = ", ".join(f"{lv.name} (period {lv.period})" for lv in levels)
            raise ValueError(
                f"lr={lr} would train nothing: it applies to the outer levels with a period, and this model has none "
                f"beyond the ones named in lrs (its levels: {names}); `base` learns at base_lr={base_lr}. Make levels "
                "of base parameters with periods={regex: tokens} (--period 'cms\\.levels\\.2\\.=512'), add LoRA "
                "adapters to learn through (--lora-rank R), fine-tune base with base_lr > 0 (--base-lr), or leave lr "
                "unset to let only the in-context memories learn"
            )
        self.options = dict(
            lr=lr,
            base_lr=base_lr,
            lrs=dict(lrs or {}),
            periods=dict(periods or {}),
            optimizer=optimizer,
            optimizer_args=dict(optimizer_args or {}),
            segment=self.segment,
        )
        names = [lv.name for lv in levels]
        unknown = sorted(set(lrs or {}) - set(names))
        if unknown:
            raise ValueError(f"lrs names {unknown}, which are not levels of this model; levels: {names}")

        def lr_of(lv: Level) -> float:
            if lv.name in (lrs or {}):
                return float(lrs[lv.name])
            return float(base_lr if lv.name == "base" else 1e-3 if lr is None else lr)

        self.lrs = {lv.name: lr_of(lv) for lv in levels}
        self.periods = {lv.name: lv.period for lv in levels}
        self.learning = [lv for lv in levels if self.lrs[lv.name] > 0]
        self.levels = None
        if self.learning:
            groups = [{"params": list(lv.params.values()), "lr": self.lrs[lv.name]} for lv in self.learning]
            kwargs = {"weight_decay": 0.0, **self.options["optimizer_args"]}
            try:
                opt = optimizer_class(optimizer)(groups, lr=groups[0]["lr"], **kwargs)
            except TypeError as e:
                raise ValueError(f"optimizer_args for {optimizer}: {e} (docs/optimizers.md lists them)") from e
            self.levels = Levels(opt, self.learning)
            self.levels.due(self.segment)  # a period that is not a multiple of the segment fails now
        self.params = [p for lv in self.learning for p in lv.params.values()]

    # --- learning ---

    def memorize(
        self,
        tokens: Tensor,
        state: ModelState | None = None,
        *,
        held_out: Tensor | None = None,
        measure: bool = True,
        progress: bool = False,
        stop: Callable[[], bool] | None = None,
    ) -> tuple[ModelState, MemorizeReport]:
        """Read `tokens` (b, n), n − 1 a multiple of the segment, learning as it goes. Returns the state after the
        stream and a report; `measure=False` skips the extra passes behind loss_before / loss_after. `held_out`
        (b, m + 1), the stream's continuation, is read (not learned from) before and after: the report's held_out_*
        losses say what was learned rather than what was seen. `stop`, asked after every segment, ends the stream
        there when it returns True: the report (`stopped=True`) covers the segments read, without the measurements
        after the stream, and the state is the one to continue from."""
        from tqdm import tqdm

        model, S = self.model, self.segment
        if not isinstance(tokens, Tensor) or tokens.dim() != 2:
            raise ValueError("tokens must be an int64 tensor of shape (batch, n): one stream per row")
        n = tokens.shape[1] - 1
        if n < S or n % S:
            raise ValueError(
                f"the stream has {n} predictions per row ({n + 1} tokens), which is not a positive "
                f"multiple of the segment {S}: give k·{S} + 1 tokens per row"
            )
        if held_out is not None and (
            not isinstance(held_out, Tensor) or held_out.dim() != 2 or held_out.shape[0] != tokens.shape[0]
        ):
            raise ValueError(
                f"held_out must be an int64 tensor (batch={tokens.shape[0]}, m + 1): the continuation of each stream"
            )
        if held_out is not None and held_out.shape[1] < 2:
            raise ValueError("held_out needs at least 2 tokens per row: one to read and one to predict")
        if not self.learning and not _memories(model) and not model.task_levels:
            raise ValueError(
                "nothing would learn: every learning rate is 0 and the model has no in-context memory; "
                "give lr/base_lr > 0"
            )
        state = model.init_state(tokens.shape[0]) if state is None else state
        start_state = state
        was_training = model.training
        model.eval()  # no dropout; learning here is explicit
        before = {n_: p.detach().clone() for lv in self.learning for n_, p in lv.params.items()}
        steps0 = {lv.name: lv.steps for lv in self.levels.levels} if self.levels else {}
        loss_before = stream_loss(model, tokens, S) if measure else None
        held_before = stream_loss(model, held_out, S) if held_out is not None else None
        total, dead, read = 0.0, {}, 0
        for lo in tqdm(range(0, n, S), desc="memorize", unit="segment", disable=not progress, leave=False):
            x = tokens[:, lo : lo + S + 1]
            with torch.set_grad_enabled(bool(self.params)):
                logits, state = model(x[:, :-1], state)
                loss = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:])
            total += loss.item()
            if self.params:
                grads = torch.autograd.grad(loss, self.params, allow_unused=True)
                for p, g in zip(self.params, grads, strict=True):
                    p.grad = g
                self.levels.step(S)
                self.levels.zero_grad()
            state = state.detach()
            bad = [m for m in unhealthy(model, state) if m.name not in dead]
            warn_about(bad, f"after {lo + S:,} tokens of the stream")
            dead |= {m.name: lo + S for m in bad}
            read = lo + S
            if stop is not None and read < n and stop():
                break
        model.train(was_training)
        stopped = read < n
        report = MemorizeReport(
            tokens=read,
            segments=read // S,
            loss_before=loss_before,
            loss_online=total / (read // S),
            loss_after=stream_loss(model, tokens[:, : read + 1], S) if measure and not stopped else None,
            dead_memories=dead,
            stopped=stopped,
        )
        if held_out is not None and not stopped:
            report.held_out_tokens = held_out.shape[1] - 1
            report.held_out_before = held_before
            report.held_out_after = stream_loss(model, held_out, S)
            report.held_out_in_context = stream_loss(model, held_out, S, state)
        for lv in self.learning:
            num = sum(((p.detach() - before[k]) ** 2).sum() for k, p in lv.params.items())
            den = sum((before[k] ** 2).sum() for k in lv.params)
            steps = next(g.steps for g in self.levels.levels if g.name == lv.name) - steps0[lv.name]
            report.levels.append(
                LevelReport(
                    lv.name, lv.period, self.lrs[lv.name], steps, (num.sqrt() / den.sqrt().clamp_min(1e-12)).item()
                )
            )
        for name, period in self.frozen_levels():
            report.levels.append(LevelReport(name, period, 0.0, 0, 0.0))
        task_names = {f"blocks.{i}.cms.levels.{j}" for i, j, _ in model.task_levels}
        for name, period in _memories(model).items():
            if name in task_names:  # below: a task-loss level writes by steps at the ends of its periods
                continue
            old, new = _memory_state(start_state, name), _memory_state(state, name)
            writes = (old.offset + read) // period
            change = _relative_change(_committed(old), _committed(new))
            report.memories.append(MemoryReport(name, period, writes, change))
        position = start_state.task["position"] if start_state.task else 0
        for i, j, level in model.task_levels:  # task-loss levels: a write is a step at the end of a period
            old, new = start_state.layers[i]["cms"][j], state.layers[i]["cms"][j]
            writes = (position + read) // level.period - position // level.period
            before, after = ({k: t[k] for k in ("up", "down")} for t in (old, new))
            change = _relative_change(_rows(before), _rows(after)) if writes else 0.0
            report.memories.append(MemoryReport(f"blocks.{i}.cms.levels.{j}", level.period, writes, change))
        return state, report

    def frozen_levels(self) -> list[tuple[str, int | None]]:
        """(name, period) of the levels with learning rate 0."""
        return [(name, self.periods[name]) for name, lr in self.lrs.items() if lr == 0]

    # --- checkpoints ---

    def state_dict(self) -> dict:
        """The level optimizers' state, the levels' token counters and pending gradient sums, and the options."""
        return {"options": self.options, "levels": self.levels.state_dict() if self.levels else None}

    def load_state_dict(self, sd: dict) -> None:
        if (sd["levels"] is None) != (self.levels is None):
            raise ValueError(
                "the saved learner and this one differ in which levels learn; build it with the "
                f"saved options {sd['options']}"
            )
        if self.levels is not None:
            self.levels.load_state_dict(sd["levels"])

    def save(self, path: str | Path, state: ModelState | None = None) -> Path:
        """Write the model (save_pretrained), the learner and the stream state into the folder `path`."""
        path = Path(path)
        tmp = path / f".tmp-{os.getpid()}"  # written whole first, then moved in: a save cut short spoils nothing
        self.model.save_pretrained(tmp)
        torch.save({**self.state_dict(), "state": encode_state(state)}, tmp / LEARNER_FILE)
        for file in tmp.iterdir():
            os.replace(file, path / file.name)
        tmp.rmdir()
        return path

    @classmethod
    def load(cls, path: str | Path, device: str | torch.device = "cpu") -> tuple[LanguageModel, Learner, ModelState]:
        """The model, learner and state of a folder written by `save`; continue with `learner.memorize(x, state)`."""
        path = Path(path)
        if not (path / LEARNER_FILE).is_file():
            raise FileNotFoundError(
                f"{path / LEARNER_FILE} does not exist: is {path} a folder written by "
                "Learner.save or nestlearn memorize?"
            )
        try:
            saved = torch.load(path / LEARNER_FILE, map_location=device, weights_only=True)
            model = load(path, device=device)
        except Exception as e:  # torch, safetensors and json raise many kinds
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(
                f"cannot read the memorize folder {path} ({first}): it is corrupt or incomplete; start again from "
                "the original checkpoint"
            ) from e
        options = dict(saved["options"])
        if not _outer(_carve(model, options.get("periods")), options.get("lrs")):
            options["lr"] = None  # saved before an unused lr was refused: it trained nothing then either
        learner = cls(model, **options)
        learner.load_state_dict(saved)
        return model, learner, decode_state(saved["state"])


def memorize(
    model: LanguageModel,
    tokens: Tensor,
    state: ModelState | None = None,
    learner: Learner | None = None,
    *,
    held_out: Tensor | None = None,
    measure: bool = True,
    progress: bool = False,
    **options,
) -> tuple[ModelState, MemorizeReport]:
    """Learn from a stream after deployment, every level at its own rate: in-context memories through the forward
    pass, outer levels by the next-token loss every C^(ℓ) tokens with their optimizer. tokens: int64 (b, n).
    `options` build a `Learner` (lr, base_lr, lrs, periods, optimizer, ...); pass `learner=` instead to keep the
    level optimizers across calls; `held_out` as in `Learner.memorize`. Returns (state, MemorizeReport)."""
    if learner is None:
        learner = Learner(model, **options)
    elif options:
        raise ValueError(f"give either learner= or Learner options, not both; got options {sorted(options)}")
    elif learner.model is not model:
        raise ValueError("learner was built for another model: build it with Learner(this_model, ...)")
    return learner.memorize(tokens, state, held_out=held_out, measure=measure, progress=progress)


def _outer(levels: list[Level], lrs: dict[str, float] | None) -> list[str]:
    """The levels that `lr` applies to: every level but `base` and those given their own rate in `lrs`."""
    return [lv.name for lv in levels if lv.name != "base" and lv.name not in (lrs or {})]


def write_report(path: Path, report: MemorizeReport) -> None:
    (path / "memorize_report.json").write_text(json.dumps(report.to_dict(), indent=2) + "\n")


# --- the command ---

STREAM_FILE = "memorize.json"
