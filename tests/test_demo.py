"""python -m nestlearn.demo: its help says what it does (associative recall of four memories), and it prints a row of
recall per memory."""

from __future__ import annotations

import pytest

from nestlearn import demo


def test_help_says_what_the_demo_does(capsys):
    with pytest.raises(SystemExit) as exit_:
        demo.main(["--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())
    assert "main job" not in out
    assert "Associative recall: write one stream of random key/value pairs into four memories" in out
    assert all(f"--{flag}" in out for flag in ("pairs", "dim", "recent", "seed"))


def test_prints_recall_of_every_memory(capsys):
    demo.main(["--pairs", "128", "--dim", "16", "--recent", "16"])
    out = capsys.readouterr().out
    for spec in demo.SPECS:
        (row,) = [line for line in out.splitlines() if line.startswith(spec.name)]
        assert row.count("/") == 2  # pairs written: 64, 128
