"""The language model's contract, for every preset at debug size: causality, batch isolation, streaming,
generation, gradients to every parameter, sizes, checkpoints, levels and config errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from nestlearn import AttentionConfig, CMSConfig, ModelConfig, SelfModConfig, TitansConfig, build, load, presets
from nestlearn.model import tree_map

PRESETS = sorted(presets.PRESETS)
VARIANTS = {
    **{name: presets.PRESETS[name]("debug") for name in PRESETS},
    # the local-objective in-context levels, the presets' default before task-loss levels (eq. 71) became it
    "hope_attention-local": presets.hope_attention("debug", signal="local"),
    "transformer-window": ModelConfig(attention=AttentionConfig(window=5), name="window"),
    "titans-dgd-snapshot": ModelConfig(mixer="titans", titans=TitansConfig(rule="dgd", read="snapshot", chunk_size=4)),
    "titans-no-momentum": ModelConfig(mixer="titans", titans=TitansConfig(momentum=False, chunk_size=4)),
    "cms-independent": ModelConfig(cms=CMSConfig(update_periods=(8, 32, None), variant="independent")),
    "cms-nested": ModelConfig(cms=CMSConfig(update_periods=(4, 8, None), variant="nested")),
    "hope-adaptive-q-gd": ModelConfig(
        mixer="sm_titans",
        sm_titans=SelfModConfig(adaptive_q=True, rule="gd", chunk_size=4, memory_chunk_size=8),
        cms=CMSConfig(update_periods=(4, None)),
    ),
}


def model_of(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return build(VARIANTS[name]).double()


def tokens(b=2, t=37, seed=0, vocab=256):
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("t", [0, 5, 21])  # 5 and 21 sit inside chunks of 16 (and of 4)
def test_logits_at_t_ignore_later_tokens(name, t):
    model = model_of(name)
    x = tokens()
    y, _ = model(x)
    x2 = x.clone()
    x2[:, t + 1 :] = tokens(seed=1)[:, t + 1 :]
    y2, _ = model(x2)
    torch.testing.assert_close(y2[:, : t + 1], y[:, : t + 1], rtol=0, atol=1e-10)
    assert not torch.allclose(y2[:, t + 1 :], y[:, t + 1 :])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_sequences_in_a_batch_do_not_interact(name):
    model = model_of(name)
    x = tokens(b=3)
    y, _ = model(x)
    x2 = x.clone()
    x2[1] = tokens(b=1, seed=2)[0]
    y2, _ = model(x2)
    torch.testing.assert_close(y2[[0, 2]], y[[0, 2]], rtol=0, atol=1e-10)
    assert not torch.allclose(y2[1], y[1])


@pytest.mark.parametrize("name", list(VARIANTS))
def test_streaming_with_carried_state_equals_one_call(name):
    model = model_of(name)
    x = tokens()
    y, _ = model(x)
    pieces, state = [], None
    for lo, hi in [(0, 7), (7, 8), (8, 30), (30, 37)]:
        y_part, state = model(x[:, lo:hi], state)
        pieces.append(y_part)
    torch.testing.assert_close(torch.cat(pieces, dim=1), y, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_generate_equals_argmax_of_parallel_forward(name):
    model = model_of(name)
    prompt = tokens(t=6)
    out = model.generate(prompt, max_new_tokens=20, temperature=0.0)
    assert out.shape == (2, 26) and torch.equal(out[:, :6], prompt)
    logits, _ = model(out[:, :-1])
    torch.testing.assert_close(out[:, 6:], logits[:, 5:].argmax(-1))


def state_numel(state) -> int:
    total = []
    tree_map(lambda x: total.append(x.numel()), state.layers)
    return sum(total)


@pytest.mark.parametrize(
    ("name", "constant"),
    [("titans", True), ("hope", True), ("transformer-window", True), ("transformer", False), ("hope_attention", False)],
)
def test_decoding_state_is_constant_for_recurrent_mixers(name, constant):
    model = model_of(name)
    _, state = model(tokens(b=1, t=8))
    sizes = []
    for _ in range(3):
        for _ in range(10):
            _, state = model(tokens(b=1, t=1), state)
        sizes.append(state_numel(state))
    assert (len(set(sizes)) == 1) == constant, sizes


@pytest.mark.parametrize("name", list(VARIANTS))
def test_every_parameter_gets_a_finite_nonzero_gradient(name):
    model = model_of(name)
    # an in-context level's writes are read only from its next period on: run past the slowest one
    periods = [p for p in model.config.cms.update_periods if p is not None and p < model.config.cms.outer_from]
    loss, _ = model.loss(tokens(t=max([40, *periods]) + 9))
    loss.backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None, f"{pname} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{pname} has a non-finite gradient"
        assert p.grad.abs().sum() > 0, f"{pname} has a zero gradient"


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_trains_and_decodes_under_bf16_autocast(preset):
    # `--precision bf16` (the default on GPU) runs the model under autocast; the memories then get a mix of float32
    # and bfloat16 inputs and must still run, in float32 (memory.scan). CPU autocast takes the same path as CUDA's.
    torch.manual_seed(0)
    model = build(presets.PRESETS[preset]("debug"))
    x = tokens(t=140)  # past the slowest in-context level (128), so that every parameter is used
    ref, _ = model.loss(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss, state = model.loss(x)
        loss.backward()  # inside too: the memories' hand-written backward must not be autocast
    assert abs(loss.item() - ref.item()) < 0.02 * ref.item(), (loss.item(), ref.item())
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, pname
    memories = []
    tree_map(lambda t: memories.append(t) if t.dim() == 4 else None, state.layers)  # (b, h, out, in) fast weights
    assert preset == "transformer" or memories and all(t.dtype == torch.float32 for t in memories)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model.generate(x[:1, :9], max_new_tokens=4)
    assert out.shape == (1, 13)


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_runs_where_its_parameters_are(preset):
    # on the meta device (shapes, no values): a tensor made on a fixed device anywhere in the forward, backward or
    # decoding path would meet meta tensors and raise. CI's stand-in for a GPU, which it does not have.
    with torch.device("meta"):
        model = build(presets.PRESETS[preset]("debug"))
    x = torch.randint(0, 256, (2, 140), device="meta")  # past the slowest in-context level: every parameter used
    loss, state = model.loss(x)
    loss.backward()
    assert all(p.grad is not None and p.grad.device.type == "meta" for p in model.parameters())
    assert model.generate(x[:1, :5], max_new_tokens=2).shape == (1, 7)


@pytest.mark.parametrize("preset", PRESETS)
@pytest.mark.parametrize("size", ["mini", "tiny", "170m", "340m", "760m", "1.3b"])
def test_named_sizes_are_within_ten_percent(preset, size):
    target = presets.SIZES[size][-1]
    with torch.device("meta"):
        n = build(presets.PRESETS[preset](size)).num_parameters()
    assert abs(n - target) <= 0.1 * target, f"{preset}({size!r}) has {n / 1e6:.1f}M parameters"


@pytest.mark.parametrize("name", PRESETS)
def test_save_then_load_gives_identical_logits(name, tmp_path):
    model = build(presets.PRESETS[name]("debug"))
    x = tokens()
    model.save_pretrained(tmp_path / "ckpt")
    loaded = load(tmp_path / "ckpt")
    assert loaded.config == model.config
    torch.testing.assert_close(loaded(x)[0], model(x)[0], rtol=0, atol=0)


def test_loading_a_missing_checkpoint_says_what_is_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json does not exist"):
        load(tmp_path)


def test_levels_cover_every_parameter_once():
    model = build(ModelConfig(cms=CMSConfig(update_periods=(1024, 4096, None)), seq_len=512))
    levels = model.levels()
    names = [n for lv in levels for n in lv.params]
    assert sorted(names) == sorted(n for n, _ in model.named_parameters())
    assert [lv.period for lv in levels] == [1024, 1024, 4096, 4096, None]  # 2 blocks × 2 outer levels, then base


@pytest.mark.parametrize(
    ("make", "match"),
    [
        (lambda: ModelConfig(dim=65), r"ModelConfig.dim=65: must be divisible by num_heads=4"),
        (lambda: ModelConfig(num_layers=0), r"ModelConfig.num_layers=0: must be a positive int"),
        (lambda: ModelConfig(mixer="mamba"), r"ModelConfig.mixer='mamba': expected one of"),
        (lambda: SelfModConfig(chunk_size=8, memory_chunk_size=12), r"memory_chunk_size=12: must be a multiple"),
        (lambda: CMSConfig(update_periods=(4096, 1024)), r"fastest first"),
        (lambda: CMSConfig(variant="stacked"), r"CMSConfig.variant='stacked'.*'nested' \(eq. 72\)"),
        (lambda: TitansConfig(chunk_size=0), r"TitansConfig.chunk_size=0: must be a positive int"),
        (lambda: TitansConfig(rule="adam"), r"TitansConfig.rule='adam'"),
        (lambda: SelfModConfig(max_lr=2.0, lr_init=2.0), r"SelfModConfig.lr_init=2.0: must lie strictly between 0"),
        (lambda: TitansConfig(lr_init=0.0), r"TitansConfig.lr_init=0.0: must lie strictly between"),
        (lambda: AttentionConfig(window=0), r"AttentionConfig.window=0"),
        (lambda: presets.transformer("huge"), r"size='huge' is not known"),
        (lambda: ModelConfig.from_dict({"dims": 3}), r"unknown ModelConfig fields \['dims'\]"),
    ],
)
def test_invalid_configs_raise_errors_naming_the_field(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_tokens_are_refused():
    model = build(presets.transformer("debug"))
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, vocab_size=256\)"):
        model(torch.tensor([[1, 300]]))
    with pytest.raises(ValueError, match=r"tokens must be an int64 tensor of shape \(batch, time\)"):
        model(torch.zeros(3))


def _chunk_update(level, h: torch.Tensor, start: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The level's weights after one chunk of inputs h (1, C, dim), from `start`, written out independently of
    nestlearn's scan: per token t, the gradient of ℓ_t = ½‖M(k_t) − v_t‖² at the chunk's starting weights (plain
    autograd, M(x) = x + W₁ gelu(W₂x) per head), clipped to the level's max_grad_norm over both layers of each head,
    then retention towards M_0 token by token: M_end = M_0 + (Π α)(M_start − M_0) − Σ_t (Π_{s>t} α_s) η_t g_t."""
    H, d = level.num_heads, level.head_dim
    with torch.no_grad():
        k = torch.nn.functional.normalize(h[0].view(-1, H, d), dim=-1)  # (C, H, d)
        v = level.value(h[0]).view(-1, H, d)
        gates = level.gates(h[0]).view(-1, 2, H)
        eta, alpha = level.max_lr * torch.sigmoid(gates[:, 0]), torch.sigmoid(gates[:, 1])  # (C, H)
    origin = {"W1": level.W1.detach(), "W2": level.W2.detach()}
    end = {n: origin[n] + alpha.prod(0)[:, None, None] * (start[n] - origin[n]) for n in start}
    for t in range(h.shape[1]):
        w = {n: x.clone().requires_grad_(True) for n, x in start.items()}
        hidden = torch.nn.functional.gelu(torch.einsum("hfd,hd->hf", w["W2"], k[t]))
        pred = k[t] + torch.einsum("hdf,hf->hd", w["W1"], hidden)  # M(k_t) per head
        g1, g2 = torch.autograd.grad(0.5 * (pred - v[t]).pow(2).sum(), [w["W1"], w["W2"]])
        norm = (g1.pow(2).sum((1, 2)) + g2.pow(2).sum((1, 2))).sqrt()  # (H,)
        clip = (level.max_grad_norm / norm).clamp(max=1.0) if level.max_grad_norm else torch.ones_like(norm)
        c = (alpha[t + 1 :].prod(0) * eta[t] * clip)[:, None, None]  # (H, 1, 1)
        end["W1"], end["W2"] = end["W1"] - c * g1, end["W2"] - c * g2
    return end


