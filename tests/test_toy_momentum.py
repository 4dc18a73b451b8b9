"""experiments/toy_momentum.py writes its plot into its run folder (--out-dir, default runs/toy_momentum under the
working directory), never over the tracked docs/img/toy_momentum.png unless told --out-dir docs/img."""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "experiments"))
import toy_momentum  # noqa: E402

TRACKED = ROOT / "docs" / "img" / "toy_momentum.png"
FAST = ["--lrs", "0.01", "--steps", "200"]  # one learning rate, a short descent: the outputs, not the result


def digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_outputs_go_to_the_run_folder_not_to_docs(tmp_path, monkeypatch, capsys):
    before = digest(TRACKED)
    monkeypatch.chdir(tmp_path)
    toy_momentum.main(FAST)  # default: runs/toy_momentum under the working directory
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*") if p.is_file()) == [
        "runs/toy_momentum/toy_momentum.png"
    ]
    toy_momentum.main([*FAST, "--out-dir", str(tmp_path / "elsewhere")])
    assert (tmp_path / "elsewhere" / "toy_momentum.png").stat().st_size > 0
    assert f"plot: {tmp_path / 'elsewhere' / 'toy_momentum.png'}" in capsys.readouterr().out
    assert digest(TRACKED) == before


def test_plot_is_a_file_name_inside_the_out_dir(tmp_path, capsys):
    with pytest.raises(SystemExit):
        toy_momentum.main([*FAST, "--plot", str(tmp_path / "x.png")])
    assert "--plot" in capsys.readouterr().err and not (tmp_path / "x.png").exists()
