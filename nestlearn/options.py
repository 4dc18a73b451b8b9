"""What every `nestlearn` command shares on its command line: a parser that refuses abbreviated and unknown options,
argument types that refuse a bad value with the rule it breaks, and the --device and --threads flags.

    p = parser("nestlearn eval", "...")
    p.add_argument("--tokens", type=non_negative_int, default=0)
    add_device(p); add_threads(p)
    args = p.parse_args(argv)
    device = resolve_device(args.device); set_threads(args.threads, device)
"""

from __future__ import annotations

import argparse
import math

from .runtime import check_device

__all__ = [
    "parser",
    "positive_int",
    "non_negative_int",
    "positive_float",
    "non_negative_float",
    "device_name",
    "add_device",
    "add_threads",
]


def parser(prog: str, description: str, **kwargs) -> argparse.ArgumentParser:
    """An ArgumentParser that does not take `--preset` for `--presets` or `--seq` for `--seq-len`: an option is
    given in full or it is an error, so that a typo is never silently read as another option."""
    return argparse.ArgumentParser(prog=prog, description=description, allow_abbrev=False, **kwargs)


def _number(text: str, kind, rule: str, ok) -> int | float:
    try:
        value = kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not {rule}") from None
    if (isinstance(value, float) and not math.isfinite(value)) or not ok(value):
        raise argparse.ArgumentTypeError(f"{text} is not {rule}")
    return value


def positive_int(text: str) -> int:
    return _number(text, int, "a positive integer (>= 1)", lambda v: v >= 1)


def non_negative_int(text: str) -> int:
    return _number(text, int, "an integer >= 0", lambda v: v >= 0)


def positive_float(text: str) -> float:
    return _number(text, float, "a number > 0", lambda v: v > 0)


def non_negative_float(text: str) -> float:
    return _number(text, float, "a number >= 0", lambda v: v >= 0)


def device_name(text: str) -> str:
    """auto, or anything torch.device accepts (`runtime.check_device`)."""
    try:
        check_device(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def add_device(p: argparse.ArgumentParser, default: str = "auto") -> None:
    p.add_argument(
        "--device", type=device_name, default=default, help=f"auto, cpu, cuda or cuda:N (default: {default})"
    )


def add_threads(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads for torch (default: torch's choice, one per core). When other work shares the CPU, "
        "give the cores that are free: docs/training.md, 'Sharing the CPU'",
    )
