"""Delta momentum against momentum on the paper's toy landscape (Fig. 4, eq. 53; issue #5).

    python experiments/toy_momentum.py                         # the table; the plot in runs/toy_momentum/
    python experiments/toy_momentum.py --out-dir docs/img      # regenerates docs/img/toy_momentum.png

    ψ(r, θ) = r² + k (r − θ + α sin(ω r))²,   minimum ψ = 0 at (0, 0),   start (r₀, θ₀) = (−3.5, 2)

The paper gives neither k, α, ω nor the learning rates. We use k = 20, α = 0.5, ω = 3 (a narrow curved valley),
β = 0.9 for both methods, and give each method its best learning rate from one grid, so the comparison is between
tuned methods: the number of steps until ψ < 1e-4 (at most 2000). Delta momentum is the `proximal` form of
nestlearn.optim.DeltaMomentum with ζ = 1e-3 (docs/optimizers.md). Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

from nestlearn.optim import DeltaMomentum

LRS = (5e-4, 1e-3, 2e-3, 5e-3, 1e-2, 2e-2, 5e-2)


def psi(x: torch.Tensor, k: float, alpha: float, omega: float) -> torch.Tensor:
    r, theta = x[0], x[1]
    return r**2 + k * (r - theta + alpha * torch.sin(omega * r)) ** 2


def make(method: str, params, lr: float, beta: float, delta: float, form: str) -> torch.optim.Optimizer:
    if method == "momentum":
        return torch.optim.SGD(params, lr=lr, momentum=beta)
    if method == "delta":
        return DeltaMomentum(params, lr=lr, momentum=beta, delta=delta, form=form)
    raise ValueError(f"method={method!r}: expected momentum or delta")


def descend(method: str, lr: float, args) -> tuple[int | None, list[tuple[float, float]]]:
    """(steps until ψ < tol, or None if not within args.steps or diverged; the path of (r, θ))."""
    x = torch.nn.Parameter(torch.tensor([-3.5, 2.0], dtype=torch.float64))
    opt = make(method, [x], lr, args.beta, args.delta, args.form)
    path = []
    for step in range(args.steps + 1):
        path.append((x[0].item(), x[1].item()))
        loss = psi(x, args.k, args.alpha, args.omega)
        if loss.item() < args.tol:
            return step, path
        if not math.isfinite(loss.item()) or loss.item() > 1e8:
            return None, path
        opt.zero_grad()
        loss.backward()
        opt.step()
    return None, path


def best(method: str, args) -> tuple[int | None, float, list]:
    """The fewest steps over the learning-rate grid (ties: the smaller rate)."""
    runs = [(descend(method, lr, args), lr) for lr in args.lrs]
    done = [(steps, lr, path) for (steps, path), lr in runs if steps is not None]
    return min(done, key=lambda t: (t[0], t[1])) if done else (None, float("nan"), [])


def plot(results: dict, args, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points = [xy for _, _, trace in results.values() for xy in trace] + [(0.0, 0.0)]
    rs, ts = zip(*points, strict=True)
    r = torch.linspace(min(rs) - 0.5, max(rs) + 0.5, 300, dtype=torch.float64)
    t = torch.linspace(min(ts) - 0.5, max(ts) + 0.5, 300, dtype=torch.float64)
    R, T = torch.meshgrid(r, t, indexing="xy")
    Z = R**2 + args.k * (R - T + args.alpha * torch.sin(args.omega * R)) ** 2
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.contour(R.numpy(), T.numpy(), torch.log10(Z + 1e-3).numpy(), levels=30, cmap="Greys", linewidths=0.6)
    for (method, (steps, lr, trace)), color in zip(results.items(), ("tab:blue", "tab:red"), strict=False):
        if not trace:  # no learning rate of the grid arrived within --steps: nothing to draw
            continue
        xs, ys = zip(*trace, strict=True)
        ax.plot(xs, ys, color=color, lw=1.2, label=f"{method} (lr {lr:g}): {steps} steps")
    ax.plot([-3.5], [2], "ko")
    ax.plot([0], [0], "k*", ms=12)
    ax.set_xlabel("r")
    ax.set_ylabel("θ")
    ax.set_title(f"ψ = r² + {args.k:g}(r − θ + {args.alpha:g} sin({args.omega:g}r))²")
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--k", type=float, default=20.0)
    ap.add_argument("--alpha", type=float, default=0.5)
    ap.add_argument("--omega", type=float, default=3.0)
    ap.add_argument("--beta", type=float, default=0.9, help="momentum β of both methods")
    ap.add_argument("--delta", type=float, default=1e-3, help="ζ of delta momentum")
    ap.add_argument("--form", default="proximal", choices=DeltaMomentum.FORMS, help="of delta momentum")
    ap.add_argument("--lrs", type=float, nargs="+", default=list(LRS), help="learning-rate grid, per method")
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--tol", type=float, default=1e-4)
    ap.add_argument(
        "--out-dir",
        default="runs/toy_momentum",
        help="folder of the outputs, made if missing (default runs/toy_momentum); "
        "--out-dir docs/img regenerates the image of docs/optimizers.md",
    )
    ap.add_argument(
        "--plot",
        default="toy_momentum.png",
        help="file name of the plot inside --out-dir (default toy_momentum.png); '' for no plot",
    )
    args = ap.parse_args(argv)
    if args.plot and Path(args.plot).name != args.plot:
        ap.error(f"--plot {args.plot!r} is a file name inside --out-dir, not a path; give the folder with --out-dir")
    results = {m: best(m, args) for m in ("momentum", "delta")}
    print(f"| method | best lr | steps to ψ < {args.tol:g} |")
    print("| --- | ---: | ---: |")
    for method, (steps, lr, _) in results.items():
        print(f"| {method} | {lr:g} | {steps if steps is not None else f'not within {args.steps}'} |")
    if args.plot:
        path = Path(args.out_dir) / args.plot
        path.parent.mkdir(parents=True, exist_ok=True)
        plot(results, args, str(path))
        print(f"plot: {path}")
    return {m: (s, lr) for m, (s, lr, _) in results.items()}


if __name__ == "__main__":
    main()
