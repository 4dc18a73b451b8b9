"""Training, evaluation and the command line, on a small generated corpus: exact resume, DDP = one process,
FSDP2 runs, checkpoints that fail loudly and survive interrupted saves, bits per byte, and every subcommand."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nestlearn import build, presets
from nestlearn.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from nestlearn.cli import COMMANDS
from nestlearn.cli import main as cli
from nestlearn.data.batches import window_starts
from nestlearn.data.corpora import write_documents
from nestlearn.data.shards import open_shard, prepare
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.evaluate import evaluate
from nestlearn.model import LanguageModel
from nestlearn.train import TrainConfig, train

WORDS = "the river memory learns fast and slow levels update at their own rate while a cat sat on the mat".split()


def write_corpus(root: Path) -> Path:
    """A small seeded corpus of train/validation/test.txt in `root`."""
    rng = random.Random(0)
    for split, n in (("train", 120), ("validation", 12), ("test", 12)):
        docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(10, 60))) for _ in range(n)]
        write_documents(root / f"{split}.txt", docs)
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


def config(corpus: Path, out: Path, **fields) -> TrainConfig:
    base = dict(
        preset="transformer",
        size="debug",
        data=str(corpus),
        data_root=str(out.parent / "cache"),
        seq_len=32,
        steps=6,
        batch_size=4,
        lr=3e-3,
        warmup_steps=2,
        eval_every=0,
        eval_tokens=256,
        log_every=1,
        save_every=0,
        progress=False,
        tensorboard="off",
        out_dir=str(out),
    )
    return TrainConfig(**{**base, **fields})


def losses(out: Path) -> dict[int, float]:
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return {x["step"]: x["loss"] for x in lines if x["kind"] == "train"}


@pytest.mark.parametrize(
    ("preset", "carry", "extra"),
    [
        ("transformer", False, {}),
        ("titans", True, {}),
        ("transformer", False, {"optimizer": "deep_momentum", "lr": 0.05}),
        # outer CMS levels every 2 and 4 steps: the stop at 3 falls inside the slow level's period
        ("hope", False, {"optimizer": "m3", "update_periods": "8,64,128", "optimizer_args": '{"slow_period": 2}'}),
    ],
    ids=["transformer", "titans-carry", "deep-momentum", "hope-levels-m3"],
)
def test_resume_is_exact(corpus, tmp_path, preset, carry, extra):
    # 6 steps in one go == 3 steps, a stop with a checkpoint, a restart that resumes, 3 more
    whole = config(corpus, tmp_path / "whole", preset=preset, carry_state=carry, **extra)
    train(whole)
    split = config(corpus, tmp_path / "split", preset=preset, carry_state=carry, stop_at=3, **extra)
    (tmp_path / "split").mkdir()
    (tmp_path / "split" / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 0.0}\n')  # no checkpoint
    train(split)
    assert latest_checkpoint(split.out_dir).name == "step-00000003"
    with open(tmp_path / "split" / "metrics.jsonl", "a") as f:  # a crash after step 4 had been logged, not saved
        f.write(json.dumps({"step": 4, "kind": "train", "loss": 0.0}) + "\n")
    train(dataclasses.replace(split, stop_at=None))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    a, _ = load_checkpoint(whole.out_dir)
    b, _ = load_checkpoint(split.out_dir)
    for (name, p), q in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(p, q), name


def test_micro_batches_give_the_same_steps_as_one_batch(corpus, tmp_path):
    train(config(corpus, tmp_path / "one"))
    train(config(corpus, tmp_path / "accum", grad_accum=2))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "accum")
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (step, a[step], b[step])


TORCHRUN_LIMIT_S = 300


def torchrun(args: list[str], cwd: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        "-m",
        "nestlearn.cli",
        "train",
        *args,
    ]
    with subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as process:
        try:
            _, err = process.communicate(timeout=TORCHRUN_LIMIT_S)
        except subprocess.TimeoutExpired:
            # SIGTERM, which the launcher passes on to its workers (each in a session of its own): a SIGKILL of the
            # launcher alone leaves the two waiting on each other, on the CPU, after the test has failed
            process.terminate()
            try:
                _, err = process.communicate(timeout=60)
            except subprocess.TimeoutExpired:
                process.kill()
                _, err = process.communicate()
            pytest.fail(f"two processes did not finish in {TORCHRUN_LIMIT_S} s (is the machine busy?): {err[-4000:]}")
    assert process.returncode == 0, err[-4000:]


def flags(c: TrainConfig) -> list[str]:
    out = []
    for f in dataclasses.fields(c):
        value = getattr(c, f.name)
        if value is None:
            continue
        flag = "--" + f.name.replace("_", "-")
        out += [flag if value else "--no-" + flag[2:]] if isinstance(value, bool) else [flag, str(value)]
    return out


@pytest.mark.parametrize("parallel", ["ddp", "fsdp"])
def test_two_processes_match_one_process(corpus, tmp_path, parallel):
    # global batch 4: two processes of 2 rows each take the same optimizer steps as one process of 4 rows
    one = config(corpus, tmp_path / "one", steps=4)
    train(one)
    two = config(corpus, tmp_path / "two", steps=4, parallel=parallel)
    torchrun(flags(two), tmp_path)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert a.keys() == b.keys()
    for step in a:
        assert abs(a[step] - b[step]) <= 1e-5, (parallel, step, a[step], b[step])
    model, _ = load_checkpoint(two.out_dir)  # rank 0 gathered and saved whole weights
    ref, _ = load_checkpoint(one.out_dir)
    for (name, p), q in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        torch.testing.assert_close(q, p, rtol=1e-4, atol=1e-5, msg=name)


def test_a_missing_or_corrupt_checkpoint_says_so(corpus, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no checkpoint"):
        load_checkpoint(tmp_path / "empty")
    c = config(corpus, tmp_path / "run", steps=2)
    train(c)
    ckpt = latest_checkpoint(c.out_dir)
    weights = ckpt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or incomplete"):
        load_checkpoint(c.out_dir)
    (ckpt / "trainer.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="no checkpoint in .* can be read .step-00000002: .*: the run cannot resume"):
        train(dataclasses.replace(c, steps=4))


def test_an_interrupted_save_keeps_the_last_good_checkpoint(corpus, tmp_path, monkeypatch):
    c = config(corpus, tmp_path / "run", steps=2, keep_last=1)
    train(c)
    good = latest_checkpoint(c.out_dir)
    model, tokenizer = load_checkpoint(good)
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies while trainer.pt is being written

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        save_checkpoint(Path(c.out_dir), 3, model, model.state_dict(), {}, tokenizer, c.to_json(), c.keep_last, None)
    assert latest_checkpoint(c.out_dir) == good
    reloaded, _ = load_checkpoint(c.out_dir)
    for name, p in reloaded.state_dict().items():
        assert torch.equal(p, before[name]), name


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_byte(corpus, tmp_path):
    tok = ByteTokenizer()
    prepare(corpus, tok, tmp_path / "shards", ("test",), progress=False)
    tokens, meta = open_shard(tmp_path / "shards" / "test", tok)
    model = build(dataclasses.replace(presets.transformer("debug"), vocab_size=tok.vocab_size, seq_len=32))
    torch.nn.init.zeros_(model.embed.weight)  # tied head: every logit is 0, p = 1/V everywhere
    result = evaluate(model, tokens, meta, seq_len=32)
    n = (len(tokens) - 1) // 32 * 32
    assert result["tokens"] == n
    assert result["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-6)
    bytes_covered = meta.num_bytes * n / (meta.num_tokens - 1)
    assert result["bits_per_byte"] == pytest.approx(n * math.log2(tok.vocab_size) / bytes_covered, rel=1e-6)


def test_windows_are_a_function_of_seed_and_step():
    a = window_starts(0, 5, 8, 1000, 33)
    assert np.array_equal(a, window_starts(0, 5, 8, 1000, 33))
    assert not np.array_equal(a, window_starts(0, 6, 8, 1000, 33))
    assert a.min() >= 0 and a.max() <= 1000 - 33


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_every_subcommand_answers_help(command, capsys):
    argv = ["--help"] if command is None else [command, "--help"]
    try:
        code = cli(argv)
    except SystemExit as e:  # argparse exits after printing help
        code = e.code
    assert code == 0
    assert "usage" in capsys.readouterr().out


def test_train_config_flags_and_files_round_trip(tmp_path):
    import argparse

    parser = argparse.ArgumentParser()
    TrainConfig.add_arguments(parser)
    saved = TrainConfig(preset="titans", steps=7, carry_state=True)
    (tmp_path / "c.json").write_text(saved.to_json())
    args = parser.parse_args(["--config", str(tmp_path / "c.json"), "--steps", "9", "--no-progress"])
    loaded = TrainConfig.from_args(args)
    assert dataclasses.replace(saved, steps=9, progress=False) == loaded
    with pytest.raises(ValueError, match="preset='nope' is not one of"):
        TrainConfig(preset="nope")
    with pytest.raises(ValueError, match="stop_at=9 must lie in"):
        TrainConfig(steps=5, stop_at=9)
    with pytest.raises(ValueError, match="batch_size=6 must be a multiple of processes × grad_accum = 1 × 4"):
        train(TrainConfig(batch_size=6, grad_accum=4, out_dir=str(tmp_path / "x")))


def test_a_run_folder_holding_another_run_is_refused(corpus, tmp_path):
    c = config(corpus, tmp_path / "run", steps=2)
    train(c)
    with pytest.raises(ValueError, match="holds a different run .--preset 'transformer' there, 'titans' now"):
        train(dataclasses.replace(c, preset="titans"))
    with pytest.raises(ValueError, match="already holds checkpoints"):
        train(dataclasses.replace(c, resume="never"))


def test_train_eval_generate_from_the_command_line(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    c = config(corpus, out, preset="hope", steps=3, tokenizer="bpe:300")
    assert cli(["train", *flags(c)]) == 0
    capsys.readouterr()
    assert cli(["eval", str(out), "--data-root", c.data_root, "--tokens", "256", "--no-progress"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["split"] == "test" and math.isfinite(result["bits_per_byte"]) and result["tokens"] >= 32
    assert cli(["generate", str(out), "--prompt", "the river", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("the river") and len(text) > len("the river")
    assert cli(["eval", str(tmp_path / "nothing")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_compare_keeps_going_when_one_model_diverges(corpus, tmp_path, monkeypatch):
    import nestlearn.train as train_module
    from nestlearn.evals.compare import compare, table

    real = train_module.train

    def diverging(config):
        if config.preset == "titans":
            raise FloatingPointError("training loss is nan at step 2")
        return real(config)

    monkeypatch.setattr(train_module, "train", diverging)
    rows = compare(["titans", "transformer"], config(corpus, tmp_path / "x", steps=2), tmp_path / "cmp", 64)
    assert rows[0] == {"preset": "titans", "optimizer": "adamw", "lr": 3e-3, "failed": "training loss is nan at step 2"}
    assert rows[1]["preset"] == "transformer" and math.isfinite(rows[1]["test_bits_per_byte"])
    assert "titans          failed: training loss is nan" in table(rows, 256)


def test_compare_trains_each_preset_with_each_optimizer(corpus, tmp_path):
    from nestlearn.evals.compare import compare, parse_lrs

    lrs = parse_lrs(["deep_momentum=0.05"], ["adamw", "deep_momentum"])
    rows = compare(
        ["transformer"],
        config(corpus, tmp_path / "x", steps=2),
        tmp_path / "cmp",
        64,
        optimizers=["adamw", "deep_momentum"],
        lrs=lrs,
    )
    assert [(r["preset"], r["optimizer"], r["lr"]) for r in rows] == [
        ("transformer-adamw", "adamw", 3e-3),
        ("transformer-deep_momentum", "deep_momentum", 0.05),
    ]
    assert all(math.isfinite(r["test_bits_per_byte"]) and r["seconds_per_step"] > 0 for r in rows)
    with pytest.raises(ValueError, match="'muon' is not one of the optimizers compared"):
        parse_lrs(["muon=0.1"], ["adamw"])
    with pytest.raises(ValueError, match="write OPTIMIZER=LR"):
        parse_lrs(["adamw"], ["adamw"])


def test_tensorboard_gets_the_same_scalars_as_the_jsonl(corpus, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    train(config(corpus, tmp_path / "tb", steps=2, tensorboard="on"))
    events = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/loss", "train/tokens_per_s", "validation/bits_per_byte"} <= set(scalars)
    logged = [e.value for e in events.Scalars("train/loss")]
    assert logged == pytest.approx(list(losses(tmp_path / "tb").values()), rel=1e-6)


def test_bf16_autocast_trains_close_to_fp32(corpus, tmp_path):
    train(config(corpus, tmp_path / "fp32", steps=3, precision="fp32"))
    train(config(corpus, tmp_path / "bf16", steps=3, precision="bf16"))
    a, b = losses(tmp_path / "fp32"), losses(tmp_path / "bf16")
    assert a.keys() == b.keys()
    for step in a:  # bf16 matmuls: close, not equal
        assert math.isfinite(b[step]) and abs(a[step] - b[step]) < 0.05, (step, a[step], b[step])


@pytest.mark.slow
def test_compiled_model_takes_the_same_steps(corpus, tmp_path):
    train(config(corpus, tmp_path / "eager", steps=2))
    train(config(corpus, tmp_path / "compiled", steps=2, compile=True))
    a, b = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    for step in a:
        assert abs(a[step] - b[step]) < 1e-4, (step, a[step], b[step])


def test_compile_of_a_memory_model_compiles_its_chunk_steps_not_the_whole_model(corpus, tmp_path, monkeypatch):
    # compiling for real takes minutes here (test_model.py checks the compiled chunks against eager): record the calls
    calls = []
    monkeypatch.setattr(LanguageModel, "compile_chunks", lambda self, enable=True: calls.append("chunks") or self)
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: calls.append("model") or module)
    train(config(corpus, tmp_path / "hope", steps=1, preset="hope", compile=True))
    train(config(corpus, tmp_path / "transformer", steps=1, compile=True))
    assert calls == ["chunks", "model"]


def test_compile_leaves_task_loss_levels_eager_and_says_so(corpus, tmp_path, monkeypatch, capsys):
    # one compiled graph cannot hold the inner steps' autograd.grad: a Transformer with task levels is not compiled
    calls = []
    monkeypatch.setattr(torch, "compile", lambda module, *a, **k: calls.append("model") or module)
    task = dict(cms_signal="task", update_periods="8,none")
    train(config(corpus, tmp_path / "task", steps=1, compile=True, **task))
    assert calls == []
    assert "task-loss CMS levels run eager" in capsys.readouterr().err


def test_an_outer_level_whose_period_is_not_a_multiple_of_the_window_is_refused_before_training(corpus, tmp_path):
    with pytest.raises(ValueError, match="period 100 tokens, but each step advances the stream by 32"):
        train(config(corpus, tmp_path / "x", preset="hope", update_periods="8,100"))
    assert not (tmp_path / "x" / "metrics.jsonl").exists() or not losses(tmp_path / "x")


@pytest.mark.parametrize("optimizer", ["adamw", "muon", "m3", "deep_momentum"])
@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_only_linear_maps_are_decayed_and_orthogonalised(preset, optimizer):
    # the parameter-group policy: nn.Linear weights (no untied head) decayed and, under muon / m3, orthogonalised;
    # embeddings, initial states, convolutions, read-outs, gate biases, norms and biases neither
    from nestlearn.optim import M3, Muon
    from nestlearn.train import make_optimizer

    config = dataclasses.replace(getattr(presets, preset)("debug"), tie_embeddings=False)
    model = build(config)
    opt = make_optimizer(model, TrainConfig(preset=preset, optimizer=optimizer, weight_decay=0.1))
    group_of = {id(p): g for g in opt.param_groups for p in g["params"]}
    assert len(group_of) == sum(1 for _ in model.parameters())
    linear = {n + ".weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "head"}
    assert any(".gates." in n or ".beta." in n or "cms" in n for n in linear)
    for name, p in model.named_parameters():
        g = group_of[id(p)]
        decayed = name in linear
        assert (g["weight_decay"] > 0) == decayed, name
        if isinstance(opt, (Muon, M3)):
            assert (p.dim() >= 2 and g["muon"] is not False) == decayed, name
    names = {n for n, _ in model.named_parameters()}
    for never in ("embed.weight", "head.weight"):
        assert never in names and never not in linear
    if preset == "hope":
        assert {"blocks.0.mixer.readout_bias", "blocks.0.mixer.conv.weight", "blocks.0.mixer.gen_W1"} <= names - linear


def test_the_cli_prints_its_own_input_errors_in_one_line_and_lets_bugs_show_their_traceback(monkeypatch, capsys):
    import nestlearn.cli as cli_module

    assert cli(["eval", "/nonexistent/run"]) == 1  # the project's own message: one line, no traceback
    err = capsys.readouterr().err
    assert "nestlearn eval: error:" in err and "Traceback" not in err

    def shape_bug(argv):  # torch's RuntimeError from a bug, not bad input
        torch.zeros(2, 3) @ torch.zeros(2, 3)

    def key_bug(argv):
        return {}["missing"]

    def torch_value_error(argv):  # a ValueError raised inside torch, not by nestlearn
        torch.nn.functional.cross_entropy(torch.zeros(2, 3), torch.zeros(3, dtype=torch.long))

    for bug, error in ((shape_bug, RuntimeError), (key_bug, KeyError), (torch_value_error, ValueError)):
        monkeypatch.setitem(cli_module.COMMANDS, "eval", (bug, "test"))
        with pytest.raises(error):
            cli(["eval"])
