"""Interrupts and resume as a user meets them: a signal mid-run saves and says how to resume, the resumed run equals
one that was never interrupted (train, memorize, continual), a second signal stops at once, a corrupt newest
checkpoint is stepped over, a resumed run names what changed and refuses what would make it another run, and a
finished run says so."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from nestlearn.checkpoint import latest_checkpoint, load_checkpoint
from nestlearn.cli import main as cli
from nestlearn.evals import continual
from nestlearn.train import TrainConfig, train

from .test_continual import corpus as language_corpus
from .test_continual import killed_at_the_first_step, small
from .test_train import config, flags, losses, write_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def two_languages(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("langs")
    return [language_corpus(root, "aaa", ["ab", "ba", "abba"]), language_corpus(root, "xyz", ["xy", "zyx", "yzzy"])]


def _signal_on_call(n: int, signum: int = signal.SIGINT):
    """A wrapper that sends this process `signum` during its n-th call: a real signal at a known point."""
    calls = {"n": 0}

    def wrap(fn):
        def inner(*args, **kwargs):
            calls["n"] += 1
            if calls["n"] == n:
                signal.raise_signal(signum)
            return fn(*args, **kwargs)

        return inner

    return wrap


def _run_cli(args: list[str], cwd: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "nestlearn.cli", *args], cwd=cwd, env=env, stderr=subprocess.PIPE, text=True
    )


def _wait_for_step(run: Path, step: int, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert process.poll() is None, "the run ended before it could be interrupted"
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= step:
            return
        time.sleep(0.02)
    raise TimeoutError(f"no step {step} in {run} after {timeout} s")


def slow_config(corpus: Path, out: Path, **fields) -> TrainConfig:
    # steps of some tens of milliseconds, so that a signal lands mid-run; stop_at keeps the test short
    return config(corpus, out, seq_len=64, batch_size=16, steps=400, stop_at=120, warmup_steps=5, **fields)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["sigterm", "sigint"])
def test_a_signal_mid_run_saves_and_the_resumed_run_equals_an_uninterrupted_one(corpus, tmp_path, signum):
    whole = slow_config(corpus, tmp_path / "whole")
    cut = slow_config(corpus, tmp_path / "cut")
    process = _run_cli(["train", *flags(cut)], tmp_path)
    _wait_for_step(Path(cut.out_dir), 3, process)
    process.send_signal(signum)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signum, err
    stopped = latest_checkpoint(cut.out_dir)
    step = int(stopped.name.removeprefix("step-"))
    assert 3 <= step < 120, err
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step {step} of 400" in err and "Traceback" not in err, err
    assert f"nestlearn train --out-dir {cut.out_dir}" in err  # how to resume
    # the command it names resumes it (every flag but --out-dir from the saved config), in a process like the first
    process = _run_cli(["train", "--out-dir", cut.out_dir], tmp_path)
    _, err = process.communicate(timeout=300)
    assert process.returncode == 0, err
    assert f"resuming {cut.out_dir} from step {step} of 400" in err
    process = _run_cli(["train", *flags(whole)], tmp_path)
    assert process.wait(timeout=300) == 0
    a, b = losses(Path(whole.out_dir)), losses(Path(cut.out_dir))
    assert a.keys() == b.keys() == set(range(1, 121))
    assert a == b
    x, _ = load_checkpoint(whole.out_dir)
    y, _ = load_checkpoint(cut.out_dir)
    for (k, p), q in zip(x.state_dict().items(), y.state_dict().values(), strict=True):
        assert torch.equal(p, q), k


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["sigint", "sigterm"])
def test_a_second_signal_stops_at_once(corpus, tmp_path, monkeypatch, capsys, signum):
    # two real signals inside the second step (from the batch it reads): the first asks for a save after the step,
    # the second stops at once, without it and without a traceback, whatever handler was there before
    import nestlearn.train as train_module

    run = config(corpus, tmp_path / "run", steps=6, save_every=0)
    twice = _signal_on_call(2, signum)(_signal_on_call(2, signum)(train_module.gather))
    monkeypatch.setattr(train_module, "gather", twice)
    previous = signal.signal(signum, signal.SIG_IGN)  # e.g. a launcher that ignores the signal in its children
    try:
        assert cli(["train", *flags(run)]) == 128 + signum
    finally:
        signal.signal(signum, previous)
    err = capsys.readouterr().err
    assert "stopped at once" in err and "Traceback" not in err, err
    assert latest_checkpoint(run.out_dir) is None  # nothing saved: the step in progress was abandoned


def test_checkpoints_by_time(corpus, tmp_path):
    # a checkpoint whenever a few milliseconds have passed: every step here; none by count
    run = config(corpus, tmp_path / "run", steps=5, save_every=0, save_every_minutes=1e-6, keep_last=10)
    train(run)
    saved = sorted(p.name for p in (Path(run.out_dir) / "checkpoints").iterdir())
    assert saved == [f"step-{s:08d}" for s in range(1, 6)]
    with pytest.raises(ValueError, match="save_every_minutes=-1"):
        config(corpus, tmp_path / "bad", save_every_minutes=-1)


def test_resume_names_what_changed_and_refuses_what_makes_another_run(corpus, tmp_path, capsys):
    run = config(corpus, tmp_path / "run", stop_at=2)
    train(run)
    capsys.readouterr()
    train(dataclasses.replace(run, stop_at=4, lr=1e-3))
    err = capsys.readouterr().err
    assert "resuming" in err and "from step 2 of 6" in err
    assert "--stop-at 2 -> 4" in err and "--lr 0.003 -> 0.001" in err and "schedule" in err
    with pytest.raises(ValueError, match=r"different run \(--seed 0 there, 1 now\)"):
        train(dataclasses.replace(run, seed=1))
    with pytest.raises(ValueError, match="--batch-size 4 there, 8 now"):
        train(dataclasses.replace(run, batch_size=8))


def test_a_finished_run_says_so_instead_of_training_again(corpus, tmp_path, capsys):
    run = config(corpus, tmp_path / "run", steps=2)
    assert cli(["train", *flags(run)]) == 0
    capsys.readouterr()
    assert cli(["train", "--out-dir", run.out_dir]) == 0
    out, err = capsys.readouterr()
    assert "is already finished: step 2 of 2" in err and "nestlearn eval" in err
    result = json.loads(out)
    assert result["finished"] is True and result["step"] == 2 and math.isfinite(result["bits_per_byte"])
    assert "NaN" not in out


def test_resume_steps_over_a_corrupt_newest_checkpoint(corpus, tmp_path, capsys):
    run = config(corpus, tmp_path / "run", steps=6, save_every=2, keep_last=3)
    train(dataclasses.replace(run, stop_at=4))
    newest = latest_checkpoint(run.out_dir)
    assert newest.name == "step-00000004"
    weights = newest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a save cut short
    capsys.readouterr()
    train(run)
    err = capsys.readouterr().err
    assert "step-00000004 cannot be read" in err and "resuming from step-00000002 instead" in err
    names = sorted(p.name for p in (Path(run.out_dir) / "checkpoints").iterdir())
    assert "corrupt-step-00000004" in names and latest_checkpoint(run.out_dir).name == "step-00000006"
    whole = config(corpus, tmp_path / "whole", steps=6)
    train(whole)
    assert losses(Path(run.out_dir)) == losses(Path(whole.out_dir))  # from step 2 again, exactly
    # an explicit --resume of a corrupt checkpoint is refused with the same words as eval's
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        train(dataclasses.replace(run, steps=8, resume=str(Path(run.out_dir) / "checkpoints" / names[0])))


def test_memorize_interrupted_saves_what_it_learned_and_continues_exactly(corpus, tmp_path, monkeypatch):
    import nestlearn.memorize as memorize_module

    run = config(corpus, tmp_path / "run", preset="hope", seq_len=16, steps=2, batch_size=2)
    train(run)
    common = ["--data-root", run.data_root, "--no-progress", "--held-out", "0", "--lr", "1e-2"]
    common += ["--period", r"cms\.levels\.2\.=32"]
    assert cli(["memorize", run.out_dir, "--tokens", "128", "--out-dir", str(tmp_path / "whole"), *common]) == 0
    # SIGINT while the second segment of eight is read: it is finished, saved, and the command says how to go on
    monkeypatch.setattr(memorize_module, "unhealthy", _signal_on_call(2)(memorize_module.unhealthy))
    assert cli(["memorize", run.out_dir, "--tokens", "128", "--out-dir", str(tmp_path / "cut"), *common]) == 130
    stream = json.loads((tmp_path / "cut" / "memorize.json").read_text())
    assert stream["offset"] == 32 and stream["history"][0]["stopped"] is True
    common = common[:3]  # the learner's options are fixed once saved
    assert cli(["memorize", str(tmp_path / "cut"), "--tokens", "96", "--out-dir", str(tmp_path / "cut"), *common]) == 0
    a, _, state_a = memorize_module.Learner.load(tmp_path / "whole")
    b, _, state_b = memorize_module.Learner.load(tmp_path / "cut")
    assert json.loads((tmp_path / "cut" / "memorize.json").read_text())["offset"] == 128
    for (k, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=0, atol=1e-6, msg=k)
    for x, y in zip(state_a.layers, state_b.layers, strict=True):
        for u, v in zip(tensors_of(x), tensors_of(y), strict=True):
            torch.testing.assert_close(v, u, rtol=0, atol=1e-6)


def tensors_of(layer) -> list[torch.Tensor]:
    """Every tensor of a layer's state, in order."""
    if isinstance(layer, torch.Tensor):
        return [layer]
    if layer is None or isinstance(layer, (int, float)):
        return []
    if isinstance(layer, dict):
        return [t for v in layer.values() for t in tensors_of(v)]
    if isinstance(layer, (list, tuple)):
        return [t for v in layer for t in tensors_of(v)]
    return [t for f in dataclasses.fields(layer) for t in tensors_of(getattr(layer, f.name))]


