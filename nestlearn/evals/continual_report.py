"""What the continual-learning protocol prints and draws for one run: the matrix R as a Markdown table and as a
figure (the summary over runs and seeds is `continual.summary`)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

__all__ = ["plot", "table"]


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
