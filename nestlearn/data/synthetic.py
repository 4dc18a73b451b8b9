"""Synthetic sequence tasks, generated on the fly and deterministic by seed.

    mqar      multi-query associative recall (Arora et al. 2024, "Zoology"): N key/value pairs, then the keys
              again in a random order, each followed by its value. Scored on the values of the second half.
    parity    the parity language (Irie et al. 2023; paper Table 5): a bit string; after every bit the model
              predicts the parity of the bits so far. Scored on every position (or on the last only).
    formal_language   the six formal languages of paper Table 5 as prefix-membership tasks (below)
    babi      bAbI-style fact tracking (Weston et al. 2015), generated here: stories as text, and as a byte-level
              task scored on the answer's bytes

Every batch is (tokens, targets, mask): int64 (b, t), int64 (b, t) and bool (b, t); the model reads tokens and is
scored on targets where mask is true (targets[:, i] is the prediction after tokens[:, : i + 1]).
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "mqar",
    "parity",
    "TASKS",
    "accuracy",
    "FORMAL_LANGUAGES",
    "Language",
    "formal_language",
    "in_language",
    "prefix_membership",
    "formal_accuracy",
    "formal_strings",
    "BabiStory",
    "BABI_TASKS",
    "babi_story",
    "babi_answer",
    "babi_tokens",
    "babi",
    "sequence_accuracy",
    "PAD",
    "REJECT",
    "ACCEPT",
]


def mqar(batch: int, num_pairs: int, vocab_size: int = 256, generator: torch.Generator | None = None, gap: int = 0):
    """Keys from [1, vocab/2), values from [vocab/2, vocab); sequence length 4 · num_pairs + gap.

    gap: filler tokens between the pairs and the queries, drawn uniformly from the value range (never a key, so they
    cannot be mistaken for a query): what a memory must hold the pairs across."""
    half = vocab_size // 2
    if num_pairs >= half - 1:
        raise ValueError(f"num_pairs={num_pairs} needs distinct keys: at most {half - 2} with vocab_size={vocab_size}")
    if isinstance(gap, bool) or not isinstance(gap, int) or gap < 0:
        raise ValueError(f"gap={gap!r} must be an int >= 0 (filler tokens between the pairs and the queries)")
    keys = torch.stack([torch.randperm(half - 1, generator=generator)[:num_pairs] + 1 for _ in range(batch)])
    values = torch.randint(half, vocab_size, (batch, num_pairs), generator=generator)
    order = torch.stack([torch.randperm(num_pairs, generator=generator) for _ in range(batch)])
    qk, qv = keys.gather(1, order), values.gather(1, order)
    first = torch.stack([keys, values], dim=2).reshape(batch, -1)  # k1 v1 k2 v2 ...
    second = torch.stack([qk, qv], dim=2).reshape(batch, -1)  # the keys again, each followed by its value
    filler = torch.randint(half, vocab_size, (batch, gap), generator=generator)
    tokens = torch.cat([first, filler, second], dim=1)  # (b, 4N + gap)
    targets = torch.roll(tokens, -1, dims=1)
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    mask[:, 2 * num_pairs + gap :: 2] = True  # after each queried key, predict its value
    return tokens, targets, mask


def parity(batch: int, length: int, generator: torch.Generator | None = None, last_only: bool = False):
    """Bits as tokens 1 and 2 (0 is kept free); targets are the running parity as tokens 1 (even) and 2 (odd)."""
    bits = torch.randint(0, 2, (batch, length), generator=generator)
    tokens = bits + 1
    targets = bits.cumsum(1).remainder(2) + 1
    mask = torch.zeros_like(tokens, dtype=torch.bool)
    if last_only:
        mask[:, -1] = True
    else:
        mask[:] = True
    return tokens, targets, mask


TASKS = {"mqar": mqar, "parity": parity}


def accuracy(logits: Tensor, targets: Tensor, mask: Tensor) -> float:
    return (logits.argmax(-1) == targets)[mask].float().mean().item()


def sequence_accuracy(logits: Tensor, targets: Tensor, mask: Tensor) -> float:
    """Fraction of sequences whose every scored position is right (argmax over the whole vocabulary)."""
    correct = (logits.argmax(-1) == targets) | ~mask  # (b, t)
    return correct.all(dim=1).float().mean().item()


# --- formal languages (paper Table 5) ---------------------------------------------------------------------------
#
# Token ids: 0 pads, 1 and 2 are the two answers (reject, accept), the alphabet's symbols are 3, 4, ... in the order
# of `Language.alphabet`. Answers and symbols never share an id, so a model cannot copy its input as an answer.

PAD, REJECT, ACCEPT = 0, 1, 2
FIRST_SYMBOL = 3


@dataclass(frozen=True)
class Language:
    """A formal language of Table 5: its alphabet, the lengths its strings have, and a sampler of its strings."""

    name: str  # the command-line name
    title: str  # Table 5's column header
    alphabet: str
    period: int  # every string drawn has a length that is a multiple of this
    sample: Callable[[int, torch.Generator | None], str]  # (length, generator) -> a string of that length


def _bits(n: int, g: torch.Generator | None) -> str:
    # parity is the one language whose training strings are not all members: any bit string, as `parity` draws
    return "".join("01"[b] for b in torch.randint(0, 2, (n,), generator=g).tolist())


def _shuffle2(n: int, g: torch.Generator | None) -> str:
    """A random member of Shuffle-2 of even length n: a walk over the two bracket counters that may open only while
    the remaining steps can still close everything, so it always ends balanced (every prefix is never negative)."""
    u = torch.rand(n, generator=g).tolist()
    out, open_ = [], {"(": 0, "[": 0}
    for i in range(n):
        remaining = n - i
        moves = [c for c, o in ((")", "("), ("]", "[")) if open_[o] > 0]
        if sum(open_.values()) + 2 <= remaining:  # one more open bracket can still be closed in time
            moves += ["(", "["]
        c = moves[int(u[i] * len(moves))]
        out.append(c)
        if c in open_:
            open_[c] += 1
        else:
            open_["(" if c == ")" else "["] -= 1
    return "".join(out)


FORMAL_LANGUAGES: dict[str, Language] = {
    lang.name: lang
    for lang in (
        Language("parity", "Parity", "01", 1, _bits),
        Language("aa", "(aa)*", "a", 2, lambda n, g: "a" * n),
        Language("abab", "(abab)*", "ab", 4, lambda n, g: "ab" * (n // 2)),
        Language("anbn", "aⁿbⁿ", "ab", 2, lambda n, g: "a" * (n // 2) + "b" * (n // 2)),
        Language("anbncn", "aⁿbⁿcⁿ", "abc", 3, lambda n, g: "a" * (n // 3) + "b" * (n // 3) + "c" * (n // 3)),
        Language("shuffle2", "Shuffle-2", "()[]", 2, _shuffle2),
    )
}


def _language(name: str) -> Language:
    if name not in FORMAL_LANGUAGES:
        raise ValueError(f"unknown formal language {name!r}; expected one of {list(FORMAL_LANGUAGES)}")
    return FORMAL_LANGUAGES[name]


def _balanced(s: str, open_: str, close: str) -> bool:
    depth = 0
    for c in s:
        depth += (c == open_) - (c == close)
        if depth < 0:
            return False
    return depth == 0


def in_language(name: str, s: str) -> bool:
    """Is the whole string `s` in the language? The slow, obvious reference (regular expressions and counts) that
    `prefix_membership` is tested against. Strings are non-empty here: the task never scores the empty prefix."""
    lang = _language(name)
    if not s or set(s) - set(lang.alphabet):
        return False
    if name == "parity":
        return s.count("1") % 2 == 0
    if name in ("aa", "abab"):
        return re.fullmatch("(aa)*" if name == "aa" else "(abab)*", s) is not None
    if name in ("anbn", "anbncn"):
        m = re.fullmatch("(a+)(b+)" if name == "anbn" else "(a+)(b+)(c+)", s)
        return m is not None and len({len(x) for x in m.groups()}) == 1
    # shuffle2: each bracket pair is balanced on its own; the other pair's symbols are ignored
    return _balanced(s, "(", ")") and _balanced(s, "[", "]")


def prefix_membership(name: str, s: str) -> list[bool]:
    """[s[: i + 1] in the language for each i]: the per-position targets, in one pass (a counter machine)."""
    lang = _language(name)
    out, valid, count = [], True, [0] * len(lang.alphabet)
    for i, c in enumerate(s):
        k = lang.alphabet.find(c)
        valid = valid and k >= 0
        if not valid:
            out.append(False)
            continue
        count[k] += 1
        if name == "parity":
            member = count[1] % 2 == 0
        elif name == "aa":
            member = (i + 1) % 2 == 0
        elif name == "abab":
            valid = k == i % 2  # a at even positions, b at odd
            member = valid and (i + 1) % 4 == 0
        elif name in ("anbn", "anbncn"):
            valid = all(n == 0 for n in count[k + 1 :])  # no letter after a later one: a* b* (c*)
            member = valid and len(set(count)) == 1
        else:  # shuffle2, alphabet "()[]": a close may never outnumber its own opens
            valid = count[1] <= count[0] and count[3] <= count[2]
            member = valid and count[0] == count[1] and count[2] == count[3]
        out.append(member)
    return out


def formal_strings(
    name: str, batch: int, min_length: int, max_length: int, generator: torch.Generator | None = None
) -> list[str]:
    """`batch` strings of the language, their lengths uniform over the lengths in [min_length, max_length] that the
    language has (multiples of its period)."""
    lang = _language(name)
    lengths = [n for n in range(max(1, min_length), max_length + 1) if n % lang.period == 0]
    if not lengths:
        raise ValueError(
            f"{name}: no string length in [{min_length}, {max_length}] is a multiple of "
            f"{lang.period}, the only lengths {lang.title} has; widen the range"
        )
    picks = torch.randint(0, len(lengths), (batch,), generator=generator).tolist()
    return [lang.sample(lengths[i], generator) for i in picks]


def formal_language(
    name: str,
    batch: int,
    min_length: int,
    max_length: int,
    pad_to: int | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Recognition of a formal language of paper Table 5, as a per-position task (Bhattamishra et al. 2020; Irie
    et al. 2023): after every symbol the model says whether the prefix so far is in the language.

        parity    bit strings; accepted when the number of 1s is even      (the one regular language here whose
                  training strings are any bit strings, as `parity`; the others draw members only)
        aa        (aa)*:   a, aa, ...; accepted at even lengths
        abab      (abab)*: abab...; accepted at multiples of 4
        anbn      aⁿbⁿ; accepted only once the b's match the a's
        anbncn    aⁿbⁿcⁿ; accepted only at the end
        shuffle2  Shuffle-2: two bracket pairs () and [], each balanced on its own, so "([)]" is in it; strings
                  are random walks that never close an unopened bracket and end balanced

    Strings are drawn from the language (parity: uniformly random bits), lengths uniform over the language's lengths
    in [min_length, max_length] (Bin0 = [1, L] for training length L, Bin1 = [L + 1, 2L]), and right-padded to
    `pad_to` (default max_length) with PAD, where the mask is false. Targets are ACCEPT or REJECT.

    Choices where the papers leave room: the target is membership of the prefix (the end-of-string bit of
    Bhattamishra's next-character sets, which for these strings carries the whole decision), rather than the full
    next-character set; strings of the counter languages are members only, so a model must count to accept.

    Returns tokens (b, pad_to), targets (b, pad_to), mask (b, pad_to).
    """
    pad_to = max_length if pad_to is None else pad_to
    if pad_to < max_length:
        raise ValueError(f"pad_to={pad_to} is shorter than max_length={max_length}; pad to at least the longest string")
    lang = _language(name)
    tokens = torch.full((batch, pad_to), PAD, dtype=torch.long)
    targets = torch.full((batch, pad_to), PAD, dtype=torch.long)
    mask = torch.zeros(batch, pad_to, dtype=torch.bool)
    for b, s in enumerate(formal_strings(name, batch, min_length, max_length, generator)):
        n = len(s)
        tokens[b, :n] = torch.tensor([FIRST_SYMBOL + lang.alphabet.index(c) for c in s])
        targets[b, :n] = torch.tensor([ACCEPT if m else REJECT for m in prefix_membership(name, s)])
        mask[b, :n] = True
    return tokens, targets, mask


