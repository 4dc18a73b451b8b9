"""Task-loss CMS levels: eq. 71 as the paper writes it, in context.

    θ^(ℓ)_{i+1} = θ^(ℓ)_i − η^(ℓ) Σ_{t = i−C^(ℓ)}^{i} ∇_θ ℓ_NTP(θ^(ℓ)_i; x_t)      if i ≡ 0 (mod C^(ℓ)), else θ^(ℓ)_i

Every in-context level (`cms.TaskLevel`) is a SwiGLU MLP whose weights are per-sequence state. The model reads its
input in chunks of C = the fastest level's period, on the stream's global grid. For each chunk it runs the whole
network with the current weights, takes the next-token loss of the chunk's tokens (summed over them: eq. 71's Σ),
and one backward gives every learning level the gradient of that loss with respect to its own weights as this chunk
read them, through every layer above it (earlier chunks' states are given, as in truncated backpropagation). A
level adds it to the sum over its period and, at the period's end, steps. So chunk i is read with the weights after
chunk i − 1: no token sees a write that its own or a later label produced.

Choices the paper leaves open (docs/deviations.md): the chunk's last target, the first token of the next chunk, is
not used (a step must not wait for a token that belongs to the next chunk); the learning rate is a constant per
level (`CMSConfig.task_lr`), or that constant times a learned per-token factor (`task_rate="data"`); no retention;
θ_0 is learned through the steps to first order by default (`CMSConfig.meta_grad`). With `variant="nested"` (eq.
72) a level goes back to θ_0 whenever the next slower in-context level steps (its own step at that token is dropped).

A call may end inside a chunk (streaming, token-by-token generation): its tokens and every layer's state at the
chunk's start are kept in the state, and the next call computes the chunk again, whole, before it steps. Under
`torch.no_grad()` (evaluation, generation) the inner steps still run, with gradients enabled for them alone.

`reference_forward` is the slow, obvious version the fast one is tested against.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cms import TaskLevel
from .config import ModelConfig
from .state import tree_map

__all__ = ["task_levels", "task_forward", "chunk_loss", "commit", "reading_only", "reference_forward"]

Where = tuple[int, int, TaskLevel]  # (block, CMS level index, level)


def task_levels(blocks: nn.ModuleList, config: ModelConfig) -> list[Where]:
    """The task-loss levels that learn (those of the last `task_blocks` blocks; the others read θ_0), checked: every
    period a multiple of the fastest, so that every level steps on the chunk grid."""
    found = [(i, j, lv) for i, b in enumerate(blocks) for j, lv in enumerate(b.cms.levels) if isinstance(lv, TaskLevel)]
    keep = config.cms.task_blocks
    first = 0 if keep is None else len(blocks) - keep
    for i, _, lv in found:
        lv.learns = i >= first
    learning = [w for w in found if w[2].learns]
    if learning:
        chunk = min(lv.period for _, _, lv in learning)
        bad = sorted({lv.period for _, _, lv in learning if lv.period % chunk})
        if bad:
            raise ValueError(
                f"CMSConfig.update_periods={config.cms.update_periods}: with signal='task' every in-context period "
                f"must be a multiple of the fastest, {chunk} (the chunk every level steps on); {bad} are not"
            )
    return learning


def _chunk(levels: list[Where]) -> int:
    return min(lv.period for _, _, lv in levels)


def _first(levels: list[Where]) -> int:
    """The first block that learns: the blocks below it do not depend on any step, and run once per call."""
    return min(i for i, _, _ in levels)


def _with(layers: list[dict], where: Where, value: dict) -> list[dict]:
    """`layers` with one level's state replaced (new lists and dicts along the path; the rest shared)."""
    i, j, _ = where
    cms = list(layers[i]["cms"])
    cms[j] = value
    out = list(layers)
    out[i] = {**layers[i], "cms": cms}
    return out


def chunk_loss(model: nn.Module, logits: Tensor, seg: Tensor, learn: Tensor | None = None) -> Tensor:
    """Eq. 71's Σ_t η_t ℓ_NTP(x_t) over a chunk, divided by the levels' constant η: the summed next-token loss of the
    chunk's tokens (logits (b, C, V), seg (b, C); the last target is the next chunk's, unused), each token weighted
    by its learned factor 2σ(w·e_t + b) when the model has one (CMSConfig.task_rate="data"). `learn` (b, C) bool:
    which tokens' next-token predictions count (None: all; padding is not text to learn from)."""
    nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), seg[:, 1:].flatten(), reduction="none")  # (b·(C−1),)
    if learn is not None:
        nll = nll * learn[:, :-1].flatten()
    if model.task_rate is None:
        return nll.sum()
    rate = 2 * torch.sigmoid(model.task_rate(model.embed(seg[:, :-1]))).float()  # (b, C − 1, 1)
    return (rate.flatten() * nll).sum()


