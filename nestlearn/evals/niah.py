"""Needle in a haystack after RULER (Hsieh et al. 2024; paper Table 1): generated here, scored by exact match.

    kind        RULER task       haystack                     needles (keys × values)        asked
    passkey     S-NIAH-1         "The grass is green. ..."    1 × 1 number                   1 key
    number      S-NIAH-2         corpus text                  1 × 1 number                   1 key
    uuid        S-NIAH-3         corpus text                  1 × 1 uuid                     1 key
    multikey    MK-NIAH-1        corpus text                  4 × 1 number                   1 key, 3 distractors
    multiquery  MQ-NIAH          corpus text                  4 × 1 number                   all 4 keys
    multivalue  MV-NIAH          corpus text                  1 × 4 numbers                  1 key, all 4 values

A needle is RULER's sentence "One of the special magic numbers for {key} is: {value}." with an adjective-noun key
and a 7-digit number or a uuid as value. The prompt is RULER's template: a preamble, the haystack with the needles
inserted between two of its sentences, the question and the answer prefix ("... The special magic number for
{key} mentioned in the provided text is"), after which the model generates greedily. A sample's score is the
fraction of its values found in the generated text (RULER's string_match_all); it is correct at 1.0.

Retrieval gain. A model that cannot yet follow the question scores 0 whatever its memory holds, so each sample is
also scored by likelihood: the bits of the answer (" " + the values joined by ", ") after the prompt, against the
bits of the same answer after the counterfactual prompt, in which every asked value in the needles is swapped for a
fresh value of the same form (same characters count; positions unchanged for bytes). gain = bits without − bits
with: how many bits of the answer the model took from the needle. A model that ignores its context gains 0; one
that copies the needle gains all the answer's bits (recall = gain / bits without = 100%).

Length and depth. `length` counts tokens of the given tokenizer, as RULER does: the prompt plus the generation
budget fit in it, and one more haystack sentence would not. The asked needles sit together at the sentence
boundary nearest to `depth` × the haystack's tokens (0: before the first sentence, 1: after the last); multikey's
distractor needles sit at boundaries drawn at random. A sample is a pure function of (seed, kind, length, depth,
index, tokenizer, documents).
"""

from __future__ import annotations

import math
import random
import re
import uuid
from bisect import bisect_left
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from ..data.tokenizer import Tokenizer

__all__ = [
    "KINDS",
    "Kind",
    "NeedleSample",
    "Haystack",
    "make_sample",
    "make_samples",
    "string_match_all",
    "oracle",
    "constant_guess",
    "model_answerer",
    "score_samples",
    "REPEAT_HAYSTACK",
    "answer_text",
    "counterfactual_prompt",
    "model_bits",
    "retrieval_gain",
]


@dataclass(frozen=True)
class Kind:
    ruler: str  # the RULER task it follows
    haystack: str  # "repeat" or "corpus"
    value: str  # "numbers" or "uuids"
    num_keys: int  # needles' keys in the text
    num_values: int  # values per key
    num_queries: int  # keys asked for (the first num_queries of the keys)


KINDS: dict[str, Kind] = {
    "passkey": Kind("S-NIAH-1", "repeat", "numbers", 1, 1, 1),
    "number": Kind("S-NIAH-2", "corpus", "numbers", 1, 1, 1),
    "uuid": Kind("S-NIAH-3", "corpus", "uuids", 1, 1, 1),
    "multikey": Kind("MK-NIAH-1", "corpus", "numbers", 4, 1, 1),
    "multiquery": Kind("MQ-NIAH", "corpus", "numbers", 4, 1, 4),
    "multivalue": Kind("MV-NIAH", "corpus", "numbers", 1, 4, 1),
}