def formal_accuracy(logits: Tensor, targets: Tensor, mask: Tensor) -> tuple[float, float]:
    """(per-position accuracy, sequence accuracy) of accept/reject decisions. The decision compares the two answer
    logits only, so a model is a recognizer whatever else its vocabulary holds; a sequence counts as right only if
    every unmasked position is right (Bhattamishra et al.)."""
    decision = torch.where(logits[..., ACCEPT] > logits[..., REJECT], ACCEPT, REJECT)  # (b, t)
    right = decision == targets
    position = right[mask].float().mean().item()
    sequence = (right | ~mask).all(dim=1).float().mean().item()
    return position, sequence


# --- bAbI-style fact tracking (Weston et al. 2015), generated here ------------------------------------------------

BABI_PEOPLE = (
    "Mary",
    "John",
    "Daniel",
    "Sandra",
    "Alice",
    "Bob",
    "Charlie",
    "Emma",
    "Fred",
    "Grace",
    "Henry",
    "Irene",
    "Jack",
    "Kate",
    "Liam",
    "Nina",
    "Oscar",
    "Paula",
    "Quinn",
    "Rosa",
    "Sam",
    "Tina",
    "Umar",
    "Vera",
)
BABI_PLACES = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")  # bAbI qa1's six places
BABI_MOVES = ("went to", "moved to", "journeyed to", "travelled to", "went back to")  # and its verbs
BABI_TASKS = {
    "single": "qa1-like, single supporting fact: every person is placed once; where is one of them?",
    "latest": "qa2-ish, latest location: people move several times; where is one who moved at least twice?",
}
_FACT = re.compile(r"^(\w+) (?:" + "|".join(BABI_MOVES) + r") the (\w+)\.$")
_QUESTION = re.compile(r"^Where is (\w+)\?$")