def _inner_step(
    model: nn.Module,
    seg: Tensor,
    learn: Tensor | None,
    hidden: Tensor | None,
    layers: list[dict],
    end: int,
    outer: bool,
):
    """One full chunk: logits with the current weights, then every learning level's gradient of the chunk's summed
    next-token loss, added to its period's sum, and a step where `end` (the stream position after the chunk) closes
    a period. `learn`: chunk_loss's. `hidden`: the output of the blocks below the first that learns, computed once for
    the whole call (None when the first block learns). Returns logits (b, C, V) and the new layers.

    With the outer graph (`outer`), the chunk is computed on a graph of its own, every incoming state a leaf of it,
    and joined to the stream's graph by `_Join`: an inner `autograd.grad` walks every node it can reach from the
    loss, so on one connected graph the step of chunk n would walk the graphs of all n − 1 before it (a window of n
    chunks then costs O(n²): at T = 1024 the last quarter's steps took 5× the first's)."""
    if not outer:
        return _chunk_step(model, seg, learn, hidden, layers, end, outer)
    inputs = [t for t in _tensors((layers, hidden)) if t.requires_grad]
    layers, hidden = tree_map(lambda t: t.detach().requires_grad_() if t.requires_grad else t, (layers, hidden))
    leaves = [t for t in _tensors((layers, hidden)) if t.requires_grad]  # in the order of `inputs`
    logits, new = _chunk_step(model, seg, learn, hidden, layers, end, outer)
    outs = [t for t in _tensors((logits, new)) if t.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    joined = iter(_Join.apply((outs, leaves, params), *inputs, *params))
    return tree_map(lambda t: next(joined) if t.requires_grad else t, (logits, new))


def _tensors(tree) -> list[Tensor]:
    """The tensors of a nested state, in `tree_map`'s order."""
    found = []
    tree_map(found.append, tree)
    return found


class _Join(torch.autograd.Function):
    """A chunk's own graph as one node of the stream's: forward passes the chunk's outputs on; backward takes the
    gradients reaching them back through the chunk's graph to its leaves, each the copy of a state the chunk started
    from (`inputs`, whose gradients these become), and to the model's parameters, which it read directly."""

    @staticmethod
    def forward(ctx, graph, *inputs):
        ctx.graph = graph
        ctx.set_materialize_grads(False)
        return tuple(t.detach() for t in graph[0])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, *grads):
        outs, leaves, params = ctx.graph
        used = [(t, g) for t, g in zip(outs, grads, strict=True) if g is not None]
        if not used:
            return (None, *[None] * (len(leaves) + len(params)))
        found = torch.autograd.grad(
            [t for t, _ in used], [*leaves, *params], [g for _, g in used], retain_graph=True, allow_unused=True
        )
        return (None, *found)


def _chunk_step(model: nn.Module, seg: Tensor, learn, hidden, layers: list[dict], end: int, outer: bool):
    """`_inner_step` (the same arguments) on whatever graph its inputs have."""
    levels = model.task_levels
    C = _chunk(levels)
    with torch.enable_grad():
        thetas = []
        for where in levels:
            i, j, _ = where
            s = layers[i]["cms"][j]
            # the weights as this chunk reads them, a node of their own: the gradient is that of the chunk's reads
            # alone, not of earlier chunks read with the same weights (a slower level's), whose states are given
            if s["up"].requires_grad:
                up, down = s["up"].view_as(s["up"]), s["down"].view_as(s["down"])
            else:  # evaluation, or frozen weights: leaves of this chunk's own graph
                up, down = s["up"].detach().requires_grad_(), s["down"].detach().requires_grad_()
            layers = _with(layers, where, {**s, "up": up, "down": down})
            thetas += [up, down]
        logits, new = model.forward_blocks(seg, layers, first=_first(levels), hidden=hidden)
        loss = chunk_loss(model, logits, seg, learn)
        full = outer and model.config.cms.meta_grad == "full"
        grads = torch.autograd.grad(loss, thetas, retain_graph=outer, create_graph=full)
    for n, where in enumerate(levels):
        i, j, level = where
        up, down = thetas[2 * n], thetas[2 * n + 1]
        g_up, g_down = grads[2 * n], grads[2 * n + 1]
        s = new[i]["cms"][j]
        # a chunk that opens a period finds the sum at the zeros the last step left: its gradient is the sum
        first = (end - C) % level.period == 0
        sum_up, sum_down = (g_up, g_down) if first else (s["sum_up"] + g_up, s["sum_down"] + g_down)
        if end % level.period == 0:  # the period closes: θ ← θ − η Σ ∇ (eq. 71)
            up, down = torch.add(up, sum_up, alpha=-level.lr), torch.add(down, sum_down, alpha=-level.lr)
            # zeros again: those the chunk found when it opened the period, else new ones
            sum_up, sum_down = (s["sum_up"], s["sum_down"]) if first else map(torch.zeros_like, (sum_up, sum_down))
            # one reduction: a sum is finite only if every weight is (a meta tensor has shapes, no values: nothing to
            # check, and reading one would raise)
            if up.device.type != "meta" and not torch.isfinite(up.sum() + down.sum()):
                raise FloatingPointError(
                    f"the task-loss CMS level blocks.{i}.cms.levels.{j} diverged at its step after token {end}: "
                    f"lower CMSConfig.task_lr (now {level.lr})"
                )
        if level.reset is not None and end % level.reset == 0:  # nested (eq. 72): the slower level has just stepped
            fresh = level.init_state(seg.shape[0])
            up, down, sum_up, sum_down = fresh["up"], fresh["down"], fresh["sum_up"], fresh["sum_down"]
        new = _with(new, where, {"up": up, "down": down, "sum_up": sum_up, "sum_down": sum_down})
    if not outer:
        logits = logits.detach()
        new = tree_map(Tensor.detach, new)
    return logits, new


