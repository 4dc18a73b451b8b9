"""Task-loss CMS levels (eq. 71): the chunked fast path equals the slow reference (outputs and gradients, first
order and full), streams cut anywhere equal one call, rows and the future never leak, each level steps exactly at
its period, evaluation and generation keep learning, and bad settings are refused."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nestlearn import build, presets
from nestlearn.checkpoint import decode_state, encode_state
from nestlearn.cms import TaskLevel
from nestlearn.config import CMSConfig
from nestlearn.task_cms import reference_forward

V = 48


def task_model(
    preset: str = "hope", periods=(8, 16, None), lr: float = 0.05, outer_from: int = 64, **cms
) -> torch.nn.Module:
    torch.manual_seed(0)
    config = presets.PRESETS[preset]("debug")
    fields = dict(signal="task", update_periods=periods, outer_from=outer_from, task_lr=lr, **cms)
    config = dataclasses.replace(config, vocab_size=V, cms=dataclasses.replace(config.cms, **fields))
    return build(config).double()


def tokens(b: int = 2, t: int = 44, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, V, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("preset", ["hope", "hope_attention", "transformer"])
def test_the_fast_path_equals_the_reference(preset):
    model, x = task_model(preset), tokens()  # 44 tokens: five chunks of 8 and a partial one
    logits, _ = model(x)
    torch.testing.assert_close(logits, reference_forward(model, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("meta_grad", ["first_order", "full"])
def test_outer_gradients_equal_the_references(meta_grad):
    model, x = task_model(meta_grad=meta_grad), tokens(t=32)
    fast = torch.autograd.grad(model(x)[0].square().mean(), list(model.parameters()), allow_unused=True)
    slow = torch.autograd.grad(reference_forward(model, x).square().mean(), list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), fast, slow, strict=True):
        if a is None or b is None:
            assert a is None and b is None, name
            continue
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12, msg=name)
    theta0 = dict(zip([n for n, _ in model.named_parameters()], fast, strict=True))
    assert theta0["blocks.1.cms.levels.1.up"].abs().sum() > 0  # θ_0 is learned through the steps (eq. 73)


def test_a_learned_rate_per_token_equals_the_reference_and_learns():
    constant, learned = task_model(meta_grad="full"), task_model(meta_grad="full", task_rate="data")
    x = tokens(t=32)
    torch.testing.assert_close(learned(x)[0], constant(x)[0], rtol=0, atol=0)  # 2σ(0) = 1: task_lr itself at first
    with torch.no_grad():
        learned.task_rate.weight.normal_(std=0.5)
    logits = learned(x)[0]
    assert not torch.allclose(logits, constant(x)[0])
    torch.testing.assert_close(logits, reference_forward(learned, x), rtol=0, atol=1e-10)
    params = [learned.task_rate.weight, learned.blocks[1].cms.levels[1].up]
    fast = torch.autograd.grad(logits.square().mean(), params)
    slow = torch.autograd.grad(reference_forward(learned, x).square().mean(), params)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    assert fast[0].abs().sum() > 0  # the rates are learned through the inner steps
    with pytest.raises(ValueError, match="task_rate='data'.*meta_grad='full'"):
        CMSConfig(signal="task", task_rate="data")


def test_full_and_first_order_meta_gradients_differ():
    x = tokens(t=32)
    grads = []
    for meta_grad in ("first_order", "full"):
        model = task_model(meta_grad=meta_grad)
        grads.append(torch.autograd.grad(model(x)[0].square().mean(), [model.blocks[0].cms.levels[0].up])[0])
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("cuts", [[13, 29], [1, 2, 3, 8, 9, 40], [8, 16, 24]], ids=["odd", "tokens", "chunks"])
def test_a_stream_cut_anywhere_equals_one_call(cuts):
    model, x = task_model(), tokens()
    whole, state = model(x)
    parts, s = [], None
    for lo, hi in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        logits, s = model(x[:, lo:hi], s)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-12)
    for a, b in zip(state.layers[1]["cms"][:2], s.layers[1]["cms"][:2], strict=True):
        torch.testing.assert_close(a["up"], b["up"], rtol=0, atol=1e-12)


def test_a_learn_mask_equals_the_reference_streams_and_masks_what_it_says():
    model, x = task_model(), tokens()
    learn = torch.rand(x.shape, generator=torch.Generator().manual_seed(2)) > 0.3
    learn[0, :20] = False  # a padded start
    whole, state = model(x, learn=learn)
    assert not torch.allclose(whole, model(x)[0])  # the mask is used
    torch.testing.assert_close(whole, reference_forward(model, x, learn), rtol=0, atol=1e-10)
    parts, s = [], None
    for lo, hi in ((0, 5), (5, 13), (13, 29), (29, 44)):  # mid-chunk cuts: the pending chunk keeps its mask
        logits, s = model(x[:, lo:hi], s, learn=learn[:, lo:hi])
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), whole, rtol=0, atol=1e-12)
    _, silent = model(x[:, :16], learn=torch.zeros(2, 16, dtype=torch.bool))
    for j, level in enumerate(model.blocks[1].cms.levels[:2]):  # nothing learnt: θ_0 still
        torch.testing.assert_close(silent.layers[1]["cms"][j]["up"][0], level.up, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"bool tensor shaped like tokens \(2, 44\)"):
        model(x, learn=learn[:, :10])
    with pytest.raises(ValueError, match="0 such levels"):
        task_model(periods=(None,))(x, learn=learn)


def test_rows_and_the_future_never_leak():
    model, x = task_model(), tokens()
    base, _ = model(x)
    y = x.clone()
    y[1] = torch.randint(0, V, (x.shape[1],))  # another second row
    torch.testing.assert_close(model(y)[0][0], base[0], rtol=0, atol=0)
    for p in (5, 8, 23, 40):  # a changed token changes nothing before it
        z = x.clone()
        z[:, p] = (z[:, p] + 1) % V
        torch.testing.assert_close(model(z)[0][:, :p], base[:, :p], rtol=0, atol=0)


def test_each_level_steps_exactly_at_its_period():
    model, x = task_model(), tokens(b=1, t=48)
    s, seen = None, []
    for lo in range(0, 48, 8):
        _, s = model(x[:, lo : lo + 8], s)
        seen.append([s.layers[0]["cms"][j]["up"].clone() for j in (0, 1)])
    before = [model.blocks[0].cms.levels[j].up[None] for j in (0, 1)]
    for c, now in enumerate(seen):
        end = 8 * (c + 1)
        for j, period in ((0, 8), (1, 16)):
            changed = not torch.equal(now[j], before[j])
            assert changed == (end % period == 0), (c, j)
        before = now


@pytest.mark.parametrize("preset", ["hope", "transformer"])
def test_nested_levels_equal_the_reference(preset):
    model, x = task_model(preset, variant="nested"), tokens()  # the period-8 level resets every 16 tokens
    logits, _ = model(x)
    torch.testing.assert_close(logits, reference_forward(model, x), rtol=0, atol=1e-10)
    grads = [
        torch.autograd.grad(out.square().mean(), [model.blocks[0].cms.levels[0].up])[0]
        for out in (model(x)[0], reference_forward(model, x))
    ]
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-7, atol=1e-12)
    assert not torch.allclose(logits, task_model(preset)(x)[0])  # the resets change what is read


def test_a_nested_level_returns_to_its_initial_state_when_the_slower_level_steps():
    model, x = task_model(variant="nested"), tokens(b=1, t=48)
    theta0 = model.blocks[0].cms.levels[0].up[None]
    s = None
    for lo in range(0, 48, 8):
        _, s = model(x[:, lo : lo + 8], s)
        at_theta0 = torch.equal(s.layers[0]["cms"][0]["up"], theta0)
        assert at_theta0 == ((lo + 8) % 16 == 0), lo  # stepped after 8, 24, 40; back at θ_0 after 16, 32, 48
    with pytest.raises(ValueError, match="each period must divide the next"):
        task_model(periods=(8, 24, 36, None), variant="nested", outer_from=64)


def test_a_level_reading_its_own_chunk_would_be_caught(monkeypatch):
    # the mistake of updating before the chunk is read (the chunk sees its own labels) breaks the reference match
    import nestlearn.task_cms as task_cms

    model, x = task_model(), tokens(t=24)
    honest, _ = model(x)
    original = task_cms._inner_step

    def peeking(model, seg, learn, hidden, layers, end, outer):
        _, stepped = original(model, seg, learn, hidden, layers, end, outer)
        return original(model, seg, learn, hidden, stepped, end + seg.shape[1], outer)

    monkeypatch.setattr(task_cms, "_inner_step", peeking)
    assert not torch.allclose(model(x)[0], honest)
    assert not torch.allclose(model(x)[0], reference_forward(model, x))


def test_each_inner_step_walks_its_own_chunks_graph_only(monkeypatch):
    # an inner autograd.grad walks every node its loss reaches: on one graph for the stream, chunk n's step would
    # walk all n − 1 chunks before it (quadratic in the window)
    import nestlearn.task_cms as task_cms

    reached, original = [], task_cms.chunk_loss

    def counting(*args):
        loss = original(*args)
        seen, todo = set(), [loss.grad_fn]
        while todo:
            node = todo.pop()
            if node is not None and node not in seen:
                seen.add(node)
                todo.extend(n for n, _ in node.next_functions)
        reached.append(len(seen))
        return loss

    monkeypatch.setattr(task_cms, "chunk_loss", counting)
    model, x = task_model(), tokens(t=64)
    model(x)[0].sum().backward()  # the outer graph: eight chunks of 8
    # as many nodes for the eighth chunk as for the first (a chunk opening a period has a few more; on one graph
    # the eighth reached 9.7× the first's)
    assert len(reached) == 8 and max(reached) < 1.1 * min(reached), reached


def test_evaluation_and_generation_keep_learning():
    model, x = task_model(), tokens(b=1, t=40)
    with torch.no_grad():
        learned, _ = model(x)
    torch.testing.assert_close(learned, model(x)[0], rtol=0, atol=1e-12)
    frozen = task_model(task_blocks=0)  # no block learns: θ_0 read throughout
    assert not torch.allclose(learned, frozen(x)[0])
    greedy = model.generate(x[:, :5], 20)
    with torch.no_grad():
        logits, _ = model(greedy[:, :-1])
    assert torch.equal(logits[:, 4:].argmax(-1), greedy[:, 5:])


def test_only_the_last_task_blocks_learn():
    model, x = task_model(task_blocks=1), tokens(b=1, t=32)
    _, s = model(x)
    assert torch.equal(s.layers[0]["cms"][0]["up"], model.blocks[0].cms.levels[0].up[None])
    assert not torch.equal(s.layers[1]["cms"][0]["up"], model.blocks[1].cms.levels[0].up[None])


def test_the_state_saves_and_restores_mid_chunk():
    model, x = task_model(), tokens()
    whole, _ = model(x)
    first, s = model(x[:, :13])
    s = decode_state(encode_state(s.detach()))
    rest, _ = model(x[:, 13:], s)
    torch.testing.assert_close(torch.cat([first, rest], 1), whole, rtol=0, atol=1e-12)


def test_bad_settings_are_refused_and_divergence_is_named():
    with pytest.raises(ValueError, match="signal='nope'"):
        CMSConfig(signal="nope")
    with pytest.raises(ValueError, match="task_lr"):
        CMSConfig(signal="task", task_lr=-1e-3)
    with pytest.raises(ValueError, match="meta_grad"):
        CMSConfig(signal="task", meta_grad="second")
    with pytest.raises(ValueError, match="multiple of the fastest, 8"):
        task_model(periods=(8, 12, None))
    model = task_model(lr=1e30).float()
    with pytest.raises(FloatingPointError, match=r"blocks\.\d\.cms\.levels\.\d diverged at its step after token \d+"):
        model(tokens(t=64))
    assert isinstance(model.blocks[0].cms.levels[0], TaskLevel)


def test_a_task_loss_hope_trains():
    model = task_model().float()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    x = tokens(b=4, t=33)
    losses = []
    for _ in range(4):
        loss, _ = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_train_with_task_levels_resumes_exactly(tmp_path):
    from nestlearn.checkpoint import latest_checkpoint, load_checkpoint
    from nestlearn.train import train

    from .test_train import config, losses, write_corpus

    corpus = write_corpus(tmp_path / "corpus")
    fields = dict(preset="hope", cms_signal="task", update_periods="8,16,none", task_lr=1e-2, carry_state=True)
    whole = config(corpus, tmp_path / "whole", steps=4, **fields)
    train(whole)
    split = config(corpus, tmp_path / "split", steps=4, stop_at=2, **fields)
    train(split)
    train(dataclasses.replace(split, stop_at=None))
    assert losses(tmp_path / "split") == losses(tmp_path / "whole")
    model, _ = load_checkpoint(whole.out_dir)
    assert model.config.cms.signal == "task" and isinstance(model.blocks[0].cms.levels[0], TaskLevel)
    assert latest_checkpoint(split.out_dir).name == "step-00000004"


def test_the_synthetic_suites_take_task_levels():
    from nestlearn.data import synthetic
    from nestlearn.evals.longctx import train_synthetic

    model, info = train_synthetic(
        "hope",
        lambda b, g: synthetic.mqar(b, 4, generator=g),
        steps=2,
        batch=2,
        cms_signal="task",
        task_lr=1e-2,
        quiet=True,
    )
    assert isinstance(model.blocks[0].cms.levels[0], TaskLevel) and model.blocks[0].cms.levels[0].lr == 1e-2
    assert info["final_loss"] == info["final_loss"]  # finite, not NaN


def test_memorize_drives_task_levels_and_outer_levels_on_one_schedule():
    from nestlearn.memorize import Learner

    model, x = task_model(periods=(8, 16, 32), outer_from=32), tokens(b=1, t=65)
    learner = Learner(model.float(), lr=1e-3, segment=32)  # the period-32 level is outer: stepped every segment
    state, report = learner.memorize(x, held_out=None)
    assert report.tokens == 64 and [lv.steps for lv in report.levels if lv.period == 32] == [2, 2]  # two blocks
    assert state.task["position"] == 64
    written = {m.name: (m.writes, m.change) for m in report.memories if m.name.endswith(("levels.0", "levels.1"))}
    assert written["blocks.0.cms.levels.0"][0] == 8 and written["blocks.0.cms.levels.1"][0] == 4
    assert all(change > 0 for _, change in written.values())


@pytest.mark.parametrize("cuts", [[], [5, 13, 29], [1, 2, 3, 4, 9]], ids=["one-call", "odd", "tokens"])
def test_blocks_below_the_learning_ones_run_once_and_change_nothing(cuts):
    # task_blocks=1: block 0 reads θ_0 and runs over each call at once; the reference runs it chunk by chunk
    model, x = task_model(task_blocks=1), tokens()
    parts, s = [], None
    for lo, hi in zip([0, *cuts], [*cuts, x.shape[1]], strict=True):
        logits, s = model(x[:, lo:hi], s)
        parts.append(logits)
    torch.testing.assert_close(torch.cat(parts, dim=1), reference_forward(model, x), rtol=0, atol=1e-10)
    fast = torch.autograd.grad(model(x)[0].square().mean(), list(model.parameters()), allow_unused=True)
    slow = torch.autograd.grad(reference_forward(model, x).square().mean(), list(model.parameters()), allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), fast, slow, strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12, msg=name)


def test_lm_eval_reads_a_task_level_checkpoint_as_its_forward_pass(tmp_path):
    pytest.importorskip("lm_eval")
    from nestlearn.data.tokenizer import ByteTokenizer
    from nestlearn.evals.harness import NestlearnLM

    from .test_harness import TEXTS, ll_direct, requests

    torch.manual_seed(0)
    config = presets.hope("debug")
    cms = dataclasses.replace(config.cms, signal="task", update_periods=(8, 16, None), outer_from=64, task_lr=0.05)
    model = build(dataclasses.replace(config, vocab_size=ByteTokenizer().vocab_size, cms=cms, tie_embeddings=False))
    model.save_pretrained(tmp_path / "ck")
    ByteTokenizer().save(tmp_path / "ck")
    lm = NestlearnLM(path=str(tmp_path / "ck"), device="cpu", batch_size=3)
    pairs = [(t, " " + u) for t in TEXTS for u in ("mat", "levels update")]
    got = lm.loglikelihood(requests("loglikelihood", pairs), disable_tqdm=True)
    for (context, continuation), (lp, _) in zip(pairs, got, strict=True):
        assert lp == pytest.approx(ll_direct(lm, context, continuation)[0], abs=1e-5)