@dataclass(frozen=True)
class BabiStory:
    facts: tuple[str, ...]  # "Mary went to the kitchen.", one move each
    person: str  # the one asked about
    answer: str  # a place word

    @property
    def prompt(self) -> str:
        """One fact per line, then the question and a space: the answer's first byte comes next."""
        return "\n".join(self.facts) + f"\nWhere is {self.person}? "


def babi_story(task: str, num_facts: int, rng: random.Random, num_people: int = 4) -> BabiStory:
    """A story of `num_facts` moves and a question, deterministic given rng's state.

    single: num_facts different people, each placed once; the question asks one of them (pure retrieval).
    latest: num_people people make num_facts moves, each to a place other than the mover's current one; the question
            asks someone who moved at least twice, so that the answer overwrites an earlier fact.
    """
    if task not in BABI_TASKS:
        raise ValueError(f"unknown bAbI task {task!r}; expected one of {list(BABI_TASKS)}")
    if task == "single":
        if not 1 <= num_facts <= len(BABI_PEOPLE):
            raise ValueError(f"single: num_facts={num_facts} must lie in [1, {len(BABI_PEOPLE)}], one person each")
        people = rng.sample(BABI_PEOPLE, num_facts)
        where = {p: rng.choice(BABI_PLACES) for p in people}
        facts = tuple(f"{p} {rng.choice(BABI_MOVES)} the {where[p]}." for p in people)
        person = rng.choice(people)
        return BabiStory(facts, person, where[person])
    if not 1 <= num_people <= len(BABI_PEOPLE) or num_facts < 2:
        raise ValueError(
            f"latest: num_people={num_people} must lie in [1, {len(BABI_PEOPLE)}] and "
            f"num_facts={num_facts} be >= 2, so that someone can move twice"
        )
    people = rng.sample(BABI_PEOPLE, num_people)
    while True:  # redrawn only when nobody moved twice (possible when num_facts <= num_people)
        where, moves, facts = {}, dict.fromkeys(people, 0), []
        for _ in range(num_facts):
            p = rng.choice(people)
            where[p] = rng.choice([x for x in BABI_PLACES if x != where.get(p)])
            moves[p] += 1
            facts.append(f"{p} {rng.choice(BABI_MOVES)} the {where[p]}.")
        movers = [p for p in people if moves[p] >= 2]
        if movers:
            person = rng.choice(movers)
            return BabiStory(tuple(facts), person, where[person])


