"""New knowledge: facts about fictitious people, generated here from a seed, and how well a model answers them.

Whether a continual learner *learns* something new can only be measured on knowledge it cannot have had before, so,
as knowledge-injection studies do (e.g. Ovadia et al. 2024, Allen-Zhu & Li 2023's synthetic biographies), the facts
are about people who do not exist: their names, birth cities and employers are made of seeded syllables, so they
are in no pretraining corpus, and a model that answers them correctly after training learned them from the training
documents. A fact set (`FactSet`) holds, for `people_per_set` people, four facts each (birth city, birth year,
employer, profession):

- training documents: short biographies of each person, `paraphrases` of them, each fact stated in a different
  templated sentence form in each (so every fact appears in `paraphrases` wordings), the sentences in seeded order;
- statements: every one of those sentences on its own (what `few_shot` puts in a prompt);
- test items: questions in wordings that training never uses ("In which city did X come into the world?" for
  "X was born in Y."), each with its one exact answer, so that a model must have learned the fact, not the sentence.

`score_qa` asks each question with greedy decoding behind a short fixed prompt ("Question: …\\nAnswer:", after one
fixed worked example of that format) and scores exact match and token F1 (SQuAD's normalisation;
`normalize_answer`, `first_answer`). With `few_shot=k`, k statements of the same set precede the question (the
asked fact's, the person's other facts, then other people's): the base model reading the task's material in its
prompt, the in-context reference for what training should achieve.

    sets = make_fact_sets(n_sets=4, people_per_set=8, seed=0)
    score_qa(model, tokenizer, sets[0])                 # zero-shot: ~0 before training on sets[0].documents
    score_qa(model, tokenizer, sets[0], few_shot=8)     # the set's statements in the prompt
"""

from __future__ import annotations

import random
import re
import string
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ..runtime import model_device

__all__ = [
    "ATTRIBUTES",
    "Person",
    "Statement",
    "QAItem",
    "FactSet",
    "FactConfig",
    "make_fact_sets",
    "score_qa",
    "qa_prompt",
    "normalize_answer",
    "first_answer",
    "exact_match",
    "token_f1",
    "greedy_continuations",
]

ATTRIBUTES = ("birthplace", "birth_year", "employer", "profession")

# --- the invented world ---

# Syllables that make pronounceable but unusual words; a name of two or three of them is not a word of any language
# the pretrained tokenizer was fitted to (it is split into several pieces), so the model has no prior about it.
_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr", "kr", "tr", "th", "gl")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ei", "ou", "ia")
_CODAS = ("", "", "", "n", "r", "l", "s", "k", "th", "m")  # no "x": "s" + "e" + "x" would spell a word
_CITY_SUFFIXES = ("ton", "burg", "ford", "haven", "mouth", "stad", "ville", "grad", "wick", "mere")
_COMPANY_SUFFIXES = (
    "Dynamics",
    "Systems",
    "Industries",
    "Labs",
    "Analytics",
    "Foods",
    "Motors",
    "Textiles",
    "Robotics",
    "Logistics",
)
# Real professions: a guess among 20 is right 5% of the time, which `score_qa`'s per-attribute figures show.
_PROFESSIONS = (
    "architect",
    "violinist",
    "geologist",
    "pharmacist",
    "carpenter",
    "journalist",
    "astronomer",
    "veterinarian",
    "librarian",
    "translator",
    "surgeon",
    "economist",
    "photographer",
    "chemist",
    "sculptor",
    "pilot",
    "botanist",
    "electrician",
    "historian",
    "baker",
)
_YEARS = (1930, 1999)  # inclusive

