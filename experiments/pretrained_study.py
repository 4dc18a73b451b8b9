"""The continual-learning study on a pretrained SmolLM2-135M: does Nested Learning stop forgetting, or move it?

Every run is one `nestlearn continual --init SMOLLM2` with the study's shared settings and one strategy's own; this
script names them, chooses each strategy's learning rate on the first task, runs them, and turns their folders into
the tables and the picture of docs/results.md.

    python experiments/pretrained_study.py sweep                      # choose the learning rates (below)
    python experiments/pretrained_study.py plan [--stream facts]      # every run's command, and which are done
    python experiments/pretrained_study.py run facts-lora --seed 0    # one run, into runs/study/facts-lora-s0
    python experiments/pretrained_study.py run facts-lora facts-ewc --seeds 0 1   # several, finished ones skipped
    python experiments/pretrained_study.py report --picture docs/img/study.png   # a table and picture per stream
    python experiments/pretrained_study.py record                     # keep the finished runs in the repository

**The record** (experiments/study_record, committed; run folders under runs/ are not): `record` copies each finished
run's results.json to study_record/results/RUN.json and the sweep's chosen.json to study_record/chosen.json. On a
fresh checkout `report` gives the recorded runs' rows (a run folder under --root takes the place of its recorded
copy), `run` skips the recorded runs as it skips finished folders (`plan` says which), and `plan`/`run` use the
recorded rates where --root has no chosen.json of its own; `--no-record` ignores the record (and so runs again what
it holds).

**Streams** (`SHARED`: the same tokens per task for every strategy): `facts`, new knowledge (3 sets of invented
people, scored by exact match on questions worded unlike training); `languages`, the Debian handbook in three
languages the base reads worst of those fetched (scored in bits per byte on each language's validation text); `bbc`,
class-incremental BBC News (5 classes, one per task, scored by accuracy among the classes seen so far). Every
strategy (`STRATEGIES`) runs on every stream; the base reading instead of learning, on facts (a person's facts in
the prompt, `facts-base-reading`) and on bbc (two labelled articles of each class it chooses among,
`bbc-base-reading`).

**Learning rates, chosen once per strategy on the first task, then fixed** (the study's protocol). `sweep
[STRATEGY ...] [--lrs LR,LR,...] [--seed 0]` trains each strategy on the facts stream's first task alone (the shared
settings with `--tasks 1`: the same fact set and the same batches as the first task of the full run) at 3 rates
centred on its RUNS value, a factor of about 3 apart on the 1-3-10 series (1e-4 → 3e-5, 1e-4, 3e-4; `--lrs`: these
rates for every strategy named), one folder each in runs/study/sweep/NAME/lrLR-sSEED. A folder with results.json is
done and skipped; an interrupted one resumes (the same command). The rule, applied by `select` to those folders'
results.json:

    a rate *learns* when its exact match on task 1 beats the untrained model's by at least 0.10 (7 of a set's 64
    questions). Among the rates that learn and whose general-ability damage after the task, Δ wiki bits per byte,
    is at most 0.10, the one with the highest exact match; if none learns within 0.10, the rate that learns with the
    least damage (the mildest learner); if none learns at all, the highest exact match, then the least damage. Ties
    go to the smaller rate.

Why: the study asks whether a strategy learns new facts *without* damaging the base, so exact match alone would pick
rates that rewrite the model (the pilot's LoRA at 1e-3: +1.10 bpb while learning less than fine-tuning) and damage
alone would pick the rate that learns nothing (the first sweep's rule did: fine-tuning at 3e-5, exact match 0, was
"within the bound", so the study would have measured a strategy that never learnt). A run that learns nothing says
nothing about forgetting, hence the floor; 0.10 bpb per task keeps three tasks' worth under the pilot's fine-tuning
loss (+0.51). Δ SQuAD F1 is shown but not used: 30 questions are too few to rank rates by. `sweep` prints
the table and merges its choices into runs/study/sweep/chosen.json {run: lr}; `plan` and `run` then use those rates
(the RUNS value where none was chosen) and say which on every command. EWC and replay train exactly as fine-tuning
on the first task (no Fisher yet, an empty buffer; tested), so they take fine-tuning's rate: sweeping them sweeps
facts-finetune. `sweep --plan` prints the sweep's commands without running them. Two sweeps of different strategies
can run at once, one core each (`sweep finetune lora` and `sweep cms-levels adapter`): each merges its own choices.

Measured on one core of a 2-core AMD EPYC with another run on the other (2026-12-05): a facts run takes 12-22
minutes (LoRA, fine-tuning), a languages run 27-31 with two others beside it, a sweep's first-task run 4-11, the
Titans adapter about twice as long, `memorize` 13-22 (its scoring learns inside every window, and its answers are
generated chunk by chunk); the base alone on bbc 7 minutes (its scoring of five stages), so a trained bbc run about
30, the base reading on bbc 43 (its prompts carry up to ten articles' openings), the Titans adapter on bbc 67-69
(61-63 by its results.json; 10 before its first step, about 12 a class; 2026-12-06, beside one other run). On two
threads beside another run the adapter spent over 50 minutes before its first step (the contention docs/training.md,
'Sharing the CPU', describes). Run several at once, one core each (`--threads 1`), and mind the memory: the Titans
adapter in all 30 blocks holds 10.6 GB on facts, 10 GB for most of a bbc run with peaks of up to 13.8 GB a few
minutes in every task, `memorize` 8-12 GB and fine-tuning 3.5 GB, so on 24 GB the adapter and `memorize` each run
beside one small run at most, never beside each other (the kernel killed the adapter beside `memorize`, three
times).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
from pathlib import Path

from nestlearn.cli import main as nestlearn
from nestlearn.evals.continual import PROGRESS_FILE

# what every run of a stream shares: the same tokens per task for every strategy
TRAIN = ["--steps-per-task", "30", "--batch-size", "4", "--seq-len", "128", "--warmup-steps", "5"]  # per task
GENERAL = ["--general-tokens", "8192", "--general-qa", "30"]  # general ability, before the stream and after it
SHARED = {
    "facts": ["--stream", "facts", "--tasks", "3", "--people-per-set", "8", *TRAIN, *GENERAL],
    # the three handbook languages the untrained base reads worst, in bits per byte on 4,096 validation tokens of
    # each of the nine fetched (docs/results.md): nb-NO 1.99, ca-ES 1.90, id-ID 1.59 (en-US 1.10)
    "languages": [
        "--stream", "languages", "--tasks", "nb-NO", "ca-ES", "id-ID", *TRAIN, "--eval-tokens", "8192", *GENERAL,
    ],
    "bbc": ["--stream", "bbc", "--classes-per-task", "1", *TRAIN, "--eval-items", "20", *GENERAL],
}  # fmt: skip
# a strategy's own flags, the same on every stream; --lr is the default, replaced by the rate `sweep` chose on the
# facts stream's first task when it chose one
STRATEGIES = {
    "base": ["--strategy", "none"],
    "finetune": ["--strategy", "finetune", "--lr", "1e-4"],
    "lora": ["--strategy", "lora", "--lora-rank", "16", "--lr", "1e-3"],
    "cms-levels": ["--strategy", "cms-levels", "--update-periods", "512,none", "--lr", "1e-4"],
    "adapter": ["--strategy", "adapter", "--adapter", "titans", "--lr", "1e-3"],
    "replay": ["--strategy", "replay", "--lr", "1e-4"],  # earlier tasks' rows
    # windows of wiki's train split in every batch (general ability is scored on its test split); its first task
    # differs from fine-tuning's, so it takes its own rate (RUNS's until swept)
    "replay-general": ["--strategy", "replay", "--replay-from", "general", "--lr", "1e-4"],
    "ewc": ["--strategy", "ewc", "--ewc-lambda", "100", "--ewc-batches", "8", "--lr", "1e-4"],
    # nothing trained: the MLPs of the last 8 blocks (of 30; TTT-E2E updates the last quarter) learn in context every
    # 64 tokens as they read, and keep it (--lr: their η)
    "memorize": ["--strategy", "memorize", "--update-periods", "64,none", "--task-blocks", "8", "--lr", "1e-3"],
}
SWEPT_ON = "facts"  # the stream whose first task chooses every strategy's rate, used then on every stream
# run name "STREAM-STRATEGY": (stream, the strategy's flags)
RUNS = {
    "facts-base-reading": ("facts", ["--strategy", "none", "--few-shot", "4"]),
    **{f"{stream}-{strategy}": (stream, flags) for stream in SHARED for strategy, flags in STRATEGIES.items()},
    "bbc-base-reading": ("bbc", ["--strategy", "none", "--few-shot", "2"]),
}
# On the first task EWC has no Fisher yet (its penalty is 0) and replay's buffer is empty, so both train exactly as
# fine-tuning (tested): a sweep of theirs would repeat fine-tuning's runs number for number, and the protocol's
# first-task choice for them is fine-tuning's.
FIRST_TASK_AS = {"facts-ewc": "facts-finetune", "facts-replay": "facts-finetune"}
MAX_BPB_DAMAGE = 0.10  # the rule's bound on Δ wiki bits per byte after the first task (module docstring)
MIN_LEARNED = 0.10  # the rule's floor: a rate learns when task-1 exact match beats the untrained model's by this
SWEEP = "sweep"  # the sweep's folder under --root
CHOSEN = "chosen.json"  # the rates it chose, in the sweep's folder: {run name: lr}
# the study as measured, kept in the repository (run folders are not): `record` copies each finished run's
# results.json to RECORD/results/RUN.json and the sweep's chosen.json to RECORD/chosen.json; `report` reads them
# where --root has no such run, and `plan`/`run` use the recorded rates where --root has no chosen.json
RECORD = Path(__file__).with_name("study_record")


def _value(flags: list[str], flag: str) -> str | None:
    """The value after `flag` in a command's flags, None when the flag is not there."""
    return flags[flags.index(flag) + 1] if flag in flags else None


