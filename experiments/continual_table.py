"""The continual-learning tables of docs/results.md from `nestlearn continual` run folders: one row per setting, in
the order given, with the mean over the runs that differ only in `--seed` (± their standard deviation).

    python experiments/continual_table.py runs/lang-*          # every folder holding a results.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from nestlearn.evals.continual import summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run folders of `nestlearn continual` (their --out-dir)")
    args = p.parse_args(argv)
    files = [d for d in args.runs if not Path(d).is_dir()]
    if files:  # a shell glob over run folders also catches their logs
        print(f"skipping {len(files)} paths that are not folders: {', '.join(files)}", file=sys.stderr)
    dirs = [d for d in args.runs if Path(d).is_dir()]
    missing = [d for d in dirs if not (Path(d) / "results.json").is_file()]
    if missing or not dirs:
        where = ", ".join(missing) or "any folder given"
        print(f"no results.json in {where}: pass the --out-dir of finished `nestlearn continual` runs", file=sys.stderr)
        return 1
    print(summary([json.loads((Path(d) / "results.json").read_text()) for d in dirs]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
