"""EleutherAI's lm-evaluation-harness (`lm-eval`) for nestlearn checkpoints: `NestlearnLM`, registered as "nestlearn".

    pip install -e ".[eval]"                    # lm-eval==0.4.13
    nestlearn lm-eval --model nestlearn --model_args path=runs/hope-tiny --tasks docs/lm-eval/spelling.yaml
    python -m nestlearn.evals.harness --model nestlearn --model_args path=runs/hope-tiny,max_length=4096 \\
        --tasks my_task --include_path my_tasks/ --batch_size 16 --limit 100

`nestlearn lm-eval ARGS` and `python -m nestlearn.evals.harness ARGS` are the `lm_eval ARGS` command line with
"nestlearn" registered; `--help` starts with how to name a checkpoint. A task whose data is on the HF hub
(hellaswag, lambada_openai, ...) cannot load without the hub: the command then says so in one line, with how to
give the task local data (a task YAML over local files, as docs/lm-eval/spelling.yaml), instead of lm-eval's
traceback (NESTLEARN_DEBUG=1 keeps the traceback). Plain
`lm_eval --model nestlearn` cannot work: lm-eval 0.4.13 knows only the models of its own table
(`lm_eval.models.MODEL_MAPPING`) and those registered by modules already imported, and reads no plugin entry points.
From Python, pass an instance (or the name, once this module is imported):

    import lm_eval
    from nestlearn.evals.harness import NestlearnLM
    out = lm_eval.simple_evaluate(model=NestlearnLM(path="runs/hope-tiny"), tasks=["docs/lm-eval/spelling.yaml"])
    out = lm_eval.simple_evaluate(model="nestlearn", model_args="path=runs/hope-tiny", tasks=["hellaswag"])

model_args (`--model_args key=value,key=value`):
    path          a checkpoint folder, or a run folder (its newest checkpoint). Required.
    device        auto (default: cuda if visible, else cpu), cpu, cuda, cuda:N. On the command line give --device
                  instead (lm-eval passes its own --device, default cuda:0, which falls back to cpu without a GPU).
    batch_size    sequences per forward pass (default 1, lm-eval's --batch_size; "auto" is not supported).
    max_length    tokens per forward pass (default: the checkpoint's training seq_len).
    long_inputs   auto (default), stream or truncate: what happens to an input longer than max_length.
                  stream: read it in windows of max_length tokens with the model's state carried from one window
                  to the next, so every token is conditioned on everything before it: the scores of one forward
                  pass over the whole input (tested). truncate: keep its last max_length tokens, as lm-eval's HF models
                  do. auto streams models whose mixer is a memory (titans, hope) or sliding-window attention, and
                  truncates models with full attention (transformer, hope_attention), whose KV cache grows with the
                  input and which were never trained on positions past their seq_len.
    max_gen_toks  the most tokens generate_until produces when the task does not say (default 256).
    precision     fp32 (default), bf16 (autocast; log-probabilities are still computed in float32) or auto
                  (bf16 on GPU, fp32 on CPU).

Every input starts with the tokenizer's end-of-document token, the separator between the documents the model was
trained on, so that a context is read as the start of a document (lm-eval's `prefix_token_id` convention).
Not supported: chat templates (--apply_chat_template; the models are not chat-tuned) and several processes (one
process on one device; run tasks in separate processes to use several GPUs).
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import traceback
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ModuleNotFoundError as e:  # nestlearn itself never needs lm-eval; only this module does
    if e.name is None or e.name.split(".")[0] != "lm_eval":
        raise
    raise ModuleNotFoundError(
        "nestlearn.evals.harness needs lm-eval: pip install 'lm-eval==0.4.13' (or pip install -e '.[eval]' in the repo)"
    ) from e

from ..checkpoint import load_checkpoint, resolve_checkpoint
from ..model import sample_next
from ..runtime import autocast, flush_subnormals, resolve_device

__all__ = ["NestlearnLM", "main", "offline_message"]

log = logging.getLogger(__name__)

LONG_INPUTS = ("auto", "stream", "truncate")
PRECISIONS = ("fp32", "bf16", "auto")
GEN_KWARGS = ("until", "max_gen_toks", "do_sample", "temperature", "top_k")
EXAMPLE = "--model_args path=runs/hope-tiny"


def _register(cls: type) -> type:
    # `python -m nestlearn.evals.harness` runs this file as __main__ and then imports nestlearn.evals.harness for
    # main(): only the importable copy registers, since lm-eval refuses a second class under the same name.
    return cls if __name__ == "__main__" else register_model("nestlearn")(cls)


def _positive_int(name: str, value: Any, fix: str) -> int:
    try:
        n = int(value)
        ok = n >= 1 and not isinstance(value, bool) and float(value) == n
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(f"{name}={value!r} must be a positive integer; {fix}")
    return n


@_register
class NestlearnLM(LM):
    """A nestlearn checkpoint as an lm-eval model; the arguments are the model_args of the module docstring.

    loglikelihood sums log p(continuation | context) over the continuation's tokens, loglikelihood_rolling sums
    log p over a whole document given the end-of-document token, and generate_until decodes token by token with
    the model's state carried (greedy unless the task samples), stopping at a stop string, end of document or
    max_gen_toks. max_batch_size is accepted because lm-eval passes it to every model, and is unused."""

    def __init__(
        self,
        path: str | None = None,
        device: str = "auto",
        batch_size: int | str = 1,
        max_length: int | str | None = None,
        long_inputs: str = "auto",
        max_gen_toks: int | str = 256,
        precision: str = "fp32",
        max_batch_size: int | None = None,
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:
            hint = " (lm-eval's HF models say pretrained=; nestlearn says path=)" if "pretrained" in unknown else ""
            raise ValueError(
                f"unknown model_args {sorted(unknown)}{hint}; the nestlearn model takes path, device, batch_size, "
                "max_length, long_inputs, max_gen_toks and precision (docs/training.md, lm-eval-harness section)"
            )
        if path is None or str(path) == "":
            raise ValueError(f"the nestlearn model needs path=CHECKPOINT (a run or checkpoint folder): {EXAMPLE}")
        if str(batch_size).startswith("auto"):
            raise ValueError(
                f"batch_size={batch_size!r} is not supported by the nestlearn model, which does not probe memory; "
                "give a number, e.g. --batch_size 16"
            )
        if long_inputs not in LONG_INPUTS:
            raise ValueError(f"long_inputs={long_inputs!r} is not known; expected one of {list(LONG_INPUTS)}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision={precision!r} is not known; expected one of {list(PRECISIONS)}")
        self.batch_size = _positive_int("batch_size", batch_size, "e.g. --batch_size 16")
        self.max_gen_toks = _positive_int("max_gen_toks", max_gen_toks, "e.g. max_gen_toks=256")
        if str(device) in ("cuda", "cuda:0") and not torch.cuda.is_available():
            # lm-eval's command line passes --device cuda:0 unless told otherwise; HF models fall back the same way
            log.warning("device=%r but no GPU is visible to torch: running on cpu (pass --device cpu)", device)
            device = "cpu"
        self._device = resolve_device(str(device))
        flush_subnormals(self._device)  # decayed fast weights reach subnormals, which x86 computes slowly
        self.checkpoint = resolve_checkpoint(path)
        self.model, self.tokenizer = load_checkpoint(self.checkpoint, self._device)
        self.model.eval()
        config = self.model.config
        if max_length is None:
            max_length = config.seq_len
        self.max_length = _positive_int("max_length", max_length, f"e.g. max_length={config.seq_len}")
        if self.tokenizer.vocab_size > config.vocab_size:
            raise ValueError(
                f"{self.checkpoint}: its tokenizer has {self.tokenizer.vocab_size} ids but the model only "
                f"{config.vocab_size}; the checkpoint is inconsistent"
            )
        # a memory (titans, hope) or a sliding window keeps a state of constant size and is meant to read on;
        # full attention's cache grows and its positions past seq_len were never trained
        recurrent = config.mixer != "attention" or config.attention.window is not None
        self.stream = long_inputs == "stream" or (long_inputs == "auto" and recurrent)
        self.precision = precision

    # --- what lm-eval asks of a model besides the three request types ---

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.eos_id

    def get_model_info(self) -> dict:
        """Added to the results' "config" by lm-eval."""
        return {
            "nestlearn_checkpoint": str(self.checkpoint),
            "nestlearn_model": self.model.config.name,
            "nestlearn_parameters": self.model.num_parameters(),
            "nestlearn_max_length": self.max_length,
            "nestlearn_long_inputs": "stream" if self.stream else "truncate",
        }

    # --- scoring ---

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """(eos + context, continuation) ids. The pair is encoded whole and split after the context's ids, as lm-eval's
        HF models do, so that a BPE merge across the boundary is scored as the tokenizer would write it; spaces that
        end the context move to the continuation, where BPE expects a word's leading space."""
        n_spaces = len(context) - len(context.rstrip())
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.tokenizer.encode(context + continuation)
        ctx = self.tokenizer.encode(context)
        return [self.tokenizer.eos_id, *ctx], whole[len(ctx) :]

    def _jobs(self, context: list[int], target: list[int]) -> list[tuple[list[int], list[int], int]]:
        """Forward passes that score every id of `target` once given `context` (≥ 1 id): (input ids, the ids they
        predict, the number of scored positions at the end). Streaming: one pass over everything, read in windows.
        Truncating: passes of at most max_length ids, each ending where its scored ids end and reaching as far
        back as max_length allows (lm-eval's rolling windows; a single pass when the target fits)."""
        full = context + target
        if self.stream:
            return [(full[:-1], full[1:], len(target))]
        jobs, a = [], len(context)
        while a < len(full):
            b = min(len(full), a + self.max_length)
            lo = max(0, b - 1 - self.max_length)
            jobs.append((full[lo : b - 1], full[lo + 1 : b], b - a))
            a = b
        return jobs

    @torch.no_grad()
    def _run(self, jobs: list[tuple[list[int], list[int], int]], progress: str, disable_tqdm: bool) -> list:
        """[(Σ log p of the scored ids, whether each is the argmax)] per job, in batches of batch_size, longest first
        (padding is on the right, so it never reaches a scored position: the models are causal)."""
        from tqdm import tqdm

        order = sorted(range(len(jobs)), key=lambda i: -len(jobs[i][0]))
        out: list[tuple[float, bool] | None] = [None] * len(jobs)
        for lo in tqdm(range(0, len(order), self.batch_size), desc=progress, disable=disable_tqdm or not order):
            batch = [jobs[i] for i in order[lo : lo + self.batch_size]]
            t = len(batch[0][0])
            inp = torch.full((len(batch), t), self.tokenizer.eos_id, dtype=torch.long)
            tgt = torch.zeros((len(batch), t), dtype=torch.long)
            scored = torch.zeros((len(batch), t), dtype=torch.bool)
            for r, (x, y, n) in enumerate(batch):
                inp[r, : len(x)], tgt[r, : len(y)] = torch.tensor(x), torch.tensor(y)
                scored[r, len(x) - n : len(x)] = True
            inp, tgt, scored = inp.to(self._device), tgt.to(self._device), scored.to(self._device)
            total = torch.zeros(len(batch), dtype=torch.float64, device=self._device)
            greedy = torch.ones(len(batch), dtype=torch.bool, device=self._device)
            state = None
            for w in range(0, t, self.max_length):  # one window unless streaming an input longer than max_length
                sl = slice(w, w + self.max_length)
                with autocast(self._device, self.precision):
                    logits, state = self.model(inp[:, sl], state)
                logp = F.log_softmax(logits.float(), dim=-1)
                tok = logp.gather(-1, tgt[:, sl, None]).squeeze(-1)
                total += tok.double().masked_fill(~scored[:, sl], 0.0).sum(1)
                greedy &= ((logp.argmax(-1) == tgt[:, sl]) | ~scored[:, sl]).all(1)
            for r, i in enumerate(order[lo : lo + self.batch_size]):
                out[i] = (float(total[r]), bool(greedy[r]))
        return out

    def _score(self, pairs: list[tuple[list[int], list[int]]], progress: str, disable_tqdm: bool) -> list:
        jobs, owner = [], []
        for k, (context, target) in enumerate(pairs):
            for job in self._jobs(context, target) if target else []:
                jobs.append(job)
                owner.append(k)
        results = [[0.0, True] for _ in pairs]  # an empty target has probability 1
        for k, (lp, greedy) in zip(owner, self._run(jobs, progress, disable_tqdm), strict=True):
            results[k][0] += lp
            results[k][1] &= greedy
        return [(lp, greedy) for lp, greedy in results]

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        results = self._score(pairs, "loglikelihood", disable_tqdm)
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood", req.args, res)
        return results

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        pairs = [([self.tokenizer.eos_id], self.tokenizer.encode(req.args[0])) for req in requests]
        results = [lp for lp, _ in self._score(pairs, "loglikelihood_rolling", disable_tqdm)]
        for req, res in zip(requests, results, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, res)
        return results

    # --- generation ---

    def _gen_settings(self, gen_kwargs: dict) -> tuple[list[str], int, float, int | None]:
        unknown = sorted(set(gen_kwargs) - set(GEN_KWARGS))
        if unknown and not getattr(self, "_warned", False):
            log.warning("nestlearn generate_until ignores gen_kwargs %s; it knows %s", unknown, list(GEN_KWARGS))
            self._warned = True
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_gen = _positive_int(
            "max_gen_toks",
            gen_kwargs.get("max_gen_toks", self.max_gen_toks),
            "set it in the task's generation_kwargs or --gen_kwargs max_gen_toks=256",
        )
        temperature = float(gen_kwargs.get("temperature", 0.0) or 0.0)
        do_sample = gen_kwargs.get("do_sample")
        # HF's convention, which lm-eval tasks are written for: do_sample=False is greedy whatever the temperature,
        # do_sample=True without a temperature samples at 1; no do_sample samples iff the temperature is positive
        if do_sample is False:
            temperature = 0.0
        elif do_sample and temperature == 0.0:
            temperature = 1.0
        if temperature < 0:
            raise ValueError(f"temperature={temperature} must be >= 0 (0 is greedy)")
        top_k = gen_kwargs.get("top_k")
        return until, max_gen, temperature, None if top_k in (None, 0, -1) else int(top_k)

    @torch.no_grad()
    def _generate(self, context: str, gen_kwargs: dict) -> str:
        until, max_gen, temperature, top_k = self._gen_settings(gen_kwargs)
        ids = [self.tokenizer.eos_id, *self.tokenizer.encode(context)]
        if not self.stream:  # leave room for the answer inside max_length, as lm-eval's HF models do
            ids = ids[-max(1, self.max_length - max_gen) :]
        x = torch.tensor([ids], device=self._device)
        state = None
        for w in range(0, x.shape[1], self.max_length):
            with autocast(self._device, self.precision):
                logits, state = self.model(x[:, w : w + self.max_length], state)
        produced: list[int] = []
        text = ""
        for _ in range(max_gen):
            nxt = sample_next(logits, temperature, top_k)
            if int(nxt) == self.tokenizer.eos_id:
                break
            produced.append(int(nxt))
            text = self.tokenizer.decode(produced)
            if any(s and s in text for s in until):
                break
            with autocast(self._device, self.precision):
                logits, state = self.model(nxt, state)
        # cut at the earliest stop string; the stop string itself is not part of the answer
        cut = min((text.index(s) for s in until if s and s in text), default=len(text))
        return text[:cut]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        from tqdm import tqdm

        out = []
        for req in tqdm(requests, desc="generate_until", disable=disable_tqdm):
            context, gen_kwargs = req.args
            res = self._generate(context, dict(gen_kwargs or {}))
            self.cache_hook.add_partial("generate_until", req.args, res)
            out.append(res)
        return out


