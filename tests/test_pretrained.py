"""Pretrained models in and out: a Hugging Face Llama folder loads with transformers' logits and greedy tokens, exports
back exactly, stacks CMS levels (§7.3) and takes memory adapters on a frozen base, starting equal to its source.

A tiny random `LlamaForCausalLM` (grouped-query attention) and a BPE tokenizer trained here stand in for the real
weights; one test marked `network` checks SmolLM2-135M itself."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import pytest
import torch

import nestlearn
from nestlearn import pretrained
from nestlearn.checkpoint import load_checkpoint
from nestlearn.cli import main as cli
from nestlearn.data.tokenizer import train_bpe
from nestlearn.model import LanguageModel

transformers = pytest.importorskip("transformers", reason="the hf extra: pip install 'nestlearn[hf]'")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

TEXT = "The river runs to the sea. The sea is wide and the river is long. " * 40


def make_llama(folder: Path, tie: bool = True, seed: int = 0) -> Path:
    """A random Llama with grouped-query attention, its own BPE tokenizer and a text corpus beside it."""
    tokenizer = train_bpe([TEXT] * 4, 300)
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=64,
        intermediate_size=96,  # not a multiple of 32: the exact width must be kept
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        rope_theta=5000.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        eos_token_id=tokenizer.eos_id,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tokenizer.save(folder)
    return folder


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


def hf_logits(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    model = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(tokens).logits


def tokens_of(vocab: int, t: int = 40, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, vocab, (2, t), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("tie", [True, False])
def test_a_hf_llama_loads_with_transformers_logits_and_greedy_tokens(tmp_path, tie):
    folder = make_llama(tmp_path / "m", tie=tie)
    model = nestlearn.load(folder).eval()
    assert model.config.attention.kv_heads == 2 and model.config.tie_embeddings == tie
    x = tokens_of(model.config.vocab_size)
    want = hf_logits(folder, x)
    got, _ = model(x)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    greedy = ref.generate(x[:1, :6], max_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(x[:1, :6], 12), greedy)


def test_hf_to_nestlearn_to_hf_gives_identical_logits_in_transformers(llama, tmp_path):
    model = nestlearn.load(llama)
    model.save_pretrained(tmp_path / "out", format="hf")
    x = tokens_of(model.config.vocab_size)
    assert torch.equal(hf_logits(tmp_path / "out", x), hf_logits(llama, x))


def test_an_independent_cms_of_outer_levels_folds_into_one_wider_mlp(llama, tmp_path):
    source = nestlearn.load(llama)
    config = pretrained.stacked_config(source.config, "hope_attention", update_periods=(None, None))
    model = pretrained.initialise(nestlearn.build(config), source)
    with torch.no_grad():  # levels that differ, and weights that are not uniform
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    model.save_pretrained(tmp_path / "out", format="hf")
    x = tokens_of(model.config.vocab_size)
    want, _ = model(x)
    got = hf_logits(tmp_path / "out", x)
    assert json.loads((tmp_path / "out" / "config.json").read_text())["intermediate_size"] == 2 * 96
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (lambda c: dataclasses.replace(c, cms=dataclasses.replace(c.cms, variant="sequential")), "composition"),
        (lambda c: c, "in-context CMS levels"),
        (lambda c: dataclasses.replace(c, mixer="titans"), "token mixer"),
    ],
)
def test_export_refuses_what_llama_cannot_hold_and_writes_nothing(llama, tmp_path, change, why):
    source = nestlearn.load(llama)
    periods = (None, None) if why == "composition" else None
    model = nestlearn.build(change(pretrained.stacked_config(source.config, "hope_attention", update_periods=periods)))
    with pytest.raises(ValueError, match=why):
        model.save_pretrained(tmp_path / "out", format="hf")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("stack", pretrained.STACKS)
def test_stacked_levels_equal_the_source_at_start_and_stay_equal_at_zero_rate(llama, stack):
    source = nestlearn.load(llama)
    x = tokens_of(source.config.vocab_size, t=70)
    want, _ = source(x)
    for task_lr in (1e-2, 0.0):
        config = pretrained.stacked_config(source.config, "hope_attention", stack=stack)  # levels 16, 128, outer
        config = dataclasses.replace(config, cms=dataclasses.replace(config.cms, task_lr=task_lr))
        model = pretrained.initialise(nestlearn.build(config), source)
        assert sum(isinstance(lv, nestlearn.cms.TaskLevel) for lv in model.blocks[0].cms.levels) == 2
        got, _ = model(x)
        torch.testing.assert_close(got[:, :16], want[:, :16], atol=1e-5, rtol=0)  # before the first step
        if task_lr == 0:
            torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
        else:  # the levels do learn in context: later tokens read the stepped weights
            assert (got[:, 16:] - want[:, 16:]).abs().max() > 1e-4


@pytest.mark.parametrize("adapter", ["titans", "sm_titans"])
def test_a_memory_adapter_starts_as_its_base(llama, adapter):
    source = nestlearn.load(llama)
    config = dataclasses.replace(source.config, adapter=adapter, adapter_blocks=1)
    model = pretrained.initialise(nestlearn.build(config), source)
    assert model.blocks[0].adapter is None and model.blocks[1].adapter is not None
    x = tokens_of(source.config.vocab_size)
    torch.testing.assert_close(model(x)[0], source(x)[0], atol=0, rtol=0)
    trainable, frozen = pretrained.freeze(model, "base")
    assert frozen == source.num_parameters() and trainable == sum(
        p.numel() for p in model.blocks[1].adapter.parameters()
    )


def test_freeze_base_with_nothing_to_train_is_refused(llama):
    with pytest.raises(ValueError, match="nothing to train"):
        pretrained.freeze(nestlearn.load(llama), "base")


def test_a_titans_preset_cannot_start_from_a_transformer(llama):
    with pytest.raises(ValueError, match="adapter"):
        pretrained.stacked_config(nestlearn.load(llama).config, "hope")


def _train(llama: Path, out: Path, *flags: str) -> None:
    corpus = out.parent / "corpus.txt"
    corpus.write_text("\n\n".join(f"{TEXT[: 200 + i]} {i}" for i in range(300)))
    args = ["train", "--init", str(llama), "--data", str(corpus), "--out-dir", str(out), "--seq-len", "32"]
    args += ["--batch-size", "2", "--steps", "3", "--eval-every", "0", "--eval-tokens", "64", "--warmup-steps", "0"]
    assert cli([*args, "--no-progress", "--lr", "1e-2", "--data-root", str(out.parent / "cache"), *flags]) == 0


def test_training_with_a_frozen_base_leaves_every_base_weight_bit_identical(llama, tmp_path, capsys):
    _train(llama, tmp_path / "run", "--preset", "hope_attention", "--update-periods", "16,none")
    _train(llama, tmp_path / "frozen", "--preset", "transformer", "--adapter", "titans", "--freeze", "base")
    assert "trainable" in capsys.readouterr().err
    source = dict(nestlearn.load(llama).named_parameters())
    model, tokenizer = load_checkpoint(tmp_path / "frozen")
    for name, p in model.named_parameters():
        if ".adapter." in name:
            continue
        assert torch.equal(p, source[name]), name
    assert any(
        not torch.equal(p, nestlearn.build(model.config).state_dict()[n])
        for n, p in model.named_parameters()
        if ".adapter." in n and "out.proj" in n
    )
    assert tokenizer.to_json() == load_checkpoint(llama)[1].to_json()  # its own tokenizer, saved with the run


def test_lora_from_a_pretrained_start_trains_only_its_factors_and_exports_merged(llama, tmp_path, capsys):
    _train(llama, tmp_path / "lora", "--preset", "transformer", "--lora-rank", "4", "--freeze", "base")
    _train(llama, tmp_path / "hope", "--preset", "hope_attention", "--update-periods", "16,none", "--steps", "1")
    source = dict(nestlearn.load(llama).named_parameters())
    model, _ = load_checkpoint(tmp_path / "lora")
    assert model.config.lora.rank == 4 and model.config.lora.alpha == 8.0
    factors = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert factors and any(p.abs().sum() > 0 for n, p in factors.items() if "lora_B" in n)  # B moved off zero
    for name, p in model.named_parameters():
        if name not in factors:
            assert torch.equal(p, source[name.replace(".base_layer", "")]), name
    with pytest.raises(ValueError, match="merge them first"):  # as a source, its adapted weights would be lost
        pretrained.stacked_config(model.config, "hope_attention")
    assert cli(["export", str(tmp_path / "lora"), str(tmp_path / "hf")]) == 0  # LoRA merged on the way out
    x = tokens_of(model.config.vocab_size)
    torch.testing.assert_close(hf_logits(tmp_path / "hf", x), model(x)[0], atol=1e-4, rtol=1e-4)
    assert cli(["export", str(tmp_path / "hope"), str(tmp_path / "hf2")]) != 0  # no Llama layout: refused
    assert "in-context CMS levels" in capsys.readouterr().err and not (tmp_path / "hf2").exists()


def test_eval_reads_a_hf_folder_with_its_own_tokenizer(llama, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"{TEXT[: 200 + i]} {i}" for i in range(300)))
    args = ["eval", str(llama), "--data", str(corpus), "--split", "validation", "--seq-len", "64", "--no-progress"]
    assert cli([*args, "--data-root", str(tmp_path / "cache")]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] > 0 and 0 < result["bits_per_byte"] < 10


def test_generate_prints_text_from_a_hf_folder(llama, capsys):
    assert cli(["generate", str(llama), "--prompt", "The river", "--max-new-tokens", "5"]) == 0
    assert capsys.readouterr().out.startswith("The river")


def test_bad_model_folders_are_named_and_nothing_is_written(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder"):
        nestlearn.load(tmp_path / "missing")
    other = tmp_path / "gpt2"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2"}))
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*LlamaForCausalLM"):
        nestlearn.load(other)
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in llama.iterdir():
        (broken / f.name).write_bytes(f.read_bytes())
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="corrupt or truncated"):
        nestlearn.load(broken)
    mismatch = tmp_path / "mismatch"
    mismatch.mkdir()
    for f in llama.iterdir():
        (mismatch / f.name).write_bytes(f.read_bytes())
    train_bpe([TEXT * 8 + "zebra quartz jukebox " * 50], 400).save(mismatch)
    with pytest.raises(ValueError, match="do not belong together"):
        load_checkpoint(mismatch)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["broken", "gpt2", "mismatch"]


def test_train_refuses_a_bad_init_before_writing_anything(llama, tmp_path, capsys):
    out = tmp_path / "run"
    for folder, preset, said in ((tmp_path, "transformer", "not a model folder"), (llama, "hope", "adapter")):
        with pytest.raises(SystemExit):
            cli(["train", "--init", str(folder), "--preset", preset, "--out-dir", str(out)])
        assert said in capsys.readouterr().err and not out.exists()


def test_a_nestlearn_transformer_is_a_source_too(tmp_path):
    source = nestlearn.build(nestlearn.presets.transformer("debug"))
    source.save_pretrained(tmp_path / "t")
    config = pretrained.stacked_config(pretrained.source_config(tmp_path / "t"), "hope_attention")
    model = pretrained.initialise(nestlearn.build(config), source)
    x = tokens_of(256, t=16)
    torch.testing.assert_close(model(x)[0], source(x)[0], atol=1e-5, rtol=0)
    assert isinstance(model, LanguageModel)


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("NESTLEARN_TEST_NETWORK") != "1", reason="set NESTLEARN_TEST_NETWORK=1")
def test_smollm2_converted_matches_transformers_greedy(tmp_path):
    from nestlearn.data.weights import fetch_model

    folder = fetch_model("smollm2-135m", progress=False)
    model, tokenizer = load_checkpoint(folder)
    prompt = torch.tensor([tokenizer.encode("The capital of France is")])
    ref = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        want = ref(prompt).logits
    got, _ = model(prompt)
    assert (got - want).abs().max() <= 1e-4 * want.abs().max()
    greedy = ref.generate(prompt, max_new_tokens=8, do_sample=False)
    out = model.generate(prompt, 8)
    assert torch.equal(out, greedy) and "Paris" in tokenizer.decode(out[0].tolist())
