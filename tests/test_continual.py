"""The continual-learning protocol: the metrics on hand-computed matrices, every strategy and stream on small local
corpora, and the command's outputs."""

from __future__ import annotations

import dataclasses
import errno
import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from nestlearn import presets
from nestlearn.cli import continual as cli_continual
from nestlearn.cli import main as cli
from nestlearn.data.corpora import BBC_CLASSES, write_documents
from nestlearn.evals import continual
from nestlearn.evals.continual import (
    EWC,
    ContinualConfig,
    GeneralReplay,
    Replay,
    build_model,
    continual_metrics,
    make_stream,
    run,
    summary,
)


def test_metrics_on_a_hand_computed_accuracy_matrix():
    R = [[0.9, 0.1, 0.0], [0.6, 0.8, 0.2], [0.3, 0.7, 0.9]]
    m = continual_metrics(R, baseline=[0.0, 0.1, 0.1], higher_is_better=True)
    assert m["average"] == pytest.approx((0.3 + 0.7 + 0.9) / 3)
    assert m["bwt"] == pytest.approx(((0.3 - 0.9) + (0.7 - 0.8)) / 2)
    assert m["forgetting"] == pytest.approx(((0.9 - 0.3) + (0.8 - 0.7)) / 2)  # max over l < T of R[l, j] − R[T, j]
    assert m["fwt"] == pytest.approx(((0.1 - 0.1) + (0.2 - 0.1)) / 2)


def test_metrics_on_a_loss_matrix_count_a_rise_as_forgetting():
    R = [[2.0, 5.0], [3.0, 1.5]]  # bits per byte: task 1 got worse after task 2
    m = continual_metrics(R, baseline=[8.0, 8.0], higher_is_better=False)
    assert m["average"] == pytest.approx(2.25)
    assert m["bwt"] == pytest.approx(-1.0) and m["forgetting"] == pytest.approx(1.0)
    assert m["fwt"] == pytest.approx(8.0 - 5.0)
    assert continual_metrics([[1.0]])["bwt"] is None  # one task: no transfer to speak of
    with pytest.raises(ValueError, match="square"):
        continual_metrics([[1.0, 2.0]])
    with pytest.raises(ValueError, match="one score per task"):
        continual_metrics(R, baseline=[1.0])


def corpus(root, name: str, words: list[str], n: int = 30, prefix=lambda i: "") -> str:
    rng = random.Random(name)
    for split, count in (("train", n), ("validation", 6), ("test", 6)):
        docs = [prefix(i) + " ".join(rng.choice(words) for _ in range(60)) for i in range(count)]
        write_documents(root / name / f"{split}.txt", docs)
    return str(root / name)


@pytest.fixture(scope="module")
def two_languages(tmp_path_factory) -> list[str]:
    root = tmp_path_factory.mktemp("langs")
    return [corpus(root, "aaa", ["ab", "ba", "abba", "baab"]), corpus(root, "xyz", ["xy", "zyx", "yzzy", "xz"])]


def killed_at_the_first_step(cfg: ContinualConfig, progress: Path, monkeypatch) -> None:
    """Run `cfg` with `progress` until its first training step dies without warning (as the kernel's OOM killer
    kills): what was saved before the stream is all there is to resume from."""

    def crash(*a, **k):
        raise MemoryError("killed")

    with monkeypatch.context() as m:
        m.setattr(continual, "_loss", crash)
        with pytest.raises(MemoryError):
            continual.run(cfg, progress)


def small(**fields) -> ContinualConfig:
    base = dict(
        stream="languages",
        preset="transformer",
        size="debug",
        steps_per_task=3,
        batch_size=2,
        seq_len=32,
        eval_tokens=128,
        warmup_steps=1,
        progress=False,
    )
    return ContinualConfig(**{**base, **fields})


