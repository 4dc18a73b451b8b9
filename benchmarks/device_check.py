"""Correctness on a device: the properties CI checks on CPU, checked again where the kernels differ (a GPU).

    PYTHONPATH=. python benchmarks/device_check.py --device cuda     # not yet run on a GPU (none lent so far)
    PYTHONPATH=. python benchmarks/device_check.py --device cpu      # 9 s on 2 cores; tests/test_benchmarks.py

1. memory    `scan` on the device: chunked equals the token-by-token reference there, and equals the chunked path
             on CPU, in float64: outputs, final state and the gradient of every input, over memory × rule ×
             momentum × read (with self-generated targets and clipping).
2. model     every preset at debug size, float64: the device's logits and gradients equal CPU's for the same
             weights; logits at t ignore later tokens (t inside a chunk); streaming with carried state equals one
             call; greedy `generate` equals the argmax of the parallel forward.
3. bf16      every preset takes 8 AdamW steps on one batch under bfloat16 autocast (as `nestlearn train` does on a
             GPU by default): the loss stays finite and goes down.
4. continual `nestlearn continual --device` (float32): two tasks of 3 steps on local corpora, each strategy's R and
             training losses on the device equal CPU's: finetune, ewc, replay, levels,
             class-incremental bbc; from a tiny random Llama (with transformers) lora, adapter, cms-levels, memorize.

Prints one line per check and exits with status 1 if any failed.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

# this tree's nestlearn, and its tests' tiny random Llama (check_continual), wherever the script is run from
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from nestlearn import build, presets  # noqa: E402
from nestlearn.memory import MemoryState, init_state, scan  # noqa: E402

FAILURES: list[str] = []


def report(name: str, ok: bool, detail: str = "") -> None:
    print(f"  {'ok  ' if ok else 'FAIL'} {name}{'  ' + detail if detail else ''}", flush=True)
    if not ok:
        FAILURES.append(name)


def max_rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return ((a - b).abs().max() / a.abs().max().clamp(min=1.0)).item() if a.numel() else 0.0


def memory_inputs(memory: str, momentum: bool, seed: int = 0) -> tuple[dict, MemoryState]:
    g = torch.Generator().manual_seed(seed)
    b, h, T, d = 2, 2, 37, 8

    def rand(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, dtype=torch.float64)

    x = {
        "q": torch.randn(b, h, T, d, generator=g, dtype=torch.float64),
        "k": F.normalize(torch.randn(b, h, T, d, generator=g, dtype=torch.float64), dim=-1),
        "v": torch.randn(b, h, T, d, generator=g, dtype=torch.float64),
        "lr": rand(b, h, T, hi=0.5),
        "retention": rand(b, h, T, lo=0.5),
        "momentum": rand(b, h, T) if momentum else None,
    }
    state = init_state(h, d, memory=memory, hidden=16, momentum=momentum, generator=g, dtype=torch.float64)
    if memory == "linear":
        state = MemoryState({"W": 0.3 * torch.randn(h, d, d, generator=g, dtype=torch.float64)}, state.momentum)
    return x, state


def run_scan(inputs: dict, state: MemoryState, device: str, **opts) -> list[torch.Tensor]:
    """Outputs, final state and input gradients of one scan on `device`, as a flat list of CPU tensors."""
    xs = {n: None if t is None else t.to(device).requires_grad_(True) for n, t in inputs.items()}
    st = state.to(device).map(lambda t: t.requires_grad_(True))
    y, out = scan(**xs, state=st, **opts)
    results = [y, *out.weights.values(), *(out.momentum or {}).values()]
    g = torch.Generator().manual_seed(1)
    loss = sum((r * torch.randn(r.shape, generator=g, dtype=r.dtype).to(device)).sum() for r in results)
    leaves = [t for t in xs.values() if t is not None] + list(st.weights.values()) + list((st.momentum or {}).values())
    grads = torch.autograd.grad(loss, leaves)
    return [t.detach().cpu() for t in results + list(grads)]


def check_memory(device: str) -> None:
    grid = itertools.product(["linear", "mlp"], ["gd", "dgd"], [False, True], ["dual", "snapshot"])
    for memory, rule, momentum, read in grid:
        inputs, state = memory_inputs(memory, momentum)
        opts = dict(
            memory=memory, objective="l2", rule=rule, chunk_size=8, read=read, max_grad_norm=2.0, self_target=True
        )
        chunked = run_scan(inputs, state, device, **opts)
        reference = run_scan(inputs, state, device, **opts, impl="reference")
        on_cpu = run_scan(inputs, state, "cpu", **opts)
        err_ref = max(max_rel_err(a, b) for a, b in zip(reference, chunked, strict=True))
        err_cpu = max(max_rel_err(a, b) for a, b in zip(on_cpu, chunked, strict=True))
        name = f"memory {memory} {rule}{' +momentum' if momentum else ''} {read}"
        report(name, err_ref < 1e-8 and err_cpu < 1e-8, f"vs reference {err_ref:.1e}, vs cpu {err_cpu:.1e}")


def check_model(device: str) -> None:
    g = torch.Generator().manual_seed(0)
    T = 140  # past the slowest in-context level (128), so that every parameter has a gradient
    x = torch.randint(0, 256, (2, T), generator=g)
    for preset in sorted(presets.PRESETS):
        torch.manual_seed(0)
        cpu_model = build(presets.PRESETS[preset]("debug")).double()
        model = build(presets.PRESETS[preset]("debug")).double().to(device)
        model.load_state_dict(cpu_model.state_dict())
        xd = x.to(device)
        losses = []
        for m, xx in ((cpu_model, x), (model, xd)):
            loss, _ = m.loss(xx)
            loss.backward()
            losses.append(loss)
        err = max(
            [max_rel_err(losses[0], losses[1])]
            + [max_rel_err(p.grad, q.grad) for p, q in zip(cpu_model.parameters(), model.parameters(), strict=True)]
        )
        y_cpu, _ = cpu_model(x)
        y, _ = model(xd)
        err = max(err, max_rel_err(y_cpu, y))
        report(f"model {preset}: device equals cpu", err < 1e-8, f"logits, loss and gradients {err:.1e}")

        with torch.no_grad():
            t = 21  # inside a chunk of 16 and of 4
            x2 = xd.clone()
            x2[:, t + 1 :] = torch.randint(0, 256, (2, T - t - 1), generator=g).to(device)
            y2, _ = model(x2)
            leak = (y2[:, : t + 1] - y[:, : t + 1]).abs().max().item()
            pieces, state = [], None
            for lo, hi in [(0, 7), (7, 8), (8, 30), (30, T)]:
                part, state = model(xd[:, lo:hi], state)
                pieces.append(part)
            stream = (torch.cat(pieces, dim=1) - y).abs().max().item()
            out = model.generate(xd[:, :6], max_new_tokens=12, temperature=0.0)
            logits, _ = model(out[:, :-1])
            greedy = torch.equal(out[:, 6:], logits[:, 5:].argmax(-1))
        report(f"model {preset}: causal", leak < 1e-10, f"change at t <= {t}: {leak:.1e}")
        report(f"model {preset}: streaming", stream < 1e-9, f"split calls vs one: {stream:.1e}")
        report(f"model {preset}: greedy generate", greedy)


def check_bf16(device: str) -> None:
    x = torch.randint(0, 256, (4, 129), generator=torch.Generator().manual_seed(0)).to(device)
    for preset in sorted(presets.PRESETS):
        torch.manual_seed(0)
        model = build(presets.PRESETS[preset]("debug")).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        losses = []
        for _ in range(8):
            with torch.autocast(torch.device(device).type, dtype=torch.bfloat16):
                loss, _ = model.loss(x)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            losses.append(loss.item())
        ok = all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0]
        report(f"bf16 {preset}: 8 steps", ok, f"loss {losses[0]:.3f} -> {losses[-1]:.3f}")


def _local_corpora(root: Path) -> tuple[list[str], str]:
    """Two small languages and a five-class bbc corpus, written under `root` (the tests' corpora)."""
    from nestlearn.data.corpora import BBC_CLASSES
    from nestlearn.data.store import write_documents

    langs = []
    for name, words in (("aaa", ["ab", "ba", "abba", "baab"]), ("xyz", ["xy", "zyx", "yzzy", "xz"])):
        rng = random.Random(name)
        for split, count in (("train", 30), ("validation", 6), ("test", 6)):
            write_documents(root / name / f"{split}.txt", [" ".join(rng.choice(words) for _ in range(60))] * count)
        langs.append(str(root / name))
    for split, n in (("train", 40), ("validation", 10), ("test", 10)):
        docs = [f"{BBC_CLASSES[i % 5]}\n" + " ".join([BBC_CLASSES[i % 5][:3]] * 20) for i in range(n)]
        write_documents(root / "bbc-local" / f"{split}.txt", docs)
    return langs, str(root / "bbc-local")


def check_continual(device: str) -> None:
    try:  # the protocol needs the core install's packages (tqdm, tokenizers, matplotlib), not only torch
        from nestlearn.evals.continual import ContinualConfig, run
    except ImportError as e:
        print(f"  skip continual: {e} (pip install -e . first)")
        return
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        langs, bbc = _local_corpora(root)
        runs = {
            "finetune": {},
            "ewc": {"strategy": "ewc", "ewc_batches": 1},
            "replay": {"strategy": "replay"},
            "levels": {"strategy": "levels", "preset": "hope", "update_periods": "8,64,128"},
            "bbc": {"stream": "bbc", "tasks": [bbc]},
        }
        try:  # the pretrained strategies need a Hugging Face folder to start from
            from tests.test_pretrained import make_llama

            llama = {"init": str(make_llama(root / "llama")), "preset": None}
            runs |= {
                "lora": llama | {"strategy": "lora"},
                "adapter": llama | {"strategy": "adapter"},
                "cms-levels": llama | {"strategy": "cms-levels", "update_periods": "64,none"},
                "memorize": llama | {"strategy": "memorize", "update_periods": "16,none", "task_blocks": 1, "lr": 0.05},
            }
        except ImportError as e:
            print(f"  skip continual from a pretrained Llama (lora, adapter, cms-levels, memorize): {e}")
        for name, fields in runs.items():
            fields = {"tasks": langs, **fields}
            config = ContinualConfig(
                **{"steps_per_task": 3, "batch_size": 2, "seq_len": 32, "eval_tokens": 128, "warmup_steps": 1}
                | {"progress": False, "data_root": tmp, "preset": "transformer"}
                | fields
            )
            try:  # a tensor left on the CPU fails on the device; say which run, and go on with the others
                out = [run(dataclasses.replace(config, device=d)) for d in ("cpu", device)]
            except Exception as e:
                report(f"continual {name}: runs on the device", False, f"{type(e).__name__}: {e}"[:300])
                continue
            a, b = (torch.tensor([*np.ravel(r["R"]), *(x["loss"] for x in r["losses"])]) for r in out)
            err = max_rel_err(a.double(), b.double())
            report(f"continual {name}: device equals cpu", err < 1e-3, f"R and losses {err:.1e}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cuda", help="the device to check against CPU (default: cuda)")
    checks = {"memory": check_memory, "model": check_model, "bf16": check_bf16, "continual": check_continual}
    p.add_argument("--checks", nargs="+", default=list(checks), choices=list(checks))
    args = p.parse_args()
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error(f"--device {args.device} but torch sees no GPU (torch {torch.__version__}); use --device cpu")
    name = torch.cuda.get_device_name(torch.device(args.device)) if args.device.startswith("cuda") else "CPU"
    print(f"# device_check on {args.device} ({name}), torch {torch.__version__}")
    for check in args.checks:
        t0 = time.perf_counter()
        print(f"{check}:", flush=True)
        checks[check](args.device)
        print(f"  ({time.perf_counter() - t0:.0f} s)")
    print(f"{len(FAILURES)} failed" + (": " + ", ".join(FAILURES) if FAILURES else ""))
    sys.exit(1 if FAILURES else 0)


if __name__ == "__main__":
    main()