def _with(flags: list[str], flag: str, value: str) -> list[str]:
    """A copy of `flags` with `flag`'s value replaced (the flag must be there: adding one would change the run)."""
    if flag not in flags:
        raise ValueError(f"{flag} is not among {' '.join(flags)}; only a flag the run already sets is replaced")
    out = list(flags)
    out[out.index(flag) + 1] = value
    return out


def lr_text(lr: float) -> str:
    """A learning rate as a short flag value and folder name: 3e-05 -> '3e-5', 0.000316 -> '3.16e-4'."""
    mantissa, exponent = f"{lr:.6e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def grid(centre: float) -> list[float]:
    """Three rates: `centre` and its neighbours on the 1-3-10 series, a factor of about 3 on either side."""
    series = [float(f"{m}e{e}") for e in range(-12, 3) for m in (1, 3)]
    below = [x for x in series if x < centre * (1 - 1e-9)]
    above = [x for x in series if x > centre * (1 + 1e-9)]
    return [below[-1], centre, above[0]]


def _lr_list(text: str) -> list[float]:
    """--lrs: comma-separated, positive, distinct learning rates."""
    rates = []
    for part in text.split(","):
        try:
            lr = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{part!r} in {text!r} is not a number: give comma-separated learning rates, e.g. 3e-5,1e-4,3e-4"
            ) from None
        if not (lr > 0 and math.isfinite(lr)):
            raise argparse.ArgumentTypeError(f"{part!r} in {text!r}: a learning rate must be a positive number")
        if any(math.isclose(lr, x, rel_tol=1e-9) for x in rates):
            raise argparse.ArgumentTypeError(f"{part!r} is twice in {text!r}: give each rate once")
        rates.append(lr)
    return rates