def test_summary_averages_the_seeds_of_one_setting_and_keeps_settings_apart():
    def result(strategy: str, seed: int, bwt: float | None) -> dict:
        config = dataclasses.asdict(ContinualConfig(strategy=strategy, seed=seed))
        metrics = {"average": 3.0 + seed, "bwt": bwt, "forgetting": -0.5 * seed, "fwt": 1.0}
        return {"config": config, "metrics": metrics, "seconds": 60.0 * (seed + 1)}

    older = result("finetune", 2, 0.3)
    del older["config"]["init_from"]  # written before the field existed: its default
    rows = summary([result("finetune", 0, 0.1), result("ewc", 0, None), older]).splitlines()[2:]
    assert rows == [
        "| languages | transformer | finetune | 0, 2 | 4.000 ± 1.414 | +0.200 ± 0.141 | -0.500 ± 0.707 "
        "| +1.000 ± 0.000 | 2.0 ± 1.4 |",
        "| languages | transformer | ewc | 0 | 3.000 | n/a | +0.000 | +1.000 | 1.0 |",
    ]


@pytest.mark.parametrize("strategy", ["finetune", "ewc", "replay", "levels"])
def test_every_strategy_fills_the_matrix(two_languages, strategy, tmp_path, capsys):
    extra = {"preset": "hope", "update_periods": "8,64"} if strategy == "levels" else {}
    result = run(small(tasks=two_languages, strategy=strategy, data_root=str(tmp_path), **extra))
    R = np.asarray(result["R"])
    # a line a task in the log, with R's row, even with the progress bar off
    log = [line for line in capsys.readouterr().err.splitlines() if " learnt (3 steps, last loss " in line]
    assert [line.split(" learnt")[0] for line in log] == [
        "nestlearn continual: task 1/2 aaa",
        "nestlearn continual: task 2/2 xyz",
    ]
    assert log[1].endswith(f"bits per byte: aaa {R[1, 0]:.3f}, xyz {R[1, 1]:.3f}")
    assert R.shape == (2, 2) and np.isfinite(R).all() and len(result["baseline"]) == 2
    assert result["tasks"] == ["aaa", "xyz"] and result["metric"] == "bits per byte"
    assert set(result["metrics"]) == {"average", "bwt", "forgetting", "fwt"}
    assert len(result["losses"]) == 6
    # training on a task makes its own score better than untrained (bits per byte falls from ~8)
    assert R[0, 0] < result["baseline"][0]


def test_levels_strategy_steps_each_outer_level_exactly_at_its_period(two_languages, tmp_path, monkeypatch):
    # periods 64 and 128 tokens with 32-token windows: the outer levels step every 2nd and every 4th step of the
    # whole run (their token counters go on across tasks); `base` (period None) every step
    from nestlearn.optim import Levels

    original, snapshots, stepped = Levels.step, [], []

    def recording_step(self, tokens):
        if not snapshots:  # the parameters before the first step
            snapshots.append({lv.name: [p.detach().clone() for p in lv.params] for lv in self.levels})
        stepped.append(original(self, tokens))
        snapshots.append({lv.name: [p.detach().clone() for p in lv.params] for lv in self.levels})
        return stepped[-1]

    monkeypatch.setattr(Levels, "step", recording_step)
    config = small(
        tasks=two_languages, strategy="levels", data_root=str(tmp_path), preset="hope", update_periods="8,64,128"
    )
    run(config)
    steps = 2 * config.steps_per_task
    assert len(snapshots) == steps + 1
    # the steps (1-based, over the whole run) on which each level must move, and on no other
    schedule = {"blocks.0.cms.levels.1": [2, 4, 6], "blocks.1.cms.levels.2": [4], "base": [1, 2, 3, 4, 5, 6]}
    for name, want in schedule.items():
        assert name in snapshots[0], sorted(snapshots[0])
        changed = [
            s
            for s in range(1, steps + 1)
            if any(not torch.equal(a, b) for a, b in zip(snapshots[s - 1][name], snapshots[s][name], strict=True))
        ]
        assert changed == want, (name, changed, want)
        assert [s for s in range(1, steps + 1) if name in stepped[s - 1]] == want, (name, stepped)
    assert {name for names in stepped for name in names} == set(snapshots[0])  # every level stepped at least once


def test_ewc_penalty_is_zero_until_consolidated_and_pulls_towards_the_anchor(two_languages, tmp_path):
    torch.manual_seed(0)
    model = build_model(small())
    task = make_stream("languages", two_languages[:1], str(tmp_path), 32)[0]
    ewc = EWC(model, lam=10.0, batches=2)
    assert ewc.penalty() == 0.0
    ewc.consolidate(task, np.random.default_rng(0), 2, 32)
    assert ewc.penalty().detach().item() == 0.0  # at the anchor
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01)
    assert ewc.penalty().detach().item() > 0


