"""`nestlearn continual`: train on tasks in order, evaluate on all after each (nestlearn.evals.continual)."""

from __future__ import annotations

import dataclasses
import json
import random
import sys
from pathlib import Path

from .. import presets
from ..config import ADAPTERS, LORA_TARGETS
from ..evals.continual import PROGRESS_FILE, STREAMS, finished_result, plot, run, table
from ..evals.continual import __doc__ as CONTINUAL_DOC
from ..evals.continual_setup import DEFAULT_LORA_RANK, STRATEGIES, ContinualConfig
from ..options import (
    add_device,
    add_threads,
    non_negative_float,
    non_negative_int,
    parser,
    positive_float,
    positive_int,
)
from ..runtime import set_threads


def main(argv: list[str] | None = None) -> int:
    p = parser(
        "nestlearn continual",
        CONTINUAL_DOC.split("\n\n")[0] + " Ctrl-C (or SIGTERM) stops after the current step, saving out_dir/"
        f"{PROGRESS_FILE}; the same command resumes it.",
    )
    d = ContinualConfig()
    p.add_argument(
        "--stream",
        default=d.stream,
        choices=list(STREAMS),
        help="; ".join(f"{k}: {v}" for k, v in STREAMS.items()) + f" (default: {d.stream})",
    )
    p.add_argument("--tasks", nargs="+", default=None, help="the stream's tasks, in order (languages, corpora)")
    p.add_argument(
        "--preset",
        default=None,
        choices=list(presets.PRESETS),
        help="(default: transformer; hope_attention with --strategy cms-levels or memorize)",
    )
    p.add_argument("--size", default=d.size, choices=list(presets.SIZES), help=f"(default: {d.size})")
    p.add_argument(
        "--strategy",
        default=d.strategy,
        choices=STRATEGIES,
        help="finetune, ewc, replay, levels; on a frozen pretrained base (--init): lora, adapter, cms-levels, and "
        "memorize (nothing trained: the in-context CMS levels learn as they read, and keep it); none: the base alone "
        f"(default: {d.strategy}; docs/continual.md)",
    )
    p.add_argument(
        "--update-periods",
        default=None,
        help="levels, cms-levels, memorize: the CMS update periods in tokens, fastest first, 'none' for every step "
        "(default: the preset's); periods at least --seq-len are outer levels, stepped at their period, shorter ones "
        "in-context (memorize: each must divide --seq-len)",
    )
    p.add_argument(
        "--steps-per-task", type=positive_int, default=d.steps_per_task, help=f"(default: {d.steps_per_task})"
    )
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size, help=f"(default: {d.batch_size})")
    p.add_argument("--seq-len", type=positive_int, default=d.seq_len, help=f"(default: {d.seq_len})")
    p.add_argument(
        "--lr",
        type=positive_float,
        default=d.lr,
        help=f"AdamW, constant after warm-up; memorize: η of the in-context levels, no warm-up (default: {d.lr})",
    )
    p.add_argument("--warmup-steps", type=positive_int, default=d.warmup_steps, help=f"(default: {d.warmup_steps})")
    p.add_argument(
        "--ewc-lambda", type=non_negative_float, default=d.ewc_lambda, help=f"ewc: λ (default: {d.ewc_lambda})"
    )
    p.add_argument(
        "--ewc-batches",
        type=positive_int,
        default=d.ewc_batches,
        help=f"ewc: batches per Fisher estimate (default: {d.ewc_batches})",
    )
    p.add_argument(
        "--replay-fraction",
        type=float,
        default=d.replay_fraction,
        help=f"replay: share of each batch drawn from the buffer (default: {d.replay_fraction})",
    )
    p.add_argument(
        "--replay-from",
        default=d.replay_from,
        choices=["tasks", "general"],
        help="replay: what the replayed rows are: tasks, a buffer of earlier tasks' rows; general, windows of wiki's "
        "train split from the first task on (needs `nestlearn fetch-data wiki`; general ability is scored on its test "
        f"split) (default: {d.replay_from})",
    )
    p.add_argument(
        "--replay-batches",
        type=positive_int,
        default=d.replay_batches,
        help=f"replay: batches kept per finished task (default: {d.replay_batches})",
    )
    p.add_argument(
        "--classes-per-task",
        type=positive_int,
        default=d.classes_per_task,
        help=f"bbc: classes per task (default: {d.classes_per_task})",
    )
    p.add_argument(
        "--people-per-set",
        type=positive_int,
        default=d.people_per_set,
        help=f"facts: invented people per fact set, 4 facts each (default: {d.people_per_set})",
    )
    p.add_argument(
        "--few-shot",
        type=non_negative_int,
        default=d.few_shot,
        help="facts: the set's statements put in every test prompt, e.g. 4 with --strategy none: the base reading "
        "the facts instead of learning them; bbc: this many labelled training articles of every class it chooses "
        f"among (default: {d.few_shot})",
    )
    p.add_argument(
        "--general-tokens",
        type=non_negative_int,
        default=d.general_tokens,
        help="general ability kept: bits per byte on this many tokens of wiki's test split, before the stream and "
        f"after it (needs `nestlearn fetch-data wiki`; default: {d.general_tokens}, off)",
    )
    p.add_argument(
        "--general-qa",
        type=non_negative_int,
        default=d.general_qa,
        help=f"general ability kept: SQuAD v2 dev questions answered in context, before and after (default: "
        f"{d.general_qa}, off)",
    )
    p.add_argument(
        "--init",
        default=None,
        metavar="DIR",
        help="start from a pretrained model: a Hugging Face Llama folder (e.g. `nestlearn fetch-model smollm2-135m`) "
        "or a nestlearn Transformer checkpoint; its shape and weights (--preset transformer or hope_attention, "
        "starting with its logits), and its tokenizer for the stream",
    )
    p.add_argument(
        "--stack",
        default=None,
        choices=["copies", "residual"],
        help="--init into hope_attention: how the CMS levels start from the MLP and still equal it (default: copies; "
        "docs/pretrained.md)",
    )
    p.add_argument(
        "--lora-rank",
        type=positive_int,
        default=None,
        help=f"lora: the adapters' rank (default: {DEFAULT_LORA_RANK})",
    )
    p.add_argument(
        "--lora-alpha", type=positive_float, default=None, help="lora: the adapters' scale alpha (default: 2 × rank)"
    )
    p.add_argument(
        "--lora-targets",
        default=None,
        help=f"lora: comma-separated projections among {','.join(LORA_TARGETS)} (default: all four)",
    )
    p.add_argument(
        "--adapter",
        default=None,
        choices=list(ADAPTERS),
        help=f"adapter: the memory beside attention (default: {ADAPTERS[0]})",
    )
    p.add_argument(
        "--adapter-blocks",
        type=positive_int,
        default=None,
        help="adapter: how many of the last blocks carry it (default: all)",
    )
    p.add_argument(
        "--task-blocks",
        type=positive_int,
        default=None,
        help="memorize: how many of the last blocks' in-context levels learn; the others read their start (default: "
        "all)",
    )
    p.add_argument(
        "--init-from",
        default=None,
        help="older §7.3 stacking: a trained byte-level checkpoint whose same-named weights are copied and whose "
        "MLPs start every SwiGLU CMS level of a titans or hope preset (not equal to it at start); into a "
        "transformer or hope_attention it is --init",
    )
    p.add_argument(
        "--eval-tokens",
        type=positive_int,
        default=d.eval_tokens,
        help=f"language-model streams: validation tokens scored per task (default: {d.eval_tokens})",
    )
    p.add_argument(
        "--eval-items",
        type=non_negative_int,
        default=d.eval_items,
        help="bbc: validation examples scored per task, the first N (default: 0, all; scoring reads each once per "
        "class seen, so a pretrained base's runs cap it)",
    )
    p.add_argument("--seed", type=int, default=d.seed, help=f"(default: {d.seed})")
    p.add_argument("--data-root", default=None, help="corpus cache (default: $NESTLEARN_DATA or ~/.cache/nestlearn)")
    p.add_argument(
        "--out-dir",
        required=True,
        help=f"where results.json, continual.png and {PROGRESS_FILE} (to resume an interrupted run) go",
    )
    p.add_argument(
        "--keep-progress",
        action="store_true",
        help=f"keep out_dir/{PROGRESS_FILE} once the run is finished: the trained weights, optimizer and whatever "
        "the strategy keeps, the size of the model several times over (1.6 GB for SmolLM2-135M fine-tuned); by "
        "default it is removed once results.json is written, and the same command then prints the results again "
        "from results.json",
    )
    add_device(p)
    add_threads(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    # every field is a flag of the same name, but progress (--no-progress)
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(ContinualConfig) if f.name != "progress"}
    config = ContinualConfig(**given, progress=not args.no_progress)
    set_threads(args.threads)
    random.seed(config.seed)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    progress = out / PROGRESS_FILE
    done = None if progress.is_file() else finished_result(out / "results.json", config)
    if done is not None:  # finished and its progress removed: not trained again
        print(f"nestlearn continual: {out} is finished; its results again (from results.json)", file=sys.stderr)
        print(table(done))
        return 0
    result = run(config, progress)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    plot(result, out / "continual.png")
    if not args.keep_progress and progress.is_file():
        size = progress.stat().st_size
        progress.unlink()
        print(
            f"nestlearn continual: removed {progress} ({size / 2**30:.1f} GiB), as the run is finished "
            "(--keep-progress keeps it)",
            file=sys.stderr,
        )
    print(table(result))
    print(
        f"\nparameters: {result['trainable_params']:,} trainable, {result['frozen_params']:,} frozen"
        + (f" (started from {config.init or config.init_from})" if config.pretrained_start else "")
    )
    print(f"\nwrote {out / 'results.json'} and {out / 'continual.png'}")
    return 0