def chosen_path(root: Path) -> Path:
    return root / SWEEP / CHOSEN


def rates_path(root: Path, record: Path | None) -> Path:
    """Where the study's rates come from: root/sweep/chosen.json (this machine's sweep), else the record's copy."""
    path = chosen_path(root)
    if path.is_file() or record is None or not (record / CHOSEN).is_file():
        return path
    return record / CHOSEN


def chosen_rates(root: Path, record: Path | None = None) -> dict[str, float]:
    """The rates `sweep` chose, {run name: lr}, from root/sweep/chosen.json, else from the record (RECORD) when one
    is given; {} when nothing was chosen yet."""
    path = rates_path(root, record)
    if not path.is_file():
        return {}
    try:
        rates = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not JSON ({e}): delete it and run `sweep` again to rewrite it") from e
    if not isinstance(rates, dict):
        raise ValueError(f"{path} holds {type(rates).__name__}, not {{run: lr}}: delete it and run `sweep` again")
    for name, lr in rates.items():
        if name not in RUNS or _value(RUNS[name][1], "--lr") is None:
            raise ValueError(
                f"{path} gives a rate to {name!r}, which is not a run of RUNS that trains ({', '.join(_trained())}): "
                "remove that entry, or delete the file and run `sweep` again"
            )
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not (lr > 0 and math.isfinite(lr)):
            raise ValueError(f"{path} gives {name!r} the rate {lr!r}; a rate is a positive number: fix or remove it")
    return {name: float(lr) for name, lr in rates.items()}


def _write_chosen(root: Path, updates: dict[str, float]) -> Path:
    """Merge `updates` into chosen.json: two sweeps of different strategies (one core each) keep each other's."""
    path = chosen_path(root)
    rates = {**chosen_rates(root), **updates}
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{CHOSEN}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps({n: rates[n] for n in RUNS if n in rates}, indent=2) + "\n")
    os.replace(tmp, path)  # whole or not at all: plan and run may read it meanwhile
    return path


def _trained(stream: str | None = None) -> list[str]:
    """The runs that train (those with a rate), of `stream` or of every stream."""
    return [n for n, (st, own) in RUNS.items() if _value(own, "--lr") is not None and stream in (None, st)]


def swept_run(name: str) -> str:
    """The run whose sweep chooses `name`'s rate: the same strategy on the facts stream ('bbc-lora' -> 'facts-lora')."""
    stream = RUNS[name][0]
    return f"{SWEPT_ON}-{name.removeprefix(stream + '-')}"


def _lr(name: str, rates: dict[str, float], path: Path) -> tuple[str | None, str]:
    """The --lr a run uses and where it comes from: the sweep's choice (read from `path`), else RUNS's default; None
    if it trains none."""
    default = _value(RUNS[name][1], "--lr")
    if default is None:
        return None, ""
    source = swept_run(name)
    if source in rates:
        where = "" if source == name else f", {source}'s"
        return lr_text(rates[source]), f"chosen on the first task{where} ({path})"
    why = f"{path} has none for it" if path.is_file() else f"no {path} yet"
    return default, f"RUNS default, not chosen: {why}"