# RULER's 'repeat' haystack, taken here one sentence at a time
REPEAT_HAYSTACK = (
    "The grass is green.",
    "The sky is blue.",
    "The sun is yellow.",
    "Here we go.",
    "There and back again.",
)
NEEDLE = "One of the special magic {type} for {key} is: {value}."
# RULER's niah template and answer prefix; with one value asked, RULER turns the plurals singular (below)
PREAMBLE = (
    "Some special magic {type} are hidden within the following text. Make sure to memorize it. "
    "I will quiz you about the {type} afterwards.\n"
)
QUESTION = (
    "\nWhat are all the special magic {type} for {query} mentioned in the provided text? "
    "The special magic {type} for {query} mentioned in the provided text are"
)
# keys are adjective-noun pairs as RULER's (drawn there from wonderwords' lists; a fixed list here, no download)
ADJECTIVES = (
    "ancient",
    "bitter",
    "bright",
    "calm",
    "clever",
    "crooked",
    "curious",
    "damp",
    "eager",
    "fancy",
    "fragile",
    "gentle",
    "glossy",
    "hollow",
    "humble",
    "icy",
    "jolly",
    "lively",
    "lonely",
    "loud",
    "mellow",
    "misty",
    "noisy",
    "odd",
    "pale",
    "polite",
    "proud",
    "quiet",
    "rapid",
    "rustic",
    "shiny",
    "silent",
    "sleepy",
    "smooth",
    "steep",
    "sturdy",
    "tame",
    "tender",
    "tidy",
    "vague",
    "vivid",
    "wandering",
    "wary",
    "wicked",
    "witty",
    "young",
    "zealous",
    "brave",
)
NOUNS = (
    "anchor",
    "badger",
    "banjo",
    "basket",
    "beacon",
    "bonfire",
    "canyon",
    "carpet",
    "castle",
    "comet",
    "cottage",
    "crayon",
    "dolphin",
    "falcon",
    "fountain",
    "garnet",
    "glacier",
    "harbor",
    "helmet",
    "island",
    "jacket",
    "kettle",
    "lantern",
    "ledger",
    "meadow",
    "mirror",
    "nectar",
    "orchard",
    "paddle",
    "pebble",
    "pigeon",
    "quarry",
    "ribbon",
    "saddle",
    "scarf",
    "shovel",
    "spindle",
    "teapot",
    "thimble",
    "tunnel",
    "umbrella",
    "valley",
    "violin",
    "walnut",
    "whistle",
    "willow",
    "yogurt",
    "zipper",
)
_NEEDLE_RE = re.compile(r"One of the special magic \w+ for ([\w-]+) is: ([\w-]+)\.")
_QUERY_RE = re.compile(r"What (?:is|are all) the special magic \w+ for (.+?) mentioned in the provided text\?")


@dataclass
class NeedleSample:
    kind: str
    length: int  # requested: prompt_tokens + max_new_tokens <= length
    depth: float  # requested, as a fraction of the haystack's tokens
    index: int
    prompt: str
    answers: list[str]  # every value the output must contain
    keys: list[str]  # the keys asked for
    max_new_tokens: int  # the generation budget
    prompt_tokens: int
    needle_position: int  # token index of the first asked needle in the prompt
    haystack_tokens: int  # tokens of the haystack sentences (each counted with its leading space)
    haystack_before: int  # of those, the ones before the asked needles
    haystack_sentences: int

    def to_dict(self, with_prompt: bool = False) -> dict:
        d = asdict(self)
        if not with_prompt:
            d.pop("prompt")
        return d


class Haystack:
    """Sentences to fill a context with: RULER's repeated sentences, or consecutive documents of a corpus split at
    sentence ends (., !, ?) and line breaks, whitespace collapsed. Token counts are cached per document."""

    def __init__(self, tokenizer: Tokenizer, documents: Sequence[str] | None = None):
        self.tokenizer, self.documents = tokenizer, documents
        self._cache: dict[int, list[tuple[str, int]]] = {}
        if documents is not None and len(documents) == 0:
            raise ValueError("the haystack corpus has no documents")

    def _document(self, i: int) -> list[tuple[str, int]]:
        if i not in self._cache:
            sents = _sentences(self.documents[i]) if self.documents is not None else list(REPEAT_HAYSTACK)
            counts = [len(ids) for ids in self.tokenizer.encode_batch([" " + s for s in sents])]
            self._cache[i] = list(zip(sents, counts, strict=True))
        return self._cache[i]

    def take(self, start: int, tokens: int) -> list[tuple[str, int]]:
        """Sentences (with their token counts) from document `start` on, wrapping around the corpus, until they
        hold at least `tokens` tokens."""
        out, total, n = [], 0, len(self.documents) if self.documents is not None else 1
        i = start % n
        while total < tokens:
            doc = self._document(i)
            out += doc
            total += sum(c for _, c in doc)
            i = (i + 1) % n
            if i == start % n and total == 0:
                raise ValueError("the haystack corpus has no text: its documents hold no sentence")
        return out