def test_in_context_level_changes_exactly_at_its_period_by_its_chunks_summed_update():
    model = model_of("hope_attention-local")  # local levels written every 16 and 128 tokens, then one outer level
    level = model.blocks[0].cms.levels[0]  # the level of period 16
    inputs = []
    level.register_forward_pre_hook(lambda _, args: inputs.append(args[0].detach().clone()))
    x = tokens(b=1, t=40)
    state, seen, weights = None, [], []
    for t in range(40):
        _, state = model(x[:, t : t + 1], state)
        st = state.layers[0]["cms"][0]
        seen.append((st.snapshot if st.offset else st.weights)["W1"].clone())  # what its reads use
        weights.append({n: w[0].detach().clone() for n, w in st.weights.items()})  # (H, ·, ·)
    changed = [t for t in range(1, 40) if not torch.equal(seen[t], seen[t - 1])]
    assert changed == [15, 31]  # after the 16th and 32nd token: the next token reads the new weights
    # by how much: each chunk's change is its summed update from the weights it started from
    h = torch.cat(inputs, dim=1)  # (1, 40, dim), the level's input at every token
    start = {"W1": level.W1.detach(), "W2": level.W2.detach()}
    for lo in (0, 16):
        want = _chunk_update(level, h[:, lo : lo + 16], start)
        got = weights[lo + 15]
        for n in want:
            assert (got[n] - start[n]).abs().max() > 1e-6  # the chunk really wrote
            torch.testing.assert_close(got[n], want[n], rtol=0, atol=1e-12)
        start = got


