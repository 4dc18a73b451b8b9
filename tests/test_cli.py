"""The command line as a careless user meets it: every command refuses a bad value or an unknown or abbreviated
option in one line that names it, a closed pipe ends the output quietly, and `compare` documents its own defaults,
refuses `--preset`, names its presets in results.json and does not retrain finished runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from nestlearn.cli import main as cli

from .test_train import config, flags, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


BAD = [
    (["eval", "ck", "--seq-len", "0"], "argument --seq-len: 0 is not a positive integer"),
    (["eval", "ck", "--tokens", "-5"], "argument --tokens: -5 is not an integer >= 0"),
    (["eval", "ck", "--batch-size", "0"], "argument --batch-size: 0 is not a positive integer"),
    (["eval", "ck", "--device", "gpu"], "argument --device: 'gpu' is not a device: use auto, cpu, cuda or cuda:N"),
    (["eval", "ck", "--threads", "0"], "argument --threads: 0 is not a positive integer"),
    (["eval", "ck", "--seq", "16"], "unrecognized arguments: --seq 16"),
    (["generate", "ck", "--prompt", "a", "--top-k", "0"], "argument --top-k: 0 is not a positive integer"),
    (["generate", "ck", "--prompt", "a", "--temperature", "-1"], "argument --temperature: -1 is not a number >= 0"),
    (["memorize", "ck", "--tokens", "0", "--out-dir", "m"], "argument --tokens: 0 is not a positive integer"),
    (["memorize", "ck", "--tokens", "64", "--out-dir", "m", "--lr", "nan"], "argument --lr: nan is not a number"),
    (["continual", "--out-dir", "c", "--steps-per-task", "0"], "argument --steps-per-task: 0 is not a positive"),
    (["continual", "--out-dir", "c", "--lr", "0"], "argument --lr: 0 is not a number > 0"),
    (["longctx", "mqar", "--device", "gpu"], "argument --device: 'gpu' is not a device"),
    (["longctx", "mqar", "--step", "3"], "unrecognized arguments: --step 3"),
    (["compare", "--preset", "titans"], "unrecognized arguments: --preset titans"),
    (["compare", "--presets", "nope"], "argument --presets: invalid choice: 'nope'"),
    (["compare", "--test-tokens", "-1"], "argument --test-tokens: -1 is not an integer >= 0"),
    (["fetch-data", "--dat", "/tmp/x", "wiki"], "unrecognized arguments: --dat"),
    (["train", "--steps", "0"], "steps=0 must be >= 1"),
    (["train", "--device", "gpu"], "device='gpu' is not a device"),
    (["train", "--threads", "0"], "threads=0 must be >= 1"),
    (["train", "--save-every-minutes", "-1"], "save_every_minutes=-1.0 must be >= 0"),
]


@pytest.mark.parametrize(("argv", "message"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_every_command_refuses_a_bad_value_in_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        cli(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err, err


def test_memorize_names_a_token_count_it_can_read(corpus, tmp_path, capsys):
    run = config(corpus, tmp_path / "run", steps=1)
    assert cli(["train", *flags(run)]) == 0
    with pytest.raises(SystemExit):
        cli(["memorize", run.out_dir, "--tokens", "1025", "--out-dir", str(tmp_path / "m"), "--no-progress"])
    err = capsys.readouterr().err
    assert "--tokens 1025 is not a multiple of the segment, 32 tokens" in err and "--tokens 1024" in err, err


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"]], ids=["nestlearn", "train"])
def test_output_into_a_closed_pipe_ends_quietly(argv):
    # `nestlearn --help | head`: the reader has gone; stdout here is a pipe whose reading end is closed
    code = (
        "import os, sys\n"
        "r, w = os.pipe(); os.close(r); os.dup2(w, 1)\n"
        "from nestlearn.cli import main\n"
        f"sys.exit(main({argv!r}))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode in (0, 1) and result.stderr == "", result.stderr  # no traceback, no "Exception ignored"


def test_compare_has_its_own_defaults_names_its_presets_and_does_not_retrain(corpus, tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli(["compare", "--help"])
    usage = " ".join(capsys.readouterr().out.split())
    assert "(default: mini)" in usage and "(default: 48)" in usage and "runs/compare/<date-time>" in usage
    assert "--preset " not in usage  # only --presets
    base = config(corpus, tmp_path / "unused", steps=2)
    given = flags(base)
    del given[given.index("--preset") : given.index("--preset") + 2]
    given[given.index("--out-dir") + 1] = str(tmp_path / "cmp")
    argv = ["compare", "--presets", "transformer", "titans", "--test-tokens", "64", *given]
    assert cli(argv) == 0
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert results["presets"] == ["transformer", "titans"] and "preset" not in results["config"]
    assert [r["preset"] for r in results["rows"]] == ["transformer", "titans"]
    capsys.readouterr()
    assert cli(argv) == 0  # again: both runs are finished, and say so; the table is the same
    err = capsys.readouterr().err
    assert err.count("is already finished") == 2, err
    again = json.loads((tmp_path / "cmp" / "results.json").read_text())
    for a, b in zip(results["rows"], again["rows"], strict=True):
        assert a["test_bits_per_byte"] == b["test_bits_per_byte"]
        assert a["train_tokens_per_s"] == pytest.approx(b["train_tokens_per_s"], rel=0.5)


def test_no_command_shows_torch_or_argparse_internals_for_a_missing_checkpoint(tmp_path, capsys):
    assert cli(["eval", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "does not exist" in err and "Traceback" not in err and len(err.strip().splitlines()) == 2


def test_a_corpus_too_small_for_the_window_says_by_how_much(tmp_path, capsys):
    for split in ("train", "validation", "test"):
        (tmp_path / "tiny").mkdir(exist_ok=True)
        (tmp_path / "tiny" / f"{split}.txt").write_text("a few words\n")
    run = ["train", "--preset", "transformer", "--size", "debug", "--data", str(tmp_path / "tiny")]
    run += [
        "--data-root",
        str(tmp_path / "cache"),
        "--seq-len",
        "32",
        "--out-dir",
        str(tmp_path / "run"),
        "--no-progress",
    ]
    assert cli(run) == 1
    err = capsys.readouterr().err
    assert (
        "the train split has 12 tokens and windows of 33 need at least 34 (22 short)" in err and "--seq-len" in err
    ), err


def test_a_shared_cpu_is_named_and_one_thread_is_not_warned_about(monkeypatch):
    import warnings

    import torch

    from nestlearn import runtime

    threads = torch.get_num_threads()
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda _: {0, 1}, raising=False)
    try:
        for load, n, warned in ((1.9, 2, True), (0.1, 2, False), (1.9, 1, False)):
            monkeypatch.setattr(runtime.os, "getloadavg", lambda load=load: (load, load, load))
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                assert runtime.set_threads(n) == n
            found = [w for w in caught if issubclass(w.category, runtime.SharedCPUWarning)]
            assert bool(found) == warned, (load, n)
            if found:
                assert "--threads 1" in str(found[0].message)
    finally:
        torch.set_num_threads(threads)
    with pytest.raises(ValueError, match="threads=0 must be a positive number"):
        runtime.set_threads(0)
