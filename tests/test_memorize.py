"""Learning after deployment (`Learner`, `memorize(model, ...)`, `nestlearn memorize`): it touches exactly the levels it
should, at their periods; learning rate 0 freezes a level; saved-then-restored learners continue exactly."""

from __future__ import annotations

import json
import random

import pytest
import torch

from nestlearn import build, presets
from nestlearn.cli import main as cli
from nestlearn.data.corpora import write_documents
from nestlearn.memorize import Learner, memorize, stream_loss
from nestlearn.train import TrainConfig, train

SLOW = r"cms\.levels\.2\."  # Hope's SwiGLU level, which has no period in training


def hope():
    torch.manual_seed(0)
    return build(presets.hope("debug"))  # CMS levels: in-context every 16 and 128 tokens, then SwiGLU


def snapshot(model) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def changed(model, before) -> set[str]:
    return {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}


def stream(n: int, batch: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, 256, (batch, n + 1), generator=torch.Generator().manual_seed(seed))


def test_outer_level_changes_exactly_at_its_period_and_frozen_levels_never():
    model = hope()
    learner = Learner(model, lr=1e-2, periods={SLOW: 32}, segment=16)  # the slow level steps every 2 segments
    before = snapshot(model)
    slow = {n for n in before if "cms.levels.2." in n}
    state, report = learner.memorize(stream(16))
    assert changed(model, before) == set()  # half a period: nothing moved, the gradient waits
    assert {lv.name: lv.steps for lv in report.levels}[SLOW] == 0
    state, report = learner.memorize(stream(16, seed=1), state)
    assert changed(model, before) == slow  # the period is complete: exactly the slow level, not the base
    assert {lv.name: lv.steps for lv in report.levels} == {SLOW: 1, "base": 0}
    assert report.levels[0].change > 0 and report.levels[1].change == 0


def test_in_context_memories_write_every_chunk_through_the_forward_pass():
    model = hope()
    before = snapshot(model)
    learner = Learner(model, lr=0.0, segment=16)  # no outer level learns: only the fast weights in the state change
    x = stream(48 + 16)
    state, report = learner.memorize(x[:, :49], held_out=x[:, 48:])
    assert changed(model, before) == set()
    writes = {m.name: m.writes for m in report.memories}
    assert writes["blocks.0.mixer.memory"] == 48 // 16 and writes["blocks.1.cms.levels.0"] == 48 // 16
    # change measures writes: 0 for the level of period 128, which wrote nothing in 48 tokens (retention and the
    # gradients of its unfinished chunk do not count), positive for every memory that wrote
    by_name = {m.name: m for m in report.memories}
    assert by_name["blocks.1.cms.levels.1"].writes == 0 and by_name["blocks.1.cms.levels.1"].change == 0
    assert all((m.change > 0) == (m.writes > 0) for m in report.memories), report.memories
    assert sum(m.writes > 0 for m in report.memories) >= 4
    # what was memorized lives in the state: the held-out continuation read after the stream differs from a fresh read
    assert report.loss_after == pytest.approx(report.loss_before)
    assert report.held_out_tokens == 16 and report.held_out_after == pytest.approx(report.held_out_before)
    assert report.held_out_in_context != pytest.approx(report.held_out_before)
    assert report.held_out_in_context == pytest.approx(stream_loss(model, x[:, 48:], 16, state))
    assert "on the next 16 tokens (held out)" in report.table()
    with pytest.raises(ValueError, match="held_out must be an int64 tensor"):
        learner.memorize(x[:, :17], held_out=x[:1, 16:])


def test_memory_report_change_is_zero_without_writes_and_positive_once_the_period_is_complete():
    model = hope()
    learner = Learner(model, lr=0.0, segment=16)
    x = stream(160)
    state, first = learner.memorize(x[:, :113])  # 112 tokens: the level of period 128 has not written yet
    slow = {m.name: m for m in first.memories if m.period == 128}
    assert len(slow) == 2 and all(m.writes == 0 and m.change == 0 for m in slow.values()), slow
    state, second = learner.memorize(x[:, 112:161], state)  # 48 more: its first chunk completes at token 128
    slow = {m.name: m for m in second.memories if m.period == 128}
    assert all(m.writes == 1 and m.change > 0 for m in slow.values()), slow
    fast = [m for m in second.memories if m.period == 16]
    assert fast and all(m.writes == 3 and m.change > 0 for m in fast), fast


