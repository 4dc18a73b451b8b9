"""What the continual-learning protocol prints and draws: for one run the matrix R as a Markdown table and as a
figure, and over runs and seeds a summary table."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np

from .continual_setup import ContinualConfig

__all__ = ["plot", "summary", "table"]


def plot(result: dict, path: Path) -> None:
    """The matrix R as a heatmap and each task's score after every stage as curves, side by side."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    R, names = np.asarray(result["R"]), result["tasks"]
    T = len(names)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    im = a.imshow(R, cmap="viridis" if result["higher_is_better"] else "viridis_r")
    for i in range(T):
        for j in range(T):
            a.text(j, i, f"{R[i, j]:.2f}", ha="center", va="center", color="w", fontsize=8)
    a.set_xticks(range(T), names, rotation=30, ha="right")
    a.set_yticks(range(T), [f"after {n}" for n in names])
    a.set_xlabel(f"evaluated on ({result['metric']})")
    fig.colorbar(im, ax=a)
    stages = ["start", *names]
    for j, name in enumerate(names):
        b.plot(range(T + 1), [result["baseline"][j], *R[:, j]], marker="o", label=name)
    b.set_xticks(range(T + 1), stages, rotation=30, ha="right")
    b.set_ylabel(result["metric"])
    b.set_xlabel("after training on")
    b.legend(fontsize=8)
    c = result["config"]
    fig.suptitle(f"{c['stream']}: {c['preset']}-{c['size']}, {c['strategy']}, {c['steps_per_task']} steps per task")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def table(result: dict) -> str:
    names, R = result["tasks"], result["R"]
    lines = [
        f"| after \\ on | {' | '.join(names)} |",
        f"| --- |{' ---: |' * len(names)}",
        f"| (untrained) | {' | '.join(f'{v:.3f}' for v in result['baseline'])} |",
    ]
    lines += [f"| {names[i]} | {' | '.join(f'{v:.3f}' for v in row)} |" for i, row in enumerate(R)]
    m = result["metrics"]

    def f(x):
        return "n/a" if x is None else f"{x:+.3f}"

    lines.append(
        f"\n{result['metric']}: average {m['average']:.3f}, BWT {f(m['bwt'])}, forgetting "
        f"{f(m['forgetting'])}, FWT {f(m['fwt'])} ({result['seconds']:.0f} s)"
    )
    general = result.get("general")
    if general:
        for key, label in (
            ("wiki_bits_per_byte", "wiki bits per byte"),
            ("squad_exact_match", "SQuAD exact match"),
            ("squad_f1", "SQuAD F1"),
        ):
            before, after = general["before"][key], general["after"][key]
            if before is not None:
                lines.append(
                    f"general ability, {label}: {before:.3f} before, {after:.3f} after ({after - before:+.3f})"
                )
    return "\n".join(lines)


def summary(results: list[dict]) -> str:
    """A Markdown table of runs that differ only in their seed, one row per setting (in the order first seen):
    the mean of each metric over the seeds, ± the sample standard deviation when there are several."""
    groups: dict[str, list[dict]] = {}
    defaults = asdict(ContinualConfig())  # for fields that runs written before they existed do not have
    for r in results:
        c = {k: v for k, v in {**defaults, **r["config"]}.items() if k not in ("seed", "data_root", "progress")}
        groups.setdefault(json.dumps(c, sort_keys=True), []).append(r)

    def cell(xs: list[float | None], fmt: str) -> str:
        if any(x is None for x in xs):
            return "n/a"
        text = format(float(np.mean(xs)), fmt)
        return text + (f" ± {float(np.std(xs, ddof=1)):{fmt.lstrip('+')}}" if len(xs) > 1 else "")

    lines = [
        "| stream | preset | strategy | seeds | average | BWT | forgetting | FWT | minutes per run |",
        "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for runs in groups.values():
        c, m = runs[0]["config"], [r["metrics"] for r in runs]
        strategy = c["strategy"] + (f" {c['update_periods']}" if c.get("update_periods") else "")
        strategy += f" rank {c['lora_rank']}" if c.get("lora_rank") else ""
        strategy += f" {c['adapter']}" if c.get("adapter") else ""
        seeds = ", ".join(str(r["config"]["seed"]) for r in runs)
        cells = [cell([x["average"] for x in m], ".3f")]
        cells += [cell([x[k] for x in m], "+.3f") for k in ("bwt", "forgetting", "fwt")]
        cells.append(cell([r["seconds"] / 60 for r in runs], ".1f"))
        lines.append(f"| {c['stream']} | {c['preset']} | {strategy} | {seeds} | {' | '.join(cells)} |")
    return "\n".join(lines)