def test_replay_replaces_the_given_share_of_rows_by_remembered_ones(two_languages, tmp_path):
    task = make_stream("languages", two_languages[:1], str(tmp_path), 32)[0]
    replay = Replay(fraction=0.25, per_task=1)
    x, mask = torch.zeros(8, 33, dtype=torch.long), torch.ones(8, 32, dtype=torch.bool)
    assert torch.equal(replay.mix(x, mask, np.random.default_rng(0))[0], x)  # nothing remembered yet
    replay.remember(task, np.random.default_rng(0), 4, 32)
    mixed, _ = replay.mix(x, mask, np.random.default_rng(0))
    assert int((mixed != 0).any(1).sum()) == 2  # a quarter of 8 rows


def test_general_replay_puts_general_rows_first_from_the_first_task_and_weighs_them_by_their_share(
    two_languages, tmp_path, monkeypatch
):
    general = make_stream("languages", two_languages[1:], str(tmp_path), 32)[0]
    replay = GeneralReplay(fraction=0.25, source=general)
    x, mask = torch.zeros(8, 33, dtype=torch.long), torch.zeros(8, 32, dtype=torch.bool)
    mask[:, -1] = True  # the task trains on one token a row (as bbc's answers)
    mixed, mixed_mask = replay.mix(x, mask, np.random.default_rng(0))  # nothing remembered: not needed
    assert replay.general_rows(8) == 2 and (mixed[:2] != 0).any(1).all() and not mixed[2:].any()
    assert mixed_mask[:2].all() and torch.equal(mixed_mask[2:], mask[2:])
    # the loss: a quarter general text (averaged over its 64 tokens), three quarters task (over its 6)
    model = continual.build_model(small())
    with torch.no_grad():
        logits, _ = model(mixed[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), mixed[:, 1:], reduction="none")
        want = 0.25 * nll[:2].mean() + 0.75 * nll[2:, -1].mean()
        torch.testing.assert_close(continual._loss(model, mixed, mixed_mask, 2), want)
    # in a run: from the first step of the first task, the general corpus's windows are in every batch
    seen = []
    monkeypatch.setattr(continual, "general_text", lambda root, tokenizer: general)
    loss = continual._loss
    monkeypatch.setattr(continual, "_loss", lambda m, x, mask, k=0: seen.append(k) or loss(m, x, mask, k))
    config = small(tasks=two_languages[:1], strategy="replay", replay_from="general", batch_size=4)
    run(dataclasses.replace(config, data_root=str(tmp_path)))
    assert seen == [1] * config.steps_per_task


def test_class_incremental_stream_and_command(tmp_path, monkeypatch, capsys):
    # five classes, each with its own words; the first line of a document is its class (the bbc corpus format)
    root = tmp_path / "corpora"
    for split, n in (("train", 40), ("validation", 10), ("test", 10)):
        docs = [f"{BBC_CLASSES[i % 5]}\n" + " ".join([BBC_CLASSES[i % 5][:3]] * 20) for i in range(n)]
        write_documents(root / "bbc-local" / f"{split}.txt", docs)
    tasks = make_stream("bbc", [str(root / "bbc-local")], None, 32)
    assert [t.name for t in tasks] == list(BBC_CLASSES) and all(len(t.valid) == 2 for t in tasks)
    out = tmp_path / "out"
    args = ["continual", "--stream", "bbc", "--tasks", str(root / "bbc-local"), "--steps-per-task", "2"]
    args += ["--batch-size", "2", "--seq-len", "32", "--out-dir", str(out), "--no-progress"]
    assert cli(args) == 0
    result = json.loads((out / "results.json").read_text())
    R = np.asarray(result["R"])
    assert R.shape == (5, 5) and ((R >= 0) & (R <= 1)).all() and result["metric"] == "accuracy"
    assert R[0, 0] == 1.0  # after the first task, its class is the only candidate
    assert (out / "continual.png").stat().st_size > 0
    # finished: its progress (the model and optimizer) removed, and the same command trains nothing again
    assert not (out / continual.PROGRESS_FILE).exists()
    capsys.readouterr()
    with monkeypatch.context() as m:
        m.setattr(cli_continual, "run", lambda *a: pytest.fail("a finished run was trained again"))
        assert cli(args) == 0
    printed = capsys.readouterr()
    assert "is finished; its results again (from results.json)" in printed.err
    assert "business" in printed.out and (out / "results.json").read_text() == json.dumps(result, indent=2) + "\n"
    # a different run is refused, not written over the finished one
    assert cli([*args, "--lr", "1e-2"]) == 1
    assert "holds the results of a different run (lr: 0.003 there, 0.01 now)" in capsys.readouterr().err
    # --keep-progress keeps it
    assert cli([*args[:-3], "--out-dir", str(tmp_path / "kept"), "--no-progress", "--keep-progress"]) == 0
    assert (tmp_path / "kept" / continual.PROGRESS_FILE).is_file()


