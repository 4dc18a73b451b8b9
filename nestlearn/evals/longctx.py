"""The long-context suite: needle in a haystack, MQAR, formal languages, bAbI (issue #6 §3; docs/longctx.md).

    nestlearn longctx niah runs/hope --kinds passkey number uuid --lengths 1024 2048 --depths 0 0.5 1 --samples 4
    nestlearn longctx formal --presets transformer hope --train-length 40 --steps 400    # paper Table 5, Bin0/Bin1
    nestlearn longctx mqar --presets transformer hope --pairs 8 --test-pairs 8 16
    nestlearn longctx babi --presets transformer hope --tasks single latest --facts 8

`niah` scores a trained checkpoint (nestlearn/niah.py): a heatmap per kind over context length × needle depth.
The other three train each preset from scratch at `debug` size on freshly generated batches (nestlearn/data/
synthetic.py), then score it on new sequences, some longer than those it was trained on. Every generator is
deterministic by --seed; each subcommand writes results.json into --out-dir and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm import tqdm

from .. import presets
from ..data import synthetic
from ..health import MemoryHealth, unhealthy, warn_about
from ..model import LanguageModel, ModelState, build

__all__ = ["train_synthetic", "memory_arguments", "memory_options", "niah_grids", "formal_table"]

Batch = tuple[Tensor, Tensor, Tensor]  # tokens, targets, mask; each (b, t)


def train_synthetic(
    preset: str,
    batch_fn: Callable[[int, torch.Generator], Batch],
    *,
    steps: int,
    batch: int,
    lr: float = 3e-3,
    seed: int = 0,
    max_lr: float | None = None,
    lr_init: float | None = None,
    rule: str | None = None,
    read: str | None = None,
    retain_to: str | None = None,
    retention_init: float | None = None,
    update_periods: tuple[int | None, ...] | None = None,
    cms_signal: str | None = None,
    task_lr: float | None = None,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    desc: str = "",
    quiet: bool = False,
) -> tuple[LanguageModel, dict]:
    """Train `preset` at `debug` size from scratch on batch_fn(batch, generator) with AdamW (no weight decay, 20
    warm-up steps, then constant lr; gradient clipping 1.0), the loss on the masked positions only.

    `max_lr`, `lr_init`, `rule`, `read` override the token mixers' memories (the cap of η_t, its initial value, GD
    or DGD, dual or snapshot reads), `retain_to` and `retention_init` every memory's (in-context CMS levels' too:
    what retention pulls towards, α_t at initialisation), `update_periods` the CMS levels ((None,): one SwiGLU
    level, Hope "w/o CMS") and `cms_signal`, `task_lr` what the in-context levels learn from (docs/deviations.md
    §11b); None keeps the preset's.
    Returns the model (in eval mode) and {"first_loss", "final_loss" (mean of the last 10), "seconds", "params"}.
    """
    torch.manual_seed(seed)
    config = presets.PRESETS[preset]("debug")
    # the token mixers' memories (Titans, self-modifying Titans): the cap of η_t, its initial value, the update rule.
    # In-context CMS levels keep their own cap: they write with GD, which diverges long before η = 2.
    memory = {k: v for k, v in dict(max_lr=max_lr, lr_init=lr_init, rule=rule, read=read).items() if v is not None}
    config.titans = dataclasses.replace(config.titans, **memory)  # checks them (lr_init < max_lr) before training
    config.sm_titans = dataclasses.replace(config.sm_titans, **memory)
    retention = {k: v for k, v in dict(retain_to=retain_to, retention_init=retention_init).items() if v is not None}
    config.titans = dataclasses.replace(config.titans, **retention)
    config.sm_titans = dataclasses.replace(config.sm_titans, **retention)
    config.cms = dataclasses.replace(config.cms, **retention)
    if update_periods is not None:
        config.cms = dataclasses.replace(config.cms, update_periods=update_periods)  # checks them
    task = {k: v for k, v in dict(signal=cms_signal, task_lr=task_lr).items() if v is not None}
    config.cms = dataclasses.replace(config.cms, **task)
    if vocab_size is not None:
        config.vocab_size = vocab_size
    model = build(config).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    t0, losses = time.perf_counter(), []
    bar = tqdm(range(steps), desc=desc or preset, leave=False, disable=quiet)
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 20)  # short warm-up, then constant
        tokens, targets, mask = (x.to(device) for x in batch_fn(batch, g))
        logits, _ = model(tokens)
        loss = F.cross_entropy(logits[mask], targets[mask])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        bar.set_postfix(loss=f"{loss.item():.3f}")
    seconds = time.perf_counter() - t0
    model.eval()
    last = losses[-10:]
    return model, {
        "first_loss": losses[0],
        "final_loss": sum(last) / len(last),
        "seconds": seconds,
        "params": model.num_parameters(),
    }


@torch.no_grad()
def _predict(model: LanguageModel, tokens: Tensor, reduce: Callable[[Tensor], Tensor], chunk: int = 64) -> Tensor:
    """reduce(logits) for every row of tokens (b, t), a chunk of rows at a time: full logits of 512 long sequences
    would not fit in memory. Returns (b, t)."""
    device = next(model.parameters()).device
    return torch.cat([reduce(model(tokens[i : i + chunk].to(device))[0]).cpu() for i in range(0, len(tokens), chunk)])


def _argmax(logits: Tensor) -> Tensor:
    return logits.argmax(-1)


def _decision(logits: Tensor) -> Tensor:
    """Accept or reject, from the two answer logits only (as synthetic.formal_accuracy decides). (b, t, V) -> (b, t)"""
    accept = logits[..., synthetic.ACCEPT] > logits[..., synthetic.REJECT]
    return torch.where(accept, synthetic.ACCEPT, synthetic.REJECT)


def _scores(pred: Tensor, targets: Tensor, mask: Tensor) -> tuple[float, float]:
    """(per-position accuracy, sequence accuracy: every scored position of the sequence right) of predictions."""
    right = pred == targets  # (b, t)
    return right[mask].float().mean().item(), (right | ~mask).all(dim=1).float().mean().item()


def _chance(targets: Tensor, mask: Tensor, answers: Sequence[int]) -> tuple[float, float]:
    """The best (per-position, sequence) accuracy of a guesser that always gives the same answer."""
    scores = [_scores(torch.full_like(targets, a), targets, mask) for a in answers]
    return max(s[0] for s in scores), max(s[1] for s in scores)


# --- niah ---


def niah_grids(records: Sequence[dict], kinds: Sequence[str], lengths: Sequence[int], depths: Sequence[float]) -> dict:
    """Per kind: mean score and accuracy (%) over samples, as grids [depth][length], and the score per length; with
    the retrieval gain in the records (niah.retrieval_gain), also its recall (%) and gain (bits) alike."""
    gain = bool(records) and "gain" in records[0]
    fields = {"score": 100, "accuracy": 100} | ({"recall": 100, "gain": 1} if gain else {})
    out = {}
    for kind in kinds:
        grid = {f: [[0.0] * len(lengths) for _ in depths] for f in fields}
        for i, depth in enumerate(depths):
            for j, length in enumerate(lengths):
                rs = [r for r in records if r["kind"] == kind and r["length"] == length and r["depth"] == depth]
                for f, scale in fields.items():
                    grid[f][i][j] = scale * sum(float(r["correct" if f == "accuracy" else f]) for r in rs) / len(rs)
        for f in ["score", "recall", "gain"] if gain else ["score"]:
            grid[f"{f}_by_length"] = [sum(row[j] for row in grid[f]) / len(depths) for j in range(len(lengths))]
        out[kind] = grid
    return out


def _heatmap(
    path: Path,
    grid: list[list[float]],
    lengths: Sequence[int],
    depths: Sequence[float],
    title: str,
    label: str = "score (%)",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.6 + 1.1 * len(lengths), 1.4 + 0.45 * len(depths)))
    im = ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(lengths)), [str(n) for n in lengths])
    ax.set_yticks(range(len(depths)), [f"{100 * d:g}%" for d in depths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylabel("needle depth")
    for i, row in enumerate(grid):
        for j, v in enumerate(row):
            ax.text(j, i, f"{v:.0f}", ha="center", va="center", fontsize=8, color="white" if v < 25 else "black")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_niah(args: argparse.Namespace) -> dict:
    from ..checkpoint import load_checkpoint, resolve_checkpoint
    from ..data.corpora import load_split
    from ..runtime import flush_subnormals, resolve_device
    from . import niah

    device = resolve_device(args.device)
    flush_subnormals(device)
    path = resolve_checkpoint(args.checkpoint)
    model, tokenizer = load_checkpoint(path, device)
    model.eval()
    if getattr(args, "window", None) is not None:  # a window narrower than the one it was trained with, or none
        model.set_window(args.window)
    docs = None
    if any(niah.KINDS[k].haystack == "corpus" for k in args.kinds):
        docs = load_split(args.haystack, args.split, args.data_root)  # says `nestlearn fetch-data NAME` if missing
    samples = niah.make_samples(
        args.kinds, args.lengths, args.depths, args.samples, tokenizer, docs, args.seed, args.max_new_tokens
    )
    records = niah.score_samples(samples, niah.model_answerer(model, tokenizer, device), progress=not args.no_progress)
    dead: dict[str, tuple[int, MemoryHealth]] = {}  # memory -> (fewest prompt tokens it was found dead after, health)

    def check(state: ModelState, tokens: int) -> None:
        for m in unhealthy(model, state):
            if m.name not in dead or tokens < dead[m.name][0]:
                dead[m.name] = (tokens, m)

    if args.gain:
        gains = niah.retrieval_gain(
            samples, niah.model_bits(model, tokenizer, device, on_state=check), args.seed, progress=not args.no_progress
        )
        records = [{**r, **g} for r, g in zip(records, gains, strict=True)]
    else:  # one pass over the longest prompt: are the memories still alive at its end?
        longest = max(samples, key=lambda s: s.length)
        with torch.no_grad():
            ids = torch.tensor([tokenizer.encode(longest.prompt)], device=device)
            check(model(ids)[1], ids.shape[1])
    if dead:
        shortest = min(t for t, _ in dead.values())
        warn_about([m for _, m in dead.values()], f"after prompts of {shortest:,} tokens or more")
    grids = niah_grids(records, args.kinds, args.lengths, args.depths)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for kind in args.kinds:
        title = f"{kind} ({niah.KINDS[kind].ruler}), {model.config.name}, haystack {Path(args.haystack).name}"
        _heatmap(out / f"niah-{kind}.png", grids[kind]["score"], args.lengths, args.depths, title)
        if args.gain:
            _heatmap(
                out / f"niah-{kind}-recall.png",
                grids[kind]["recall"],
                args.lengths,
                args.depths,
                title,
                label="recall (% of the answer's bits)",
            )
    result = {
        "checkpoint": str(path),
        "model": model.config.name,
        "trained_seq_len": model.config.seq_len,
        "window": model.config.attention.window if model.config.attention else None,
        "tokenizer": tokenizer.kind,
        "haystack": args.haystack,
        "split": args.split,
        "seed": args.seed,
        "samples": args.samples,
        "lengths": args.lengths,
        "depths": args.depths,
        "kinds": {k: {"ruler": niah.KINDS[k].ruler, **grids[k]} for k in args.kinds},
        "dead_memories": {name: tokens for name, (tokens, _) in dead.items()},
        "records": records,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(
        f"\nRULER-style needle in a haystack: {model.config.name} (trained on {model.config.seq_len}-token windows), "
        f"score % (string_match_all), mean over {len(args.depths)} depths × {args.samples} samples\n"
    )
    print("| kind | " + " | ".join(str(n) for n in args.lengths) + " |")
    print("| --- |" + " ---: |" * len(args.lengths))
    for kind in args.kinds:
        cells = " | ".join(f"{v:.1f}" for v in grids[kind]["score_by_length"])
        print(f"| {kind} ({niah.KINDS[kind].ruler}) | {cells} |")
    if args.gain:
        print(
            "\nRetrieval gain: recall % = bits of the answer taken from the needle / bits without it (mean gain in "
            "bits in brackets)\n"
        )
        print("| kind | " + " | ".join(str(n) for n in args.lengths) + " |")
        print("| --- |" + " ---: |" * len(args.lengths))
        for kind in args.kinds:
            g = grids[kind]
            cells = " | ".join(
                f"{r:.1f} ({b:+.2f})" for r, b in zip(g["recall_by_length"], g["gain_by_length"], strict=True)
            )
            print(f"| {kind} ({niah.KINDS[kind].ruler}) | {cells} |")
    print(f"\nheatmaps and results.json in {out}")
    return result


# --- formal languages, MQAR, bAbI: trained from scratch ---


def run_formal(args: argparse.Namespace) -> list[dict]:
    L = args.train_length
    bins = {"bin0": (1, L), "bin1": (L + 1, 2 * L)}  # Table 5: Bin0 within the training lengths, Bin1 up to twice
    rows = []
    for lang in args.languages:
        for preset in args.presets:
            model, fit = train_synthetic(
                preset,
                lambda b, g, lang=lang: synthetic.formal_language(lang, b, 1, L, generator=g),
                steps=args.steps,
                batch=args.batch,
                lr=args.lr,
                seed=args.seed,
                **memory_options(args),
                device=args.device,
                desc=f"{preset} {lang}",
                quiet=args.quiet,
            )
            row = {"language": lang, "preset": preset, **fit}
            g_eval = torch.Generator().manual_seed(10_000 + args.seed)
            for name, (lo, hi) in bins.items():
                tokens, targets, mask = synthetic.formal_language(lang, args.eval_samples, lo, hi, generator=g_eval)
                position, sequence = _scores(_predict(model, tokens, _decision), targets, mask)
                pos_chance, seq_chance = _chance(targets, mask, (synthetic.REJECT, synthetic.ACCEPT))
                row |= {
                    name: sequence,
                    f"{name}_position": position,
                    f"{name}_chance": seq_chance,
                    f"{name}_position_chance": pos_chance,
                    f"{name}_lengths": [lo, hi],
                }
            rows.append(row)
    _write(args.out_dir, {"train_length": L, "steps": args.steps, "seed": args.seed, "rows": rows})
    print(formal_table(rows, args.languages, args.presets, L))
    return rows


def formal_table(rows: Sequence[dict], languages: Sequence[str], presets_: Sequence[str], train_length: int) -> str:
    """Sequence accuracy (%) in the layout of paper Table 5, with the best constant guesser as a last row."""
    titles = [synthetic.FORMAL_LANGUAGES[lang].title for lang in languages]
    lines = [
        f"\nFormal languages (paper Table 5): sequence accuracy %, trained on lengths 1..{train_length}; "
        f"Bin0 = lengths 1..{train_length}, Bin1 = {train_length + 1}..{2 * train_length}\n",
        "| Model | " + " | ".join(f"{t} Bin0 | {t} Bin1" for t in titles) + " |",
        "| --- |" + " ---: | ---: |" * len(languages),
    ]
    by = {(r["preset"], r["language"]): r for r in rows}
    for preset in presets_:
        cells = [f"{100 * by[preset, lang][b]:.1f}" for lang in languages for b in ("bin0", "bin1")]
        lines.append(f"| {preset} | " + " | ".join(cells) + " |")
    first = {lang: by[presets_[0], lang] for lang in languages}
    cells = [f"{100 * first[lang][b + '_chance']:.1f}" for lang in languages for b in ("bin0", "bin1")]
    lines.append("| constant guess | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def run_mqar(args: argparse.Namespace) -> list[dict]:
    test_pairs = args.test_pairs or [args.pairs, 2 * args.pairs]
    vocab = presets.SIZES["debug"][3]
    for pairs in [args.pairs, *test_pairs]:  # refuse a bad setting before training, not after
        synthetic.mqar(1, pairs, vocab, gap=args.gap)
    chance = 1 / (vocab - vocab // 2)  # values are uniform over the upper half of the vocabulary
    rows = []
    for preset in args.presets:
        model, fit = train_synthetic(
            preset,
            lambda b, g: synthetic.mqar(b, args.pairs, vocab, generator=g, gap=args.gap),
            steps=args.steps,
            batch=args.batch,
            lr=args.lr,
            seed=args.seed,
            **memory_options(args),
            device=args.device,
            desc=f"{preset} mqar",
            quiet=args.quiet,
        )
        g_eval = torch.Generator().manual_seed(10_000 + args.seed)
        for pairs in test_pairs:
            tokens, targets, mask = synthetic.mqar(args.eval_samples, pairs, vocab, generator=g_eval, gap=args.gap)
            accuracy = _scores(_predict(model, tokens, _argmax), targets, mask)[0]  # over every queried value
            rows.append(
                {
                    "preset": preset,
                    "train_pairs": args.pairs,
                    "pairs": pairs,
                    "gap": args.gap,
                    "accuracy": accuracy,
                    "chance": chance,
                    **fit,
                }
            )
    _write(args.out_dir, {"steps": args.steps, "seed": args.seed, "rows": rows})
    print(
        f"\nMQAR: trained with {args.pairs} key/value pairs (sequences of {4 * args.pairs + args.gap} tokens, a gap "
        f"of {args.gap}); accuracy on the queried values of {args.eval_samples} new sequences\n"
    )
    print("| preset | pairs | tokens | accuracy | chance | time (s) |\n| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['preset']} | {r['pairs']} | {4 * r['pairs'] + args.gap} | {r['accuracy']:.3f} | "
            f"{r['chance']:.3f} | {r['seconds']:.0f} |"
        )
    return rows


def run_babi(args: argparse.Namespace) -> list[dict]:
    from ..data.tokenizer import ByteTokenizer

    test_facts = args.test_facts or [args.facts, 2 * args.facts]
    for task in args.tasks:  # refuse a bad setting before training, not after
        for facts in [args.facts, *test_facts]:
            synthetic.babi_story(task, facts, random.Random(0), args.people)
    vocab = ByteTokenizer().vocab_size  # bytes and the eos id that pads
    chance = 1 / len(synthetic.BABI_PLACES)
    rows = []
    for task in args.tasks:
        for preset in args.presets:
            model, fit = train_synthetic(
                preset,
                lambda b, g, task=task: synthetic.babi(task, b, args.facts, args.people, generator=g),
                steps=args.steps,
                batch=args.batch,
                lr=args.lr,
                seed=args.seed,
                **memory_options(args),
                vocab_size=vocab,
                device=args.device,
                desc=f"{preset} {task}",
                quiet=args.quiet,
            )
            g_eval = torch.Generator().manual_seed(10_000 + args.seed)
            for facts in test_facts:
                tokens, targets, mask = synthetic.babi(task, args.eval_samples, facts, args.people, generator=g_eval)
                accuracy = _scores(_predict(model, tokens, _argmax), targets, mask)[1]  # the whole answer right
                rows.append(
                    {
                        "task": task,
                        "preset": preset,
                        "train_facts": args.facts,
                        "facts": facts,
                        "accuracy": accuracy,
                        "chance": chance,
                        **fit,
                    }
                )
    _write(args.out_dir, {"steps": args.steps, "seed": args.seed, "people": args.people, "rows": rows})
    print(
        f"\nbAbI-style fact tracking: trained on stories of {args.facts} facts; answer accuracy (every byte of the "
        f"place right) on {args.eval_samples} new stories\n"
    )
    print("| task | preset | facts | accuracy | chance | time (s) |\n| --- | --- | ---: | ---: | ---: | ---: |")
    for r in rows:
        print(
            f"| {r['task']} | {r['preset']} | {r['facts']} | {r['accuracy']:.3f} | {r['chance']:.3f} | "
            f"{r['seconds']:.0f} |"
        )
    return rows


def _write(out_dir: str, result: dict) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")


# --- command line ---


def memory_options(args: argparse.Namespace) -> dict:
    """The memory options of `memory_arguments`, as `train_synthetic` takes them."""
    names = ("max_lr", "lr_init", "rule", "read", "retain_to", "retention_init", "cms_signal", "task_lr")
    return {name: getattr(args, name) for name in names}


def memory_arguments(p: argparse.ArgumentParser) -> None:
    """--max-lr, --lr-init, --rule, --read, --retain-to, --retention-init, --cms-signal, --task-lr: the memories, as
    `train_synthetic` takes them."""
    p.add_argument(
        "--max-lr",
        type=float,
        default=None,
        help="override the memories' inner learning-rate cap η_max (0.1); 2 with DGD lets them track "
        "state (docs/deviations.md)",
    )
    p.add_argument(
        "--lr-init", type=float, default=None, help="the memories' initial η_t (default η_max / 2); below --max-lr"
    )
    p.add_argument(
        "--rule",
        choices=["gd", "dgd"],
        default=None,
        help="the memories' update rule (default: the preset's, gd for Titans, dgd for Hope)",
    )
    p.add_argument(
        "--read",
        choices=["dual", "snapshot"],
        default=None,
        help="how the memories are read inside a chunk: dual (token t sees its own write, the default) "
        "or snapshot (eq. 90: the weights the chunk started from; docs/deviations.md)",
    )
    p.add_argument(
        "--retain-to",
        choices=["init", "zero"],
        default=None,
        help="what every memory's retention pulls towards: init, its meta-learned initial state (the "
        "default), or zero, the paper's weight decay (MLP memories die on long streams; "
        "docs/deviations.md)",
    )
    p.add_argument(
        "--retention-init",
        type=float,
        default=None,
        help="every memory's retention α_t at initialisation, in (0, 1) (default 0.982: a time constant "
        "of about 55 tokens)",
    )
    p.add_argument(
        "--cms-signal",
        choices=["local", "task"],
        default=None,
        help="what the in-context CMS levels learn from: task (eq. 71: the next-token loss, the default of hope and "
        "hope_attention; docs/deviations.md §11b) or local (their own objective)",
    )
    p.add_argument("--task-lr", type=float, default=None, help="--cms-signal task: η of the levels (default 1e-3)")
