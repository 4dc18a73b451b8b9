"""A pretrained base in `nestlearn continual` and `nestlearn memorize`: every strategy starts from a tiny Llama with
its tokenizer and its logits; lora, adapter and cms-levels train their pathway only (the base bit-identical), resume
exactly with the base still frozen; memorize --lora-rank learns through the LoRA factors only and saves a folder that
loads back with them. Bad settings are refused naming the fix."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import nestlearn
from nestlearn.checkpoint import load_checkpoint
from nestlearn.cli import main as cli
from nestlearn.evals import continual
from nestlearn.evals.continual import ContinualConfig, make_model, make_stream, run

from .test_continual import corpus, small

pytest.importorskip("transformers", reason="the hf extra: pip install 'nestlearn[hf]'")
pytest.importorskip("peft", reason="the hf extra: pip install 'nestlearn[hf]'")

from .test_interrupt import _signal_on_call  # noqa: E402
from .test_pretrained import TEXT, make_llama  # noqa: E402


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> Path:
    return make_llama(tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="module")
def langs(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("langs")
    return [corpus(root, "aaa", ["ab", "ba", "abba", "baab"]), corpus(root, "xyz", ["xy", "zyx", "yzzy", "xz"])]


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def pretrained_run(llama, langs, cache, **fields) -> ContinualConfig:
    return small(tasks=langs, init=str(llama), data_root=cache, **{"preset": None, **fields})


@pytest.fixture(scope="module")
def finetuned(llama, langs, cache) -> dict:
    return run(pretrained_run(llama, langs, cache, strategy="finetune"))


# the strategy's own settings, and what must train: every other parameter is the frozen base
FROZEN = {
    "lora": ({"lora_rank": 4}, lambda n: ".lora_" in n),
    "adapter": ({"adapter": "titans", "adapter_blocks": 1}, lambda n: ".adapter." in n),
    "sm_titans adapter": ({"strategy": "adapter", "adapter": "sm_titans"}, lambda n: ".adapter." in n),
    # 64 ≥ seq_len 32: an outer level stepped every other step; 'none' is the MLP stepped every step, frozen
    "cms-levels": ({"update_periods": "64,none"}, lambda n: ".cms.levels.0." in n or n.endswith("agg_logits")),
}


@pytest.mark.parametrize("name", list(FROZEN))
def test_a_pathway_on_a_frozen_pretrained_base_trains_alone_and_starts_as_the_base(
    llama, langs, cache, finetuned, tmp_path, name
):
    fields, trains = FROZEN[name]
    config = pretrained_run(llama, langs, cache, **{"strategy": name, **fields})
    start, tokenizer = make_model(config)
    assert tokenizer.to_json() == load_checkpoint(llama)[1].to_json()  # the model's own tokenizer, not bytes
    result = run(config, tmp_path / "progress.pt")
    after = torch.load(tmp_path / "progress.pt", weights_only=True)["model"]
    assert np.isfinite(result["R"]).all() and np.asarray(result["R"]).shape == (2, 2)
    # the same untrained scores as the pretrained model itself: every pathway starts as the identity
    np.testing.assert_allclose(result["baseline"], finetuned["baseline"], rtol=1e-6)
    moved = set()
    for n, p in start.named_parameters():
        assert p.requires_grad == trains(n), n
        if not trains(n):
            assert torch.equal(after[n], p.detach()), f"frozen {n} changed"
        elif not torch.equal(after[n], p.detach()):
            moved.add(n)
    assert moved, "nothing trained"
    trainable = sum(p.numel() for n, p in start.named_parameters() if trains(n))
    assert result["trainable_params"] == trainable and result["frozen_params"] == start.num_parameters() - trainable
    assert result["frozen_params"] >= nestlearn.load(llama).num_parameters()  # the whole source is frozen


def test_the_stream_is_read_with_the_pretrained_models_tokenizer(llama, langs, cache):
    _, tokenizer = make_model(pretrained_run(llama, langs, cache, strategy="finetune"))
    task = make_stream("languages", langs[:1], cache, 32, tokenizer=tokenizer)[0]
    text = (Path(langs[0]) / "train.txt").read_text()
    assert tokenizer.vocab_size != 257 and int(task.train.max()) < tokenizer.vocab_size
    assert len(task.train) < len(text.encode())  # BPE tokens, fewer than the bytes
    assert tokenizer.decode(task.train[:50].tolist()) in text


def test_the_class_incremental_stream_reads_with_the_pretrained_tokenizer_too(llama, tmp_path):
    from nestlearn.data.corpora import BBC_CLASSES, write_documents

    for split, n in (("train", 20), ("validation", 10), ("test", 10)):
        docs = [f"{BBC_CLASSES[i % 5]}\n" + " ".join([BBC_CLASSES[i % 5][:3]] * 20) for i in range(n)]
        write_documents(tmp_path / "bbc" / f"{split}.txt", docs)
    config = small(stream="bbc", tasks=[str(tmp_path / "bbc")], init=str(llama), strategy="lora", steps_per_task=1)
    _, tokenizer = make_model(config)
    task = make_stream("bbc", config.tasks, None, 32, tokenizer=tokenizer)[0]
    x, mask = task.batch(np.random.default_rng(0), 2, 32)
    answer = tokenizer.encode(f" {task.train_labels[0]}\n")
    assert task.tokenizer is tokenizer and int(mask[0].sum()) == len(answer)
    R = np.asarray(run(config)["R"])
    assert R.shape == (5, 5) and R[0, 0] == 1.0


@pytest.mark.parametrize("strategy", ["ewc", "replay", "levels"])
def test_the_older_strategies_start_from_the_pretrained_model_too(llama, langs, cache, finetuned, strategy):
    extra = {"preset": "hope_attention", "update_periods": "64,none"} if strategy == "levels" else {}
    result = run(pretrained_run(llama, langs, cache, strategy=strategy, **extra))
    np.testing.assert_allclose(result["baseline"], finetuned["baseline"], rtol=1e-6)
    assert result["frozen_params"] == 0 and np.asarray(result["R"])[0, 0] < result["baseline"][0]


def interrupted_and_resumed(config, tmp_path, monkeypatch, step: str) -> tuple[dict, dict]:
    """A whole run, and the same run stopped by SIGINT in its fifth call of `step` (task 2, its second step) and
    resumed from cut.pt."""
    whole = run(config, tmp_path / "whole.pt")
    monkeypatch.setattr(continual, step, _signal_on_call(5)(getattr(continual, step)))
    with pytest.raises(continual.Interrupted, match="at step 2 of 3 of task 2/2"):
        run(config, tmp_path / "cut.pt")
    monkeypatch.undo()
    return whole, run(config, tmp_path / "cut.pt")


def test_an_interrupted_lora_run_resumes_exactly_with_its_base_still_frozen(llama, langs, cache, tmp_path, monkeypatch):
    config = pretrained_run(llama, langs, cache, strategy="lora")
    assert config.lora_rank == 8 and config.lora_alpha == 16.0  # the documented defaults
    whole, resumed = interrupted_and_resumed(config, tmp_path, monkeypatch, "_loss")
    assert resumed["R"] == whole["R"] and resumed["losses"] == whole["losses"]
    assert resumed["trainable_params"] == whole["trainable_params"]
    base = dict(make_model(config)[0].named_parameters())
    final = torch.load(tmp_path / "cut.pt", weights_only=True)["model"]
    assert all(torch.equal(final[n], p) for n, p in base.items() if ".lora_" not in n)
    with pytest.raises(ValueError, match="lora_rank: 8 there, 4 now"):
        run(dataclasses.replace(config, lora_rank=4, lora_alpha=None), tmp_path / "cut.pt")


def test_cms_levels_step_the_outer_level_at_its_period_only(llama, langs, cache, monkeypatch):
    from nestlearn.optim import Levels

    stepped, original = [], Levels.step
    monkeypatch.setattr(Levels, "step", lambda self, tokens: stepped.append(original(self, tokens)) or stepped[-1])
    run(pretrained_run(llama, langs, cache, strategy="cms-levels", update_periods="64,none"))
    outer = [s for s, names in enumerate(stepped, 1) if "blocks.0.cms.levels.0" in names]
    assert outer == [2, 4, 6] and all("base" in names for names in stepped)  # base: the aggregation weights


def memorizing(llama, langs, cache, **fields) -> ContinualConfig:
    # 16 < seq_len 32: an in-context level stepped twice a row; the last of the 2 blocks learns
    return pretrained_run(
        llama,
        langs,
        cache,
        **{"strategy": "memorize", "update_periods": "16,none", "task_blocks": 1, "lr": 0.05, **fields},
    )


def test_memorize_trains_nothing_and_keeps_only_what_its_in_context_levels_learnt(llama, langs, cache, tmp_path):
    config = memorizing(llama, langs, cache)
    start, _ = make_model(config)
    result = run(config, tmp_path / "progress.pt")
    after = torch.load(tmp_path / "progress.pt", weights_only=True)["model"]
    learns = {"blocks.1.cms.levels.0.up", "blocks.1.cms.levels.0.down"}  # block 0 reads its θ_0 (task_blocks 1)
    assert not any(p.requires_grad for p in start.parameters())  # no optimizer: nothing is trained
    for n, p in start.named_parameters():
        assert torch.equal(after[n], p.detach()) != (n in learns), n
    assert result["trainable_params"] == sum(p.numel() for n, p in start.named_parameters() if n in learns)
    R, baseline = np.asarray(result["R"]), result["baseline"]
    assert np.isfinite(R).all() and R[0, 0] < baseline[0]  # it learnt the first language by reading it


def test_memorize_carries_each_rows_fast_weights_into_the_next_row(llama, langs, cache):
    from nestlearn.model import ModelState
    from nestlearn.task_cms import _with

    model, _ = make_model(memorizing(llama, langs, cache))
    x = torch.randint(1, model.config.vocab_size, (2, 33))  # no end-of-text (0 below): no padding
    ((i, j, level),) = model.task_levels
    fresh = model.init_state(1)
    with torch.no_grad():
        _, first = model(x[:1, :-1], fresh)
        # the second row: a fresh state (no attention cache) whose level holds the first row's fast weights
        learnt = {k: first.layers[i]["cms"][j][k] for k in ("up", "down")}
        layers = _with(fresh.layers, model.task_levels[0], {**fresh.layers[i]["cms"][j], **learnt})
        _, second = model(x[1:, :-1], ModelState(layers, fresh.task))
    theta_0 = level.up.detach().clone()
    continual._memorize(model, x, eos_id=0)
    assert not torch.equal(level.up, theta_0)
    torch.testing.assert_close(level.up, second.layers[i]["cms"][j]["up"][0])
    torch.testing.assert_close(level.down, second.layers[i]["cms"][j]["down"][0])


def test_memorize_does_not_learn_from_padding(llama, langs, cache):
    model, _ = make_model(memorizing(llama, langs, cache))
    ((_, _, level),) = model.task_levels
    theta_0 = level.up.detach().clone()
    continual._memorize(model, torch.zeros(2, 33, dtype=torch.long), eos_id=0)  # bbc's left-padding, all of it
    assert torch.equal(level.up, theta_0)
    padded = torch.randint(1, model.config.vocab_size, (1, 33))
    padded[0, :17] = 0  # the first chunk of 16 is padding; the text after it is learnt
    with torch.no_grad():  # the loss it reports is over the text: the same as read by the model before its step
        text = torch.arange(32) >= 16  # predicting the text from the last end-of-text on
        logits, _ = model(padded[:, :-1], learn=text[None])
        expected = F.cross_entropy(logits[0, 16:].float(), padded[0, 17:])
    loss = continual._memorize(model, padded, eos_id=0)
    assert not torch.equal(level.up, theta_0)
    torch.testing.assert_close(loss, expected)


def test_memorize_measures_general_ability_before_on_the_base_and_after_learning(llama, langs, cache, monkeypatch):
    from nestlearn.task_cms import reading_only

    config = memorizing(llama, langs, cache)
    model, _ = make_model(config)
    x = torch.randint(0, model.config.vocab_size, (1, 48))
    with torch.no_grad(), reading_only(model):  # η = 0: the levels read θ_0, so the model is its source
        torch.testing.assert_close(model(x)[0], nestlearn.load(llama)(x)[0])
    assert [lv.lr for _, _, lv in model.task_levels] == [0.05]  # restored
    rates = []  # the learning levels' η at each measurement of general ability: before the stream, then after
    monkeypatch.setattr(
        continual,
        "general_ability",
        lambda m, *a, **k: rates.append([lv.lr for _, _, lv in m.task_levels]) or {"wiki_bits_per_byte": 1.0},
    )
    run(dataclasses.replace(config, general_tokens=64))
    assert rates == [[0.0], [0.05]]


def test_fast_weights_are_not_committed_part_way_through_a_chunk(llama, langs, cache):
    from nestlearn.task_cms import commit

    model, _ = make_model(memorizing(llama, langs, cache))
    with torch.no_grad():
        _, state = model(torch.randint(0, model.config.vocab_size, (1, 24)))
    with pytest.raises(ValueError, match="ends 8 tokens into a chunk of 16"):
        commit(model, state)


def test_an_interrupted_memorize_run_resumes_exactly(llama, langs, cache, tmp_path, monkeypatch):
    whole, resumed = interrupted_and_resumed(memorizing(llama, langs, cache), tmp_path, monkeypatch, "_memorize")
    assert resumed["R"] == whole["R"] and resumed["losses"] == whole["losses"]


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"update_periods": "none"}, r"gives none that learns: give a period shorter than --seq-len 32"),
        ({"task_blocks": 3}, r"--task-blocks 3: the model has 2 blocks"),
        ({"update_periods": "12,none"}, r"\[12\] do not divide it"),
    ],
)
def test_memorize_without_levels_to_learn_or_rows_that_end_on_their_periods_is_refused(
    llama, langs, cache, fields, message
):
    with pytest.raises(ValueError, match=message):
        make_model(memorizing(llama, langs, cache, **fields))


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        (
            {"strategy": "finetune", "lora_rank": 4},
            r"--lora-rank \(lora_rank\) is the lora strategy's.*--strategy lora",
        ),
        ({"strategy": "lora", "adapter": "titans"}, r"--adapter .*adapter strategy's.*this run's strategy is lora"),
        (
            {"strategy": "ewc", "update_periods": "64"},
            r"levels, cms-levels and memorize strategy's.*--strategy cms-levels",
        ),
        ({"strategy": "lora", "task_blocks": 1}, r"--task-blocks \(task_blocks\) is the memorize strategy's"),
        ({"strategy": "memorize", "init": None}, r"--strategy memorize trains a memory pathway .*give --init DIR"),
        ({"strategy": "memorize", "preset": "transformer"}, "--strategy memorize stacks CMS levels .*drop --preset"),
        ({"strategy": "lora", "init": None}, r"--strategy lora trains a memory pathway .*give --init DIR"),
        ({"strategy": "cms-levels", "preset": "transformer"}, "drop --preset transformer"),
        (
            {"strategy": "finetune", "preset": "hope"},
            r"--init builds transformer or hope_attention.*--strategy adapter",
        ),
        ({"strategy": "finetune", "stack": "residual"}, "--stack says how CMS levels start"),
        ({"strategy": "levels", "update_periods": "64,none"}, "use --preset hope_attention"),
        ({"strategy": "finetune", "init_from": "elsewhere"}, "--init and --init-from both"),
        ({"strategy": "lora", "lora_targets": "qkv,mlp"}, "targets"),
        ({"strategy": "adapter", "adapter": "lstm"}, "adapter='lstm'"),
    ],
)
def test_bad_pretrained_settings_are_refused_naming_the_fix(llama, fields, message):
    with pytest.raises(ValueError, match=message):
        small(**{"init": str(llama), "preset": None, **fields})


def test_a_source_with_unmerged_lora_is_refused(tmp_path):
    from nestlearn.config import LoRAConfig

    source = nestlearn.build(dataclasses.replace(nestlearn.presets.transformer("debug"), lora=LoRAConfig(rank=2)))
    source.save_pretrained(tmp_path / "lora")
    with pytest.raises(ValueError, match="has LoRA adapters.*merge_lora"):
        make_model(small(init=str(tmp_path / "lora"), strategy="finetune"))


def test_the_continual_command_takes_the_pretrained_flags(llama, langs, cache, tmp_path, capsys):
    args = ["continual", "--tasks", *langs, "--init", str(llama), "--steps-per-task", "2", "--batch-size", "2"]
    args += ["--seq-len", "32", "--eval-tokens", "64", "--data-root", cache, "--no-progress"]
    assert cli([*args, "--strategy", "lora", "--lora-rank", "2", "--out-dir", str(tmp_path / "out")]) == 0
    result = json.loads((tmp_path / "out" / "results.json").read_text())
    assert result["config"]["lora_rank"] == 2 and result["config"]["lora_alpha"] == 4.0
    assert f"{result['trainable_params']:,} trainable, {result['frozen_params']:,} frozen" in capsys.readouterr().out
    assert cli([*args, "--adapter-blocks", "1", "--out-dir", str(tmp_path / "bad")]) == 1
    assert "--adapter-blocks (adapter_blocks) is the adapter strategy's setting" in capsys.readouterr().err
    assert not (tmp_path / "bad" / "results.json").exists()
    # the base alone trains nothing, and says so (its parameters require gradients, but no optimizer holds them)
    assert cli([*args, "--strategy", "none", "--out-dir", str(tmp_path / "none")]) == 0
    result = json.loads((tmp_path / "none" / "results.json").read_text())
    said = capsys.readouterr().err
    assert f"none: nothing trained; {result['frozen_params']:,} parameters fixed" in said and " trainable" not in said


# --- memorize --lora-rank ---


def write_corpus(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split in ("train", "validation", "test"):
        (folder / f"{split}.txt").write_text("\n\n".join(f"{TEXT[: 300 + 7 * i]} {i}" for i in range(40)))
    return folder


def test_memorize_with_lora_learns_through_the_factors_only_and_loads_back(llama, tmp_path, capsys):
    data = write_corpus(tmp_path / "corpus")
    common = ["--data", str(data), "--data-root", str(tmp_path / "cache"), "--no-progress"]
    out = tmp_path / "m1"
    first = ["memorize", str(llama), "--tokens", "64", "--segment", "32", "--lora-rank", "4", "--out-dir", str(out)]
    assert cli([*first, *common]) == 0
    assert "parameters learn" in capsys.readouterr().err
    assert json.loads((out / "config.json").read_text())["lora"]["rank"] == 4
    source = dict(nestlearn.load(llama).named_parameters())
    model, tokenizer = load_checkpoint(out)
    assert tokenizer.to_json() == load_checkpoint(llama)[1].to_json()
    factors = {n: p for n, p in model.named_parameters() if ".lora_" in n}
    assert factors and any(p.abs().sum() > 0 for n, p in factors.items() if "lora_B" in n)  # B moved off zero
    for name, p in model.named_parameters():
        if name not in factors:
            assert torch.equal(p, source[name.replace(".base_layer", "")]), name
    report = json.loads((out / "memorize_report.json").read_text())
    assert {lv["name"]: lv["steps"] for lv in report["levels"]} == {"lora": 2, "base": 0}
    # the folder continues, its LoRA included; the flags that would change it are refused
    assert cli(["memorize", str(out), "--tokens", "32", "--out-dir", str(tmp_path / "m2"), *common]) == 0
    assert json.loads((tmp_path / "m2" / "memorize.json").read_text())["offset"] == 96
    x = torch.arange(40)[None] % 300
    again = nestlearn.load(tmp_path / "m2")
    assert again.config.lora.rank == 4 and not torch.equal(again(x)[0], model(x)[0])  # its LoRA learned on
    assert cli(["memorize", str(out), "--tokens", "32", "--lora-rank", "2", "--out-dir", str(tmp_path / "m3")]) == 1
    assert "drop ['lora_rank']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        cli(["memorize", str(llama), "--tokens", "32", "--lora-alpha", "2", "--out-dir", str(tmp_path / "m3")])
    assert "--lora-alpha does nothing without --lora-rank" in capsys.readouterr().err
    assert not (tmp_path / "m3").exists()