HELP = """\
usage: nestlearn lm-eval --model nestlearn --model_args path=CHECKPOINT[,KEY=VALUE...] --tasks TASKS [lm-eval options]
       (the same: python -m nestlearn.evals.harness ...)

lm-evaluation-harness on a nestlearn checkpoint: lm-eval's own command line (lm-eval 0.4.13) with the model
"nestlearn" registered. Name the checkpoint with --model nestlearn --model_args path=CHECKPOINT, where CHECKPOINT
is a checkpoint folder or a run folder (its newest checkpoint), e.g. --model_args path=runs/hope-tiny. lm-eval's
pretrained= is not understood.

examples:
  nestlearn lm-eval --model nestlearn --model_args path=runs/hope-tiny --tasks docs/lm-eval/spelling.yaml
  nestlearn lm-eval --model nestlearn --model_args path=runs/hope-tiny,max_length=4096 --device cpu \\
      --tasks my_task --include_path my_tasks/ --batch_size 16 --output_path results/

model_args, comma-separated KEY=VALUE: path (required), max_length (default: the checkpoint's seq_len),
long_inputs (auto, stream or truncate), max_gen_toks (256), precision (fp32, bf16 or auto). Give the batch size
and the device with lm-eval's --batch_size (a number) and --device (default cuda:0, cpu without a GPU).

Offline: lm-eval's own tasks (hellaswag, lambada_openai, ...) load their data from the HF hub. Without it, give a
task over local files: a task YAML (docs/lm-eval/spelling.yaml is one, run from the repository root) passed as
--tasks FILE.yaml, or a folder of them passed as --include_path DIR with --tasks TASK_NAME. Documented in
docs/training.md, "Evaluating with lm-eval-harness".

lm-eval's own help follows; where it says lm-eval, write nestlearn lm-eval.
"""