def test_the_base_alone_is_scored_among_the_classes_seen_at_each_stage(tmp_path, monkeypatch):
    """The base learns nothing, yet its class-incremental row after task i chooses among the classes of tasks 1..i
    (and task j's own): a copy of its untrained row would score the first task among one class forever."""
    from nestlearn.evals import streams

    root = tmp_path / "corpora"
    for split, n in (("train", 10), ("validation", 5), ("test", 5)):
        docs = [f"{BBC_CLASSES[i % 5]}\n" + " ".join([BBC_CLASSES[i % 5][:3]] * 5) for i in range(n)]
        write_documents(root / "bbc-local" / f"{split}.txt", docs)
    # a score that says how many classes it chose among
    monkeypatch.setattr(streams.ClassTask, "score", lambda self, model, seq_len, candidates, **_: len(candidates) / 10)
    base = run(
        ContinualConfig(stream="bbc", tasks=[str(root / "bbc-local")], strategy="none", seq_len=32, progress=False)
    )
    expected = [[(max(i, j) + 1) / 10 for j in range(5)] for i in range(5)]
    assert base["baseline"] == [(j + 1) / 10 for j in range(5)] and base["R"] == expected
    assert base["trainable_params"] == 0 and not base["losses"]


def test_class_scoring_pads_rows_to_the_longest_and_scores_the_first_eval_items(tmp_path):
    root = tmp_path / "corpora"
    for split, n in (("train", 10), ("validation", 15), ("test", 5)):
        docs = [f"{BBC_CLASSES[i % 5]}\n" + " ".join([BBC_CLASSES[i % 5][:3]] * (2 + i)) for i in range(n)]
        write_documents(root / "bbc-local" / f"{split}.txt", docs)
    task = make_stream("bbc", [str(root / "bbc-local")], None, 64)[0]
    prompts, labels = ["ab\nTopic:", "abcdef gh\nTopic:"], ["business", "tech"]
    full, full_mask = task._rows(prompts, labels, 64)
    fit, fit_mask = task._rows(prompts, labels, 64, fit=True)
    longest = len(task.tokenizer.encode(prompts[1])) + len(task.tokenizer.encode(" tech\n"))
    assert full.shape == (2, 65) and fit.shape == (2, longest)
    # the same rows, less of the left padding; the masks cover exactly the answers' tokens
    assert torch.equal(full[:, -longest:], fit) and torch.equal(full_mask[:, -(longest - 1) :], fit_mask)
    assert fit_mask.sum(1).tolist() == [len(task.tokenizer.encode(f" {y}\n")) for y in labels]

    rows = []

    class Counting(torch.nn.Module):  # uniform logits: every class ties, and the rows read are counted
        def forward(self, x):
            rows.append(x.shape[0])
            return torch.zeros(*x.shape, 257), None

    assert len(task.valid) == 3
    assert task.score(Counting(), 64, candidates=["business", "tech"], eval_items=2) in (0.0, 0.5, 1.0)
    assert sum(rows) == 2 * 2  # two examples, each read once per candidate
    rows.clear()
    task.score(Counting(), 64, candidates=["business", "tech"])
    assert sum(rows) == 3 * 2  # 0: every example
    with pytest.raises(ValueError, match="--eval-items 5 caps the examples a classification task scores"):
        ContinualConfig(stream="languages", eval_items=5)