def test_a_nested_level_returns_to_its_initial_state_when_the_slower_level_updates():
    # eq. 72: periods 4 and 16; the fast level restarts from θ_0 at tokens 16, 32, ... of the stream
    torch.manual_seed(0)
    cms = build(ModelConfig(cms=CMSConfig(update_periods=(4, 16, None), variant="nested"))).blocks[0].cms.double()
    fast = cms.levels[0]
    x = torch.randn(2, 23, 64, dtype=torch.float64)
    state = cms.init_state(2)
    y_a, state = cms(x[:, :10], state)  # a cut inside the first reset period, and inside a chunk
    y_b, state = cms(x[:, 10:], state)
    assert state["position"] == 23
    _, restarted = fast(x[:, 16:], fast.init_state(2))  # the fast level's input is x itself: it comes first
    for name, w in restarted.weights.items():
        torch.testing.assert_close(state["levels"][0].weights[name], w, rtol=0, atol=1e-12)
    y, _ = cms(x, cms.init_state(2))
    torch.testing.assert_close(torch.cat([y_a, y_b], dim=1), y, rtol=0, atol=1e-12)
    sequential = build(ModelConfig(cms=CMSConfig(update_periods=(4, 16, None)))).blocks[0].cms.double()
    sequential.load_state_dict(cms.state_dict())
    y_seq, _ = sequential(x, sequential.init_state(2))
    assert torch.equal(y_seq[:, :16], y[:, :16]) and not torch.allclose(y_seq[:, 16:], y[:, 16:])
    with pytest.raises(ValueError, match="4 does not divide 6"):
        CMSConfig(update_periods=(4, 6, None), variant="nested")


