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

from .. import pretrained
from ..interrupt import Interrupted, StopRequest
from ..runtime import resolve_device
from ..task_cms import reading_only
from .continual_report import plot, summary, table
from .continual_setup import (
    FROZEN_BASE,
    STRATEGIES,
    ContinualConfig,
    build_model,
    make_model,
)
from .continual_strategies import EWC, GeneralReplay, Replay, _loss, _memorize
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


# --- the protocol ---


PROGRESS_FILE = "progress.pt"


def _progress_key(config: ContinualConfig) -> dict:
    """What a saved progress must share with the config that resumes it (not where the data lives or bars)."""
    return {k: v for k, v in asdict(config).items() if k not in ("data_root", "progress", "device")}


def run(config: ContinualConfig, progress_file: str | Path | None = None) -> dict:
    """Train on the stream's tasks in order, scoring every task after each; returns R, the metrics and curves.

    With `progress_file`, everything the protocol has done is saved there after each task, and after the step in
    progress when SIGINT/SIGTERM arrives (then `Interrupted` is raised); a later call with the same file and config
    resumes exactly where it stopped: the same batches, the same numbers as a run that was never interrupted."""
    from tqdm import tqdm

    from ..model import Level
    from ..optim import Levels

    device = resolve_device(config.device)  # a GPU that is not there is refused before anything is read
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    saved = _read_progress(progress_file, config)
    model, tokenizer = make_model(config, start=saved is None)  # a resumed run loads its own weights below
    model.to(device)
    if device.type != "cpu":
        print(f"nestlearn continual: on {device}, float32", file=sys.stderr)
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

    def score(stage: int, j: int) -> float:
        """Task j's score after training on tasks 0..stage (stage −1: untrained)."""
        # class-incremental: choose among the classes of every task trained on so far, and task j's own
        candidates = [y for u in tasks[: max(stage, j) + 1] for y in getattr(u, "labels", ())]
        model.eval()
        try:
            return tasks[j].score(
                model,
                config.seq_len,
                eval_tokens=config.eval_tokens,
                eval_items=config.eval_items,
                candidates=candidates,
            )
        finally:
            model.train()

    def score_all(stage: int) -> list[float]:
        """Every task's score after training on tasks 0..stage (stage −1: untrained)."""
        return [score(stage, j) for j in range(len(tasks))]

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
            "measured": measured,  # everything before the stream: the untrained scores and general ability
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
    baseline, general_before, measured = [], None, False  # measured: all that comes before the stream is
    train_seconds = 0.0  # training alone (batches, forward, backward, step), for tokens/s
    if saved is not None:
        model.load_state_dict(saved["model"])
        if opt is not None:
            opt.load_state_dict(saved["optimizer"])
        if levels is not None:
            levels.load_levels_state_dict(saved["levels"])
        rng.bit_generator.state = json.loads(saved["numpy_rng"])
        torch.set_rng_state(saved["torch_rng"])
        random.setstate(saved["python_rng"])
        if ewc is not None:
            fisher, anchor = saved["ewc"]["fisher"], saved["ewc"]["anchor"]
            ewc.fisher = {n: t.to(device) for n, t in fisher.items()}  # it may have been saved on another device
            ewc.anchor = {n: t.to(device) for n, t in anchor.items()}
        if replay is not None:
            replay.rows = [tuple(row) for row in saved["replay"]]
        R, baseline, losses, step, seconds = (saved[k] for k in ("R", "baseline", "losses", "step", "seconds"))
        general_before = saved.get("general_before")
        measured = saved.get("measured", True)  # progress saved before the key was saved after the measurements
        train_seconds = saved.get("train_seconds", 0.0)
        first_task, first_step = saved["task"], saved["task_step"]
        print(
            f"nestlearn continual: {progress_file} is finished; its results again"
            if first_task == len(tasks)
            else f"nestlearn continual: resuming from task {first_task + 1}/{len(tasks)}, step {first_step} of "
            f"{config.steps_per_task} ({progress_file})"
            if measured
            else f"nestlearn continual: resuming the measurements before the stream, {len(baseline)} of "
            f"{len(tasks)} tasks scored untrained ({progress_file})",
            file=sys.stderr,
        )

    def where(saved_now: bool) -> str:
        if saved_now:
            return f"saved {progress_file}"
        return "nothing saved (no progress file)" if progress_file is None else f"{progress_file} could not be saved"

    t0 = time.perf_counter()
    with StopRequest("the current step") as stop:
        # before the stream (50 minutes for some): each untrained score is saved as it comes, so that a stop or a
        # kill keeps what was measured; a stop waits for the task being scored, not for all of them
        while not measured and len(baseline) < len(tasks):
            baseline.append(score(-1, len(baseline)))
            if stop.requested:
                raise Interrupted(
                    stop.signum,
                    f"stopped by {stop.name} before the stream, {len(baseline)} of {len(tasks)} tasks scored "
                    f"untrained; {where(save(0, 0))}. Resume with the same command",
                )
            if len(baseline) < len(tasks):  # the last is saved with general ability, below
                save(0, 0)
        if not measured:
            # memorize: the base's general ability, its levels reading θ_0 without a step (η = 0: exactly the
            # pretrained model), not the model learning inside each window at η, which a large η breaks before the
            # stream begins
            with reading_only(model) if config.strategy == "memorize" else contextlib.nullcontext():
                general_before = general()
            measured, seconds, t0 = True, 0.0, time.perf_counter()  # minutes count the stream, not the measuring
            saved_now = save(0, 0)
            if stop.requested:
                raise Interrupted(
                    stop.signum,
                    f"stopped by {stop.name} after the measurements before the stream; {where(saved_now)}. Resume "
                    "with the same command",
                )
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
                    raise Interrupted(
                        stop.signum,
                        f"stopped by {stop.name} at step {j + 1} of {config.steps_per_task} of task {i + 1}/"
                        f"{len(tasks)} ({task.name}); {where(save(i, j + 1))}. Resume with the same command",
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
        "device": str(device),  # where it ran (the config may say auto)
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