def _sentences(text: str) -> list[str]:
    parts = re.split(r"(?<=[.!?])\s+|\n+", text)
    return [" ".join(p.split()) for p in parts if p.strip()]


def _key(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)}-{rng.choice(NOUNS)}"


def _value(rng: random.Random, kind: Kind) -> str:
    if kind.value == "uuids":
        return str(uuid.UUID(int=rng.getrandbits(128), version=4))
    return str(rng.randint(10**6, 10**7 - 1))  # 7 digits, as RULER's


def _nearest_boundary(cum: list[int], target: float) -> int:
    """The sentence boundary k (k sentences before it) whose token offset cum[k] is nearest to target."""
    k = bisect_left(cum, target)
    if k == len(cum):
        return k - 1
    return k - 1 if k > 0 and target - cum[k - 1] <= cum[k] - target else k


def make_sample(
    kind: str,
    length: int,
    depth: float,
    tokenizer: Tokenizer,
    haystack: Haystack | None = None,
    seed: int = 0,
    index: int = 0,
    max_new_tokens: int | None = None,
) -> NeedleSample:
    """One needle-in-a-haystack prompt of `length` tokens with the asked needles at `depth`.

    Args:
        kind: one of KINDS.
        haystack: the corpus sentences (a `Haystack` over documents); not needed for `passkey`.
        max_new_tokens: the generation budget; default: the tokens of the answer (values joined by ", ") plus 8.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown needle kind {kind!r}; expected one of {list(KINDS)}")
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must lie in [0, 1] (a fraction of the haystack)")
    k = KINDS[kind]
    if k.haystack == "repeat":
        haystack = Haystack(tokenizer)
    elif haystack is None or haystack.documents is None:
        raise ValueError(f"kind {kind!r} hides its needles in corpus text: pass haystack=Haystack(tokenizer, docs)")
    rng = random.Random(f"niah:{seed}:{kind}:{length}:{depth}:{index}")  # str seeds hash the same in every process

    keys: list[str] = []
    while len(keys) < k.num_keys:  # distinct keys
        key = _key(rng)
        if key not in keys:
            keys.append(key)
    values = [[_value(rng, k) for _ in range(k.num_values)] for _ in keys]
    asked = keys[: k.num_queries]
    answers = [v for key in asked for v in values[keys.index(key)]]
    needles = [NEEDLE.format(type=k.value, key=key, value=v) for key, vs in zip(keys, values, strict=True) for v in vs]
    asked_needles = [n for n in needles if _NEEDLE_RE.match(n).group(1) in asked]
    rng.shuffle(asked_needles)  # RULER shuffles the needles
    distractors = [(rng.random(), n) for n in needles if n not in asked_needles]

    singular = k.num_queries * k.num_values == 1
    head, tail, vtype = PREAMBLE, QUESTION, k.value
    if singular:  # RULER's replacements for one value: "Some ... are" -> "A ... is", "What are all" -> "What is"
        head = head.replace("Some", "A").replace("are", "is")
        tail = tail.replace("are all", "is").replace("are", "is")
        vtype = vtype[:-1]
    query = asked[0] if len(asked) == 1 else ", ".join(asked[:-1]) + ", and " + asked[-1]
    head, tail = head.format(type=vtype), tail.format(type=vtype, query=query)
    budget = max_new_tokens or len(tokenizer.encode(" " + ", ".join(answers))) + 8

    def build(sentences: list[tuple[str, int]]) -> tuple[str, int, int]:
        """The prompt with these haystack sentences, the char offset where the first asked needle's text starts
        (its leading space included) and the haystack tokens before the asked needles."""
        cum = [0]
        for _, c in sentences:
            cum.append(cum[-1] + c)
        at = _nearest_boundary(cum, depth * cum[-1])
        slots: dict[int, list[str]] = {at: list(asked_needles)}
        for u, n in distractors:
            slots.setdefault(_nearest_boundary(cum, u * cum[-1]), []).append(n)
        pieces: list[str] = []
        for i in range(len(sentences) + 1):
            if i == at:
                j = len(pieces)
            pieces += slots.get(i, [])
            if i < len(sentences):
                pieces.append(sentences[i][0])
        start = len(head) + len(" ".join(pieces[:j]))  # at the joining space, or right after the preamble's newline
        return head + " ".join(pieces) + tail, start, cum[at]

    base = len(tokenizer.encode(build([])[0]))
    if base + budget > length:
        raise ValueError(
            f"length={length} is too short for a {kind} needle: the prompt without haystack takes {base} "
            f"tokens and the answer budget {budget} more; use a length of at least {base + budget}, "
            "more to leave room for the haystack"
        )
    pool = haystack.take(rng.randrange(len(haystack.documents or [0])), length)
    cum = [0]
    for _, c in pool:
        cum.append(cum[-1] + c)
    n = bisect_left(cum, length - budget - base + 1) - 1  # the most sentences whose counted tokens fit
    prompt_tokens = len(tokenizer.encode(build(pool[:n])[0]))
    # counts of sentences encoded alone may differ slightly from the whole prompt's (BPE merges): correct exactly
    while n > 0 and prompt_tokens + budget > length:
        n -= 1
        prompt_tokens = len(tokenizer.encode(build(pool[:n])[0]))
    while n < len(pool) and len(tokenizer.encode(build(pool[: n + 1])[0])) + budget <= length:
        n += 1
        prompt_tokens = len(tokenizer.encode(build(pool[:n])[0]))
    prompt, needle_char, before = build(pool[:n])
    return NeedleSample(
        kind=kind,
        length=length,
        depth=depth,
        index=index,
        prompt=prompt,
        answers=answers,
        keys=asked,
        max_new_tokens=budget,
        prompt_tokens=prompt_tokens,
        needle_position=len(tokenizer.encode(prompt[:needle_char])),
        haystack_tokens=cum[n],
        haystack_before=before,
        haystack_sentences=n,
    )


def make_samples(
    kinds: Sequence[str],
    lengths: Sequence[int],
    depths: Sequence[float],
    num_samples: int,
    tokenizer: Tokenizer,
    documents: Sequence[str] | None = None,
    seed: int = 0,
    max_new_tokens: int | None = None,
) -> list[NeedleSample]:
    """Every (kind, length, depth, index) sample, in that order."""
    needs_corpus = any(KINDS[k].haystack == "corpus" for k in kinds if k in KINDS)
    haystack = Haystack(tokenizer, documents) if needs_corpus else None
    return [
        make_sample(kind, length, depth, tokenizer, haystack, seed, i, max_new_tokens)
        for kind in kinds
        for length in lengths
        for depth in depths
        for i in range(num_samples)
    ]


# --- scoring ---


def string_match_all(prediction: str, references: Sequence[str]) -> float:
    """RULER's metric: the fraction of references contained in the prediction, case-insensitively."""
    return sum(r.lower() in prediction.lower() for r in references) / len(references)