def command(name: str, seed: int, root: Path, init: str, rates: dict[str, float] | None = None) -> list[str]:
    stream, own = RUNS[name]
    lr, _ = _lr(name, rates or {}, chosen_path(root))
    if lr is not None:
        own = _with(own, "--lr", lr)
    out = root / f"{name}-s{seed}"
    return ["continual", "--init", init, *SHARED[stream], *own, "--seed", str(seed), "--out-dir", str(out)]


def _described(name: str, argv: list[str], rates: dict[str, float], path: Path) -> str:
    """The command as a shell line, with where its learning rate comes from (`path`) as a comment."""
    lr, why = _lr(name, rates, path)
    return "nestlearn " + " ".join(argv) + (f"   # --lr {lr}: {why}" if lr is not None else "")


# --- choosing the learning rates on the first task ---


def sweep_name(strategy: str) -> str:
    """The run whose first task a sweep of `strategy` trains ('lora' or 'facts-lora' -> 'facts-lora'), refused for
    runs that train nothing; EWC and replay are fine-tuning's (FIRST_TASK_AS)."""
    name = swept_run(strategy) if strategy in RUNS else f"{SWEPT_ON}-{strategy}"
    name = name if name in RUNS else None
    swept = ", ".join(n.removeprefix(f"{SWEPT_ON}-") for n in _trained(SWEPT_ON))
    if name is None:
        raise ValueError(f"{strategy!r} is not a run of RUNS; a sweep takes the strategies that train: {swept}")
    if name not in _trained():
        raise ValueError(
            f"{name} trains nothing ({' '.join(RUNS[name][1])}), so it has no rate to choose; a sweep takes the "
            f"strategies that train: {swept}"
        )
    if name in FIRST_TASK_AS:
        print(
            f"pretrained_study: {name} trains as {FIRST_TASK_AS[name]} on the first task: sweeping that",
            file=sys.stderr,
        )
    return FIRST_TASK_AS.get(name, name)


def sweep_dir(root: Path, name: str, lr: float, seed: int) -> Path:
    return root / SWEEP / name / f"lr{lr_text(lr)}-s{seed}"


def sweep_command(name: str, lr: float, seed: int, root: Path, init: str) -> list[str]:
    """`name`'s run on its stream's first task alone, at `lr`: the shared settings but `--tasks 1` (facts: the
    first fact set, with the same batches as in the full run)."""
    stream, own = RUNS[name]
    shared = _with(SHARED[stream], "--tasks", "1")
    out = sweep_dir(root, name, lr, seed)
    lr_flags = _with(own, "--lr", lr_text(lr))
    return ["continual", "--init", init, *shared, *lr_flags, "--seed", str(seed), "--out-dir", str(out)]


def sweep_results(root: Path, name: str, seed: int) -> list[dict]:
    """One row per finished rate of `name`'s sweep with `seed`, by rate: task-1 exact match and the changes in
    general ability (wiki bits per byte, SQuAD F1) from before the task to after it."""
    rows = []
    for path in sorted((root / SWEEP / name).glob(f"lr*-s{seed}/results.json")):
        r = json.loads(path.read_text())
        if len(r["R"]) != 1:
            raise ValueError(
                f"{path} trained {len(r['R'])} tasks; a sweep folder holds the first task alone (--tasks 1): move "
                f"it out of {root / SWEEP}"
            )
        g = r.get("general") or {}
        before, after = g.get("before") or {}, g.get("after") or {}
        if before.get("wiki_bits_per_byte") is None or after.get("wiki_bits_per_byte") is None:
            raise ValueError(
                f"{path} has no wiki bits per byte before and after the task, which the rule needs: rerun it with "
                "the shared settings (--general-tokens 8192)"
            )
        f1 = None if before.get("squad_f1") is None else after["squad_f1"] - before["squad_f1"]
        rows.append(
            {
                "lr": float(r["config"]["lr"]),
                "exact_match": r["R"][0][0],
                "gain": r["R"][0][0] - r["baseline"][0],  # over the untrained model on the same questions
                "bpb_change": after["wiki_bits_per_byte"] - before["wiki_bits_per_byte"],
                "squad_f1_change": f1,
                "minutes": r["seconds"] / 60,
            }
        )
    return sorted(rows, key=lambda x: x["lr"])


def select(rows: list[dict], bound: float = MAX_BPB_DAMAGE, floor: float = MIN_LEARNED) -> tuple[float, str]:
    """The rule (module docstring): among the rates that learn (exact-match gain ≥ `floor`) with Δ wiki bpb ≤ `bound`,
    the best exact match; else the learner of least damage; else the best exact match, then the least damage; ties
    to the smaller rate. Returns the rate and which case chose it: "kept", "mildest learner" or "none learns"."""
    if not rows:
        raise ValueError("no finished sweep runs to choose from: run `sweep STRATEGY` first")

    def damage(x: dict) -> float:  # a diverged run's NaN bits per byte is the most damage, not an incomparable one
        return x["bpb_change"] if math.isfinite(x["bpb_change"]) else math.inf

    learners = [x for x in rows if x["gain"] >= floor - 1e-12]
    kept = [x for x in learners if damage(x) <= bound]
    if kept:
        return min(kept, key=lambda x: (-x["exact_match"], x["lr"]))["lr"], "kept"
    if learners:
        return min(learners, key=lambda x: (damage(x), x["lr"]))["lr"], "mildest learner"
    return min(rows, key=lambda x: (-x["exact_match"], damage(x), x["lr"]))["lr"], "none learns"


