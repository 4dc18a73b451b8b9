"""The continual-learning protocol: train on tasks 1, …, n in order under one budget, evaluate on every task after
each, and measure forgetting (paper §9.1; the metrics of Lopez-Paz & Ranzato 2017 and Chaudhry et al. 2018).

    nestlearn continual --stream languages --preset hope --strategy levels --update-periods 16,128,2048
    nestlearn continual --stream bbc --preset transformer --strategy replay

R[i, j] is the score on task j after training on tasks 1..i (bits per byte for language-model streams, lower is
better; accuracy for classification, higher is better), b[j] the score of the untrained model. With T tasks and
s = +1 when higher is better, −1 when lower is:

    average          (1/T) Σ_j R[T, j]
    BWT              (1/(T−1)) Σ_{j<T} s·(R[T, j] − R[j, j])          backward transfer: < 0 is forgetting
    forgetting       (1/(T−1)) Σ_{j<T} max_{l<T} s·(R[l, j] − R[T, j]) the drop from the best score a task had
    FWT              (1/(T−1)) Σ_{j>1} s·(R[j−1, j] − b[j])           forward transfer: help before training on j

Streams: `languages` (the Debian handbook in one language after another: en, de, fr, es by default; bits per
byte per language), `domains` (wiki → shakespeare → pydoc), `bbc` (class-incremental BBC News: one class per
task, scored among the classes seen so far). Strategies: `finetune` (plain sequential training: the
catastrophic-forgetting baseline), `ewc` (elastic weight consolidation, online), `replay` (a fixed share of every
batch drawn from a buffer of earlier tasks, or with `--replay-from general` from general text), `levels` (every
level at its own period through `optim.Levels`, as `nestlearn train --update-periods`). Every strategy sees the
same number of batches of the same size per task.

From a pretrained model (`--init DIR`: a Hugging Face Llama folder or a nestlearn Transformer checkpoint), every
strategy starts at that model's shape with its weights, and the stream is read with its own tokenizer; three more
strategies then train a memory pathway on the frozen base (`nestlearn.pretrained`, docs/pretrained.md): `lora`
(low-rank adapters; only their factors train), `adapter` (a Titans or self-modifying Titans memory beside attention)
and `cms-levels` (§7.3: Hope-Attention whose CMS levels all start from the block's MLP, the outer ones stepped at
their periods). Each of these starts with the pretrained model's logits. A fourth, `memorize`, trains nothing: the
same Hope-Attention's in-context levels (a period shorter than --seq-len) learn from the task loss as they read the
stream (eq. 71), the task's rows one after another as one stream, and what they learnt is kept: it is the weights
every later sequence, scoring included, starts from (`task_cms.commit`). `--init-from CHECKPOINT` (older, byte-level)
starts a Titans or Hope preset from a trained Transformer, its MLPs becoming the CMS levels (`level_stack`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import random
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import pretrained
from ..interrupt import Interrupted, StopRequest
from ..task_cms import commit, reading_only
from .continual_report import plot, summary, table
from .continual_setup import (
    FROZEN_BASE,
    STRATEGIES,
    ContinualConfig,
    build_model,
    make_model,
)
from .general import general_ability
from .streams import STREAMS, ClassTask, LMTask, general_text, make_stream

__all__ = [
    "continual_metrics",
    "STREAMS",
    "STRATEGIES",
    "FROZEN_BASE",
    "ContinualConfig",
    "build_model",
    "make_model",
    "run",
    "make_stream",
    "LMTask",
    "ClassTask",
    "EWC",
    "Replay",
    "GeneralReplay",
    "plot",
    "table",
    "summary",
]

# --- metrics ---


def continual_metrics(R, baseline=None, higher_is_better: bool = True) -> dict[str, float | None]:
    """Average score, backward transfer, forgetting and forward transfer of a T × T matrix R (module docstring);
    `baseline` (T,), the untrained model's scores, is needed for forward transfer only."""
    R = np.asarray(R, dtype=np.float64)
    if R.ndim != 2 or R.shape[0] != R.shape[1] or R.shape[0] < 1:
        raise ValueError(f"R must be a square T × T matrix of scores; got shape {R.shape}")
    T, s = R.shape[0], 1.0 if higher_is_better else -1.0
    out: dict[str, float | None] = {"average": float(R[-1].mean()), "bwt": None, "forgetting": None, "fwt": None}
    if T > 1:
        out["bwt"] = float(np.mean([s * (R[-1, j] - R[j, j]) for j in range(T - 1)]))
        out["forgetting"] = float(np.mean([max(s * (R[l, j] - R[-1, j]) for l in range(T - 1)) for j in range(T - 1)]))
        if baseline is not None:
            b = np.asarray(baseline, dtype=np.float64)
            if b.shape != (T,):
                raise ValueError(f"baseline must have one score per task, shape ({T},); got {b.shape}")
            out["fwt"] = float(np.mean([s * (R[j - 1, j] - b[j]) for j in range(1, T)]))
    return out