# exceptions that mean "the HF hub (or any remote host) could not be reached": by the module that defines the class
# and the class name, so that none of these optional packages has to be importable. httpx matches httpx and httpx2.
UNREACHABLE = {
    "requests": ("ConnectionError", "Timeout"),
    "urllib3": ("NewConnectionError", "ConnectTimeoutError", "MaxRetryError"),
    "httpx": ("ConnectError", "NetworkError", "TimeoutException"),
    "huggingface_hub": ("OfflineModeIsEnabled", "LocalEntryNotFoundError"),
    "aiohttp": ("ClientConnectionError",),
}


def _chain(e: BaseException) -> list[BaseException]:
    """e and every exception it was raised from or during (__cause__, __context__), each once."""
    out, todo = [], [e]
    while todo:
        x = todo.pop()
        if x is not None and all(x is not y for y in out):
            out.append(x)
            todo += [x.__cause__, x.__context__]
    return out


def _unreachable(e: BaseException) -> bool:
    if isinstance(e, (ConnectionError, TimeoutError, socket.gaierror)):
        return True
    for cls in type(e).__mro__:
        root = cls.__module__.split(".")[0]
        names = UNREACHABLE.get("httpx" if root.startswith("httpx") else root, ())
        if cls.__name__ in names:
            return True
    return False


