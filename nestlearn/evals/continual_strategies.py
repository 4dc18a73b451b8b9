"""The continual-learning strategies that change how a step trains (`nestlearn continual --strategy`): online EWC,
replay of earlier tasks' rows or of general text, and `memorize`'s step, the in-context levels reading a batch's rows
as one stream. The other strategies differ only in what trains (continual_setup) and in their optimizer (continual)."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from ..runtime import model_device
from ..task_cms import commit
from .streams import LMTask


class EWC:
    """Online elastic weight consolidation (Kirkpatrick et al. 2017; Schwarz et al. 2018): after each task, the
    diagonal Fisher F (mean squared gradient of the task loss over `batches` batches) is added to a running sum
    and the weights θ* are kept; training then adds (λ/2) Σ F (θ − θ*)². Frozen parameters (requires_grad False)
    are left out: they cannot move."""

    def __init__(self, model, lam: float, batches: int):
        self.model, self.lam, self.batches = model, lam, batches
        self.fisher: dict[str, Tensor] = {}
        self.anchor: dict[str, Tensor] = {}

    def _named(self) -> list[tuple[str, Tensor]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def penalty(self) -> Tensor | float:
        if not self.fisher:
            return 0.0
        return 0.5 * self.lam * sum((self.fisher[n] * (p - self.anchor[n]) ** 2).sum() for n, p in self._named())

    def consolidate(self, task, rng, batch_size: int, seq_len: int) -> None:
        fisher = {n: torch.zeros_like(p) for n, p in self._named()}
        for _ in range(self.batches):
            x, mask = task.batch(rng, batch_size, seq_len)
            self.model.zero_grad(set_to_none=True)
            _loss(self.model, x, mask).backward()
            for n, p in self._named():
                if p.grad is not None:
                    fisher[n] += p.grad.detach() ** 2 / self.batches
        self.model.zero_grad(set_to_none=True)
        for n, f in fisher.items():
            self.fisher[n] = self.fisher.get(n, 0) + f
        self.anchor = {n: p.detach().clone() for n, p in self._named()}


class Replay:
    """A buffer of `per_task` batches' rows from every finished task; a `fraction` of each later batch's rows is
    replaced by rows drawn from it, so that the compute per step is unchanged."""

    def __init__(self, fraction: float, per_task: int):
        self.fraction, self.per_task = fraction, per_task
        self.rows: list[tuple[Tensor, Tensor]] = []

    def mix(self, x: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        k = int(round(self.fraction * x.shape[0]))
        if not self.rows or k == 0:
            return x, mask
        picks = rng.integers(0, len(self.rows), size=k)
        x, mask = x.clone(), mask.clone()
        for row, i in enumerate(picks):
            x[row], mask[row] = self.rows[i]
        return x, mask

    def remember(self, task, rng, batch_size: int, seq_len: int) -> None:
        for _ in range(self.per_task):
            x, mask = task.batch(rng, batch_size, seq_len)
            self.rows.extend(zip(x, mask, strict=True))

    def general_rows(self, batch_size: int) -> int:
        return 0  # the buffer's rows are tasks' rows, counted as the task's own


class GeneralReplay(Replay):
    """Replay of general text (`--replay-from general`): from the first task on, the first `fraction` of each
    batch's rows is replaced by windows of a general corpus (wiki's train split; general ability is scored on its
    test split). The two kinds of row count in the loss by their share of the rows, each averaged over its own
    tokens, so that a task trained on a few answer tokens a row (bbc) is not drowned by whole rows of text."""

    def __init__(self, fraction: float, source: LMTask):
        super().__init__(fraction, per_task=0)
        self.source = source

    def mix(self, x: Tensor, mask: Tensor, rng: np.random.Generator) -> tuple[Tensor, Tensor]:
        k = self.general_rows(x.shape[0])
        if k == 0:
            return x, mask
        g, g_mask = self.source.batch(rng, k, x.shape[1] - 1)
        return torch.cat([g, x[k:]]), torch.cat([g_mask, mask[k:]])

    def remember(self, task, rng, batch_size: int, seq_len: int) -> None:
        pass  # nothing to keep: the general text is there from the start

    def general_rows(self, batch_size: int) -> int:
        return int(round(self.fraction * batch_size))


def _loss(model, x: Tensor, mask: Tensor, general_rows: int = 0) -> Tensor:
    """Mean next-token loss over the masked tokens; with `general_rows`, the first rows (general text) and the rest
    (the task) each averaged over their own tokens and weighted by their share of the rows. The rows go to the
    model's device here, so that batching, replay's mixing and EWC's batches stay on the CPU."""
    device = model_device(model)
    x, mask = x.to(device), mask.to(device)
    logits, _ = model(x[:, :-1])
    nll = F.cross_entropy(logits.float().transpose(1, 2), x[:, 1:], reduction="none")  # (b, t)
    if not general_rows:
        return (nll * mask).sum() / mask.sum().clamp_min(1)
    share, g, t = general_rows / x.shape[0], slice(None, general_rows), slice(general_rows, None)
    general = (nll[g] * mask[g]).sum() / mask[g].sum().clamp_min(1)
    return share * general + (1 - share) * (nll[t] * mask[t]).sum() / mask[t].sum().clamp_min(1)


@torch.no_grad()  # the in-context levels still step: task_cms enables gradients for their inner steps alone
def _memorize(model, x: Tensor, eos_id: int) -> Tensor:
    """The memorize strategy's step: the batch's rows read in turn, as one stream, by the in-context levels alone
    (eq. 71, in context); each row starts from the fast weights the last one ended with (`task_cms.commit`: θ_0 ←
    them), its attention cache dropped as between training rows. Every token's loss counts, the facts' mask too (the
    levels learn from what they read), except padding's: an end-of-text followed by another (bbc's left-padding) is
    not text, and does not drive a step. Returns the rows' next-token loss as read, each chunk before its own step,
    over the tokens that drive steps (padding's left out, as the other strategies' masks leave it out)."""
    was_training = model.training
    model.eval()
    x = x.to(model_device(model))
    total, count = x.new_zeros((), dtype=torch.float), 0
    for row in x:  # (T + 1,)
        padding = (row[:-1] == eos_id) & (row[1:] == eos_id)  # (T,): predicting end-of-text after end-of-text
        logits, state = model(row[None, :-1], learn=~padding[None])  # (1, T, V)
        nll = F.cross_entropy(logits[0].float(), row[1:], reduction="none")  # (T,)
        total, count = total + nll[~padding].sum(), count + int((~padding).sum())
        commit(model, state)
    model.train(was_training)
    return total / max(count, 1)
