"""Memories stay alive on long streams: every MLP memory of every preset, over 16,384 tokens in calls of 512 with
the state carried, stays finite and away from the dead all-zero state, keeps writing, and still learns a key
written late (a task-loss CMS level: still gets a gradient to step on) (issue #18). With retention towards zero
(the paper's weight decay) they die, and the run-time check says which."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
import torch.nn.functional as F

from nestlearn import build, presets
from nestlearn.health import DEAD_NORM, DeadMemoryWarning, memory_health, memory_state, warn_dead
from nestlearn.memory import read, scan
from nestlearn.state import MemoryState

STREAM, CALL = 16_384, 512
MEMORY_PRESETS = ["titans", "hope", "hope_attention"]


def _model(preset: str, trained: bool, retain_to: str = "init"):
    config = presets.PRESETS[preset]("debug")
    for sub in ("titans", "sm_titans", "cms"):
        setattr(config, sub, dataclasses.replace(getattr(config, sub), retain_to=retain_to))
    model = build(config)
    if trained:  # a few AdamW steps on random tokens: the gates and initial states move
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
        g = torch.Generator().manual_seed(1)
        for _ in range(3):
            loss, _ = model.loss(torch.randint(0, 256, (2, 129), generator=g))
            opt.zero_grad()
            loss.backward()
            opt.step()
    return model.eval()


def _stream(model, tokens: int, generator: torch.Generator):
    """Feed `tokens` random tokens in calls of CALL; yield the state after every call."""
    state = model.init_state(1)
    with torch.no_grad():
        for _ in range(tokens // CALL):
            _, state = model(torch.randint(0, 256, (1, CALL), generator=generator), state)
            yield state


def _flat(state: MemoryState) -> torch.Tensor:
    return torch.cat([w.flatten() for w in state.weights.values()])


def _learns_a_key(model, state, name: str) -> float:
    """Write one fresh (k*, v*) pair 16 times into the memory `name` of `state`, then 32 random pairs after it, all
    with retention 0.982; return ‖M(k*) − v*‖ at the end / before. Below 1: the memory still learns and holds it."""
    mem = memory_state(state, name)
    mem = MemoryState({n: w.detach().expand(1, *w.shape[-3:]) if w.dim() == 3 else w for n, w in mem.weights.items()})
    b, h, d = mem.weights["W2"].shape[0], mem.weights["W2"].shape[1], mem.weights["W2"].shape[-1]  # (b, h, f, d)
    g = torch.Generator().manual_seed(7)
    k_star = F.normalize(torch.randn(b, h, 1, d, generator=g), dim=-1)
    v_star = torch.randn(b, h, 1, d, generator=g)
    noise_k = F.normalize(torch.randn(b, h, 32, d, generator=g), dim=-1)
    k = torch.cat([k_star.expand(b, h, 16, d), noise_k], dim=2)
    v = torch.cat([v_star.expand(b, h, 16, d), torch.randn(b, h, 32, d, generator=g)], dim=2)
    lr = torch.full(k.shape[:3], 0.1)
    retention = torch.full(k.shape[:3], 0.982)
    origin = _origin_of(model, name)
    before = (read(k_star, mem) - v_star).norm()
    plain = MemoryState(mem.weights)  # the memory's weights, written token by token
    _, after_state = scan(k, k, v, lr, retention, state=plain, chunk_size=1, origin=origin)
    return ((read(k_star, after_state) - v_star).norm() / before).item()


def _level_gradient(model, state, name: str) -> float:
    """‖∇ of the next-token loss on one fixed random 16-token chunk w.r.t. the task-loss level `name`'s weights in
    `state`‖: what its next step (eq. 71) would move it by. Zero for a level that can no longer learn."""
    i, j = int(name.split(".")[1]), int(name.split(".")[4])
    layers = [dict(layer) for layer in state.layers]
    cms = list(layers[i]["cms"])
    theta = {k: cms[j][k].detach().clone().requires_grad_() for k in ("up", "down")}
    cms[j] = {**cms[j], **theta}
    layers[i] = {**layers[i], "cms": cms}
    x = torch.randint(0, 256, (1, 17), generator=torch.Generator().manual_seed(11))
    with torch.enable_grad():
        loss, _ = model.loss(x, dataclasses.replace(state, layers=layers))
        grads = torch.autograd.grad(loss, list(theta.values()))
    return torch.cat([g.flatten() for g in grads]).norm().item()


def _origin_of(model, name: str):
    parts = name.split(".")
    block = model.blocks[int(parts[1])]
    if parts[2] == "mixer":
        mixer = block.mixer
        return mixer.origin() if hasattr(mixer, "origin") else mixer.origins()[parts[3]]
    return block.cms.levels[int(parts[4])].origin()


@pytest.mark.parametrize("trained", [False, True], ids=["at-init", "after-3-steps"])
@pytest.mark.parametrize("preset", MEMORY_PRESETS)
def test_every_memory_stays_alive_and_writing_over_a_long_stream(preset, trained):
    model = _model(preset, trained)
    previous = None
    with torch.no_grad():
        for i, state in enumerate(_stream(model, STREAM, torch.Generator().manual_seed(0))):
            health = list(memory_health(model, state))
            assert health, "the preset has no memory to check"
            for m in health:
                assert m.alive, f"after {(i + 1) * CALL} tokens: {m.describe()}"
                assert min(m.norms.values()) > 100 * DEAD_NORM, f"after {(i + 1) * CALL} tokens: {m.describe()}"
            flat = {m.name: _flat(memory_state(state, m.name)) for m in health}
            if previous is not None:  # every call of 512 tokens still changes every memory: it writes
                for name, w in flat.items():
                    change = ((w - previous[name]).norm() / previous[name].norm()).item()
                    assert change > 1e-4, f"{name} changed by {change:.2g} in the call ending at {(i + 1) * CALL}"
            previous = flat
        fresh = model.init_state(1)
        for m in health:
            if "up" in memory_state(state, m.name).weights:  # a task-loss level: it still gets a gradient to step on
                grad, at_start = _level_gradient(model, state, m.name), _level_gradient(model, fresh, m.name)
                assert grad > 0.1 * at_start, f"{m.name}: gradient {grad:.2g} at the end, {at_start:.2g} at the start"
                continue
            # a key written late is learnt and held about as well as by the fresh memory (≈ 0.7–0.8×)
            ratio, at_start = _learns_a_key(model, state, m.name), _learns_a_key(model, fresh, m.name)
            assert ratio < 0.95 and ratio < at_start + 0.1, (
                f"{m.name} after {STREAM} tokens: a written key's error fell only to {ratio:.2f}× ({at_start:.2f}× "
                "at the start of the stream)"
            )


@pytest.mark.parametrize("preset", ["titans", "hope"])
def test_retention_towards_zero_kills_the_memories_and_the_check_says_which(preset):
    # the paper's weight decay (retain_to="zero") with α ≈ 0.982: every MLP memory reaches the dead state within a
    # few thousand tokens, stops writing, cannot learn a key, and warn_dead names each one
    model = _model(preset, trained=False, retain_to="zero")
    *_, state = _stream(model, 4096, torch.Generator().manual_seed(0))
    task = {f"blocks.{i}.cms.levels.{j}" for i, j, _ in model.task_levels}
    health = [m for m in memory_health(model, state) if m.name not in task]
    assert health and all(m.dead == m.total for m in health), [m.describe() for m in health]
    # task-loss CMS levels (Hope's default) have no retention: nothing takes them there
    assert all(m.alive for m in memory_health(model, state) if m.name in task)
    with pytest.warns(DeadMemoryWarning, match="blocks.0.mixer.memory"):
        bad = warn_dead(model, state, "after 4,096 tokens")
    assert {m.name for m in bad} == {m.name for m in health}
    assert _learns_a_key(model, state, health[0].name) > 0.99


def test_a_live_model_raises_no_warning():
    model = _model("titans", trained=False)
    *_, state = _stream(model, 1024, torch.Generator().manual_seed(0))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadMemoryWarning)
        assert warn_dead(model, state, "after 1,024 tokens") == []


def test_a_non_finite_memory_is_reported():
    model = _model("titans", trained=False)
    state = model.init_state(1)
    mem = memory_state(state, "blocks.1.mixer.memory")
    mem.weights = {**mem.weights, "W1": torch.full_like(mem.weights["W1"], float("nan"))}
    with pytest.warns(DeadMemoryWarning, match="NaN or inf"):
        bad = warn_dead(model, state, "now")
    assert [m.name for m in bad] == ["blocks.1.mixer.memory"]


# --- the run-time check in the commands that read long streams: eval, memorize, longctx niah ---


def _dead_prone_titans():
    """A Titans model whose memories die within ~1,000 tokens: retention towards zero."""
    return _model("titans", trained=False, retain_to="zero")


def test_evaluate_names_the_dead_memories_of_a_long_window():
    import numpy as np

    from nestlearn.data.shards import ShardMeta
    from nestlearn.evaluate import evaluate

    tokens = np.random.default_rng(0).integers(0, 256, 2 * 2048 + 1).astype(np.uint16)
    meta = ShardMeta("test", "<u2", len(tokens), 1, len(tokens), len(tokens), "bytes", 256, 0, "", "random", "")
    with pytest.warns(DeadMemoryWarning, match="at the end of a 2048-token eval window"):
        result = evaluate(_dead_prone_titans(), tokens, meta, seq_len=2048, batch_size=1)
    assert result["dead_memories"] == ["blocks.0.mixer.memory", "blocks.1.mixer.memory"]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", DeadMemoryWarning)  # the default (retention towards M_0): no warning
        assert evaluate(_model("titans", False), tokens, meta, seq_len=2048, batch_size=1)["dead_memories"] == []


def test_memorize_reports_where_each_memory_died():
    from nestlearn.memorize import Learner

    stream = torch.randint(0, 256, (1, 4 * 512 + 1), generator=torch.Generator().manual_seed(0))
    with pytest.warns(DeadMemoryWarning, match="tokens of the stream"):
        _, report = Learner(_dead_prone_titans(), lr=0.0, segment=512).memorize(stream, measure=False)
    assert set(report.dead_memories) == {"blocks.0.mixer.memory", "blocks.1.mixer.memory"}
    assert all(at in (512, 1024, 1536, 2048) for at in report.dead_memories.values())
    assert "reached the dead state by token" in report.table()


def test_niah_retrieval_gain_pass_hands_its_state_to_the_check():
    # `nestlearn longctx niah` checks the memories through this hook: it must see the state at the end of the pass
    from nestlearn.data.tokenizer import ByteTokenizer
    from nestlearn.evals import niah

    model, seen, tok = _dead_prone_titans(), [], ByteTokenizer()
    text = "".join(random.Random(0).choice("abcdefghijklmnopqrstuvwxyz ,.") for _ in range(600))
    niah.model_bits(model, tok, on_state=lambda state, n: seen.append((n, state)))(text, " answer")
    ((n, state),) = seen
    ids = torch.tensor([tok.encode(text + " answer")])
    with torch.no_grad():
        want = model(ids[:, :-1])[1]
    assert n == ids.shape[1] - 1
    for name in ("blocks.0.mixer.memory", "blocks.1.mixer.memory"):
        for k, w in memory_state(want, name).weights.items():
            assert torch.allclose(memory_state(state, name).weights[k], w), (name, k)


def test_a_config_saved_before_retain_to_existed_keeps_retention_towards_zero(tmp_path):
    # such a model was trained with the paper's decay; loading it must not change what its memories do
    from nestlearn import load
    from nestlearn.config import ModelConfig

    config = presets.hope("debug")
    d = config.to_dict()
    assert ModelConfig.from_dict(d).sm_titans.retain_to == "init"
    for name in ("titans", "sm_titans", "cms"):
        del d[name]["retain_to"]
    old = ModelConfig.from_dict(d)
    assert (old.titans.retain_to, old.sm_titans.retain_to, old.cms.retain_to) == ("zero", "zero", "zero")
    model = build(old)
    model.save_pretrained(tmp_path)
    assert load(tmp_path).config.sm_titans.retain_to == "zero"
    assert ModelConfig.from_dict({}).titans.retain_to == "init"  # no sub-config given: today's defaults