# Training wordings (4 per attribute; a document uses one of each), and test wordings that none of them share.
# {a_profession} is the profession with its article ("an architect").
_TRAIN_TEMPLATES = {
    "birthplace": (
        "{name} was born in {birthplace}.",
        "{name}'s birthplace is {birthplace}.",
        "{birthplace} is the city where {name} was born.",
        "{name} grew up in {birthplace}, the city of their birth.",
    ),
    "birth_year": (
        "{name} was born in the year {birth_year}.",
        "{name}'s year of birth is {birth_year}.",
        "The birth of {name} took place in {birth_year}.",
        "In {birth_year}, {name} was born.",
    ),
    "employer": (
        "{name} works for {employer}.",
        "{name} is employed by {employer}.",
        "{employer} employs {name}.",
        "{name}'s employer is {employer}.",
    ),
    "profession": (
        "{name} is {a_profession}.",
        "{name} works as {a_profession}.",
        "By profession, {name} is {a_profession}.",
        "{name} has a career as {a_profession}.",
    ),
}
_TEST_TEMPLATES = {
    "birthplace": ("Where was {name} born?", "In which city did {name} come into the world?"),
    "birth_year": ("In what year was {name} born?", "What is the birth year of {name}?"),
    "employer": ("Which company does {name} work at?", "At which firm does {name} have a job?"),
    "profession": ("What does {name} do for a living?", "What is {name}'s occupation?"),
}
MAX_PARAPHRASES = min(len(t) for t in _TRAIN_TEMPLATES.values())
MAX_QUESTIONS = min(len(t) for t in _TEST_TEMPLATES.values())


@dataclass(frozen=True)
class Person:
    """One invented person and their four facts."""

    name: str
    birthplace: str
    birth_year: int
    employer: str
    profession: str

    def answer(self, attribute: str) -> str:
        return str(getattr(self, attribute))


@dataclass(frozen=True)
class Statement:
    """One training sentence, and the fact it states: (person's name, attribute)."""

    text: str
    person: str
    attribute: str


@dataclass(frozen=True)
class QAItem:
    """A question and its accepted answers (exact match against any of them). `person` and `attribute` name the
    fact asked about (for facts; empty for other QA), `context` is text the prompt gives before the question."""

    question: str
    answers: tuple[str, ...]
    person: str = ""
    attribute: str = ""
    context: str = ""


@dataclass
class FactSet:
    """The material of one task: the people, their training biographies, the statements those are made of, and
    the test questions."""

    index: int
    people: list[Person]
    documents: list[str]
    statements: list[Statement]
    test: list[QAItem]


