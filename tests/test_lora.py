"""LoRA through peft (nestlearn.lora): exact targets, the base at initialisation, only adapters train, merge, save and
load, export to Hugging Face after a merge."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys

import pytest
import torch

from nestlearn import presets
from nestlearn.config import LoRAConfig, ModelConfig
from nestlearn.lora import (
    add_lora,
    load_base,
    lora_parameters,
    lora_targets,
    mark_only_lora_trainable,
    merge_lora,
    parameter_counts,
)
from nestlearn.model import build, load

needs_peft = pytest.mark.skipif(importlib.util.find_spec("peft") is None, reason="needs peft: pip install '.[hf]'")
LORA = LoRAConfig(rank=4, alpha=8.0)


def with_lora(config: ModelConfig, lora: LoRAConfig = LORA) -> ModelConfig:
    return dataclasses.replace(config, lora=lora)


def tokens(vocab: int, t: int = 24, b: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (b, t), generator=torch.Generator().manual_seed(seed))


def adapted(model) -> set[str]:
    from peft.tuners.lora import LoraLayer

    return {name for name, m in model.named_modules() if isinstance(m, LoraLayer)}


def train(model, steps: int = 3, lr: float = 1e-2) -> None:
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    x = tokens(model.config.vocab_size, t=17)
    for _ in range(steps):
        loss, _ = model.loss(x)
        opt.zero_grad()
        loss.backward()
        opt.step()


# --- configuration ---


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"rank": 0}, "rank=0"), ({"alpha": 0.0}, "alpha=0.0"), ({"targets": ("qkv", "q_proj")}, "q_proj")],
)
def test_bad_config_names_the_value(kwargs, named):
    with pytest.raises(ValueError, match=named):
        LoRAConfig(**kwargs)
    with pytest.raises(ValueError, match=named):  # the same through a config read from JSON
        ModelConfig.from_dict({**presets.transformer("debug").to_dict(), "lora": kwargs})


def test_add_lora_needs_a_lora_config():
    with pytest.raises(ValueError, match="LoRAConfig"):
        add_lora(build(presets.transformer("debug")), {"rank": 4})


def test_missing_peft_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # `import peft` raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'nestlearn\[hf\]'"):
        build(with_lora(presets.transformer("debug")))


# --- targets ---


def _task(config: ModelConfig) -> ModelConfig:
    return dataclasses.replace(config, cms=dataclasses.replace(config.cms, signal="task"))


ATTN, MLP0, MLP2 = (
    ("mixer.qkv", "mixer.proj"),
    ("cms.levels.0.up", "cms.levels.0.down"),
    ("cms.levels.2.up", "cms.levels.2.down"),
)
TARGETED = [
    (presets.transformer("debug"), ATTN + MLP0),
    (presets.hope_attention("debug"), ATTN + MLP2),  # levels 0, 1 in context (local objective)
    (_task(presets.hope_attention("debug")), ATTN + MLP2),  # levels 0, 1 task-loss levels: up, down Parameters
    (presets.titans("debug"), MLP0),  # the Titans mixer has a qkv and an out.proj too
    (presets.hope("debug"), MLP2),
    (dataclasses.replace(presets.transformer("debug"), adapter="titans"), ATTN + MLP0),
    (dataclasses.replace(presets.transformer("debug"), adapter="sm_titans", adapter_blocks=1), ATTN + MLP0),
]

TARGETED_IDS = [
    "transformer",
    "hope_attention",
    "hope_attention-task",
    "titans",
    "hope",
    "titans-adapter",
    "sm_titans-adapter",
]


@needs_peft
@pytest.mark.parametrize(("config", "suffixes"), TARGETED, ids=TARGETED_IDS)
def test_targets_attention_and_swiglu_only(config, suffixes):
    """Titans / self-modifying Titans mixers and memory adapters (with their own qkv and out.proj) and in-context CMS
    levels are never adapted; every attention and outer SwiGLU projection is."""
    model = build(with_lora(config))
    want = {f"blocks.{i}.{s}" for i in range(config.num_layers) for s in suffixes}
    assert adapted(model) == want
    assert set(lora_parameters(model)) == {f"{n}.lora_{ab}.default.weight" for n in want for ab in "AB"}


@needs_peft
def test_targets_subset():
    model = build(with_lora(presets.hope_attention("debug"), LoRAConfig(rank=2, targets=("proj", "down"))))
    assert adapted(model) == {f"blocks.{i}.{m}" for i in range(2) for m in ("mixer.proj", "cms.levels.2.down")}


@needs_peft
def test_targets_that_match_nothing_are_refused():
    config = presets.hope_attention("debug")
    in_context = dataclasses.replace(config, cms=dataclasses.replace(config.cms, update_periods=(16, 128)))
    with pytest.raises(ValueError, match=r"targets=\('up', 'down'\) match no projection.*in-context"):
        build(with_lora(in_context, LoRAConfig(targets=("up", "down"))))
    with pytest.raises(ValueError, match=r"targets=\('qkv',\) match no projection.*'titans'"):
        build(with_lora(presets.titans("debug"), LoRAConfig(targets=("qkv",))))
    assert lora_targets(build(presets.titans("debug")), ("qkv", "proj")) == []


@needs_peft
def test_add_twice_and_merge_without_adapters_are_refused():
    model = build(with_lora(presets.transformer("debug")))
    with pytest.raises(ValueError, match="merge them first"):
        add_lora(model, LORA)
    plain = build(presets.transformer("debug"))
    with pytest.raises(ValueError, match="no LoRA adapters"):
        merge_lora(plain)
    with pytest.raises(ValueError, match="no LoRA adapters"):
        mark_only_lora_trainable(plain)


# --- initialisation, levels, training ---


@needs_peft
@pytest.mark.parametrize("preset", ["transformer", "hope_attention"])
def test_starts_equal_to_its_base(preset):
    config = presets.PRESETS[preset]("debug")
    base = build(config).eval()
    model = load_base(build(with_lora(config)), base.state_dict()).eval()
    assert any(".base_layer." in n for n in model.state_dict())  # peft renamed the adapted weights
    assert all(not p.any() for n, p in lora_parameters(model).items() if ".lora_B." in n)  # B = 0
    assert all(p.abs().sum() > 0 for n, p in lora_parameters(model).items() if ".lora_A." in n)
    x = tokens(config.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(x)[0], base(x)[0])
    # every parameter trains unless asked otherwise: peft's freezing of the base is undone
    assert all(p.requires_grad for p in model.parameters())


@needs_peft
def test_load_base_refuses_a_mismatched_state_dict():
    model = build(with_lora(presets.transformer("debug")))
    sd = build(presets.transformer("debug")).state_dict()
    del sd["blocks.1.mixer.qkv.weight"]
    with pytest.raises(ValueError, match=r"missing \['blocks.1.mixer.qkv.base_layer.weight'\]"):
        load_base(model, sd)
    sd = {**build(presets.transformer("debug")).state_dict(), "extra.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match=r"unexpected \['extra.weight'\]"):
        load_base(model, sd)


@needs_peft
def test_levels_put_lora_with_its_level():
    """An outer CMS level with a period keeps its adapters in its own group; every parameter is in one group."""
    config = presets.hope_attention("debug")
    config = dataclasses.replace(config, cms=dataclasses.replace(config.cms, update_periods=(16, 512, None)))
    model = build(with_lora(config))
    levels = model.levels()
    seen = [n for lv in levels for n in lv.params]
    assert sorted(seen) == sorted(n for n, _ in model.named_parameters())  # each exactly once
    by_name = {lv.name: lv for lv in levels}
    for i in range(config.num_layers):
        group = by_name[f"blocks.{i}.cms.levels.1"]
        assert group.period == 512
        assert set(group.params) == {f"blocks.{i}.cms.levels.1.{m}.{w}" for m in ("up", "down") for w in LORA_NAMES}
    assert any(".lora_" in n for n in by_name["base"].params)  # attention's and the period-None level's adapters


LORA_NAMES = ("base_layer.weight", "lora_A.default.weight", "lora_B.default.weight")


@needs_peft
@pytest.mark.parametrize("preset", ["transformer", "hope_attention"])
def test_only_lora_trains_when_marked(preset):
    model = build(with_lora(presets.PRESETS[preset]("debug")))
    mark_only_lora_trainable(model)
    lora = lora_parameters(model)
    trainable, frozen = parameter_counts(model)
    assert trainable == sum(p.numel() for p in lora.values())
    assert trainable + frozen == model.num_parameters()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train(model)
    for n, p in model.named_parameters():
        if n in lora:
            assert ".lora_A." in n or not torch.equal(p, before[n]), n  # every B has moved off zero
        else:
            assert torch.equal(p, before[n]), n  # the base bit-identical


@needs_peft
@pytest.mark.parametrize("preset", ["transformer", "hope_attention"])
def test_merge_equals_the_adapted_model(preset):
    config = presets.PRESETS[preset]("debug")
    model = build(with_lora(config))
    mark_only_lora_trainable(model)
    train(model)
    x = tokens(config.vocab_size)
    model.eval()
    with torch.no_grad():
        want = model(x)[0]
        merge_lora(model)
        got = model(x)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert model.config.lora is None and lora_parameters(model) == {}
    assert set(model.state_dict()) == set(build(config).state_dict())  # a plain model's names again
    assert not hasattr(model, "peft_config")


# --- checkpoints ---


@needs_peft
@pytest.mark.parametrize("preset", ["transformer", "hope_attention"])
def test_save_and_load_round_trip(preset, tmp_path):
    model = build(with_lora(presets.PRESETS[preset]("debug")))
    train(model, steps=2)
    model.save_pretrained(tmp_path)
    again = load(tmp_path)
    assert again.config == model.config and again.config.lora == LORA
    sd, sd2 = model.state_dict(), again.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = tokens(model.config.vocab_size)
    with torch.no_grad():
        assert torch.equal(again.eval()(x)[0], model.eval()(x)[0])


@needs_peft
def test_hf_export_after_merge_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    hf_config = transformers.LlamaConfig(
        vocab_size=100,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    torch.manual_seed(0)
    llama = transformers.LlamaForCausalLM(hf_config).eval()
    llama.save_pretrained(tmp_path / "llama")
    x = tokens(100)
    model = load(tmp_path / "llama").eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x)[0], llama(x).logits, rtol=1e-4, atol=1e-4)

    add_lora(model, LoRAConfig(rank=4, alpha=8.0))
    assert model.config.lora == LoRAConfig(rank=4, alpha=8.0)
    mark_only_lora_trainable(model)
    model.train()
    train(model)
    model.eval()
    with pytest.raises(ValueError, match=r"merge_lora"):
        model.save_pretrained(tmp_path / "refused", format="hf")
    with torch.no_grad():
        want = model(x)[0]
        assert not torch.allclose(want, llama(x).logits, atol=1e-3)  # the adapters changed the model
    merge_lora(model)
    model.save_pretrained(tmp_path / "out", format="hf")
    exported = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        torch.testing.assert_close(exported(x).logits, want, rtol=1e-4, atol=1e-4)