# --- strategies ---


class EWC:
    """Online elastic weight consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018): after each task, the
    diagonal Fisher F (mean squared gradient of the task loss over `batches` batches) is added to a running sum
    and the weights θ* are kept; training then adds (λ/2) Σ F (θ − θ*)². Frozen parameters (requires_grad False)
    are left out: they cannot move."""

    def __init__(self, model, lam: float, batches: int):
        self.model, self.lam, self.batches = model, lam, batches
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def _named(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def penalty(self) -> Tensor | float:
        if not self.fisher:
            return 0.0
        return 0.5 * self.lam * sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self._named())

    def consolidate(self, task, rng, batch_size: int, seq_len: int) -> None:
        fisher = {n: torch.zeros_like(p) for n, p in self._named()}
        for _ in range(self.batches):
            x, mask = task.batch(rng, batch_size, seq_len)
            self.model.zero_grad(set_to_none=True)
            _loss(self.model, x, mask).backward()
            for n, p in self._named():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / self.batches
        self.model.zero_grad(set_to_none=True)
        for n, f in fisher.items():
            self.fisher[n] = self.fisher.get(n, 0) + f
        self.anchor = {n: p.detach().clone() for n, p in self._named()}


class Replay:
    """A buffer of `per_task` batches' rows from every finished task; a `fraction` of each later batch's rows is
    replaced by rows drawn from it, so that the compute per step is unchanged."""

    def __init__(self, fraction: float, per_task: int):
        self.fraction, self.per_task = fraction, per_task
        self.rows: list[tuple[Tensor, Tensor]] = []

    def mix(self, x: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        k = int(round(self.fraction * x.shape[0]))
        if not self.rows or k == 0:
            return x, mask
        picks = rng.integers(0, len(self.rows), size=k)
        x, mask = x.clone(), mask.clone()
        for row, i in enumerate(picks):
            x[row], mask[row] = self.rows[i]
        return x, mask

    def remember(self, task, rng, batch_size: int, seq_len: int) -> None:
        for _ in range(self.per_task):
            x, mask = task.batch(rng, batch_size, seq_len)
            self.rows.extend(zip(x, mask, strict=True))

    def general_rows(self, batch_size: int) -> int:
        return 0  # the buffer's rows are tasks' rows, counted as the task's own


class GeneralReplay(Replay):
    """Replay of general text (`--replay-from general`): from the first task on, the first `fraction` of each
    batch's rows is replaced by windows of a general corpus (wiki's train split; general ability is scored on its
    test split). The two kinds of row count in the loss by their share of the rows, each averaged over its own
    tokens, so that a task trained on a few answer tokens a row (bbc) is not drowned by whole rows of text."""

    def __init__(self, fraction: float, source: LMTask):
        super().__init__(fraction, per_task=0)
        self.source = source

    def mix(self, x: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        k = self.general_rows(x.shape[0])
        if k == 0:
            return x, mask
        g, g_mask = self.source.batch(rng, k, x.shape[1] - 1)
        return torch.cat([g, x[k:]]), torch.cat([g_mask, mask[k:]])

    def remember(self, task, rng, batch_size: int, seq_len: int) -> None:
        pass  # nothing to keep: the general text is there from the start

    def general_rows(self, batch_size: int) -> int:
        return int(round(self.fraction * batch_size))


def _loss(model, x: Tensor, mask: Tensor, general_rows: int = 0) -> Tensor:
    """Mean next-token loss over the masked tokens; with `general_rows`, the first rows (general text) and the rest
    (the task) each averaged over their own tokens and weighted by their share of the rows."""
    logits, _ = model(x[:, :-1])
    nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (b, t)
    if not general_rows:
        return (nll * mask).sum() / mask.sum().clamp_min(1)
    share, g, t = general_rows / x.shape[0], slice(None, general_rows), slice(general_rows, None)
    general = (nll[g] * mask[g]).sum() / mask[g].sum().clamp_min(1)
    return share * general + (1 - share) * (nll[t] * mask[t]).sum() / mask[t].sum().clamp_min(1)


@torch.no_grad()  # the in-context levels still step: task_cms enables gradients for their inner steps alone
def _memorize(model, x: Tensor, eos_id: int) -> Tensor:
    """The memorize strategy's step: the batch's rows read in turn, as one stream, by the in-context levels alone
    (eq. 71, in context); each row starts from the fast weights the last one ended with (`task_cms.commit`: θ_0 ←
    them), its attention cache dropped as between training rows. Every token's loss counts, the facts' mask too (the
    levels learn from what they read), except padding's: an end-of-text followed by another (bbc's left-padding) is
    not text, and does not drive a step. Returns the rows' next-token loss as read, each chunk before its own step,
    over the tokens that drive steps (padding's left out, as the other strategies' masks leave it out)."""
    was_training = model.training
    model.eval()
    total, count = x.new_zeros((), dtype=torch.float), 0
    for row in x:  # (T + 1,)
        padding = (row[:-1] == eos_id) & (row[1:] == eos_id)  # (T,): predicting end-of-text after end-of-text
        logits, state = model(row[None, :-1], learn=~padding[None])  # (1, T, V)
        nll = F.cross_entropy(logits[0].float(), row[1:], reduction="none")  # (T,)
        total, count = total + nll[~padding].sum(), count + int((~padding).sum())
        commit(model, state)
    model.train(was_training)
    return total / max(count, 1)


# --- the protocol ---


PROGRESS_FILE = "progress.pt"


def _progress_key(config: ContinualConfig) -> dict:
    """What a saved progress must share with the config that resumes it (not where the data lives or bars)."""
    return {k: v for k, v in asdict(config).items() if k not in ("data_root", "progress")}


def run(config: ContinualConfig, progress_file: str | Path | None = None) -> dict:
    """Train on the stream's tasks in order, scoring every task after each; returns R, the metrics and curves.

    With `progress_file`, everything the protocol has done is saved there after each task, and after the step in
    progress when SIGINT/SIGTERM arrives (then `Interrupted` is raised); a later call with the same file and config
    resumes exactly where it stopped: the same batches, the same numbers as a run that was never interrupted."""
    from tqdm import tqdm

    from ..model import Level
    from ..optim import Levels

    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    saved = _read_progress(progress_file, config)
    model, tokenizer = make_model(config, start=saved is None)  # a resumed run loads its own weights below
    tasks = make_stream(
        config.stream,
        config.tasks,
        config.data_root,
        config.seq_len,
        config.classes_per_task,
        tokenizer,
        config.people_per_set,
        config.few_shot,
    )
    trainable = [p for p in model.parameters() if p.requires_grad]  # a frozen base is in no optimizer
    n_trainable = 0 if config.strategy == "none" else sum(p.numel() for p in trainable)  # the base alone trains none
    if config.strategy == "memorize":  # no parameter is trained; the weights that learn are the levels' fast weights
        n_trainable = sum(lv.up.numel() + lv.down.numel() for _, _, lv in model.task_levels)
    n_frozen = model.num_parameters() - n_trainable
    if config.pretrained_start or n_frozen:
        counts = (
            f"nothing trained; {n_trainable:,} fast weights learn in context, {n_frozen:,} parameters fixed"
            if config.strategy == "memorize"
            else f"nothing trained; {n_frozen:,} parameters fixed"
            if config.strategy == "none"
            else pretrained.count(model)
        )
        print(f"nestlearn continual: {model.config.name}, {config.strategy}: {counts}", file=sys.stderr)
    opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=0.0) if trainable else None
    levels = None
    if config.strategy in ("levels", "cms-levels"):
        model_levels = [
            Level(lv.name, lv.period, {n: p for n, p in lv.params.items() if p.requires_grad}) for lv in model.levels()
        ]
        model_levels = [lv for lv in model_levels if lv.params]
        if all(lv.period is None for lv in model_levels):
            raise ValueError(
                f"the {config.strategy} strategy needs outer CMS levels with a period: {config.preset}'s CMS periods "
                f"{model.config.cms.update_periods} have none at least {model.config.cms.outer_from} "
                "tokens; give --update-periods, e.g. 16,128,2048 (periods at least --seq-len are "
                "outer levels)"
            )
        levels = Levels(opt, model_levels)
        levels.due(config.seq_len)
    ewc = EWC(model, config.ewc_lambda, config.ewc_batches) if config.strategy == "ewc" else None
    replay = None
    if config.strategy == "replay":
        replay = (
            GeneralReplay(config.replay_fraction, general_text(config.data_root, tokenizer))
            if config.replay_from == "general"
            else Replay(config.replay_fraction, config.replay_batches)
        )

    def score_all(stage: int) -> list[float]:
        """Every task's score after training on tasks 0..stage (stage −1: untrained)."""
        model.eval()
        out = []
        for j, t in enumerate(tasks):
            # class-incremental: choose among the classes of every task trained on so far, and task j's own
            candidates = [y for u in tasks[: max(stage, j) + 1] for y in getattr(u, "labels", ())]
            out.append(
                t.score(
                    model,
                    config.seq_len,
                    eval_tokens=config.eval_tokens,
                    eval_items=config.eval_items,
                    candidates=candidates,
                )
            )
        model.train()
        return out

    def save(task: int, task_step: int) -> bool:
        """Whether everything done so far is now in `progress_file`."""
        if progress_file is None:
            return False
        sd = {
            "config": json.dumps(_progress_key(config)),
            "task": task,
            "task_step": task_step,
            "step": step,
            "seconds": seconds + time.perf_counter() - t0,
            "R": R,
            "baseline": baseline,
            "general_before": general_before,
            "losses": losses,
            "train_seconds": train_seconds,
            "model": model.state_dict(),
            "optimizer": opt.state_dict() if opt is not None else {},
            "levels": levels.levels_state_dict() if levels is not None else {},
            "numpy_rng": json.dumps(rng.bit_generator.state),
            "torch_rng": torch.get_rng_state(),
            "python_rng": random.getstate(),
            "ewc": {"fisher": ewc.fisher, "anchor": ewc.anchor} if ewc is not None else {},
            "replay": [list(row) for row in replay.rows] if replay is not None else [],
        }
        path = Path(progress_file)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        try:
            torch.save(sd, tmp)
            os.replace(tmp, path)  # whole or not at all
        except OSError as e:  # a full disk costs the run its resumability, not the run
            tmp.unlink(missing_ok=True)
            print(
                f"nestlearn continual: could not save {path} ({e.strerror or e}); the run goes on, but if it is "
                f"stopped now it starts again from {'the last save' if path.is_file() else 'the beginning'}",
                file=sys.stderr,
                flush=True,
            )
            return False
        return True

    def general() -> dict | None:
        """General ability kept (nestlearn.evals.general), without its per-item predictions; None when off."""
        if not (config.general_tokens or config.general_qa):
            return None
        model.eval()
        r = general_ability(
            model,
            tokenizer,
            bpb_tokens=config.general_tokens,
            qa_items=config.general_qa,
            seed=config.seed,
            data_root=config.data_root,
        )
        model.train()
        return {k: v for k, v in r.items() if k not in ("squad_predictions", "config")}

    R, losses, step, seconds, first_task, first_step = [], [], 0, 0.0, 0, 0
    train_seconds = 0.0  # training alone (batches, forward, backward, step), for tokens/s
    if saved is None:
        baseline = score_all(-1)
        # memorize: the base's general ability, its levels reading θ_0 without a step (η = 0: exactly the pretrained
        # model), not the model learning inside each window at η, which a large η breaks before the stream begins
        with reading_only(model) if config.strategy == "memorize" else contextlib.nullcontext():
            general_before = general()
        t0 = time.perf_counter()
        save(0, 0)  # the measurements before the stream (50 minutes for some): kept through a kill before task 1 ends
    else:
        model.load_state_dict(saved["model"])
        if opt is not None:
            opt.load_state_dict(saved["optimizer"])
        if levels is not None:
            levels.load_levels_state_dict(saved["levels"])
        rng.bit_generator.state = json.loads(saved["numpy_rng"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        if ewc is not None:
            ewc.fisher, ewc.anchor = saved["ewc"]["fisher"], saved["ewc"]["anchor"]
        if replay is not None:
            replay.rows = [tuple(row) for row in saved["replay"]]
        R, baseline, losses, step, seconds = (saved[k] for k in ("R", "baseline", "losses", "step", "seconds"))
        general_before = saved.get("general_before")
        train_seconds = saved.get("train_seconds", 0.0)
        first_task, first_step = saved["task"], saved["task_step"]
        print(
            f"nestlearn continual: {progress_file} is finished; its results again"
            if first_task == len(tasks)
            else f"nestlearn continual: resuming from task {first_task + 1}/{len(tasks)}, step {first_step} of "
            f"{config.steps_per_task} ({progress_file})",
            file=sys.stderr,
        )
    t0 = time.perf_counter()
    with StopRequest("the current step") as stop:
        for i, task in enumerate(tasks):
            if i < first_task:
                continue
            bar = tqdm(
                range(first_step if i == first_task else 0, config.steps_per_task),
                desc=f"task {i + 1}/{len(tasks)} {task.name}",
                unit="step",
                disable=not config.progress,
                leave=False,
            )
            if config.strategy == "none":  # the base alone: nothing changes, so no step is taken
                bar.close()
                # its scores change only where the classes to choose among grow with the stage (class-incremental)
                R.append(score_all(i) if any(getattr(t, "labels", ()) for t in tasks) else list(baseline))
                save(i + 1, 0)
                continue
            for j in bar:
                started = time.perf_counter()
                x, mask = task.batch(rng, config.batch_size, config.seq_len)
                if config.strategy == "memorize":
                    loss = _memorize(model, x, tokenizer.eos_id)
                else:
                    lr = config.lr * min(1.0, (step + 1) / config.warmup_steps)
                    for g in opt.param_groups:
                        g["lr"] = lr
                    general_rows = 0
                    if replay is not None:
                        x, mask = replay.mix(x, mask, rng)
                        general_rows = replay.general_rows(x.shape[0])
                    loss = _loss(model, x, mask, general_rows)
                    total = loss + (ewc.penalty() if ewc is not None else 0.0)
                    opt.zero_grad(set_to_none=True)
                    total.backward()
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    levels.step(config.seq_len) if levels is not None else opt.step()
                losses.append({"step": step, "task": i, "loss": loss.item()})
                train_seconds += time.perf_counter() - started
                bar.set_postfix(loss=f"{loss.item():.3f}")
                step += 1
                if stop.requested and j + 1 < config.steps_per_task:
                    bar.close()
                    saved_now = save(i, j + 1)
                    where = (
                        f"saved {progress_file}"
                        if saved_now
                        else "nothing saved (no progress file)"
                        if progress_file is None
                        else f"{progress_file} could not be saved"
                    )
                    raise Interrupted(
                        stop.signum,
                        f"stopped by {stop.name} at step {j + 1} of {config.steps_per_task} of task {i + 1}/"
                        f"{len(tasks)} ({task.name}); {where}. Resume with the same command",
                    )
            if ewc is not None:
                ewc.consolidate(task, rng, config.batch_size, config.seq_len)
            if replay is not None:
                replay.remember(task, rng, config.batch_size, config.seq_len)
            R.append(score_all(i))
            save(i + 1, 0)  # a task done is never redone
            # one line a task, with or without the bar: what a run in the background shows in its log
            scores = ", ".join(f"{t.name} {r:.3f}" for t, r in zip(tasks, R[-1], strict=True))
            last = f", last loss {losses[-1]['loss']:.3f}" if losses else ""
            print(
                f"nestlearn continual: task {i + 1}/{len(tasks)} {task.name} learnt ({config.steps_per_task} "
                f"steps{last}); {tasks[0].metric}: {scores}",
                file=sys.stderr,
                flush=True,
            )
    higher = tasks[0].higher_is_better
    # the base alone is the model it started as: its general ability is the one measured before
    general_after = general_before if config.strategy == "none" else general() if general_before is not None else None
    return {
        "config": asdict(config),
        "tasks": [t.name for t in tasks],
        "metric": tasks[0].metric,
        "higher_is_better": higher,
        "R": R,
        "baseline": baseline,
        "params": model.num_parameters(),
        "trainable_params": n_trainable,
        "frozen_params": n_frozen,
        "metrics": continual_metrics(R, baseline, higher),
        "general": None if general_before is None else {"before": general_before, "after": general_after},
        "losses": losses,
        # training alone (batches, forward, backward, step): the tokens of every training row, over those seconds
        "train_tokens_per_s": len(losses) * config.batch_size * config.seq_len / train_seconds
        if train_seconds
        else None,
        "seconds": seconds + time.perf_counter() - t0,
    }


def _read_progress(path: str | Path | None, config: ContinualConfig) -> dict | None:
    """The saved progress of this config's run, None when there is none; a different run's is refused."""
    if path is None or not Path(path).is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot read {path} ({first}): it is corrupt or incomplete; delete it to start the run afresh"
        ) from e
    detail = _differences(json.loads(saved["config"]), config)
    if detail:
        raise ValueError(
            f"{path} is the progress of a different run ({detail}); resume it with its settings, or choose "
            "another --out-dir"
        )
    return saved


def finished_result(path: str | Path, config: ContinualConfig) -> dict | None:
    """The results.json at `path` when it is this config's finished run, None when there is none; a different
    run's is refused (as `_read_progress` refuses a different run's progress), so that it is never overwritten."""
    if not Path(path).is_file():
        return None
    result = json.loads(Path(path).read_text())
    detail = _differences(result["config"], config)
    if detail:
        raise ValueError(
            f"{path} holds the results of a different run ({detail}); rerun it with its settings, or choose "
            "another --out-dir"
        )
    return result


def _differences(theirs: dict, config: ContinualConfig) -> str:
    """What a saved run's config and this one differ in, as 'name: theirs there, ours now, ...'; '' if nothing."""
    ours = _progress_key(config)
    # a setting the saved run does not name came after it: it ran as that setting's default
    defaults = {f.name: f.default for f in dataclasses.fields(ContinualConfig)}
    theirs = {k: theirs.get(k, defaults.get(k)) for k in ours}
    return ", ".join(f"{k}: {theirs[k]!r} there, {v!r} now" for k, v in ours.items() if theirs[k] != v)