@dataclass(frozen=True)
class FactConfig:
    """How fact sets are made. `paraphrases`: biographies per person, each stating every fact in another wording
    (at most 4); `questions`: test questions per fact, each in another wording (at most 2)."""

    n_sets: int
    people_per_set: int
    seed: int = 0
    paraphrases: int = 4
    questions: int = 2

    def __post_init__(self) -> None:
        for name in ("n_sets", "people_per_set", "paraphrases", "questions"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")
        if self.paraphrases > MAX_PARAPHRASES:
            raise ValueError(
                f"paraphrases={self.paraphrases}: there are {MAX_PARAPHRASES} training wordings per fact; give at "
                f"most {MAX_PARAPHRASES} (or add templates to _TRAIN_TEMPLATES)"
            )
        if self.questions > MAX_QUESTIONS:
            raise ValueError(
                f"questions={self.questions}: there are {MAX_QUESTIONS} test wordings per fact; give at most "
                f"{MAX_QUESTIONS} (or add templates to _TEST_TEMPLATES)"
            )


def _word(rng: random.Random, syllables: int) -> str:
    return "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS) for _ in range(syllables))


class _Unique:
    """Draws invented words never drawn before (across every set, so that no two tasks share an entity)."""

    def __init__(self, rng: random.Random):
        self.rng, self.used = rng, set()

    def __call__(self, make) -> str:
        for _ in range(1000):
            word = make(self.rng)
            if word.lower() not in self.used:
                self.used.add(word.lower())
                return word
        raise RuntimeError("could not draw a new invented word in 1000 tries; the syllable inventory is too small")


def _person(rng: random.Random, unique: _Unique) -> Person:
    return Person(
        name=unique(lambda r: f"{_word(r, 2).capitalize()} {_word(r, 2).capitalize()}"),
        birthplace=unique(lambda r: _word(r, r.choice((1, 2))).capitalize() + r.choice(_CITY_SUFFIXES)),
        birth_year=rng.randint(*_YEARS),
        employer=unique(lambda r: f"{_word(r, 2).capitalize()} {r.choice(_COMPANY_SUFFIXES)}"),
        profession=rng.choice(_PROFESSIONS),
    )


def _fields(person: Person) -> dict[str, str]:
    article = "an" if person.profession[0] in "aeiou" else "a"
    return {
        "name": person.name,
        "birthplace": person.birthplace,
        "birth_year": str(person.birth_year),
        "employer": person.employer,
        "a_profession": f"{article} {person.profession}",
    }


def make_fact_sets(
    n_sets: int, people_per_set: int, seed: int = 0, *, paraphrases: int = 4, questions: int = 2
) -> list[FactSet]:
    """`n_sets` fact sets of `people_per_set` invented people each (module docstring), deterministic by `seed`.

    Sets are drawn one after another from one generator, so the first k sets of a seed are the same whatever
    `n_sets` is, and no name, city or company occurs in two sets. Biography j of a person states fact a in
    wording (j + offset_a) mod 4, the offsets seeded per person, so each document mixes wordings and each fact
    appears in `paraphrases` different ones."""
    config = FactConfig(n_sets, people_per_set, seed, paraphrases, questions)
    rng = random.Random(f"nestlearn-facts-{config.seed}")
    unique = _Unique(rng)
    sets = []
    for index in range(config.n_sets):
        people = [_person(rng, unique) for _ in range(config.people_per_set)]
        documents, statements, test = [], [], []
        for person in people:
            values = _fields(person)
            offsets = {a: rng.randrange(MAX_PARAPHRASES) for a in ATTRIBUTES}
            for j in range(config.paraphrases):
                sentences = []
                for a in ATTRIBUTES:
                    text = _TRAIN_TEMPLATES[a][(j + offsets[a]) % MAX_PARAPHRASES].format(**values)
                    sentences.append(text)
                    statements.append(Statement(text, person.name, a))
                rng.shuffle(sentences)
                documents.append(" ".join(sentences))
            for a in ATTRIBUTES:
                for q in _TEST_TEMPLATES[a][: config.questions]:
                    test.append(QAItem(q.format(**values), (person.answer(a),), person.name, a))
        rng.shuffle(documents)  # people interleaved, not one person's biographies in a row
        sets.append(FactSet(index, people, documents, statements, test))
    return sets


# --- scoring ---

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)
# a sentence ends at . ! or ? after a lower-case letter, a digit or a closing bracket or quote, before white space
# or the end: "U.S. Army" and "1.5 m" are not cut, "Paris. It is" is
_SENTENCE_END = re.compile(r"(?<=[a-z0-9)\]\"'%])[.!?](?=\s|$)")


def normalize_answer(text: str) -> str:
    """SQuAD's normalisation (its official evaluate-v2.0.py): lower case, punctuation removed, the articles a, an,
    the removed, runs of white space made one space."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def first_answer(continuation: str) -> str:
    """The answer in a model's continuation: its text up to the first line break, then up to the end of its first
    sentence (`_SENTENCE_END`), stripped of white space. " Paris.\\nQuestion: ..." gives "Paris"."""
    line = continuation.lstrip().split("\n", 1)[0]
    end = _SENTENCE_END.search(line)
    return (line[: end.start()] if end else line).strip()


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised answer, else 0.0."""
    p = normalize_answer(prediction)
    return float(any(p == normalize_answer(a) for a in answers))