def task_forward(model: nn.Module, tokens: Tensor, layers: list[dict], task: dict, learn: Tensor | None = None):
    """The forward pass of a LanguageModel (`model`, which imports this module) with learning task-loss levels:
    logits (b, t, V), the new layers, and the new `task` part of the state (the position; the chunk in progress, its
    `learn` mask, and every layer's state at its start). `learn` (b, t) bool: which tokens' next-token predictions
    drive the steps (None: every one)."""
    C = _chunk(model.task_levels)
    position, pending, start = task["position"], task["chunk"], task["start"]
    if pending is not None:  # a chunk begun by an earlier call: computed again from its start, whole
        x, layers, skip = torch.cat([pending, tokens], dim=1), start, pending.shape[1]
        before = task.get("learn")  # absent from a state saved before masks existed: every token learnt
        if learn is not None or before is not None:
            learn = torch.cat([_mask(before, pending), _mask(learn, tokens)], dim=1)
    else:
        x, skip = tokens, 0
    base = position - skip  # the stream position of x[:, 0], a multiple of C
    outer = torch.is_grad_enabled()
    first, below, cut = _first(model.task_levels), None, x.shape[1] // C * C  # cut: where a partial chunk starts
    if first:  # the blocks that read θ_0 only (task_blocks): once over the whole call, chunk-parallel, in two parts
        # so that their state where a partial last chunk starts is at hand (the next call starts again from there)
        pieces, mid = [], layers
        if cut:
            h, mid = model.run_blocks(model.embed(x[:, :cut]), layers, 0, first)  # (b, cut, dim)
            pieces.append(h)
        layers = mid
        if cut < x.shape[1]:
            h, layers = model.run_blocks(model.embed(x[:, cut:]), mid, 0, first)
            pieces.append(h)
        below = torch.cat(pieces, dim=1)  # (b, t, dim)
    out, pending, pending_learn, start = [], None, None, None
    for lo in range(0, x.shape[1], C):
        seg = x[:, lo : lo + C]
        h = None if below is None else below[:, lo : lo + C]
        mask = None if learn is None else learn[:, lo : lo + C]
        if seg.shape[1] == C:
            logits, layers = _inner_step(model, seg, mask, h, layers, base + lo + C, outer)
        else:  # the chunk goes on in a later call: read it with the current weights, step then
            # its start state: the blocks below as they were where it starts, the others as they are now
            pending, pending_learn, start = seg, mask, layers if not first else [*mid[:first], *layers[first:]]
            logits, layers = model.forward_blocks(seg, layers, first=first, hidden=h)
        out.append(logits)
    logits = torch.cat(out, dim=1)[:, skip:]
    task = {"position": position + tokens.shape[1], "chunk": pending, "start": start, "learn": pending_learn}
    return logits, layers, task


def _mask(learn: Tensor | None, tokens: Tensor) -> Tensor:
    """`learn` for `tokens` (b, t), every token learnt where it is None."""
    return torch.ones_like(tokens, dtype=torch.bool) if learn is None else learn


@contextlib.contextmanager
def reading_only(model: nn.Module):
    """Within: every task-loss level's η is 0, so the levels read θ_0 and never change it (with the pretrained
    stacking, the model is then exactly its source); each level's η is restored on the way out, however it ends."""
    rates = [level.lr for _, _, level in model.task_levels]
    try:
        for _, _, level in model.task_levels:
            level.lr = 0.0
        yield model
    finally:
        for (_, _, level), lr in zip(model.task_levels, rates, strict=True):
            level.lr = lr


