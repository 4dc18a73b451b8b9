"""The long-context suite: every generator is deterministic by seed, every answer is checkable (an oracle that reads
the input scores 100%, a constant guesser scores chance), needles sit where asked in contexts of the asked length,
and each `nestlearn longctx` subcommand runs end to end on a tiny model."""

from __future__ import annotations

import json
import math
import random
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from nestlearn.cli import main as cli
from nestlearn.data import synthetic
from nestlearn.data.corpora import write_documents
from nestlearn.data.synthetic import ACCEPT, FORMAL_LANGUAGES, REJECT
from nestlearn.data.tokenizer import ByteTokenizer, train_bpe
from nestlearn.evals import niah
from nestlearn.evals.niah import KINDS, Haystack, constant_guess, make_sample, make_samples, oracle, string_match_all

WORDS = "the river memory learns fast and slow levels update at their own rate while a cat sat on the mat".split()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def documents(n: int, seed: int = 0) -> list[str]:
    """Documents of 3 to 8 sentences of 4 to 14 words each."""
    rng = random.Random(seed)

    def sentence() -> str:
        return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 14))).capitalize() + "."

    return [" ".join(sentence() for _ in range(rng.randint(3, 8))) for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("corpus")
    for split, n in (("train", 60), ("validation", 8), ("test", 20)):
        write_documents(root / f"{split}.txt", documents(n, seed=len(split)))
    return root


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(documents(60), 300)


# --- determinism ---


def batches(suite: str, seed: int):
    if suite == "mqar":
        return synthetic.mqar(8, 6, generator=gen(seed))
    if suite in synthetic.BABI_TASKS:
        return synthetic.babi(suite, 8, 6, generator=gen(seed))
    return synthetic.formal_language(suite, 16, 1, 40, generator=gen(seed))


@pytest.mark.parametrize("suite", ["mqar", *synthetic.BABI_TASKS, *FORMAL_LANGUAGES])
def test_same_seed_same_batch_other_seed_other_batch(suite):
    a, b, c = batches(suite, 0), batches(suite, 0), batches(suite, 1)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(x.shape == y.shape and torch.equal(x, y) for x, y in zip(a, c, strict=True))


def test_needles_are_deterministic_by_seed():
    tok, docs = ByteTokenizer(), documents(30)
    a, b = (make_samples(["uuid", "multikey"], [900], [0.5], 2, tok, docs, seed=0) for _ in range(2))
    c = make_samples(["uuid", "multikey"], [900], [0.5], 2, tok, docs, seed=1)
    assert [s.prompt for s in a] == [s.prompt for s in b]
    assert all(x.prompt != y.prompt and x.answers != y.answers for x, y in zip(a, c, strict=True))
    assert a[0].answers != a[1].answers  # samples of one setting differ from each other


# --- formal languages ---


@pytest.mark.parametrize(
    ("language", "string", "members"),
    [
        ("parity", "0110", "1011"),
        ("aa", "aaaa", "0101"),
        ("abab", "ababab", "000100"),
        ("abab", "abba", "0000"),
        ("anbn", "aabb", "0001"),
        ("anbn", "abab", "0100"),
        ("anbncn", "aabbcc", "000001"),
        ("anbncn", "abcabc", "001000"),
        ("shuffle2", "([)]", "0001"),
        ("shuffle2", "()[]", "0101"),
        ("shuffle2", ")(", "00"),
        ("shuffle2", "(]", "00"),
    ],
)
def test_membership_of_hand_made_strings(language, string, members):
    expected = [m == "1" for m in members]
    assert synthetic.prefix_membership(language, string) == expected
    assert [synthetic.in_language(language, string[: i + 1]) for i in range(len(string))] == expected


@pytest.mark.parametrize("language", FORMAL_LANGUAGES)
def test_formal_targets_are_prefix_membership_and_strings_are_members(language):
    lang = FORMAL_LANGUAGES[language]
    tokens, targets, mask = synthetic.formal_language(language, 64, 1, 40, pad_to=48, generator=gen(0))
    assert tokens.shape == targets.shape == mask.shape == (64, 48)
    for b in range(64):
        n = int(mask[b].sum())
        assert mask[b, :n].all() and n % lang.period == 0 and 1 <= n <= 40
        assert (tokens[b, n:] == synthetic.PAD).all()
        s = "".join(lang.alphabet[t - synthetic.FIRST_SYMBOL] for t in tokens[b, :n].tolist())
        reference = [ACCEPT if synthetic.in_language(language, s[: i + 1]) else REJECT for i in range(n)]
        assert targets[b, :n].tolist() == reference, s
        if language != "parity":  # parity trains on every bit string; the others on members only
            assert synthetic.in_language(language, s), s


@pytest.mark.parametrize("language", FORMAL_LANGUAGES)
def test_formal_oracle_scores_one_and_constant_guess_scores_chance(language):
    tokens, targets, mask = synthetic.formal_language(language, 512, 41, 80, generator=gen(0))  # Bin1 of L = 40
    lengths = mask.sum(1)
    assert lengths.min() > 40 and lengths.max() <= 80
    assert synthetic.formal_accuracy(F.one_hot(targets, 3).float(), targets, mask) == (1.0, 1.0)
    position, sequence = synthetic.formal_accuracy(
        F.one_hot(torch.full_like(targets, REJECT), 3).float(), targets, mask
    )
    assert position == pytest.approx((targets == REJECT)[mask].float().mean().item())
    # a sequence is right only if every position is: always rejecting gets no string of a language right, since each
    # string drawn ends accepted (parity: no string of more than one bit has only odd prefixes)
    assert sequence == 0.0
    if language == "parity":
        assert 0.45 < position < 0.55
    else:  # at least half the prefixes are rejected: per-position chance is high, hence sequence accuracy
        assert position >= 0.5


# --- MQAR ---


def test_mqar_oracle_scores_one_and_constant_guess_scores_chance():
    tokens, targets, mask = synthetic.mqar(512, 8, generator=gen(0))
    answers = torch.zeros_like(targets)
    for b in range(len(tokens)):  # the oracle reads the pairs of the first half and answers each query
        pairs = dict(zip(tokens[b, 0:16:2].tolist(), tokens[b, 1:16:2].tolist(), strict=True))
        answers[b] = torch.tensor([pairs.get(t, 0) for t in tokens[b].tolist()])
    assert synthetic.accuracy(F.one_hot(answers, 256).float(), targets, mask) == 1.0
    constant = synthetic.accuracy(F.one_hot(torch.full_like(targets, 200), 256).float(), targets, mask)
    assert abs(constant - 1 / 128) < 0.005


# --- bAbI ---


@pytest.mark.parametrize("task", synthetic.BABI_TASKS)
def test_babi_oracle_reads_the_answer_and_constant_guess_scores_chance(task):
    rng = random.Random(0)
    stories = [synthetic.babi_story(task, 10, rng) for _ in range(600)]
    assert all(synthetic.babi_answer(s.prompt) == s.answer for s in stories)
    if task == "latest":  # the asked person moved at least twice, so an earlier fact is overwritten
        assert all(sum(f.startswith(s.person + " ") for f in s.facts) >= 2 for s in stories)
    else:
        assert all(sum(f.startswith(s.person + " ") for f in s.facts) == 1 for s in stories)
    guess = sum(s.answer == "kitchen" for s in stories) / len(stories)
    assert abs(guess - 1 / len(synthetic.BABI_PLACES)) < 0.05


def test_babi_tokens_score_the_answer_bytes():
    rng = random.Random(0)
    stories = [synthetic.babi_story("latest", n, rng) for n in (2, 5, 9)]
    tokens, targets, mask = synthetic.babi_tokens(stories)
    for b, s in enumerate(stories):
        assert bytes(targets[b][mask[b]].tolist()).decode() == s.answer
        n = len(s.prompt.encode()) + len(s.answer.encode()) - 1
        assert bytes(tokens[b, :n].tolist()).decode() == (s.prompt + s.answer)[:-1]
        assert (tokens[b, n:] == 256).all()  # padded with the byte tokenizer's eos id
    assert synthetic.sequence_accuracy(F.one_hot(targets, 257).float(), targets, mask) == 1.0
    wrong = targets.clone()
    wrong[0, mask[0].nonzero()[-1]] = ord("!")  # the last byte of one answer wrong: that answer is wrong
    assert synthetic.sequence_accuracy(F.one_hot(wrong, 257).float(), targets, mask) == pytest.approx(2 / 3)


# --- needle in a haystack ---


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
@pytest.mark.parametrize("kind", KINDS)
def test_needle_oracle_scores_one_constant_scores_zero_and_the_length_fits(kind, tokenizer, bpe):
    tok = ByteTokenizer() if tokenizer == "bytes" else bpe
    docs = documents(40)
    haystack = Haystack(tok, docs)
    texts = [*docs, "The grass is green. There and back again."]
    longest = max(len(tok.encode(" " + s)) for d in texts for s in re.split(r"(?<=[.!?])\s+", d))
    length = 1200 if tokenizer == "bytes" else 800
    for depth in (0.0, 0.3, 1.0):
        s = make_sample(kind, length, depth, tok, haystack, seed=0)
        assert string_match_all(oracle(s), s.answers) == 1.0
        assert string_match_all(constant_guess(s), s.answers) == 0.0
        assert len(s.answers) == KINDS[kind].num_queries * KINDS[kind].num_values
        assert len(tok.encode(s.prompt)) == s.prompt_tokens
        # prompt + budget fit the length, and one more haystack sentence would not
        assert 0 <= length - (s.prompt_tokens + s.max_new_tokens) <= longest
        # the asked needles sit at the sentence boundary nearest the depth
        assert abs(s.haystack_before - depth * s.haystack_tokens) <= longest
        needle = tok.decode(tok.encode(s.prompt)[s.needle_position :]).lstrip()
        assert any(needle.startswith(f"One of the special magic {KINDS[kind].value} for {k} is:") for k in s.keys)
        assert s.prompt.endswith("mentioned in the provided text " + ("is" if len(s.answers) == 1 else "are"))


def copying_bits(context: str, continuation: str) -> float:
    """An oracle by likelihood: certain of each value a needle in the context holds, uniform over 10⁷ otherwise."""
    return sum(0.0 if f" is: {v}." in context else math.log2(1e7) for v in continuation.strip().split(", "))


def blind_bits(context: str, continuation: str) -> float:
    """A model that ignores its context: the answer's bits do not depend on the prompt."""
    return 3.0 * len(continuation)


@pytest.mark.parametrize("tokenizer", ["bytes", "bpe"])
@pytest.mark.parametrize("kind", KINDS)
def test_counterfactual_prompt_hides_only_the_asked_values(kind, tokenizer, bpe):
    tok = ByteTokenizer() if tokenizer == "bytes" else bpe
    s = make_sample(kind, 1200 if tokenizer == "bytes" else 800, 0.5, tok, Haystack(tok, documents(40)), seed=3)
    cf = niah.counterfactual_prompt(s, seed=0)
    assert cf == niah.counterfactual_prompt(s, seed=0) != niah.counterfactual_prompt(s, seed=1)
    assert len(cf) == len(s.prompt) and not any(v in cf for v in s.answers)
    # everything but the values is the same text: the question, the distractor needles, the haystack
    assert re.sub(r"is: [\w-]+\.", "", cf) == re.sub(r"is: [\w-]+\.", "", s.prompt)
    swapped = [a != b for a, b in zip(cf, s.prompt, strict=True)]
    assert sum(swapped) <= sum(len(v) for v in s.answers)
    if tokenizer == "bytes":  # the needle is where it was, token for token
        assert len(tok.encode(cf)) == s.prompt_tokens


@pytest.mark.parametrize("kind", KINDS)
def test_retrieval_gain_is_full_for_a_copier_and_zero_for_a_blind_model(kind):
    tok = ByteTokenizer()
    samples = make_samples([kind], [1000], [0.0, 1.0], 2, tok, documents(40), seed=0)
    for g, s in zip(niah.retrieval_gain(samples, copying_bits), samples, strict=True):
        assert g["bits_with"] == 0.0 and g["gain"] == pytest.approx(len(s.answers) * math.log2(1e7))
        assert g["recall"] == 1.0
    assert all(g["gain"] == 0.0 and g["recall"] == 0.0 for g in niah.retrieval_gain(samples, blind_bits))


def test_model_bits_are_the_answer_ids_log_probabilities(checkpoint):
    from nestlearn.checkpoint import load_checkpoint, resolve_checkpoint

    model, tok = load_checkpoint(resolve_checkpoint(checkpoint), "cpu")
    model.eval()
    s = make_sample("passkey", 420, 0.5, tok, seed=0)
    ids = tok.encode(s.prompt + niah.answer_text(s))
    n = len(tok.encode(niah.answer_text(s)))
    expected = 0.0
    for i in range(len(ids) - n, len(ids)):  # one prefix at a time: the id at i given ids[:i]
        with torch.no_grad():
            logits, _ = model(torch.tensor([ids[:i]]))
        expected -= F.log_softmax(logits[0, -1], dim=-1)[ids[i]].item() / math.log(2)
    assert niah.model_bits(model, tok)(s.prompt, niah.answer_text(s)) == pytest.approx(expected, rel=1e-5)


def test_needle_errors_say_what_to_do():
    tok = ByteTokenizer()
    with pytest.raises(ValueError, match=r"length=300 is too short for a uuid needle: .* at least 4\d\d"):
        make_sample("uuid", 300, 0.5, tok, Haystack(tok, documents(5)))
    with pytest.raises(ValueError, match="unknown needle kind 'haystack'; expected one of"):
        make_sample("haystack", 300, 0.5, tok)
    with pytest.raises(ValueError, match="depth=1.5 must lie in"):
        make_sample("passkey", 600, 1.5, tok)
    with pytest.raises(ValueError, match="pass haystack="):
        make_sample("number", 600, 0.5, tok)


# --- the command line, end to end ---


@pytest.fixture(scope="module")
def checkpoint(corpus, tmp_path_factory) -> Path:
    from nestlearn.train import TrainConfig, train

    out = tmp_path_factory.mktemp("run")
    train(
        TrainConfig(
            preset="transformer",
            size="debug",
            data=str(corpus),
            data_root=str(out / "cache"),
            seq_len=32,
            steps=2,
            batch_size=4,
            warmup_steps=1,
            eval_every=0,
            eval_tokens=64,
            save_every=0,
            progress=False,
            tensorboard="off",
            out_dir=str(out / "run"),
        )
    )
    return out / "run"


def test_niah_command_writes_results_and_heatmaps(checkpoint, corpus, tmp_path, capsys):
    out = tmp_path / "niah"
    argv = [
        "longctx",
        "niah",
        str(checkpoint),
        "--haystack",
        str(corpus),
        "--kinds",
        "passkey",
        "number",
        "--lengths",
        "512",
        "640",
        "--depths",
        "0",
        "1",
        "--samples",
        "1",
        "--device",
        "cpu",
        "--no-progress",
        "--out-dir",
        str(out),
    ]
    assert cli(argv) == 0
    table = capsys.readouterr().out
    assert "| passkey (S-NIAH-1) |" in table and "| number (S-NIAH-2) |" in table
    result = json.loads((out / "results.json").read_text())
    assert (out / "niah-passkey.png").stat().st_size > 1000 and (out / "niah-number.png").is_file()
    assert len(result["records"]) == 2 * 2 * 2
    for r in result["records"]:
        assert 0.0 <= r["score"] <= 1.0 and r["prompt_tokens"] + r["max_new_tokens"] <= r["length"]
    for kind in ("passkey", "number"):
        grid = result["kinds"][kind]["score"]
        assert len(grid) == 2 and all(len(row) == 2 and all(0 <= v <= 100 for v in row) for row in grid)
        assert (out / f"niah-{kind}-recall.png").is_file()
        gain = result["kinds"][kind]["gain"]  # the grid is the mean of its records
        rs = [r for r in result["records"] if r["kind"] == kind and r["depth"] == 1.0 and r["length"] == 640]
        assert gain[1][1] == pytest.approx(rs[0]["gain"]) == pytest.approx(rs[0]["bits_without"] - rs[0]["bits_with"])
    assert "Retrieval gain" in table
    assert cli([*argv[:-1], str(tmp_path / "plain"), "--no-gain", "--kinds", "passkey"]) == 0
    plain = json.loads((tmp_path / "plain" / "results.json").read_text())
    assert "gain" not in plain["records"][0] and "recall" not in plain["kinds"]["passkey"]


def test_niah_with_a_window_reads_only_the_last_tokens(checkpoint, corpus, tmp_path, capsys):
    argv = ["longctx", "niah", str(checkpoint), "--haystack", str(corpus), "--kinds", "passkey", "--lengths", "512"]
    argv += ["--depths", "0", "--samples", "1", "--device", "cpu", "--no-progress"]
    runs = {}
    for window in (None, 16):
        out = tmp_path / f"w{window}"
        assert cli([*argv, "--out-dir", str(out), *(["--window", str(window)] if window else [])]) == 0
        runs[window] = json.loads((out / "results.json").read_text())
    assert runs[None]["window"] is None and runs[16]["window"] == 16
    # the needle at depth 0 lies hundreds of tokens back: with a 16-token window the answer cannot depend on it
    assert runs[16]["records"][0]["gain"] == pytest.approx(0.0, abs=1e-9)
    assert runs[None]["records"][0]["bits_with"] != runs[16]["records"][0]["bits_with"]
    with pytest.raises(SystemExit):
        cli([*argv, "--window", "0"])
    assert "--window" in capsys.readouterr().err


def test_niah_command_errors(checkpoint, corpus, tmp_path, capsys):
    base = ["longctx", "niah", str(checkpoint), "--samples", "1", "--no-progress", "--out-dir", str(tmp_path)]
    assert cli([*base, "--kinds", "number", "--data-root", str(tmp_path / "empty")]) == 1
    assert "nestlearn fetch-data wiki" in capsys.readouterr().err
    assert cli([*base, "--kinds", "uuid", "--haystack", str(corpus), "--lengths", "100"]) == 1
    assert "length=100 is too short for a uuid needle" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli([*base, "--kinds", "needle"])
    assert "invalid choice: 'needle'" in capsys.readouterr().err


def test_formal_command_prints_table_5(tmp_path, capsys):
    argv = [
        "longctx",
        "formal",
        "--presets",
        "transformer",
        "--languages",
        "parity",
        "anbn",
        "--train-length",
        "8",
        "--steps",
        "2",
        "--batch",
        "4",
        "--eval-samples",
        "16",
        "--quiet",
        "--out-dir",
        str(tmp_path),
    ]
    assert cli(argv) == 0
    table = capsys.readouterr().out
    assert "| Model | Parity Bin0 | Parity Bin1 | aⁿbⁿ Bin0 | aⁿbⁿ Bin1 |" in table
    assert "| transformer |" in table and "| constant guess |" in table
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["language"], r["preset"]) for r in rows] == [("parity", "transformer"), ("anbn", "transformer")]
    for r in rows:
        assert all(0.0 <= r[k] <= 1.0 for k in ("bin0", "bin1", "bin0_position", "bin1_position", "bin1_chance"))
        assert r["bin0_lengths"] == [1, 8] and r["bin1_lengths"] == [9, 16]
    assert rows[1]["bin1_chance"] == 0.0  # no constant answer gets a whole aⁿbⁿ string right