def token_f1(prediction: str, answers: Sequence[str]) -> float:
    """SQuAD's token F1, the best over the answers: the harmonic mean of precision and recall of the normalised
    prediction's words against an answer's (as multisets); 1.0 when both are empty, 0.0 when one is."""

    def f1(p: list[str], g: list[str]) -> float:
        if not p or not g:
            return float(p == g)
        same = sum((Counter(p) & Counter(g)).values())
        if same == 0:
            return 0.0
        precision, recall = same / len(p), same / len(g)
        return 2 * precision * recall / (precision + recall)

    words = normalize_answer(prediction).split()
    return max(f1(words, normalize_answer(a).split()) for a in answers)


# One fixed demonstration before every question, in the same format: without it a base model does not answer in
# a few words (SmolLM2-135M continues "Answer:" with a new line, "The answer is: …" or the question's subject, which
# scored 0 even with the answer in its prompt); with it, it answers in the demonstration's style. A context question
# gets two, with answers of two kinds (a name, a place), so that neither kind is favoured.
PLAIN_DEMO = "Question: What is the capital of France?\nAnswer: Paris\n\n"
CONTEXT_DEMO = (
    "Context: The Eiffel Tower was designed by the engineering firm Eiffel et Compagnie. It was completed in 1889.\n"
    "Question: Which company designed the Eiffel Tower?\nAnswer: Eiffel et Compagnie\n\n"
    "Context: Ada Lovelace was a mathematician. She was born in London in 1815.\n"
    "Question: Where was Ada Lovelace born?\nAnswer: London\n\n"
)


def qa_prompt(question: str, context: str = "", demo: bool = True) -> str:
    """The fixed prompt: "Question: {question}\\nAnswer:", after "Context: {context}\\n" when there is context;
    with `demo`, after `PLAIN_DEMO` (no context) or `CONTEXT_DEMO` (context), its worked examples."""
    head = f"Context: {context}\n" if context else ""
    if demo:
        head = (CONTEXT_DEMO if context else PLAIN_DEMO) + head
    return f"{head}Question: {question}\nAnswer:"


@torch.no_grad()
def greedy_continuations(model, tokenizer, prompts: Sequence[str], max_new_tokens: int, batch: int = 8) -> list[str]:
    """The text each prompt is continued with by `max_new_tokens` greedy tokens (`model.generate`).

    Only prompts of the same length in tokens share a batch: a model call has no padding mask, and left padding
    would change what the model reads, so the result would depend on what a prompt was batched with. The model is
    put in eval mode for the call and given back in the mode it was in."""
    if max_new_tokens < 1 or batch < 1:
        raise ValueError(f"max_new_tokens={max_new_tokens} and batch={batch} must both be at least 1")
    ids = [tokenizer.encode(p) for p in prompts]
    empty = [i for i, x in enumerate(ids) if not x]
    if empty:
        raise ValueError(f"prompt {empty[0]} ({prompts[empty[0]]!r}) encodes to no tokens: give it some text")
    device = model_device(model)
    by_length: dict[int, list[int]] = {}
    for i, x in enumerate(ids):
        by_length.setdefault(len(x), []).append(i)
    out = [""] * len(prompts)
    was_training = model.training
    model.eval()
    try:
        for length, rows in sorted(by_length.items()):
            for lo in range(0, len(rows), batch):
                group = rows[lo : lo + batch]
                x = torch.tensor([ids[i] for i in group], dtype=torch.long, device=device)
                y = model.generate(x, max_new_tokens)
                for i, new in zip(group, y[:, length:].tolist(), strict=True):
                    out[i] = tokenizer.decode(new)
    finally:
        model.train(was_training)
    return out