def test_continual_interrupted_mid_task_resumes_to_the_same_results(two_languages, tmp_path, monkeypatch):
    cfg = small(tasks=two_languages, strategy="ewc", ewc_batches=1, data_root=str(tmp_path))
    whole = continual.run(cfg, tmp_path / "whole.pt")
    # the steps' _loss calls (EWC's Fisher batch calls its own): task 1's three, then task 2: the signal comes during
    # its second step
    monkeypatch.setattr(continual, "_loss", _signal_on_call(5)(continual._loss))
    with pytest.raises(continual.Interrupted, match="at step 2 of 3 of task 2/2"):
        continual.run(cfg, tmp_path / "cut.pt")
    monkeypatch.undo()
    resumed = continual.run(cfg, tmp_path / "cut.pt")
    assert resumed["R"] == whole["R"] and resumed["losses"] == whole["losses"]
    assert resumed["baseline"] == whole["baseline"]
    with pytest.raises(ValueError, match="different run"):
        continual.run(dataclasses.replace(cfg, lr=1e-3), tmp_path / "cut.pt")
    # progress saved before a setting existed (replay_from, task_blocks) ran as its default, and resumes
    old = torch.load(tmp_path / "cut.pt", weights_only=True)
    key = json.loads(old["config"])
    old["config"] = json.dumps({k: v for k, v in key.items() if k not in ("replay_from", "task_blocks")})
    torch.save(old, tmp_path / "cut.pt")
    assert continual.run(cfg, tmp_path / "cut.pt")["R"] == whole["R"]
    with pytest.raises(ValueError, match="replay_from: 'tasks' there, 'general' now"):
        continual.run(dataclasses.replace(cfg, strategy="replay", replay_from="general"), tmp_path / "cut.pt")