def test_an_outer_level_started_from_an_mlp_computes_that_mlp():
    # paper §7.3: MLP_0^(f_i) = a pre-trained MLP; η → 0 then recovers the pre-trained model
    model = build(ModelConfig(cms=CMSConfig(update_periods=(None,))))
    level = model.blocks[0].cms.levels[0]
    hidden, dim = level.down.in_features, level.down.out_features
    gate, up, down = torch.randn(hidden, dim), torch.randn(hidden, dim), torch.randn(dim, hidden)
    level.load_mlp(gate, up, down)
    x = torch.randn(3, dim)
    want = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(level(x), want)
    with pytest.raises(ValueError, match=r"gate has shape \(3, 64\); this level expects"):
        level.load_mlp(torch.randn(3, dim), up, down)


@pytest.mark.parametrize("name", ["hope", "hope_attention", "titans"])
def test_checkpointed_memories_give_the_same_loss_and_gradients(name):
    # 70 tokens from a stream cut mid-chunk: 5 pieces of the self-modifying loop, checkpointed in groups of 3 and 2
    results = []
    for checkpoint in (False, True):
        config = presets.PRESETS[name]("debug")
        for sub in (config.sm_titans, config.titans, config.cms):
            if sub is not None:
                sub.checkpoint = checkpoint
        torch.manual_seed(0)
        model = build(config).double()
        _, state = model(tokens(t=5))
        loss, _ = model.loss(tokens(t=71, seed=3), state)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()]))  # None: no completed write yet
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=1e-12)
    for a, b in zip(grads_a, grads_b, strict=True):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.slow  # compiles (about 40 s on 2 cores; the Titans path is tested on `scan` in test_memory_equivalence)