def _few_shot_context(item: QAItem, statements: Sequence[Statement], k: int, rng: random.Random) -> str:
    """k statements of the set, one a line, in random order (so the answer's place tells nothing): one wording of
    the asked fact, then one of each other fact about the same person (k = 4 gives the person's whole biography),
    then statements about other people; as retrieval would choose them, nearest first."""
    same = [s for s in statements if s.person == item.person]
    if not any(s.attribute == item.attribute for s in same):
        raise ValueError(
            f"few_shot needs the statements of the set the questions come from; none states {item.attribute} of "
            f"{item.person!r}: pass the FactSet itself as items, or statements=that_set.statements"
        )
    by_attribute: dict[str, list[Statement]] = {}
    for s in same:
        by_attribute.setdefault(s.attribute, []).append(s)
    others = sorted(by_attribute.keys() - {item.attribute})
    rng.shuffle(others)
    picked = [rng.choice(by_attribute[a]) for a in [item.attribute, *others]][:k]
    rest = [s for s in statements if s.person != item.person]
    picked += rng.sample(rest, min(k - len(picked), len(rest)))
    rng.shuffle(picked)
    return "\n".join(s.text for s in picked)


def score_qa(
    model,
    tokenizer,
    items: FactSet | Sequence[QAItem],
    max_new_tokens: int = 8,
    batch: int = 8,
    *,
    few_shot: int = 0,
    statements: Sequence[Statement] | None = None,
    seed: int = 0,
    demo: bool = True,
) -> dict:
    """Exact match and token F1 of the model's greedy answers to `items` (a FactSet's test items, or any QAItems).

    Each prompt is `qa_prompt(question, context, demo)`: "Question: {question}\\nAnswer:", after "Context:
    {context}\\n" when the item has a context, after a fixed worked example of the format when `demo` (the default;
    `PLAIN_DEMO`, `CONTEXT_DEMO`). With `few_shot=k` (facts only), the context is k statements of the item's set
    (`statements`: that set's; taken from `items` when it is a FactSet), drawn by `seed`: the asked fact's, the same
    person's other facts, then other people's (`_few_shot_context`).
    The model continues each prompt by `max_new_tokens` greedy tokens; the prediction is `first_answer` of that
    continuation (up to the first line break, then to the end of the first sentence), compared after
    `normalize_answer` (lower case; punctuation and the articles a, an, the removed) with each accepted answer.

    Returns exact_match and f1 (means over the items), n, exact_match per attribute (where items name one),
    seconds, and every item's question, prediction, answers and scores under "predictions"."""
    if isinstance(items, FactSet):
        statements = items.statements if statements is None else statements
        items = items.test
    items = list(items)
    if not items:
        raise ValueError("items is empty: give at least one question to score")
    if isinstance(few_shot, bool) or not isinstance(few_shot, int) or few_shot < 0:
        raise ValueError(f"few_shot={few_shot!r} must be an int >= 0 (the statements put in each prompt)")
    if few_shot and not statements:
        raise ValueError(
            f"few_shot={few_shot} puts statements of the questions' set in the prompt, but none were given: pass "
            "the FactSet itself as items, or statements=that_set.statements"
        )
    rng = random.Random(f"nestlearn-few-shot-{seed}")
    contexts = [_few_shot_context(it, statements, few_shot, rng) if few_shot else it.context for it in items]
    prompts = [qa_prompt(it.question, c, demo) for it, c in zip(items, contexts, strict=True)]
    t0 = time.perf_counter()
    continuations = greedy_continuations(model, tokenizer, prompts, max_new_tokens, batch)
    seconds = time.perf_counter() - t0
    rows = []
    for it, cont in zip(items, continuations, strict=True):
        pred = first_answer(cont)
        rows.append(
            {
                "question": it.question,
                "prediction": pred,
                "continuation": cont,
                "answers": list(it.answers),
                "exact_match": exact_match(pred, it.answers),
                "f1": token_f1(pred, it.answers),
            }
        )
    by_attribute: dict[str, list[float]] = {}
    for it, r in zip(items, rows, strict=True):
        if it.attribute:
            by_attribute.setdefault(it.attribute, []).append(r["exact_match"])
    return {
        "exact_match": sum(r["exact_match"] for r in rows) / len(rows),
        "f1": sum(r["f1"] for r in rows) / len(rows),
        "n": len(rows),
        "few_shot": few_shot,
        "by_attribute": {a: sum(v) / len(v) for a, v in by_attribute.items()},
        "seconds": seconds,
        "predictions": rows,
    }
