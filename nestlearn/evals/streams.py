"""The continual-learning streams: tasks in order, each a corpus to model (scored in bits per byte) or classes to
tell apart (scored by accuracy among the classes seen so far). `languages`: the Debian handbook in one language after
another; `domains`: wiki, shakespeare, pydoc; `bbc`: class-incremental BBC News; `facts`: new knowledge, one set of
facts about invented people per task (nestlearn.evals.facts), scored by exact match on questions worded unlike
training. Text is read as bytes, or with a pretrained model's own tokenizer (`make_stream(..., tokenizer=)`)."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..data.shards import ShardMeta
from ..data.tokenizer import ByteTokenizer, Tokenizer
from ..runtime import model_device
from .facts import FactSet, make_fact_sets, score_qa

__all__ = ["LANGUAGES", "STREAMS", "LMTask", "ClassTask", "FactsTask", "make_stream", "general_text"]

LANGUAGES = ("en-US", "de-DE", "fr-FR", "es-ES")

# --- tasks ---


@dataclass
class LMTask:
    """Language modelling on one corpus: train on random windows of its train split, scored in bits per byte on
    the first `eval_tokens` of its validation split (`nestlearn.evaluate.evaluate`)."""

    name: str
    train: np.ndarray
    valid: np.ndarray
    valid_meta: ShardMeta
    higher_is_better = False
    metric = "bits per byte"

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        from ..data.batches import gather

        x = gather(self.train, rng.integers(0, len(self.train) - seq_len - 1, size=batch_size), seq_len + 1)
        return x, torch.ones_like(x[:, 1:], dtype=torch.bool)

    def score(self, model, seq_len: int, eval_tokens: int, batch_size: int = 8, **_) -> float:
        from ..evaluate import evaluate

        result = evaluate(
            model, self.valid, self.valid_meta, seq_len, batch_size, eval_tokens, device=model_device(model)
        )
        return result["bits_per_byte"]


@dataclass
class ClassTask:
    """Class-incremental classification with a language model: an example is the start of an article, then
    "\\nTopic:" and the class name; training is next-token loss on the class name's tokens. Scoring picks, among the
    classes seen so far (`candidates`: those of every task trained on, and the task's own), the class name of
    lowest mean negative log-likelihood per token (the mean, not the sum, so that short names are not favoured).
    With `few_shot` = k, every scored prompt is preceded by k labelled training examples of each candidate class
    (`demos`), in an order fixed by the candidates: the base reading the classes instead of learning them."""

    name: str
    labels: tuple[str, ...]
    train: list[str]  # prompts of this task's classes
    train_labels: list[str]
    valid: list[str]
    valid_labels: list[str]
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)
    few_shot: int = 0
    demos: dict[str, list[str]] = field(default_factory=dict)  # class -> its first training prompts (few_shot)
    higher_is_better = True
    metric = "accuracy"

    def context(self, candidates: list[str]) -> str:
        """The labelled examples put before every scored prompt: `few_shot` of each candidate class, shuffled by a
        seed that the candidates fix (so the newest class is not always the last one read), "" without few_shot."""
        if not self.few_shot:
            return ""
        missing = [y for y in candidates if len(self.demos.get(y, ())) < self.few_shot]
        if missing:
            raise ValueError(
                f"few_shot={self.few_shot} needs that many training examples of every candidate class; "
                f"{missing} have fewer (demos: { {y: len(d) for y, d in self.demos.items()} })"
            )
        shots = [(p, y) for y in candidates for p in self.demos[y][: self.few_shot]]
        random.Random(f"nestlearn-class-few-shot-{'|'.join(candidates)}").shuffle(shots)
        return "".join(f"{p} {y}\n\n" for p, y in shots)

    def _rows(
        self, prompts: list[str], answers: list[str], seq_len: int, fit: bool = False, head: list[int] | None = None
    ) -> tuple[Tensor, Tensor]:
        """Prompt and answer ids, cut to seq_len + 1 from the left and left-padded with eos: to seq_len + 1
        (training batches, a fixed shape) or, with `fit`, to the longest row (scoring: a pretrained tokenizer's
        prompts fill a quarter of the row, and scoring reads every row once per candidate class). `head` (the
        few-shot examples' ids) goes whole before each cut prompt, so a row may then be longer than seq_len + 1."""
        head = head or []
        pairs = []
        for prompt, answer in zip(prompts, answers, strict=True):
            p, a = self.tokenizer.encode(prompt), self.tokenizer.encode(f" {answer}\n")
            pairs.append((head + (p + a)[-(seq_len + 1) :], len(a)))
        width = max(len(ids) for ids, _ in pairs) if fit else len(head) + seq_len + 1
        rows = [[self.tokenizer.eos_id] * (width - len(ids)) + ids for ids, _ in pairs]  # left-padded
        masks = [[False] * (width - n) + [True] * n for _, n in pairs]
        x, m = torch.tensor(rows), torch.tensor(masks)
        return x, m[:, 1:]  # mask over the predictions of x[:, 1:]

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        idx = rng.integers(0, len(self.train), size=batch_size)
        return self._rows([self.train[i] for i in idx], [self.train_labels[i] for i in idx], seq_len)

    @torch.no_grad()
    def score(
        self, model, seq_len: int, candidates: list[str], batch_size: int = 16, eval_items: int = 0, **_
    ) -> float:
        """Accuracy on the first `eval_items` validation examples (0: all of them)."""
        n = min(eval_items, len(self.valid)) if eval_items else len(self.valid)
        valid, labels, context = self.valid[:n], self.valid_labels[:n], self.context(candidates)
        head = self.tokenizer.encode(context) if context else []  # once, not per batch and candidate
        correct, device = 0, model_device(model)
        for lo in range(0, len(valid), batch_size):
            prompts = valid[lo : lo + batch_size]
            nlls = []
            for label in candidates:
                x, m = self._rows(prompts, [label] * len(prompts), seq_len, fit=True, head=head)
                x, m = x.to(device), m.to(device)
                logits, _ = model(x[:, :-1])
                nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")
                nlls.append((nll * m).sum(1) / m.sum(1))
            best = torch.stack(nlls, 1).argmin(1)
            correct += sum(candidates[int(b)] == y for b, y in zip(best, labels[lo : lo + batch_size], strict=True))
        return correct / len(valid)


@dataclass
class FactsTask:
    """New knowledge: one fact set. Training is next-token loss on windows of its biographies, joined by the end of
    document into one stream read cyclically from random starts; the score is exact match of greedy answers to its
    test questions, worded unlike any training sentence (`facts.score_qa`). `few_shot` > 0 puts that many of the
    set's statements in every prompt: the base model reading the task's material instead of learning it."""

    name: str
    facts: FactSet
    tokens: np.ndarray  # the biographies, eos-separated
    tokenizer: Tokenizer
    few_shot: int = 0
    higher_is_better = True
    metric = "exact match"

    def batch(self, rng: np.random.Generator, batch_size: int, seq_len: int) -> tuple[Tensor, Tensor]:
        starts = rng.integers(0, len(self.tokens), size=batch_size)
        x = torch.from_numpy(self.tokens[(starts[:, None] + np.arange(seq_len + 1)) % len(self.tokens)])
        return x.long(), torch.ones_like(x[:, 1:], dtype=torch.bool)

    def score(self, model, seq_len: int, **_) -> float:
        return score_qa(model, self.tokenizer, self.facts, few_shot=self.few_shot)["exact_match"]


def _facts_tasks(tasks: list[str] | None, tokenizer: Tokenizer, people: int, few_shot: int) -> list[FactsTask]:
    n = 3
    if tasks:
        if len(tasks) != 1 or not tasks[0].isdigit() or int(tasks[0]) < 1:
            raise ValueError(f"the facts stream's --tasks is the number of fact sets, one positive int; got {tasks}")
        n = int(tasks[0])
    out = []
    for facts in make_fact_sets(n, people, seed=0):  # one knowledge for every run: seeds vary training only
        ids = [t for doc in facts.documents for t in (*tokenizer.encode(doc), tokenizer.eos_id)]
        out.append(FactsTask(f"facts-{facts.index + 1}", facts, np.array(ids, dtype=np.int64), tokenizer, few_shot))
    return out


def _lm_task(corpus: str, data_root: str | None, name: str | None = None, tokenizer: Tokenizer | None = None) -> LMTask:
    from ..data.shards import open_shard
    from ..train import shards_for

    tokenizer = tokenizer or ByteTokenizer()
    out = shards_for(corpus, tokenizer, data_root, ("train", "validation"), progress=False)
    train, _ = open_shard(out / "train", tokenizer)
    valid, meta = open_shard(out / "validation", tokenizer)
    return LMTask(name or corpus, train, valid, meta)


def general_text(data_root: str | None, tokenizer: Tokenizer | None = None) -> LMTask:
    """General text to replay (`--replay-from general`): the wiki corpus as a task, training windows from its train
    split (general ability is scored on its test split, `nestlearn.evals.general`)."""
    return _lm_task("wiki", data_root, "wiki", tokenizer)


def _bbc_tasks(
    data_root: str | None,
    prompt_chars: int,
    classes_per_task: int,
    corpus: str = "bbc",
    tokenizer: Tokenizer | None = None,
    few_shot: int = 0,
) -> list[ClassTask]:
    from ..data.corpora import BBC_CLASSES, load_split

    def examples(split: str) -> list[tuple[str, str]]:
        out = []
        for doc in load_split(corpus, split, data_root):
            label, _, text = doc.partition("\n")
            head = " ".join(text.split())[:prompt_chars]
            out.append((f"{head}\nTopic:", label))
        return out

    train, valid = examples("train"), examples("validation")
    groups = [BBC_CLASSES[i : i + classes_per_task] for i in range(0, len(BBC_CLASSES), classes_per_task)]
    demos = {y: [p for p, label in train if label == y][:few_shot] for y in BBC_CLASSES} if few_shot else {}
    short = {y: len(d) for y, d in demos.items() if len(d) < few_shot}
    if short:  # said before any scoring, not at the first score of a class
        raise ValueError(
            f"--few-shot {few_shot} puts that many training articles of each class before every scored one; the "
            f"{corpus} corpus's train split has fewer of {short}: give a smaller --few-shot"
        )
    tasks = []
    for labels in groups:
        tr = [(p, y) for p, y in train if y in labels]
        va = [(p, y) for p, y in valid if y in labels]
        tasks.append(
            ClassTask(
                "+".join(labels),
                tuple(labels),
                [p for p, _ in tr],
                [y for _, y in tr],
                [p for p, _ in va],
                [y for _, y in va],
                tokenizer or ByteTokenizer(),
                few_shot,
                demos,
            )
        )
    return tasks


STREAMS = {
    "languages": "the Debian handbook, one language after another (--tasks: en-US de-DE fr-FR es-ES ...)",
    "domains": "wiki → shakespeare → pydoc (--tasks: any fetched corpora, in order)",
    "bbc": "class-incremental BBC News: one class per task, scored among the classes seen so far",
    "facts": "new knowledge: facts about invented people, one set per task, scored by exact match on questions "
    "worded unlike training (--tasks: the number of sets, 3)",
}


def make_stream(
    name: str,
    tasks: list[str] | None,
    data_root: str | None,
    seq_len: int,
    classes_per_task: int = 1,
    tokenizer: Tokenizer | None = None,
    people_per_set: int = 8,
    few_shot: int = 0,
) -> list:
    """The tasks of a stream. A task may also be a local corpus folder (train.txt, validation.txt, test.txt); for
    `bbc`, `tasks` may name one corpus (a folder in the bbc format: the class on each document's first line).
    `tokenizer`: what the text is read with (default: bytes; a pretrained model's own). `people_per_set`: the facts
    stream's (FactsTask); `few_shot`: examples put in every test prompt, a set's statements (facts) or training
    examples of each candidate class (bbc)."""
    if name == "facts":
        return _facts_tasks(tasks, tokenizer or ByteTokenizer(), people_per_set, few_shot)
    if name == "languages":
        return [
            _lm_task(lang if Path(lang).is_dir() else f"handbook-{lang}", data_root, Path(lang).name, tokenizer)
            for lang in (tasks or LANGUAGES)
        ]
    if name == "domains":
        return [_lm_task(c, data_root, Path(c).name, tokenizer) for c in (tasks or ("wiki", "shakespeare", "pydoc"))]
    if name == "bbc":
        if tasks and len(tasks) != 1:
            raise ValueError(
                f"the bbc stream's tasks are its classes, in a fixed order; --tasks may only name the "
                f"corpus to read them from (default bbc); got {tasks}"
            )
        return _bbc_tasks(
            data_root,
            prompt_chars=max(16, seq_len - 24),
            classes_per_task=classes_per_task,
            corpus=tasks[0] if tasks else "bbc",
            tokenizer=tokenizer,
            few_shot=few_shot,
        )
    raise ValueError(f"stream={name!r} is not known; expected one of {list(STREAMS)}")