def offline_message(e: BaseException) -> str | None:
    """A one-line message for an error that means a task's data is on a host that cannot be reached (the HF hub,
    offline), naming the task and dataset when the traceback shows them; None for any other error."""
    chain = _chain(e)
    if not any(_unreachable(x) for x in chain):
        return None
    task = dataset = None
    for x in chain:
        for frame, _ in traceback.walk_tb(x.__traceback__):
            names, module = frame.f_locals, frame.f_globals.get("__name__", "")
            config = getattr(names.get("self"), "config", None)
            if module.startswith("lm_eval.") and frame.f_code.co_name == "download" and config is not None:
                task = task or getattr(config, "task", None)
                dataset = dataset or getattr(config, "dataset_path", None)
            if module.startswith("datasets.") and frame.f_code.co_name == "load_dataset":
                dataset = dataset or names.get("path")
    what = f"task {task!r}" if task else "a task"
    data = f"the dataset {dataset!r}" if dataset else "data"
    reason = f"{type(e).__name__}: {e}".splitlines()[0]
    return (
        f"{what} needs {data} from the HF hub, which cannot be reached from here ({reason}). Give the task its data "
        "locally: a task YAML over local files (dataset_path: json with dataset_kwargs: data_files:, or "
        "dataset_path: a local folder with one file per split, e.g. test.jsonl), passed as --tasks FILE.yaml or "
        "through --include_path DIR; example: docs/lm-eval/spelling.yaml; docs/training.md, 'Offline, on local data'"
    )