def test_a_continual_run_killed_in_its_first_task_keeps_what_it_measured_before_the_stream(
    two_languages, tmp_path, monkeypatch
):
    """The untrained scores and general ability come before any step and can take 50 minutes (the Titans adapter on
    bbc); a run killed before its first task ends (out of memory, SIGKILL) resumes without measuring them again."""
    cfg = small(tasks=two_languages, data_root=str(tmp_path))
    whole = continual.run(cfg, tmp_path / "whole.pt")
    killed_at_the_first_step(cfg, tmp_path / "cut.pt", monkeypatch)
    saved = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert (saved["task"], saved["task_step"], saved["R"]) == (0, 0, []) and saved["baseline"] == whole["baseline"]
    scored = []
    score = continual.LMTask.score
    monkeypatch.setattr(
        continual.LMTask, "score", lambda self, *a, **k: scored.append(self.name) or score(self, *a, **k)
    )
    resumed = continual.run(cfg, tmp_path / "cut.pt")
    assert len(scored) == 2 * 2  # after each task, each task; not the untrained row again
    assert resumed["R"] == whole["R"] and resumed["losses"] == whole["losses"]
    assert resumed["baseline"] == whole["baseline"]


def test_a_continual_run_stopped_before_the_stream_keeps_the_untrained_scores_it_has(
    two_languages, tmp_path, monkeypatch
):
    """SIGTERM while the untrained model is being scored (over 50 minutes for the Titans adapter on bbc): the task
    being scored is finished and saved, the run stops, and the resumed run scores only the tasks it had not."""
    cfg = small(tasks=two_languages, data_root=str(tmp_path))
    whole = continual.run(cfg, tmp_path / "whole.pt")
    score, scored = continual.LMTask.score, []
    monkeypatch.setattr(continual.LMTask, "score", _signal_on_call(1, signal.SIGTERM)(score))
    with pytest.raises(continual.Interrupted, match="before the stream, 1 of 2 tasks scored untrained; saved") as e:
        continual.run(cfg, tmp_path / "cut.pt")
    assert e.value.exit_code == 143
    saved = torch.load(tmp_path / "cut.pt", weights_only=False)
    assert (saved["measured"], saved["baseline"]) == (False, whole["baseline"][:1])
    monkeypatch.setattr(
        continual.LMTask, "score", lambda self, *a, **k: scored.append(self.name) or score(self, *a, **k)
    )
    resumed = continual.run(cfg, tmp_path / "cut.pt")
    names = [Path(t).name for t in two_languages]
    assert scored == [names[1]] + 2 * names  # the one left untrained, then each task after each
    assert resumed["R"] == whole["R"] and resumed["losses"] == whole["losses"]
    assert resumed["baseline"] == whole["baseline"]