@pytest.mark.parametrize("suite", ["mqar", "babi"])
def test_mqar_and_babi_commands_report_accuracy_and_chance(suite, tmp_path, capsys):
    extra = ["--pairs", "4", "--test-pairs", "4", "8"] if suite == "mqar" else ["--tasks", "latest", "--facts", "3"]
    argv = [
        "longctx",
        suite,
        "--presets",
        "transformer",
        "--steps",
        "2",
        "--batch",
        "4",
        "--eval-samples",
        "16",
        "--quiet",
        "--out-dir",
        str(tmp_path),
        *extra,
    ]
    assert cli(argv) == 0
    assert "| transformer |" in capsys.readouterr().out
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert len(rows) == 2 and all(0.0 <= r["accuracy"] <= 1.0 for r in rows)
    assert rows[0]["chance"] == pytest.approx(1 / 128 if suite == "mqar" else 1 / 6)
    assert [r["pairs" if suite == "mqar" else "facts"] for r in rows] == ([4, 8] if suite == "mqar" else [3, 6])


def test_training_commands_refuse_bad_settings_before_training(tmp_path, capsys):
    assert cli(["longctx", "mqar", "--pairs", "8", "--test-pairs", "200", "--out-dir", str(tmp_path)]) == 1
    assert "num_pairs=200 needs distinct keys" in capsys.readouterr().err
    assert cli(["longctx", "babi", "--tasks", "single", "--facts", "30", "--out-dir", str(tmp_path)]) == 1
    assert "num_facts=30 must lie in [1, 24]" in capsys.readouterr().err