def choose(names: list[str], seed: int, root: Path) -> tuple[dict[str, float], str]:
    """Apply the rule to each run's finished sweep folders, merge the rates into chosen.json (with EWC's and replay's,
    which are fine-tuning's) and return them with the table: one row per rate, the chosen one marked."""
    lines = [
        "| run | lr | task-1 exact match | gain | Δ wiki bpb | Δ SQuAD F1 | min | chosen |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    notes, chosen = [], {}
    for name in names:
        rows = sweep_results(root, name, seed)
        if not rows:
            raise ValueError(f"no finished runs in {root / SWEEP / name} with seed {seed}: run `sweep` first")
        lr, case = select(rows)
        bound, learns = f"Δ wiki bpb ≤ {MAX_BPB_DAMAGE:.2f}", f"gain ≥ {MIN_LEARNED:.2f}"
        why = {
            "kept": f"best exact match with {learns} and {bound}",
            "mildest learner": f"least damage with {learns}: none learnt with {bound}",
            "none learns": f"best exact match: no rate learnt ({learns})",
        }[case]
        chosen[name] = lr
        for x in rows:
            f1 = "n/a" if x["squad_f1_change"] is None else f"{x['squad_f1_change']:+.3f}"
            mark = f"✓ {why}" if x["lr"] == lr else ""
            lines.append(
                f"| {name} | {lr_text(x['lr'])} | {x['exact_match']:.3f} | {x['gain']:+.3f} | "
                f"{x['bpb_change']:+.3f} | {f1} | {x['minutes']:.0f} | {mark} |"
            )
        rates = [x["lr"] for x in rows]
        # a choice at the grid's edge says the best rate may lie beyond it
        if lr == max(rates) and len(rates) > 1 and case == "kept":
            notes.append(f"{name}: the largest rate swept was chosen; a larger one may learn more (--lrs)")
        if case == "mildest learner":
            notes.append(f"{name}: no rate learnt within the bound; rates between those swept may (--lrs)")
        if case == "none learns":
            notes.append(f"{name}: no rate swept learnt; the study will measure a strategy that barely learns")
        for alias, target in FIRST_TASK_AS.items():
            if target == name:
                chosen[alias] = lr
                notes.append(f"{alias}: {lr_text(lr)}, {name}'s rate (it trains as {name} on the first task)")
    path = _write_chosen(root, chosen)
    return chosen, "\n".join([*lines, "", *notes, f"wrote {path}"])


def sweep(strategies: list[str], lrs: list[float] | None, seed: int, root: Path, init: str, dry_run: bool) -> int:
    """Run each strategy's first task at each rate (skipping finished folders), then choose (`choose`)."""
    # by default every run that trains, EWC and replay through fine-tuning's sweep (FIRST_TASK_AS)
    given = strategies or [n for n in _trained(SWEPT_ON) if n not in FIRST_TASK_AS]
    names = list(dict.fromkeys(sweep_name(s) for s in given))
    jobs = [(name, lr) for name in names for lr in lrs or grid(float(_value(RUNS[name][1], "--lr")))]
    for name, lr in jobs:
        argv = sweep_command(name, lr, seed, root, init)
        done = (sweep_dir(root, name, lr, seed) / "results.json").is_file()
        if dry_run:
            print("nestlearn " + " ".join(argv) + ("   # done" if done else ""))
            continue
        if done:
            print(f"pretrained_study: {sweep_dir(root, name, lr, seed)} is done: skipped", file=sys.stderr)
            continue
        print("pretrained_study: nestlearn " + " ".join(argv), file=sys.stderr)
        code = nestlearn([*argv, "--threads", "1", "--no-progress"])
        if code:
            print(
                f"pretrained_study: {sweep_dir(root, name, lr, seed)} stopped (exit {code}); nothing chosen. The same "
                "command resumes the sweep",
                file=sys.stderr,
            )
            return code
    if not dry_run:
        print(choose(names, seed, root)[1])
    return 0


def _state(root: Path, record: Path | None, run: str) -> str:
    """What `run` does with a run ("NAME-sSEED"): skip it when its folder has results.json ("done") or, without a
    folder of its own, when the record has it ("recorded"); resume it ("part-way"); or start it ("")."""
    if (root / run / "results.json").is_file():
        return "done"
    if (root / run / PROGRESS_FILE).is_file():
        return "part-way"
    return "recorded" if record is not None and (record / "results" / f"{run}.json").is_file() else ""


def run_all(
    names: list[str], seeds: list[int], root: Path, init: str, rates: dict[str, float], path: Path, record: Path | None
) -> int:
    """Each run with each seed, one core each, in order, at the `rates` read from `path`; a run that is done (its
    folder has results.json) or recorded (`_state`) is skipped, one stopped part-way resumes from its progress.pt.
    Stops at the first run that fails, returning its exit code."""
    for seed in seeds:
        for name in names:
            argv = command(name, seed, root, init, rates)
            state = _state(root, record, f"{name}-s{seed}")
            if state == "done":
                print(f"pretrained_study: {root / f'{name}-s{seed}'} is done: skipped", file=sys.stderr)
                continue
            if state == "recorded":
                print(
                    f"pretrained_study: {name}-s{seed} is in the record ({record / 'results'}): skipped; "
                    "--no-record runs it again",
                    file=sys.stderr,
                )
                continue
            print("pretrained_study: " + _described(name, argv, rates, path), file=sys.stderr)
            code = nestlearn([*argv, "--threads", "1", "--no-progress"])
            if code:
                print(
                    f"pretrained_study: {name}-s{seed} stopped (exit {code}); the same command resumes", file=sys.stderr
                )
                return code
            print(
                f"pretrained_study: {name}-s{seed} done; `record` keeps it in {RECORD.name}, to commit", file=sys.stderr
            )
    return 0


def _progress(state: str, first_comment: bool) -> str:
    """What `run` would do with a run (`_state`), as the end of its plan line: nothing (done, recorded), resume, or
    start."""
    word = {
        "done": "done",
        "recorded": "recorded: `run` skips it (--no-record runs it again)",
        "part-way": f"stopped part-way: `run` resumes it from {PROGRESS_FILE}",
    }.get(state)
    if word is None:
        return ""
    return f"   # {word}" if first_comment else f"; {word}"


def _model_dir() -> str:
    from nestlearn.data.weights import model_dir

    return str(model_dir("smollm2-135m"))


def _stream_of(results: dict, folder: str) -> str:
    """A run's stream: its config's, else the folder name's first part (facts-lora-s0 -> facts)."""
    return results["config"].get("stream") or folder.split("-")[0]


def finished(root: Path, record: Path | None = None) -> dict[str, Path]:
    """Every finished run, {run folder's name: its results.json}: the record's (RECORD/results/RUN.json), and the
    run folders under `root` with results.json, which take the place of the record's where both have a run."""
    found = {} if record is None else {p.stem: p for p in (record / "results").glob("*.json")}
    found |= {p.parent.name: p for p in root.glob("*/results.json")}
    return dict(sorted(found.items()))


def record_runs(root: Path, record: Path) -> list[str]:
    """Copy every finished run's results.json under `root` into the record, and the sweep's chosen.json: the files
    to commit. Returns what was copied."""
    copied = []
    (record / "results").mkdir(parents=True, exist_ok=True)
    for name, path in finished(root).items():
        shutil.copyfile(path, record / "results" / f"{name}.json")
        copied.append(f"{path} -> {record / 'results' / f'{name}.json'}")
    if chosen_path(root).is_file():
        chosen_rates(root)  # refuses a broken file rather than recording it
        shutil.copyfile(chosen_path(root), record / CHOSEN)
        copied.append(f"{chosen_path(root)} -> {record / CHOSEN}")
    return copied


def _rows(runs: dict[str, Path]) -> dict[str, list[dict]]:
    """Every finished run ({run: its results.json}) as a row of `report`'s numbers, by stream."""
    streams: dict[str, list[dict]] = {}
    for run, results in runs.items():
        r = json.loads(results.read_text())
        c, m, g = r["config"], r["metrics"], r.get("general") or {}
        before, after = g.get("before") or {}, g.get("after") or {}

        def change(key: str, before=before, after=after) -> float | None:
            return None if before.get(key) is None else after[key] - before[key]

        f1_lost = None  # SQuAD F1 lost, in % of the base's: the measure of Lin et al. 2025's reference points
        if before.get("squad_f1"):
            f1_lost = 100 * (before["squad_f1"] - after["squad_f1"]) / before["squad_f1"]
        sign = 1 if r.get("higher_is_better", True) else -1
        streams.setdefault(_stream_of(r, run), []).append(
            {
                "run": run,
                "name": run.rsplit("-s", 1)[0],  # the run without its seed
                "metric": r.get("metric", "exact match"),
                "strategy": c["strategy"]
                + (f" (few-shot {c['few_shot']})" if c.get("few_shot") else "")
                + (f" of {c['replay_from']} text" if c.get("replay_from") == "general" else ""),
                "average": m["average"],
                "sign": sign,
                "untrained": sum(r["baseline"]) / len(r["baseline"]),
                "forgetting": m["forgetting"],
                "bwt": m["bwt"],
                "fwt": m.get("fwt"),  # forward transfer: each task scored just before it is learnt, less untrained
                "bpb_change": change("wiki_bits_per_byte"),
                "squad_f1_change": change("squad_f1"),
                "f1_lost": f1_lost,
                "trainable": r.get("trainable_params"),
                "tokens_per_s": r.get("train_tokens_per_s"),
                "minutes": r["seconds"] / 60,
            }
        )
    for stream, rows in streams.items():
        # the gain is over the base alone (the stream's `base` run: on bbc its last row chooses among every class,
        # as the strategies' last rows do), else over the untrained row
        base = [x["average"] for x in rows if x["name"] == f"{stream}-base"]
        for x in rows:
            reference = statistics.fmean(base) if base else x["untrained"]
            x["gain"] = x["sign"] * (x["average"] - reference) + 0.0  # + 0.0: never -0.000
    return streams


def _mean_sd(xs: list[float | None]) -> tuple[float, float | None] | None:
    """The mean and the standard deviation (n − 1) of the values given; None when there are none."""
    xs = [x for x in xs if x is not None]
    if not xs:
        return None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else None)