def _wants_help(argv: list[str]) -> bool:
    if argv[:1] in (["ls"], ["validate"]):  # lm-eval's other subcommands: their own help only
        return False
    return not argv or argv == ["run"] or any(a in ("-h", "--help") for a in argv)


def main(argv: list[str] | None = None) -> int:
    """The lm_eval command line with the "nestlearn" model registered: `python -m nestlearn.evals.harness ARGS`.
    Its help starts with how to name a nestlearn checkpoint; an error that means a task's data cannot be reached
    (the HF hub, offline) is one line on stderr and exit status 1 (NESTLEARN_DEBUG=1: the traceback)."""
    from lm_eval.__main__ import cli_evaluate

    argv = sys.argv[1:] if argv is None else list(argv)
    if _wants_help(argv):
        print(HELP)
        sys.stdout.flush()
    # lm-eval's parser reads sys.argv itself (it inserts the `run` subcommand when none is given)
    sys.argv = ["lm_eval", *argv]
    try:
        cli_evaluate()
    except Exception as e:
        message = offline_message(e)
        if message is None or os.environ.get("NESTLEARN_DEBUG"):
            raise
        print(f"nestlearn lm-eval: error: {message} (NESTLEARN_DEBUG=1 for a traceback)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    from nestlearn.evals.harness import main as _main  # the registered copy of this module (see _register)

    sys.exit(_main())