def test_compiled_chunks_give_the_same_loss_and_gradients_as_eager():
    # Hope on a stream cut mid-chunk, so that eager pieces (the first and last) and compiled whole chunks both run
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build(presets.hope("debug")).compile_chunks(compiled)
        _, state = model(tokens(t=5))
        loss, state = model.loss(tokens(t=71, seed=3), state)
        loss.backward()
        results.append((loss.detach(), [p.grad for p in model.parameters()], state.detach()))
    (loss_a, grads_a, state_a), (loss_b, grads_b, state_b) = results
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-5, atol=1e-6)  # float32: fused kernels round differently
    for a, b in zip(grads_a, grads_b, strict=True):
        if a is None:  # no completed write of the slow level yet: eager has no gradient, the compiled graph zeros
            assert b is None or not b.any()
        else:
            torch.testing.assert_close(b, a, rtol=1e-3, atol=1e-6)
    flat_a, flat_b = [], []  # the carried states agree as well
    tree_map(flat_a.append, state_a.layers)
    tree_map(flat_b.append, state_b.layers)
    for a, b in zip(flat_a, flat_b, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_compiled_chunks_train_under_bf16_autocast():
    # `nestlearn train --compile` on a GPU (bf16 by default): the compiled graphs must keep the memories in float32,
    # the transition's hand-written backward included, and agree with eager under the same autocast
    results = []
    for compiled in (False, True):
        torch.manual_seed(0)
        model = build(presets.hope("debug")).compile_chunks(compiled)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss, _ = model.loss(tokens(t=65, seed=3))
            loss.backward()
        results.append(loss.item())
    assert results[1] == pytest.approx(results[0], rel=1e-3), results


@pytest.mark.parametrize("preset", ["titans", "hope"])
def test_lr_init_sets_the_initial_inner_learning_rate(preset):
    config = presets.PRESETS[preset]("debug")
    mixer = config.titans if preset == "titans" else config.sm_titans
    default = build(config).blocks[0].mixer
    mixer.max_lr, mixer.lr_init = 2.0, 0.05
    model = build(config).blocks[0].mixer
    if preset == "titans":
        bias, old = model.gates.bias.view(model.num_gates, -1)[0], default.gates.bias.view(default.num_gates, -1)[0]
    else:
        bias, old = model.readout_bias[0], default.readout_bias[0]
    torch.testing.assert_close(2.0 * torch.sigmoid(bias), torch.full_like(bias, 0.05))
    torch.testing.assert_close(torch.sigmoid(old), torch.full_like(old, 0.5))  # None: η starts at max_lr / 2


@pytest.mark.parametrize("preset", sorted(presets.PRESETS))
def test_the_training_length_does_not_change_the_architecture(preset):
    # a level's kind (in-context or outer) comes from its config, fixed when the config is made: training at
    # --seq-len 64 must not turn Hope's period-128 level into a SwiGLU level, and a checkpoint trained at one
    # length must load and run at another
    import dataclasses

    from nestlearn.train import TrainConfig, model_config_of

    def shapes(config):
        return {n: tuple(p.shape) for n, p in build(config).named_parameters()}

    config = getattr(presets, preset)("debug")
    want = shapes(config)
    assert shapes(dataclasses.replace(config, seq_len=64)) == want
    assert shapes(model_config_of(TrainConfig(preset=preset, size="debug", seq_len=64), 256)) == want
    assert shapes(model_config_of(TrainConfig(preset=preset, size="debug", seq_len=4096), 256)) == want
    assert ModelConfig.from_dict(dataclasses.replace(config, seq_len=64).to_dict()).cms.outer_from == 256
    old = config.to_dict()
    del old["cms"]["outer_from"]  # a config saved before outer_from: its seq_len decided, as it did then
    assert ModelConfig.from_dict(old).cms.outer_from == config.seq_len


@pytest.mark.parametrize("eta_bias, alpha_bias, moves", [(-30.0, 30.0, False), (30.0, -30.0, True)])
def test_self_modifying_titans_reads_eta_and_alpha_from_their_own_readouts(eta_bias, alpha_bias, moves):
    # readout_bias[0] is η's (the learning rate), readout_bias[1] α's (retention). η ≈ 0 and α ≈ 1 must leave
    # every generating memory and M_memory exactly where it started (no write, no decay); swapped, η = max_lr and
    # α ≈ 0 rewrite them. A swap of the two read-outs fails the first case.
    from nestlearn.sm_titans import SelfModifyingTitans

    torch.manual_seed(0)
    layer = SelfModifyingTitans(32, 2, SelfModConfig(momentum=False, retain_to="zero"))
    with torch.no_grad():
        layer.readout.zero_()
        layer.readout_bias[0].fill_(eta_bias)
        layer.readout_bias[1].fill_(alpha_bias)
    _, state = layer(torch.randn(1, 32, 32), layer.init_state(1))
    for name, start in (
        ("gen", {"W1": layer.gen_W1, "W2": layer.gen_W2}),
        ("memory", {"W1": layer.mem_W1, "W2": layer.mem_W2}),
    ):
        for k, w0 in start.items():
            change = (state[name].weights[k] - w0).norm() / w0.norm()
            assert (change > 0.5) if moves else (change < 1e-6), (name, k, change.item())


def test_a_window_set_after_loading_equals_one_built_in():
    config = presets.transformer("debug")
    torch.manual_seed(0)
    full = build(config)
    windowed = build(dataclasses.replace(config, attention=dataclasses.replace(config.attention, window=8)))
    windowed.load_state_dict(full.state_dict())
    x = torch.randint(0, config.vocab_size, (2, 40))
    torch.testing.assert_close(full.set_window(8)(x)[0], windowed(x)[0], rtol=0, atol=0)
    assert full.config.attention.window == 8
    assert not torch.allclose(full.set_window(None)(x)[0], windowed(x)[0])  # full attention again
    with pytest.raises(ValueError, match="window"):
        full.set_window(0)
    with pytest.raises(ValueError, match="no attention layer"):
        build(presets.titans("debug")).set_window(8)