def _cell(xs: list[float | None], fmt: str) -> str:
    ms = _mean_sd(xs)
    if ms is None:
        return "n/a"
    return format(ms[0], fmt) + ("" if ms[1] is None else f" ± {format(ms[1], fmt.lstrip('+'))}")


def report(root: Path, picture: Path | None, record: Path | None = None) -> str:
    """Per stream: a Markdown table with one row per finished run (`finished`: the run folders under `root`, and the
    record's runs that `root` does not have; the strategy, R's average score, its
    gain over the untrained model in the direction the metric improves: bits per byte saved, accuracy or exact
    match gained; forgetting, BWT, FWT, the change in general ability, trainable parameters, tokens/s), then one row per
    run over its seeds, mean ± standard deviation; with `picture`, a picture per stream (PICTURE's name with the
    stream's added: study.png -> study-facts.png)."""
    streams = _rows(finished(root, record))
    if not streams:
        where = f"under {root}" + ("" if record is None else f" nor in {record / 'results'}")
        raise SystemExit(f"no */results.json {where}: run the study first (`plan`, `run NAME`)")

    def f(x, fmt):
        return "n/a" if x is None else format(x, fmt)

    out = []
    for stream, rows in streams.items():
        metric = rows[0]["metric"]
        out += [
            f"**{stream}** ({metric})",
            "",
            f"| run | strategy | {metric} | gain | forgetting | BWT | FWT | Δ wiki bpb | Δ SQuAD F1 | trained | tok/s "
            "| min |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for x in rows:
            out.append(
                f"| {x['run']} | {x['strategy']} | {x['average']:.3f} | {x['gain']:+.3f} | "
                f"{f(x['forgetting'], '+.3f')} | {f(x['bwt'], '+.3f')} | {f(x['fwt'], '+.3f')} | "
                f"{f(x['bpb_change'], '+.3f')} | "
                f"{f(x['squad_f1_change'], '+.3f')} | {f(x['trainable'], ',')} | {f(x['tokens_per_s'], '.0f')} | "
                f"{x['minutes']:.0f} |"
            )
        out += [
            "",
            f"| run | seeds | {metric} | gain | forgetting | BWT | FWT | Δ wiki bpb | SQuAD F1 lost (%) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, group in _by_name(rows).items():
            cells = [_cell([x[k] for x in group], fmt) for k, fmt in _SUMMARY]
            out.append(f"| {name} | {len(group)} | {' | '.join(cells)} |")
        out.append("")
        if picture is not None:
            _plot(rows, stream, picture.with_name(f"{picture.stem}-{stream}{picture.suffix}"))
    return "\n".join(out).rstrip()


# the over-seeds table's columns after the run and its seeds: (row key, format)
_SUMMARY = [
    ("average", ".3f"),
    ("gain", "+.3f"),
    ("forgetting", "+.3f"),
    ("bwt", "+.3f"),
    ("fwt", "+.3f"),
    ("bpb_change", "+.3f"),
    ("f1_lost", ".0f"),
]
# Lin et al. 2025 (sparse memory fine-tuning): held-out QA F1 lost after learning new facts, in %
PUBLISHED_F1_LOST = {"full fine-tuning": 89, "LoRA": 71, "sparse memory fine-tuning": 11}
STYLE_ORDER = [*STRATEGIES, "base-reading"]  # a strategy's marker and colour in the pictures


def _by_name(rows: list[dict]) -> dict[str, list[dict]]:
    groups: dict[str, list[dict]] = {}
    for x in rows:
        groups.setdefault(x["name"], []).append(x)
    return groups


def _plot(rows: list[dict], stream: str, path: Path) -> None:
    """What each run learned against what the base lost: Δ wiki bits per byte (left) and SQuAD F1 lost in % of
    the base's (right, with Lin et al.'s published points as lines), one point per run, mean ± sd over its seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 5), sharey=True)
    groups = _by_name(rows)
    for ax, key, label in (
        (axes[0], "bpb_change", "general text lost: Δ wiki bits per byte (right is worse)"),
        (axes[1], "f1_lost", "reading comprehension lost: SQuAD F1 lost, % of the base's"),
    ):
        # a legend, not labels at the points (strategies that fail alike land on one spot), and one marker and
        # colour per strategy on every stream's picture
        for name, group in groups.items():
            x, y = _mean_sd([g[key] for g in group]), _mean_sd([g["gain"] for g in group])
            x = x or (0.0, None)
            i = STYLE_ORDER.index(name.removeprefix(f"{stream}-")) % 10
            ax.errorbar(x[0], y[0], xerr=x[1], yerr=y[1], fmt="osD^v<>ps*"[i], color=f"C{i}", capsize=3, label=name)
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
        ax.set_xlabel(label)
    for who, lost in PUBLISHED_F1_LOST.items():
        axes[1].axvline(lost, color="grey", ls="--", lw=0.8)
        axes[1].annotate(  # inside the axes, whatever the runs' gains
            f"{who} (Lin et al.)",
            (lost, 0.02),
            xycoords=("data", "axes fraction"),
            rotation=90,
            fontsize=6,
            color="grey",
            va="bottom",
            ha="right",
        )
    axes[0].set_ylabel(f"learned: {rows[0]['metric']} gained over the base")
    fig.suptitle(f"SmolLM2-135M, {stream} stream (mean ± sd over seeds)")
    handles, names = axes[0].get_legend_handles_labels()
    fig.legend(handles, names, loc="lower center", ncol=5, fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    actions = p.add_subparsers(dest="action", required=True, metavar="{plan,run,sweep,report,record}")
    recorded = argparse.ArgumentParser(add_help=False)
    recorded.add_argument(
        "--record",
        type=Path,
        default=RECORD,
        help="the study's measurements kept in the repository (default: experiments/study_record)",
    )
    recorded.add_argument("--no-record", dest="record", action="store_const", const=None, help="ignore the record")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--seed", type=int, default=0)
    common.add_argument("--root", type=Path, default=Path("runs/study"), help="where run folders go (runs/study)")
    common.add_argument(
        "--init", default=None, help="the pretrained model folder (default: fetch-model's smollm2-135m)"
    )
    plan = actions.add_parser("plan", parents=[common, recorded], help="print every run's command")
    plan.add_argument("--stream", choices=list(SHARED), default=None, help="this stream's runs only (default: all)")
    run = actions.add_parser("run", parents=[common, recorded], help="runs, in order, skipping finished ones")
    run.add_argument("names", nargs="+", choices=list(RUNS), metavar="NAME", help="which runs (`plan` lists them)")
    run.add_argument("--seeds", type=int, nargs="+", default=None, help="each run with these seeds (default: --seed)")
    sw = actions.add_parser("sweep", parents=[common], help="choose learning rates on the first task (docstring)")
    sw.add_argument(
        "strategies", nargs="*", metavar="STRATEGY", help=f"default: every one that trains ({', '.join(_trained())})"
    )
    sw.add_argument(
        "--lrs", type=_lr_list, default=None, help="these rates for every strategy named (default: 3 around RUNS's)"
    )
    sw.add_argument("--plan", action="store_true", help="print the sweep's commands, run nothing")
    rep = actions.add_parser("report", parents=[recorded], help="tables and picture from the run folders and record")
    rep.add_argument("--root", type=Path, default=Path("runs/study"), help="where run folders are (runs/study)")
    rep.add_argument(
        "--picture", type=Path, default=None, help="also draw gain against general-ability loss, one PNG per stream"
    )
    rec = actions.add_parser("record", help="copy the finished runs' results.json and the rates into the record")
    rec.add_argument("--root", type=Path, default=Path("runs/study"), help="where run folders are (runs/study)")
    rec.add_argument("--record", type=Path, default=RECORD, help="where to copy them (default: the repository's)")
    args = p.parse_args(argv)
    try:
        if args.action == "report":
            print(report(args.root, args.picture, args.record))
            return 0
        if args.action == "record":
            copied = record_runs(args.root, args.record)
            print("\n".join(copied) or f"nothing to record: no */results.json under {args.root}")
            return 0
        init = args.init or _model_dir()
        if args.action == "sweep":
            return sweep(args.strategies, args.lrs, args.seed, args.root, init, args.plan)
        path = rates_path(args.root, args.record)
        rates = chosen_rates(args.root, args.record)
        if args.action == "plan":
            for name in (n for n, (stream, _) in RUNS.items() if args.stream in (None, stream)):
                line = _described(name, command(name, args.seed, args.root, init, rates), rates, path)
                print(line + _progress(_state(args.root, args.record, f"{name}-s{args.seed}"), "#" not in line))
            return 0
        return run_all(args.names, args.seeds or [args.seed], args.root, init, rates, path, args.record)
    except ValueError as e:
        print(f"pretrained_study {args.action}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