def babi_answer(prompt: str) -> str:
    """The answer read off a prompt's text alone (the oracle): the place of the asked person's last move."""
    *facts, question = prompt.strip().split("\n")
    asked = _QUESTION.match(question)
    if asked is None:
        raise ValueError(f"the prompt's last line {question!r} is not a 'Where is X?' question")
    where = {}
    for line in facts:
        m = _FACT.match(line)
        if m is None:
            raise ValueError(f"{line!r} is not a bAbI move ('X went to the Y.')")
        where[m.group(1)] = m.group(2)
    return where[asked.group(1)]


def babi_tokens(stories: Sequence[BabiStory], tokenizer=None, pad_to: int | None = None):
    """Stories as a token-level task: tokens are prompt + answer, the mask covers the answer's tokens (its bytes, with
    the default byte tokenizer), padding is the tokenizer's eos id. The model's vocabulary must hold that id
    (257 ids for bytes). Returns tokens, targets, mask, each (b, pad_to or the longest)."""
    from .tokenizer import ByteTokenizer

    tokenizer = tokenizer or ByteTokenizer()
    rows = [(tokenizer.encode(s.prompt), tokenizer.encode(s.answer)) for s in stories]
    longest = max(len(p) + len(a) - 1 for p, a in rows)
    pad_to = longest if pad_to is None else pad_to
    if pad_to < longest:
        raise ValueError(f"pad_to={pad_to} is shorter than the longest story ({longest} tokens)")
    tokens = torch.full((len(rows), pad_to), tokenizer.eos_id, dtype=torch.long)
    targets = tokens.clone()
    mask = torch.zeros(len(rows), pad_to, dtype=torch.bool)
    for b, (prompt, answer) in enumerate(rows):
        ids = torch.tensor(prompt + answer)
        n = len(ids) - 1
        tokens[b, :n], targets[b, :n] = ids[:-1], ids[1:]
        mask[b, len(prompt) - 1 : n] = True  # the positions whose next token is one of the answer's
    return tokens, targets, mask


def babi(
    task: str,
    batch: int,
    num_facts: int,
    num_people: int = 4,
    generator: torch.Generator | None = None,
    pad_to: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """A batch of bAbI-style stories as a byte-level task (see `babi_story`, `babi_tokens`); deterministic by
    generator. Chance (a constant place) is 1/6."""
    rng = random.Random(int(torch.randint(0, 2**62, (1,), generator=generator)))
    stories = [babi_story(task, num_facts, rng, num_people) for _ in range(batch)]
    return babi_tokens(stories, pad_to=pad_to)