def test_class_few_shot_puts_whole_labelled_training_examples_of_each_candidate_before_every_prompt(tmp_path):
    """--few-shot k on bbc: the base reading the classes. Every scored row starts with k training examples of each
    candidate class (none of another, none from the validation split), whole though the row is longer than
    seq_len, then the validation prompt (cut as without them) and the candidate's name."""
    root = tmp_path / "corpora"
    for split, n in (("train", 10), ("validation", 5), ("test", 5)):
        docs = [f"{BBC_CLASSES[i % 5]}\n{split} {i} " + " ".join([BBC_CLASSES[i % 5][:3]] * 3) for i in range(n)]
        write_documents(root / "bbc-local" / f"{split}.txt", docs)
    tasks = make_stream("bbc", [str(root / "bbc-local")], None, 32, few_shot=2)
    candidates = ["business", "entertainment", "politics"]
    context = tasks[2].context(candidates)
    shots = [s for s in context.split("\n\n") if s]
    assert len(shots) == 2 * 3 and all(s.startswith("train ") for s in shots)
    assert sorted(s.rsplit("Topic: ", 1)[1] for s in shots) == sorted(candidates * 2)
    assert [s.rsplit(" ", 1)[1] for s in shots] != sorted(candidates * 2)  # shuffled, not grouped by class
    assert context == tasks[0].context(candidates)  # fixed by the candidates alone

    rows = []

    class Recording(torch.nn.Module):
        def forward(self, x):
            rows.extend(x.tolist())
            return torch.zeros(*x.shape, 257), None

    tasks[2].score(Recording(), 64, candidates=candidates)  # T = 64: the article itself is not cut
    eos = tasks[2].tokenizer.eos_id
    texts = [tasks[2].tokenizer.decode([t for t in row if t != eos]) for row in rows]
    assert len(texts) == 1 * 3 and len(rows[0]) > 65  # one politics example, once per candidate; longer than T
    for text, y in zip(texts, candidates, strict=True):
        assert text.startswith(context) and text[len(context) :].startswith("validation 2 pol")
        assert text.endswith(f"Topic: {y}")  # the answer's final newline is the one token not fed
    assert make_stream("bbc", [str(root / "bbc-local")], None, 32)[2].context(candidates) == ""  # off by default
    with pytest.raises(ValueError, match=r"--few-shot 3 puts that many .* has fewer of \{'business': 2"):
        make_stream("bbc", [str(root / "bbc-local")], None, 32, few_shot=3)
    with pytest.raises(ValueError, match=r"few_shot=2 needs that many training examples.*\['tech'\]"):
        dataclasses.replace(tasks[0], demos={"business": tasks[0].demos["business"]}).context(["business", "tech"])
    ContinualConfig(stream="bbc", few_shot=2)
    with pytest.raises(ValueError, match="it needs --stream facts or bbc, not languages"):
        ContinualConfig(stream="languages", few_shot=2)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="strategy='sgd'"):
        ContinualConfig(strategy="sgd")
    with pytest.raises(ValueError, match="steps_per_task=0"):
        ContinualConfig(steps_per_task=0)
    with pytest.raises(ValueError, match=r"levels, cms-levels and memorize strategy's setting.*strategy is finetune"):
        ContinualConfig(update_periods="16,128")
    with pytest.raises(ValueError, match="--replay-from general says what the replay strategy replays"):
        ContinualConfig(replay_from="general")
    with pytest.raises(ValueError, match="replay_from='books'"):
        ContinualConfig(strategy="replay", replay_from="books")
    with pytest.raises(ValueError, match=r"--lora-rank \(lora_rank\) is the lora strategy's.*--strategy lora"):
        ContinualConfig(lora_rank=4)
    with pytest.raises(ValueError, match="--strategy adapter trains a memory pathway on a frozen pretrained base"):
        ContinualConfig(strategy="adapter")  # no --init: nothing pretrained to freeze
    with pytest.raises(ValueError, match="stream="):
        make_stream("music", None, None, 32)
    with pytest.raises(ValueError, match="'gpu' is not a device: use auto, cpu, cuda or cuda:N"):
        ContinualConfig(device="gpu")


def test_a_gpu_that_is_not_there_is_refused_before_anything_is_read(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "progress.pt").write_bytes(b"not a progress file")  # read first of all, were it read
    args = ["continual", "--tasks", str(tmp_path / "no-such-corpus"), "--out-dir", str(tmp_path / "out")]
    assert cli([*args, "--device", "cuda"]) != 0
    assert "device='cuda' but no GPU is visible to torch; use --device cpu or auto" in capsys.readouterr().err