def test_memory_options_reach_the_mixers_and_update_periods_the_cms():
    from nestlearn import presets
    from nestlearn.evals.longctx import train_synthetic

    model, _ = train_synthetic(
        "hope",
        lambda b, g: synthetic.parity(b, 8, generator=g),
        steps=1,
        batch=2,
        max_lr=2.0,
        lr_init=0.05,
        rule="gd",
        quiet=True,
    )
    config = model.config
    assert (config.sm_titans.max_lr, config.sm_titans.lr_init, config.sm_titans.rule) == (2.0, 0.05, "gd")
    assert config.cms.max_lr == presets.hope("debug").cms.max_lr  # GD levels keep their own cap
    model, _ = train_synthetic(
        "hope", lambda b, g: synthetic.parity(b, 8, generator=g), steps=1, batch=2, update_periods=(None,), quiet=True
    )
    assert model.config.cms.update_periods == (None,) and len(model.blocks[0].cms.levels) == 1  # Hope w/o CMS


def test_lr_init_at_or_above_the_cap_is_refused_before_training(tmp_path, capsys):
    argv = [
        "longctx",
        "formal",
        "--presets",
        "titans",
        "--languages",
        "parity",
        "--max-lr",
        "2",
        "--lr-init",
        "3",
        "--out-dir",
        str(tmp_path),
    ]
    assert cli(argv) == 1
    assert "TitansConfig.lr_init=3.0: must lie strictly between 0 and max_lr=2.0" in capsys.readouterr().err


@pytest.mark.parametrize(("predict", "want"), [("oracle", 1.0), ("constant", 0.0)])
def test_mqar_command_scores_what_the_model_predicts(predict, want, tmp_path, capsys, monkeypatch):
    # the reported accuracy is the share of queried values the predictions get right: an oracle that reads the
    # next token scores exactly 1, a constant that is never a value exactly 0 (not merely "within [0, 1]")
    from nestlearn.evals import longctx

    def fake(model, tokens, reduce, chunk=64):
        return torch.roll(tokens, -1, dims=1) if predict == "oracle" else torch.zeros_like(tokens)

    monkeypatch.setattr(longctx, "_predict", fake)
    argv = [
        "longctx",
        "mqar",
        "--presets",
        "transformer",
        "--steps",
        "1",
        "--batch",
        "2",
        "--pairs",
        "4",
        "--test-pairs",
        "4",
        "6",
        "--gap",
        "5",
        "--eval-samples",
        "8",
        "--quiet",
        "--out-dir",
        str(tmp_path),
    ]
    assert cli(argv) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["accuracy"] for r in rows] == [want, want] and [r["gap"] for r in rows] == [5, 5]
