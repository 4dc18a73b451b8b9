"""Levels (eq. 71): each level steps exactly every `period` tokens with the gradient summed over the period, its
state resumes exactly, its assignment rules and errors; and every optimizer keeps 2 DDP processes identical."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

from nestlearn import build, presets
from nestlearn.optim import M3, DeepMomentum, Levels, Muon


def two_params():
    fast = torch.nn.Parameter(torch.zeros(3))
    slow = torch.nn.Parameter(torch.zeros(2, 2))
    return fast, slow


def test_level_changes_exactly_every_period_by_the_summed_gradient():
    fast, slow = two_params()
    levels = Levels(
        torch.optim.SGD([fast, slow], lr=1.0),
        [("fast", None), ("slow", 96)],
        named_parameters=[("fast", fast), ("slow", slow)],
    )
    pending = torch.zeros(2, 2)
    for step in range(1, 10):
        g_fast, g_slow = torch.full((3,), float(step)), torch.full((2, 2), float(step * step))
        fast.grad, slow.grad = g_fast.clone(), g_slow.clone()
        before_fast, before_slow = fast.detach().clone(), slow.detach().clone()
        stepped = levels.step(tokens=32)  # period 96 = every 3 steps
        pending += g_slow
        torch.testing.assert_close(fast.detach(), before_fast - g_fast)  # every step, its own gradient
        if step % 3 == 0:
            assert stepped == ["fast", "slow"]
            torch.testing.assert_close(slow.detach(), before_slow - pending)  # the sum of the period's gradients
            pending.zero_()
        else:
            assert stepped == ["fast"]
            assert torch.equal(slow.detach(), before_slow)
        levels.zero_grad()


def test_a_waiting_level_does_not_advance_its_optimizer_state():
    fast, slow = two_params()
    opt = torch.optim.AdamW([fast, slow], lr=0.1)
    levels = Levels(opt, [("slow", 64)], named_parameters=[("fast", fast), ("slow", slow)])
    for _ in range(3):
        fast.grad, slow.grad = torch.ones(3), torch.ones(2, 2)
        levels.step(tokens=32)
    assert opt.state[fast]["step"].item() == 3 and opt.state[slow]["step"].item() == 1


def model_with_outer_levels():
    config = presets.hope("debug")
    config.cms.update_periods, config.cms.outer_from, config.seq_len = (8, 64, 128), 32, 32  # 8 in-context
    return build(config)


def test_levels_from_model_levels_step_each_cms_level_at_its_period():
    model = model_with_outer_levels()
    levels = Levels(torch.optim.SGD(model.parameters(), lr=0.1), model.levels())
    periods = {lv.name: lv.period for lv in levels.levels}
    assert periods["blocks.0.cms.levels.1"] == 64 and periods["blocks.1.cms.levels.2"] == 128
    assert periods["base"] is None
    tokens = torch.randint(0, model.config.vocab_size, (2, 33))
    counts = {}
    for _ in range(4):
        logits, _ = model(tokens[:, :-1])
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        for name in levels.step(tokens=32):
            counts[name] = counts.get(name, 0) + 1
        levels.zero_grad()
    assert counts["base"] == 4 and counts["blocks.0.cms.levels.1"] == 2 and counts["blocks.0.cms.levels.2"] == 1


def test_first_matching_pattern_wins_and_the_rest_is_base():
    model = model_with_outer_levels()
    named = list(model.named_parameters())
    levels = Levels(
        torch.optim.SGD(model.parameters(), lr=0.1), [(r"cms\.levels\.2", 256), (r"cms", 64)], named_parameters=named
    )
    by_name = {lv.name: lv for lv in levels.levels}
    assert len(by_name[r"cms\.levels\.2"].params) == 4
    cms = [p for n, p in named if "cms" in n and "levels.2" not in n]
    assert {id(p) for p in by_name["cms"].params} == {id(p) for p in cms}
    assert len(by_name["base"].params) == len(named) - 4 - len(cms)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"levels": [("nothing_is_called_this", 64)]}, "matches no parameter"),
        ({"levels": [("slow", 0)]}, "period=0"),
        ({"levels": [("slow", -32)]}, "period=-32"),
        ({"levels": [("slow", 64)], "periods": {"slower": 128}}, "'slower', which does not exist"),
    ],
)
def test_bad_levels_raise_clear_errors(kwargs, match):
    fast, slow = two_params()
    with pytest.raises(ValueError, match=match):
        Levels(torch.optim.SGD([fast, slow], lr=0.1), named_parameters=[("fast", fast), ("slow", slow)], **kwargs)


def test_a_period_that_is_not_a_multiple_of_the_step_is_refused():
    fast, slow = two_params()
    levels = Levels(
        torch.optim.SGD([fast, slow], lr=0.1), [("slow", 100)], named_parameters=[("fast", fast), ("slow", slow)]
    )
    fast.grad, slow.grad = torch.ones(3), torch.ones(2, 2)
    with pytest.raises(ValueError, match="period 100 tokens, but each step advances the stream by 32"):
        levels.step(tokens=32)


def test_parameters_outside_the_optimizer_are_refused():
    fast, slow = two_params()
    with pytest.raises(ValueError, match="give the optimizer exactly the parameters of the levels"):
        Levels(torch.optim.SGD([fast], lr=0.1), [("slow", 64)], named_parameters=[("fast", fast), ("slow", slow)])


def test_levels_state_dict_resumes_exactly_mid_period():
    def make():
        torch.manual_seed(0)
        fast, slow = torch.nn.Parameter(torch.randn(3)), torch.nn.Parameter(torch.randn(4, 3))
        opt = Levels(
            M3([fast, slow], lr=0.01, slow_period=2), [("slow", 96)], named_parameters=[("fast", fast), ("slow", slow)]
        )
        return (fast, slow), opt

    def steps(params, opt, ts):
        for t in ts:
            g = torch.Generator().manual_seed(t)
            for p in params:
                p.grad = torch.randn(p.shape, generator=g)
            opt.step(tokens=32)

    straight, opt = make()
    steps(straight, opt, range(7))
    first, opt = make()
    steps(first, opt, range(4))  # stops one step into the slow level's second period
    sd = opt.state_dict()
    second, opt2 = make()
    with torch.no_grad():
        for a, b in zip(second, first, strict=True):
            a.copy_(b)
    opt2.load_state_dict(sd)
    steps(second, opt2, range(4, 7))
    for a, b in zip(straight, second, strict=True):
        torch.testing.assert_close(a, b, atol=0, rtol=0)


# --- two processes (gloo): every optimizer leaves the ranks with identical parameters ---

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "muon": lambda ps: Muon(ps, lr=1e-2),
    "m3": lambda ps: M3(ps, lr=1e-2, slow_period=2),
    "deep_momentum": lambda ps: DeepMomentum(ps, lr=1e-2),
}


def _ddp_worker(rank: int, port: int, queue) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(1)
    out = {}
    for name, make in OPTIMIZERS.items():
        torch.manual_seed(0)  # the same initial weights on both ranks
        model = model_with_outer_levels()
        net = DDP(model)
        levels = Levels(make(list(model.parameters())), model.levels())
        g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
        for _ in range(3):
            tokens = torch.randint(0, model.config.vocab_size, (2, 33), generator=g)
            logits, _ = net(tokens[:, :-1])
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
            levels.step(tokens=32)
            levels.zero_grad()
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        gathered = [torch.zeros_like(flat) for _ in range(2)]
        dist.all_gather(gathered, flat)
        start = torch.cat(
            [p.detach().flatten() for p in (torch.manual_seed(0), model_with_outer_levels())[1].parameters()]
        )
        out[name] = ((gathered[0] - gathered[1]).abs().max().item(), (flat - start).abs().max().item())
    if rank == 0:
        queue.put(out)
    dist.destroy_process_group()


def test_two_ddp_processes_end_with_identical_parameters_for_every_optimizer():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(rank, port, queue)) for rank in range(2)]
    for p in procs:
        p.start()
    out = queue.get(timeout=240)
    for p in procs:
        p.join(timeout=60)
        assert p.exitcode == 0
    for name, (spread, moved) in out.items():
        assert spread == 0.0, f"{name}: ranks differ by {spread}"
        assert moved > 1e-4, f"{name}: parameters did not move"