def test_a_run_saved_on_one_device_resumes_on_another(two_languages, tmp_path, monkeypatch):
    """The device is where a run computes, not what it is: progress saved with --device cpu resumes with auto (here
    the CPU too; on a GPU machine, the GPU), and a finished run's results.json is its results on either."""
    cfg = small(tasks=two_languages, data_root=str(tmp_path), device="cpu")
    whole = continual.run(cfg, tmp_path / "whole.pt")
    killed_at_the_first_step(cfg, tmp_path / "cut.pt", monkeypatch)
    resumed = continual.run(dataclasses.replace(cfg, device="auto"), tmp_path / "cut.pt")
    assert resumed["R"] == whole["R"] and resumed["config"]["device"] == "auto" and resumed["device"] == "cpu"
    (tmp_path / "results.json").write_text(json.dumps(whole))
    assert continual.finished_result(tmp_path / "results.json", dataclasses.replace(cfg, device="auto")) == whole


def test_level_stacking_starts_cms_levels_from_a_trained_models_mlps(two_languages, tmp_path):
    # paper §7.3: a Hope-Attention whose SwiGLU level is the Transformer's MLP, attention and embeddings copied
    from nestlearn import build
    from nestlearn.data.tokenizer import ByteTokenizer, train_bpe

    torch.manual_seed(1)
    source = build(dataclasses.replace(presets.transformer("debug"), vocab_size=257))
    source.save_pretrained(tmp_path / "src")
    ByteTokenizer().save(tmp_path / "src")
    # into hope_attention, --init-from is --init (nestlearn.pretrained): every level a copy, equal at start
    stacked = small(
        preset="hope_attention", init_from=str(tmp_path / "src"), strategy="levels", update_periods="64,none"
    )
    model = build_model(stacked)
    mlp, levels = source.blocks[1].cms.levels[0], model.blocks[1].cms.levels
    for level in levels:
        assert torch.equal(level.up.weight, mlp.up.weight) and torch.equal(level.down.weight, mlp.down.weight)
    assert torch.equal(model.blocks[0].mixer.qkv.weight, source.blocks[0].mixer.qkv.weight)
    assert torch.equal(model.embed.weight, source.embed.weight)
    x = torch.randint(0, 257, (2, 32), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(model(x)[0], source(x)[0], atol=1e-5, rtol=0)
    result = run(
        small(preset="hope_attention", init_from=str(tmp_path / "src"), tasks=two_languages, data_root=str(tmp_path))
    )
    assert np.isfinite(result["R"]).all()
    # into hope (a self-modifying Titans mixer the source does not have): level_stack, its SwiGLU level the MLP
    hope = build_model(small(preset="hope", init_from=str(tmp_path / "src")))
    assert torch.equal(hope.blocks[1].cms.levels[-1].up.weight, mlp.up.weight)
    assert torch.equal(hope.embed.weight, source.embed.weight)
    with pytest.raises(ValueError, match="byte-level"):
        source2 = build(dataclasses.replace(presets.transformer("debug"), vocab_size=300))  # not byte-level
        source2.save_pretrained(tmp_path / "src2")
        train_bpe(["the river runs to the sea " * 50], 300).save(tmp_path / "src2")
        build_model(small(preset="hope", init_from=str(tmp_path / "src2")))


def test_a_full_disk_costs_the_run_its_progress_file_not_the_run(two_languages, tmp_path, monkeypatch, capsys):
    def full(obj, path, *a, **k):
        Path(path).write_bytes(b"partial")  # what a full disk leaves behind
        raise OSError(errno.ENOSPC, "No space left on device")

    config = small(tasks=two_languages, data_root=str(tmp_path))
    monkeypatch.setattr(continual.torch, "save", full)
    result = run(config, tmp_path / "progress.pt")
    monkeypatch.undo()
    assert np.asarray(result["R"]).shape == (2, 2) and np.isfinite(result["R"]).all()
    err = capsys.readouterr().err
    # after the first task's untrained score, after all that comes before the stream, after each task: said each time
    assert err.count("could not save") == 4, err
    assert "(No space left on device); the run goes on, but if it is stopped now it starts again from the " in err
    assert list(tmp_path.glob("*progress*")) == []  # nothing half-written left