@torch.no_grad()
def commit(model: nn.Module, state, row: int = 0) -> None:
    """θ_0 ← the fast weights that row `row` of `state` ends with, for every level that learns: what one sequence
    learnt becomes the weights every new sequence starts from (a deployed model keeping what it read, the attention
    cache and the rest of the state dropped; `nestlearn continual --strategy memorize`). A state part-way through a
    chunk or through a slower level's period holds tokens or gradients not yet stepped: refused, so that nothing read
    is lost without a word."""
    task = state.task
    if task["chunk"] is not None:
        raise ValueError(
            f"the state ends {task['chunk'].shape[1]} tokens into a chunk of {_chunk(model.task_levels)}: read a "
            "multiple of the fastest in-context period before committing its fast weights"
        )
    for i, j, level in model.task_levels:
        s = state.layers[i]["cms"][j]
        if task["position"] % level.period:
            raise ValueError(
                f"blocks.{i}.cms.levels.{j} (period {level.period}) is part-way through its period at position "
                f"{task['position']}: read a multiple of every in-context period before committing"
            )
        level.up.copy_(s["up"][row])
        level.down.copy_(s["down"][row])


def reference_forward(model: nn.Module, tokens: Tensor, learn: Tensor | None = None) -> Tensor:
    """The slow, obvious eq. 71, for tests: one sequence at a time; before the step after chunk i, the whole prefix is
    computed again from a fresh state with the weight history θ_0 … θ_i (chunk j read with θ_j), and the step takes
    plain autograd's gradient of chunk i's summed next-token loss (the tokens `learn` (b, t) marks, if given) with
    respect to θ_i alone. Returns the logits of
    a last pass over the whole sequence with that history; the outer gradient flows through it to first order
    (each inner gradient a constant), or through the inner gradients too with meta_grad="full"."""
    levels = model.task_levels
    C, full = _chunk(levels), model.config.cms.meta_grad == "full"
    rows = []
    for r in range(tokens.shape[0]):
        x = tokens[r : r + 1]
        n = x.shape[1] // C
        theta = [{"up": lv.up[None], "down": lv.down[None]} for _, _, lv in levels]
        sums = [{"up": 0.0, "down": 0.0} for _ in levels]
        history = []  # θ used by each chunk

        for c in range(n):
            leaves = [{k: v.detach().requires_grad_() if not full else v for k, v in th.items()} for th in theta]
            if full:
                leaves = [{k: v + 0 for k, v in th.items()} for th in theta]  # non-leaf copies to differentiate at
            logits = _replay(model, x, [*history, leaves], c + 1)[:, c * C :]
            seg = x[:, c * C : (c + 1) * C]
            nll = F.cross_entropy(logits[:, :-1].float().flatten(0, 1), seg[:, 1:].flatten(), reduction="none")
            if learn is not None:
                nll = nll * learn[r, c * C : (c + 1) * C - 1]
            if model.task_rate is not None:  # η_t = task_lr · 2σ(w·e_t + b), token t predicting token t + 1
                nll = nll * 2 * torch.sigmoid(model.task_rate(model.embed(seg[0, :-1])))[:, 0]
            loss = nll.sum()
            flat = [v for th in leaves for v in th.values()]
            grads = iter(torch.autograd.grad(loss, flat, create_graph=full))
            history.append(theta)
            new_theta = []
            for (_, _, lv), th, s in zip(levels, theta, sums, strict=True):
                for k in ("up", "down"):
                    s[k] = s[k] + next(grads)
                if (c + 1) * C % lv.period == 0:
                    th = {k: th[k] - lv.lr * s[k] for k in ("up", "down")}
                    s["up"], s["down"] = 0.0, 0.0
                if lv.reset is not None and (c + 1) * C % lv.reset == 0:  # nested: θ_0 again
                    th = {"up": lv.up[None], "down": lv.down[None]}
                    s["up"], s["down"] = 0.0, 0.0
                new_theta.append(th)
            theta = new_theta
        rest = x.shape[1] - n * C
        hist = history + ([theta] if rest else [])
        logits = _replay(model, x, hist, n + (1 if rest else 0))
        rows.append(logits)
    return torch.cat(rows, dim=0)


def _replay(model: nn.Module, x: Tensor, history: list[list[dict]], chunks: int) -> Tensor:
    """The first `chunks` chunks of x (1, t) from a fresh state, chunk c read with the weights history[c]."""
    levels = model.task_levels
    C = _chunk(levels)
    layers, out = model.init_state(1).layers, []
    for c in range(chunks):
        for where, theta in zip(levels, history[c], strict=True):
            layers = _with(layers, where, {**layers[where[0]]["cms"][where[1]], **theta})
        logits, layers = model.forward_blocks(x[:, c * C : (c + 1) * C], layers)
        out.append(logits)
    return torch.cat(out, dim=1)