def test_the_level_step_is_the_summed_gradient_of_its_period():
    # SGD on the slow level: after one period its change is −lr · Σ over the period's segments of ∇ segment loss
    model = hope()
    x = stream(32)
    ref = hope()
    params = [p for n, p in ref.named_parameters() if "cms.levels.2." in n]
    state, total = None, [torch.zeros_like(p) for p in params]
    for lo in (0, 16):
        loss, state = ref.loss(x[:, lo : lo + 17], state)
        for t, g in zip(total, torch.autograd.grad(loss, params), strict=True):
            t += g
        state = state.detach()
    learner = Learner(
        model,
        lr=0.1,
        periods={SLOW: 32},
        optimizer="deep_momentum",
        optimizer_args={"memory": "linear", "momentum": 0.0},
        segment=16,
    )
    memorize(model, x, learner=learner, measure=False)
    got = [p for n, p in model.named_parameters() if "cms.levels.2." in n]
    for p, p0, g in zip(got, params, total, strict=True):
        torch.testing.assert_close(p, p0 - 0.1 * g, rtol=1e-4, atol=1e-6)


def test_saved_and_restored_learner_continues_exactly(tmp_path):
    x = stream(64)
    model = hope()
    learner = Learner(model, lr=1e-2, base_lr=1e-4, periods={SLOW: 32}, segment=16)
    state, _ = learner.memorize(x[:, :33], measure=False)  # 2 segments: the slow level steps once
    state, _ = learner.memorize(x[:, 32:49], state, measure=False)  # 1 segment: its gradient sum is pending
    learner.save(tmp_path / "mem", state)
    whole_state, _ = learner.memorize(x[:, 48:], state, measure=False)
    whole = model(x[:, :8], whole_state)[0]

    model2, learner2, state2 = Learner.load(tmp_path / "mem")
    state2, _ = learner2.memorize(x[:, 48:], state2, measure=False)
    torch.testing.assert_close(model2(x[:, :8], state2)[0], whole, rtol=0, atol=0)


def test_bad_settings_are_refused_with_the_fix():
    model = hope()
    with pytest.raises(ValueError, match="lr=-1"):
        Learner(model, lr=-1)
    with pytest.raises(ValueError, match="not levels of this model"):
        Learner(model, lrs={"blocks.9.cms.levels.2": 1e-3})
    with pytest.raises(ValueError, match="matches no parameter"):
        Learner(model, periods={"nothing-here": 32})
    with pytest.raises(ValueError, match="multiple of 16"):
        Learner(model, periods={SLOW: 24}, segment=16)
    with pytest.raises(ValueError, match="multiple of the segment 16"):
        Learner(model, segment=16).memorize(stream(20))
    torch.manual_seed(0)
    transformer = build(presets.transformer("debug"))
    with pytest.raises(ValueError, match=r"lr=1.0 would train nothing.*--period.*--base-lr"):
        memorize(transformer, stream(256), lr=1.0)  # its only level is the frozen base
    with pytest.raises(ValueError, match=r"lr=0.001 would train nothing.*its levels: base \(period None\)"):
        Learner(model, lr=1e-3)  # a default Hope: in-context memories, and `base`, frozen
    assert Learner(model).learning == []  # lr unset: only the in-context memories learn, which is not nothing
    with pytest.raises(ValueError, match="either learner= or"):
        memorize(model, stream(16), learner=Learner(model, segment=16), lr=1.0)


def test_fine_tuning_the_base_level_lowers_the_loss_of_the_stream():
    torch.manual_seed(0)
    model = build(presets.transformer("debug"))
    x = torch.arange(257).remainder(7)[None]  # a pattern the untrained model does not know
    _, report = memorize(model, x, base_lr=1e-2, segment=32)
    assert report.loss_after < report.loss_before - 0.5
    assert report.levels[0].steps == 256 // 32
    assert stream_loss(model, x, 32) == pytest.approx(report.loss_after)