def oracle(sample: NeedleSample) -> str:
    """A perfect answerer that reads the prompt's text: the values of the needles whose keys the question asks."""
    found: dict[str, list[str]] = {}
    for key, value in _NEEDLE_RE.findall(sample.prompt):
        found.setdefault(key, []).append(value)
    asked = _QUERY_RE.search(sample.prompt).group(1).replace(", and ", ", ").split(", ")
    return " " + ", ".join(v for key in asked for v in found.get(key, []))


def constant_guess(sample: NeedleSample) -> str:
    """The same answer whatever the prompt: chance level (a random 7-digit number or uuid is about never hit)."""
    return " 1234567"


def model_answerer(model, tokenizer: Tokenizer, device: torch.device | str = "cpu") -> Callable[[NeedleSample], str]:
    """Greedy generation (temperature 0) of up to the sample's budget, cut at the first end-of-document id."""

    def answer(sample: NeedleSample) -> str:
        ids = torch.tensor(tokenizer.encode(sample.prompt), device=device)
        new = model.generate(ids, sample.max_new_tokens, temperature=0.0)[len(ids) :].tolist()
        if tokenizer.eos_id in new:
            new = new[: new.index(tokenizer.eos_id)]
        return tokenizer.decode(new)

    return answer


def score_samples(
    samples: Sequence[NeedleSample], answer: Callable[[NeedleSample], str], progress: bool = False
) -> list[dict]:
    """One record per sample: its description, the generated text, `score` (string_match_all) and `correct`."""
    from tqdm import tqdm

    records = []
    for s in tqdm(samples, desc="needles", unit="sample", disable=not progress, dynamic_ncols=True):
        text = answer(s)
        score = string_match_all(text, s.answers)
        records.append({**s.to_dict(), "generated": text, "score": score, "correct": score == 1.0})
    return records


