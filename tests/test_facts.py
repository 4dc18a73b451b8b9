"""New-knowledge fact sets (nestlearn.evals.facts): deterministic by seed, questions worded unlike training, answers
present in training, and QA scoring exact on constructed cases (an oracle stub in place of a model)."""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from torch import nn

import nestlearn
from nestlearn.data.tokenizer import ByteTokenizer
from nestlearn.evals.facts import (
    ATTRIBUTES,
    CONTEXT_DEMO,
    PLAIN_DEMO,
    FactConfig,
    QAItem,
    exact_match,
    first_answer,
    make_fact_sets,
    normalize_answer,
    score_qa,
    token_f1,
)


class Oracle(nn.Module):
    """A model stand-in whose greedy continuation of a "Question: …\\nAnswer:" prompt is `answer_for(question)`,
    then a full stop and the next question, as a base model rambles on; it records every prompt it reads."""

    def __init__(self, answer_for):
        super().__init__()
        self.answer_for, self.tok, self.prompts = answer_for, ByteTokenizer(), []

    def generate(self, x: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        rows = []
        for row in x.tolist():
            prompt = self.tok.decode(row)
            self.prompts.append(prompt)
            question = prompt.rsplit("Question: ", 1)[1].split("\n", 1)[0]
            new = self.tok.encode(f" {self.answer_for(question)}.\nQuestion: what next?" + " " * max_new_tokens)
            rows.append(row + new[:max_new_tokens])
        return torch.tensor(rows)


@pytest.fixture(scope="module")
def sets():
    return make_fact_sets(3, 4, seed=7)


def answers_of(fact_set):
    return {it.question: it.answers[0] for it in fact_set.test}


# --- generation ---


def test_same_seed_same_sets_other_seed_other_sets(sets):
    assert make_fact_sets(3, 4, seed=7) == sets
    assert make_fact_sets(3, 4, seed=8)[0].people != sets[0].people
    # sets come one after another from one generator: the first ones do not depend on how many are asked for
    assert make_fact_sets(1, 4, seed=7)[0] == sets[0]


def test_shape_of_a_set(sets):
    for s in sets:
        assert len(s.people) == 4
        assert len(s.documents) == 4 * 4  # 4 biographies per person
        assert len(s.statements) == 4 * 4 * len(ATTRIBUTES)
        assert len(s.test) == 4 * len(ATTRIBUTES) * 2  # 2 questions per fact
        for p in s.people:
            assert re.fullmatch(r"[A-Z][a-z]+ [A-Z][a-z]+", p.name)
            assert 1930 <= p.birth_year <= 1999


def test_no_entity_is_shared_between_sets(sets):
    for kind in ("name", "birthplace", "employer"):
        values = [getattr(p, kind) for s in sets for p in s.people]
        assert len(set(values)) == len(values), kind


def test_every_fact_in_several_wordings_and_every_statement_in_a_document(sets):
    for s in sets:
        for p in s.people:
            for a in ATTRIBUTES:
                texts = [st.text for st in s.statements if (st.person, st.attribute) == (p.name, a)]
                assert len(set(texts)) == 4, (p.name, a)  # 4 different wordings of the fact
                # with the name and the answer taken out, the wordings still differ: different templates
                frames = {t.replace(p.name, "X").replace(p.answer(a), "Y") for t in texts}
                assert len(frames) == 4
        text = "\n".join(s.documents)
        assert all(st.text in text for st in s.statements)


def test_test_questions_never_appear_in_training(sets):
    for s in sets:
        text = " ".join(s.documents).lower()
        for it in s.test:
            assert it.question.lower() not in text
            assert it.question.rstrip("?").lower() not in text
            # nor does the question's wording around the name: it is a paraphrase, not a cloze of a sentence
            for part in it.question.rstrip("?").split(it.person):
                if len(part.strip()) > 12:
                    assert part.strip().lower() not in text, (part, it.question)


def test_answers_appear_in_the_documents_about_the_person(sets):
    for s in sets:
        for it in s.test:
            about = [d for d in s.documents if it.person in d]
            assert len(about) == 4
            assert all(it.answers[0] in d for d in about)  # stated in every biography of the person


def test_config_errors_name_the_value():
    with pytest.raises(ValueError, match="people_per_set=0"):
        make_fact_sets(1, 0)
    with pytest.raises(ValueError, match="paraphrases=5"):
        FactConfig(1, 1, paraphrases=5)


# --- scoring ---


def test_normalisation_and_answer_extraction():
    assert normalize_answer("  The Eiffel   Tower! ") == "eiffel tower"
    assert normalize_answer("an architect.") == "architect"
    assert first_answer(" Paris.\nQuestion: next") == "Paris"
    assert first_answer(" Krelthialville, a city. It is big") == "Krelthialville, a city"
    assert first_answer(" the U.S. Army. Later") == "the U.S. Army"  # initials do not end a sentence
    assert first_answer(" 1.5 metres") == "1.5 metres"
    assert first_answer("\n\nnothing") == "nothing"  # leading blank lines are skipped


def test_exact_match_and_f1_on_constructed_cases():
    assert exact_match("the Kraenpaex Systems", ["Kraenpaex Systems"]) == 1.0
    assert exact_match("Kraenpaex", ["Kraenpaex Systems"]) == 0.0
    assert token_f1("Kraenpaex", ["Kraenpaex Systems"]) == pytest.approx(2 / 3)  # precision 1, recall 1/2
    assert token_f1("Kraenpaex Systems Ltd", ["Kraenpaex Systems"]) == pytest.approx(0.8)  # 2/3, 1
    assert token_f1("nothing alike", ["Kraenpaex Systems"]) == 0.0
    assert token_f1("x", ["nope", "x"]) == 1.0  # the best accepted answer counts
    assert token_f1("the", ["a"]) == 1.0  # both empty after normalisation


def test_oracle_scores_one_and_a_wrong_model_zero(sets):
    truth = answers_of(sets[0])
    right = score_qa(Oracle(truth.__getitem__), ByteTokenizer(), sets[0], max_new_tokens=40)
    assert (right["exact_match"], right["f1"], right["n"]) == (1.0, 1.0, len(sets[0].test))
    assert right["by_attribute"] == dict.fromkeys(ATTRIBUTES, 1.0)
    assert right["predictions"][0]["prediction"] == sets[0].test[0].answers[0]
    wrong = score_qa(Oracle(lambda q: "Nowhere Atall"), ByteTokenizer(), sets[0], max_new_tokens=40)
    assert (wrong["exact_match"], wrong["f1"]) == (0.0, 0.0)
    # another set's answers: as wrong as can be (no entity is shared)
    other = score_qa(Oracle(lambda q: sets[1].people[0].employer), ByteTokenizer(), sets[0], max_new_tokens=40)
    assert other["by_attribute"]["employer"] == 0.0


def test_partial_answers_get_partial_f1(sets):
    # the employer's first word only: "Kraenpaex" for "Kraenpaex Systems", F1 2/3; every other fact right
    truth = answers_of(sets[0])
    employer = {it.question for it in sets[0].test if it.attribute == "employer"}

    def half(q):
        return truth[q].split()[0] if q in employer else truth[q]

    r = score_qa(Oracle(half), ByteTokenizer(), sets[0], max_new_tokens=40, batch=3)
    share = len(employer) / len(sets[0].test)
    assert r["by_attribute"]["employer"] == 0.0
    assert r["exact_match"] == pytest.approx(1 - share)
    assert r["f1"] == pytest.approx(1 - share + share * 2 / 3)


def test_plain_items_and_an_answer_too_short_to_finish():
    items = [QAItem("What is two and two?", ("four",)), QAItem("Name a colour.", ("red", "blue"))]
    oracle = Oracle({"What is two and two?": "four", "Name a colour.": "blue"}.__getitem__)
    assert score_qa(oracle, ByteTokenizer(), items, max_new_tokens=20)["exact_match"] == 1.0
    assert PLAIN_DEMO + "Question: What is two and two?\nAnswer:" in oracle.prompts
    score_qa(oracle, ByteTokenizer(), items[:1], max_new_tokens=20, demo=False)
    assert oracle.prompts[-1] == "Question: What is two and two?\nAnswer:"
    # 3 new bytes: " fo" is all the model may say
    assert score_qa(oracle, ByteTokenizer(), items[:1], max_new_tokens=3)["exact_match"] == 0.0


@pytest.mark.parametrize("k", [1, 3, 5])
def test_few_shot_puts_the_asked_fact_and_the_person_first(sets, k):
    s = sets[0]
    oracle = Oracle(answers_of(s).__getitem__)
    r = score_qa(oracle, ByteTokenizer(), s, max_new_tokens=40, few_shot=k, seed=3)
    assert r["exact_match"] == 1.0 and r["few_shot"] == k
    assert len(oracle.prompts) == len(s.test)
    by_prompt = {p.rsplit("Question: ", 1)[1].split("\n")[0]: p for p in oracle.prompts}
    for it in s.test:
        prompt = by_prompt[it.question]
        assert prompt.startswith(CONTEXT_DEMO + "Context: ")
        assert prompt.endswith(f"\nQuestion: {it.question}\nAnswer:")
        lines = prompt.removeprefix(CONTEXT_DEMO + "Context: ").split("\nQuestion: ")[0].split("\n")
        assert len(lines) == k and len(set(lines)) == k
        stated = [next(st for st in s.statements if st.text == line) for line in lines]  # each is a statement
        assert sum((st.person, st.attribute) == (it.person, it.attribute) for st in stated) == 1
        # the person's other facts next, one wording each, then other people's
        assert sorted(st.attribute for st in stated if st.person == it.person) == sorted(
            {st.attribute for st in stated if st.person == it.person}
        )
        assert sum(st.person == it.person for st in stated) == min(k, len(ATTRIBUTES))
    again = Oracle(answers_of(s).__getitem__)
    score_qa(again, ByteTokenizer(), s, max_new_tokens=40, few_shot=k, seed=3)
    assert sorted(again.prompts) == sorted(oracle.prompts)  # deterministic by seed


def test_few_shot_needs_the_sets_statements(sets):
    oracle = Oracle(answers_of(sets[0]).__getitem__)
    with pytest.raises(ValueError, match="few_shot=2 puts statements"):
        score_qa(oracle, ByteTokenizer(), sets[0].test, few_shot=2)
    with pytest.raises(ValueError, match="none states"):
        score_qa(oracle, ByteTokenizer(), sets[0].test, few_shot=2, statements=sets[1].statements)


def test_a_real_tiny_model_scores_deterministically(sets):
    config = dataclasses.replace(nestlearn.presets.transformer("debug"), vocab_size=257)
    model = nestlearn.build(config)
    model.train()
    a = score_qa(model, ByteTokenizer(), sets[0].test[:6], max_new_tokens=4, batch=4)
    b = score_qa(model, ByteTokenizer(), sets[0].test[:6], max_new_tokens=4, batch=4)
    assert model.training  # given back in the mode it was in
    assert [r["continuation"] for r in a["predictions"]] == [r["continuation"] for r in b["predictions"]]
    assert 0.0 <= a["exact_match"] <= a["f1"] <= 1.0  # an exact match is an F1 of 1