def test_memorize_command_writes_a_model_that_continues(tmp_path):
    rng = random.Random(0)
    words = "the river memory learns fast and slow levels".split()
    for split in ("train", "validation", "test"):
        write_documents(
            tmp_path / "corpus" / f"{split}.txt", [" ".join(rng.choice(words) for _ in range(80)) for _ in range(20)]
        )
    run = tmp_path / "run"
    train(
        TrainConfig(
            preset="hope",
            size="debug",
            data=str(tmp_path / "corpus"),
            data_root=str(tmp_path / "cache"),
            seq_len=16,
            steps=2,
            batch_size=2,
            eval_every=0,
            save_every=0,
            progress=False,
            tensorboard="off",
            out_dir=str(run),
        )
    )
    common = ["--data-root", str(tmp_path / "cache"), "--no-progress"]
    assert (
        cli(
            [
                "memorize",
                str(run),
                "--tokens",
                "64",
                "--period",
                f"{SLOW}=32",
                "--lr",
                "1e-2",
                "--out-dir",
                str(tmp_path / "m1"),
                *common,
            ]
        )
        == 0
    )
    first = json.loads((tmp_path / "m1" / "memorize.json").read_text())
    steps = {lv["name"]: lv["steps"] for lv in first["history"][0]["levels"]}
    assert first["offset"] == 64 and steps == {"base": 0, SLOW: 2}
    # training at seq_len 16 leaves the period-16 and -128 levels in context (the preset's architecture)
    writes = {m["name"]: m["writes"] for m in first["history"][0]["memories"]}
    assert writes["blocks.0.cms.levels.0"] == 4 and writes["blocks.0.cms.levels.1"] == 0
    assert cli(["memorize", str(tmp_path / "m1"), "--tokens", "32", "--out-dir", str(tmp_path / "m2"), *common]) == 0
    second = json.loads((tmp_path / "m2" / "memorize.json").read_text())
    assert second["offset"] == 96 and [h["offset"] for h in second["history"]] == [0, 64]
    assert cli(["eval", str(tmp_path / "m2"), "--data-root", str(tmp_path / "cache"), "--no-progress"]) == 0
    assert (
        cli(
            [
                "memorize",
                str(tmp_path / "m1"),
                "--tokens",
                "32",
                "--lr",
                "1",
                "--out-dir",
                str(tmp_path / "m3"),
                *common,
            ]
        )
        == 1
    )  # a continued learner keeps its options


# --- LoRA: learning after deployment through low-rank factors only ---


def lora_transformer():
    pytest.importorskip("peft", reason="LoRA needs peft: pip install 'nestlearn[hf]'")
    from nestlearn.config import LoRAConfig
    from nestlearn.lora import add_lora

    torch.manual_seed(0)
    return add_lora(build(presets.transformer("debug")), LoRAConfig(rank=4, alpha=8.0))


def test_lora_learns_through_its_factors_only_as_a_level_of_its_own():
    model = lora_transformer()
    before = snapshot(model)
    factors = {n for n in before if ".lora_" in n}
    learner = Learner(model, segment=32)  # lr unset: 1e-3 for the factors; base_lr 0: the base frozen
    assert {name: learner.lrs[name] for name in learner.lrs} == {"base": 0.0, "lora": 1e-3}
    x = torch.arange(97).remainder(7)[None]
    _, report = learner.memorize(x)
    assert changed(model, before) == factors  # A and B of every adapted projection, and nothing else
    assert {lv.name: lv.steps for lv in report.levels} == {"lora": 3, "base": 0}
    assert report.loss_after < report.loss_before
    assert Learner(model, lr=1e-2).lrs["lora"] == 1e-2  # `lr` is the factors' rate: not "would train nothing"
    with pytest.raises(ValueError, match="nothing would learn"):
        Learner(model, lr=0.0, segment=32).memorize(x)


def test_a_saved_lora_learner_loads_back_with_its_adapters_and_continues_exactly(tmp_path):
    model = lora_transformer()
    x = torch.arange(129).remainder(5)[None]
    learner = Learner(model, lr=1e-2, segment=32)
    state, _ = learner.memorize(x[:, :65], measure=False)
    learner.save(tmp_path / "mem", state)
    assert json.loads((tmp_path / "mem" / "config.json").read_text())["lora"]["rank"] == 4
    model2, learner2, state2 = Learner.load(tmp_path / "mem")
    assert model2.config.lora == model.config.lora
    torch.testing.assert_close(model2(x[:, :16])[0], model(x[:, :16])[0], rtol=0, atol=0)  # equal logits
    learner.memorize(x[:, 64:], state, measure=False)
    learner2.memorize(x[:, 64:], state2, measure=False)
    torch.testing.assert_close(model2(x[:, :16])[0], model(x[:, :16])[0], rtol=0, atol=0)