# --- retrieval gain: what the model takes from the needle, scored by likelihood (module docstring) ---


def answer_text(sample: NeedleSample) -> str:
    """The continuation that answers the sample: what the oracle says (" " + the values joined by ", ")."""
    return " " + ", ".join(sample.answers)


def counterfactual_prompt(sample: NeedleSample, seed: int = 0) -> str:
    """The prompt with every asked value in the needles swapped for a fresh one of the same form; all else (the
    question, the distractors, the haystack) unchanged, so that nothing in it gives the answer away."""
    kind = KINDS[sample.kind]
    rng = random.Random(f"niah-counterfactual:{seed}:{sample.kind}:{sample.length}:{sample.depth}:{sample.index}")
    fresh: dict[str, str] = {}
    for value in sample.answers:
        new = _value(rng, kind)
        while new in sample.answers or new in fresh.values():
            new = _value(rng, kind)
        fresh[value] = new

    def swap(m: re.Match) -> str:
        if m.group(1) not in sample.keys or m.group(2) not in fresh:
            return m.group(0)
        return m.group(0)[: m.start(2) - m.start(0)] + fresh[m.group(2)] + m.group(0)[m.end(2) - m.start(0) :]

    return _NEEDLE_RE.sub(swap, sample.prompt)


def model_bits(
    model,
    tokenizer: Tokenizer,
    device: torch.device | str = "cpu",
    on_state: Callable[[object, int], None] | None = None,
) -> Callable[[str, str], float]:
    """−log₂ p(continuation | context) under the model, from one forward pass over context + continuation (the
    context as `model_answerer` feeds it: no end-of-document id in front). on_state(state, tokens), if given, sees
    the state after each pass (`nestlearn longctx niah` checks that the memories are alive)."""

    @torch.no_grad()
    def bits(context: str, continuation: str) -> float:
        ctx, cont = tokenizer.encode(context), tokenizer.encode(continuation)
        ids = torch.tensor([ctx + cont], device=device)
        logits, state = model(ids[:, :-1])  # (1, t − 1, vocab): position i predicts id i + 1
        if on_state is not None:
            on_state(state, ids.shape[1] - 1)
        logp = F.log_softmax(logits[0, len(ctx) - 1 :].float(), dim=-1)  # (len(cont), vocab)
        return -float(logp.gather(-1, ids[0, len(ctx) :, None]).sum()) / math.log(2)

    return bits


def retrieval_gain(
    samples: Sequence[NeedleSample], bits: Callable[[str, str], float], seed: int = 0, progress: bool = False
) -> list[dict]:
    """Per sample: `bits_with` (the answer after the prompt), `bits_without` (after the counterfactual prompt),
    `gain` = bits_without − bits_with and `recall` = gain / bits_without (0 when bits_without is 0)."""
    from tqdm import tqdm

    out = []
    for s in tqdm(samples, desc="retrieval gain", unit="sample", disable=not progress, dynamic_ncols=True):
        answer = answer_text(s)
        with_, without = bits(s.prompt, answer), bits(counterfactual_prompt(s, seed), answer)
        gain = without - with_
        out.append(
            {
                "bits_with": with_,
                "bits_without": without,
                "gain": gain,
                "recall": gain / without if without > 0 else 0.0,
            }
        )
    return out
