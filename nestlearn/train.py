"""Training on token shards: one loop for every preset, on one process or many (torchrun: DDP or FSDP2).

    nestlearn train --preset hope --size tiny --data wiki --steps 2000 --out-dir runs/hope-tiny
    torchrun --nproc_per_node 2 -m nestlearn.cli train --preset hope --parallel fsdp ...

Every field of `TrainConfig` is a flag (`nestlearn train --help`); `--config FILE` reads a saved one
(`out_dir/train_config.json`), flags given after it override it.

Data. A step reads `batch_size` windows of `seq_len + 1` tokens from the train shard. The windows of step s are a
pure function of (seed, s), so that a run resumed at step s reads exactly what an uninterrupted run would have,
and the global batch is the same whatever the number of processes and micro-batches it is cut into: process r
of W takes rows r, r + W, ... of each micro-batch's slice. With `carry_state`, row j instead walks through its own
contiguous stretch of the token stream, segment after segment, and the model's state is carried (detached:
truncated backprop through time) from one step to the next; it starts afresh when the stretch wraps around.

Checkpoints (`nestlearn.checkpoint`) are written atomically every `save_every` steps and at the end; a run
restarted with the same out_dir resumes from its newest one, exactly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import random
import shutil
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from . import pretrained
from .checkpoint import (
    CHECKPOINTS,
    TRAIN_CONFIG_FILE,
    checkpoint_problem,
    decode_state,
    newest_intact,
    read_trainer,
    resolve_checkpoint,
    save_checkpoint,
)
from .data.batches import gather, lane_starts, window_starts
from .data.corpora import corpus_key, data_dir, load_split, resolve_split_file
from .data.shards import open_shard, prepare, shard_dir
from .data.tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe
from .evaluate import evaluate
from .interrupt import Interrupted, SaveClock, StopRequest
from .model import LanguageModel, Level, build, load
from .runtime import Dist, autocast, flush_subnormals, resolve_device, set_threads, setup_distributed
from .train_config import RUN_FIELDS, SCHEDULE_FIELDS, TrainConfig, lr_at, model_config_of, optimizer_factory

__all__ = ["TrainConfig", "train", "prepare_data", "model_config_of", "make_optimizer", "param_groups"]


# --- data ---


def tokenizer_of(config: TrainConfig, *, progress: bool = True) -> Tokenizer:
    """--tokenizer: bytes, a tokenizer.json folder, or bpe:VOCAB trained once on the train split and cached under
    the corpus cache by the split's digest (so that a changed text trains a new one)."""
    if config.init:
        if config.tokenizer != "bytes":
            raise ValueError(
                f"--tokenizer {config.tokenizer}: a model started with --init reads with its own tokenizer "
                f"({config.init}/tokenizer.json); leave --tokenizer out"
            )
        return load_tokenizer(config.init)
    if config.tokenizer == "bytes":
        return ByteTokenizer()
    if not config.tokenizer.startswith("bpe:"):
        return load_tokenizer(config.tokenizer)
    vocab = config.tokenizer.removeprefix("bpe:")
    if not vocab.isdigit():
        raise ValueError(f"tokenizer={config.tokenizer!r}: expected bpe:VOCAB with an integer, e.g. bpe:8192")
    digest = resolve_split_file(config.data, "train", config.data_root)[2]
    cache = data_dir_of(config) / "tokenizers" / f"{corpus_key(config.data)}-bpe{vocab}-{digest[:12]}"
    if (cache / "tokenizer.json").is_file():
        return load_tokenizer(cache)  # trained before on this text (training again gives the same file)
    docs = load_split(config.data, "train", config.data_root)
    tokenizer = train_bpe(docs, int(vocab), length=len(docs), progress=progress)
    tokenizer.save(cache)
    return tokenizer


def shard_dir_of(config: TrainConfig, tokenizer: Tokenizer) -> Path:
    """--shards, or the one folder of the corpus and tokenizer that eval and memorize also use."""
    return Path(config.shards) if config.shards else shard_dir(config.data, tokenizer, config.data_root)


def prepare_data(config: TrainConfig, *, progress: bool = True) -> tuple[Path, Tokenizer]:
    """Token shards of config.data with config.tokenizer, made once and found afterwards. Returns their folder."""
    tokenizer = tokenizer_of(config, progress=progress)
    out = shard_dir_of(config, tokenizer)
    prepare(config.data, tokenizer, out, root=config.data_root, progress=progress)
    return out, tokenizer


def shards_for(
    data: str, tokenizer: Tokenizer, data_root: str | None = None, splits=("test",), progress: bool = True
) -> Path:
    """Shards of `data` made with a given tokenizer (a checkpoint's): the same folder as training's."""
    out = shard_dir(data, tokenizer, data_root)
    prepare(data, tokenizer, out, splits, root=data_root, progress=progress)
    return out


def data_dir_of(config: TrainConfig) -> Path:
    return Path(config.data_root) if config.data_root else data_dir()


def wrap(model: LanguageModel, config: TrainConfig, env: Dist, device: torch.device) -> nn.Module:
    if env.world == 1:
        return model
    if config.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (env.world,))
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


# --- model, optimizer, schedule ---


def param_groups(model: nn.Module, weight_decay: float, orthogonalise: bool = False) -> list[dict]:
    """The parameter-group policy (docs/training.md): the weights of linear maps, every `nn.Linear` but an untied
    output head, are decayed and, when `orthogonalise` (muon, m3), orthogonalised; nothing else is either: the
    embedding and head, the memories' initial states, the causal convolutions' weights, self-modifying Titans'
    read-outs and gate biases, norms and biases (AdamW inside muon and m3, which Jordan et al. advise for
    embeddings; decay would pull α's bias of 4 towards 0 and the initial states towards the dead zero state)."""
    # LoRA's factors are nn.Linears too, but small and meant to start at B = 0: neither decayed nor orthogonalised
    linear = {
        id(m.weight)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and name.split(".")[-1] != "head" and ".lora_" not in name
    }
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if id(p) in linear], "weight_decay": weight_decay},
        {"params": [p for p in params if id(p) not in linear], "weight_decay": 0.0},
    ]
    if orthogonalise:
        groups[1]["muon"] = False
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """config.optimizer over `param_groups`: linear maps decayed (and orthogonalised by muon and m3), the rest not."""
    return optimizer_factory(config)(param_groups(model, config.weight_decay, config.optimizer in ("muon", "m3")))


def make_levels(model: LanguageModel, optimizer: torch.optim.Optimizer, config: TrainConfig):
    """Levels over `optimizer` when the model has outer CMS levels with a period (eq. 71), else None."""
    from .optim import Levels

    # a frozen parameter is in no optimizer, so in no level either
    levels = [
        Level(lv.name, lv.period, {n: p for n, p in lv.params.items() if p.requires_grad}) for lv in model.levels()
    ]
    levels = [lv for lv in levels if lv.params]
    if all(lv.period is None for lv in levels):
        return None
    if config.parallel == "fsdp" and dist.is_initialized():
        raise ValueError(
            "outer CMS levels with a period (--update-periods) are not supported with --parallel fsdp "
            "yet: use --parallel ddp"
        )
    wrapped = Levels(optimizer, levels)  # DDP and torch.compile keep the module's parameter objects
    wrapped.due(model.config.seq_len)  # a period that is not a multiple of the window fails now, not at step 1
    return wrapped


# --- evaluation ---


# --- the loop ---


class Metrics:
    """JSONL lines in out_dir/metrics.jsonl, and the same scalars to TensorBoard when it is on."""

    def __init__(self, out_dir: Path, mode: str, enabled: bool):
        self.enabled, self.writer = enabled, None
        if not enabled:
            return
        self.file = open(out_dir / "metrics.jsonl", "a")  # noqa: SIM115 - lives as long as the run
        if mode != "off":
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError as e:
                if mode == "on":
                    raise ValueError("--tensorboard on needs the tensorboard package: pip install tensorboard") from e

    def log(self, step: int, kind: str, values: dict) -> None:
        if not self.enabled:
            return
        self.file.write(json.dumps({"step": step, "kind": kind, **values}) + "\n")
        self.file.flush()
        if self.writer is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self.writer.add_scalar(f"{kind}/{k}", v, step)

    def close(self) -> None:
        if self.enabled:
            self.file.close()
            if self.writer is not None:
                self.writer.close()


def _drop_metrics_after(path: Path, step: int) -> None:
    if not path.is_file():
        return
    lines = [x for x in path.read_text().splitlines() if x.strip() and json.loads(x)["step"] <= step]
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text("".join(x + "\n" for x in lines))
    os.replace(tmp, path)


# What a resumed run may change. RUN_FIELDS define the run (its model, data, order and optimizer): another value
# is another run, refused. SCHEDULE_FIELDS change the numbers from the resumed step on; they are accepted and named,
# as is every other field (how the run is executed and recorded), so that nothing changes silently.
def _say(text: str) -> None:
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"nestlearn train: {text}", file=sys.stderr, flush=True)


def _resume_point(out_dir: Path, config: TrainConfig, main: bool) -> Path | None:
    """The checkpoint to resume from, after checking that the folder's run is this run and naming what changed.
    A newest checkpoint that does not read back whole (a save cut short) is moved aside as corrupt-step-N, and
    the run resumes from the newest one that does."""
    if config.resume not in ("auto", "never"):
        path = resolve_checkpoint(config.resume)
        problem = checkpoint_problem(path)
        if problem is not None:
            raise ValueError(
                f"--resume {config.resume}: {path} cannot be read ({problem}); the checkpoint is corrupt or "
                "incomplete: use an earlier one (checkpoints/step-*)"
            )
        return path
    if not (out_dir / CHECKPOINTS).is_dir() or not any((out_dir / CHECKPOINTS).glob("step-*")):
        return None
    if config.resume == "never":
        raise ValueError(
            f"{out_dir} already holds checkpoints; pass --resume auto to continue that run or choose another --out-dir"
        )
    found, bad = newest_intact(out_dir)
    if found is None:
        detail = "; ".join(f"{p.name}: {why}" for p, why in bad)
        raise ValueError(
            f"no checkpoint in {out_dir / CHECKPOINTS} can be read ({detail}): the run cannot resume. Delete "
            f"{out_dir / CHECKPOINTS} to start it afresh, or choose another --out-dir"
        )
    for path, why in bad:
        aside = path.with_name("corrupt-" + path.name)
        if main:  # out of the way of `latest_checkpoint` and of keep_last's pruning
            shutil.rmtree(aside, ignore_errors=True)
            path.rename(aside)
        _say(f"{path} cannot be read ({why}): moved to {aside.name}; resuming from {found.name} instead")
    saved = TrainConfig.from_file(found / TRAIN_CONFIG_FILE)
    changed = {f.name: (getattr(saved, f.name), getattr(config, f.name)) for f in dataclasses.fields(TrainConfig)}
    changed = {k: v for k, v in changed.items() if v[0] != v[1] and k != "resume"}
    refused = {k: v for k, v in changed.items() if k in RUN_FIELDS}
    if refused:
        detail = ", ".join(f"--{k.replace('_', '-')} {a!r} there, {b!r} now" for k, (a, b) in refused.items())
        raise ValueError(
            f"{out_dir} holds a different run ({detail}): these define the run. Drop them to resume it, "
            "or choose another --out-dir"
        )
    if changed:
        detail = ", ".join(f"--{k.replace('_', '-')} {a!r} -> {b!r}" for k, (a, b) in changed.items())
        note = (
            " (the schedule and the optimizer's settings change from the resumed step on)"
            if set(changed) & set(SCHEDULE_FIELDS)
            else ""
        )
        _say(f"changed since the run was saved: {detail}{note}")
    return found


def _last_validation(path: Path, step: int) -> dict:
    """The validation metrics metrics.jsonl holds for `step`, or {} when it has none."""
    lines = [json.loads(x) for x in path.read_text().splitlines() if x.strip()] if path.is_file() else []
    found = [x for x in lines if x.get("kind") == "validation" and x.get("step") == step]
    return {k: v for k, v in found[-1].items() if k not in ("kind", "step")} if found else {}


def train(config: TrainConfig) -> dict:
    """Run (or resume) a training run. Returns the final validation metrics and the training speed."""
    from tqdm import tqdm

    env = setup_distributed(config.device)
    device = resolve_device(config.device, env.local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    flush_subnormals(device)
    micro = config.batch_size // (env.world * config.grad_accum)
    if micro * env.world * config.grad_accum != config.batch_size:
        raise ValueError(
            f"batch_size={config.batch_size} must be a multiple of processes × grad_accum = "
            f"{env.world} × {config.grad_accum}"
        )
    set_threads(config.threads, device)
    out_dir = Path(config.out_dir)
    resume_from = _resume_point(out_dir, config, env.main)
    trainer = read_trainer(resume_from) if resume_from is not None else None
    last = config.stop_at or config.steps
    if trainer is not None and trainer["step"] >= last:
        what = "finished" if last == config.steps else f"stopped at --stop-at {last}"
        _say(
            f"{out_dir} is already {what}: step {trainer['step']} of {config.steps} ({resume_from}); nothing to "
            f"train. Raise --steps (or --stop-at) to train on; `nestlearn eval {out_dir}` evaluates it"
        )
        return {"step": trainer["step"], "finished": True, **_last_validation(out_dir / "metrics.jsonl", last)}
    if trainer is not None:
        _say(f"resuming {out_dir} from step {trainer['step']} of {config.steps} ({resume_from.name})")
    if env.main:
        out_dir.mkdir(parents=True, exist_ok=True)
        shard_dir, tokenizer = prepare_data(config, progress=config.progress)
    if env.world > 1:
        dist.barrier()  # rank 0 made the shards; the others only read them
        if not env.main:
            tokenizer = tokenizer_of(config, progress=False)
            shard_dir = shard_dir_of(config, tokenizer)
    train_tokens, _ = open_shard(shard_dir / "train", tokenizer)
    val_tokens, val_meta = open_shard(shard_dir / "validation", tokenizer)

    torch.manual_seed(config.seed)
    random.seed(config.seed)
    model_config = model_config_of(config, tokenizer.vocab_size)
    model = build(model_config)
    if config.init and resume_from is None:  # a resumed run reads every weight from its checkpoint
        pretrained.initialise(model, load(config.init))
    if config.freeze != "none" or config.init or config.adapter or config.lora_rank:
        if config.freeze != "none":
            pretrained.freeze(model, config.freeze)
        _say(f"{model_config.name}: {pretrained.count(model)}")
    model = model.to(device)
    T = model_config.seq_len
    step, carried = 0, None
    optimizer_sd = None
    if resume_from is not None:
        from safetensors.torch import load_model

        load_model(model, resume_from / "model.safetensors", device=str(device))
        step, optimizer_sd = trainer["step"], trainer["optimizer"]
        torch.set_rng_state(trainer["torch_rng"])
        random.setstate(trainer["python_rng"])
        carried = decode_state(trainer["carried"])  # one list of micro-batch states per process
        if len(carried) != env.world:
            raise ValueError(
                f"{resume_from} was saved by {len(carried)} processes; resume with as many "
                f"(now {env.world}), or restart without --carry-state"
            )
        carried = [None if s is None else s.to(device) for s in carried[env.rank]]
    net = wrap(model, config, env, device)
    if config.compile and model.has_memories():
        model.compile_chunks()  # a whole-model graph would unroll every chunk of the sequence
    elif config.compile and not model.task_levels:
        net = torch.compile(net)
    if config.compile and model.task_levels:
        _say(
            "--compile: the task-loss CMS levels run eager (their inner steps take gradients inside the forward "
            "pass, which one compiled graph cannot hold); only the memories' chunks, if any, are compiled"
        )
    if config.parallel == "fsdp" and env.world > 1 and config.optimizer not in ("adamw",):
        raise ValueError(
            f"--optimizer {config.optimizer} needs whole parameters and FSDP shards them: use --parallel "
            "ddp, or adamw with fsdp"
        )
    optimizer = make_optimizer(net, config)
    levels = make_levels(model, optimizer, config)  # steps outer CMS levels at their periods (eq. 71)
    if optimizer_sd is not None:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        # a level that has not been stepped yet rightly has no optimizer state: not strict then
        options = StateDictOptions(full_state_dict=True, strict=levels is None)
        set_optimizer_state_dict(net, optimizer, optimizer_sd, options=options)
        if levels is not None:
            if "levels" not in trainer:
                raise ValueError(
                    f"{resume_from} has no state for the outer CMS levels; resume with the run's own --update-periods"
                )
            levels.load_levels_state_dict(trainer["levels"])
            # set_optimizer_state_dict first runs a zero-gradient step to create every state; a level never
            # stepped before the save had none, and must not start with a step count of 1
            for name, p in model.named_parameters():
                if name not in optimizer_sd["state"]:
                    optimizer.state.pop(p, None)
    if env.main:  # lines an interrupted run wrote after its last checkpoint (all of them if it saved none)
        _drop_metrics_after(out_dir / "metrics.jsonl", step)
    metrics = Metrics(out_dir, config.tensorboard, env.main)
    if env.main:
        (out_dir / TRAIN_CONFIG_FILE).write_text(config.to_json())
    if carried is None or not config.carry_state:
        carried = [None] * config.grad_accum

    def state_dicts() -> tuple[dict, dict]:
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

        return get_state_dict(net, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))

    def save(step: int) -> None:
        model_sd, optim_sd = state_dicts()  # a collective under FSDP: every rank takes part
        every = [carried]
        if env.world > 1:  # the carried states of every process (small: one memory state per row)
            every = [None] * env.world if env.main else None
            dist.gather_object(carried, every, dst=0)
        if env.main:
            extra = {} if levels is None else {"levels": levels.levels_state_dict()}
            save_checkpoint(
                out_dir, step, model, model_sd, optim_sd, tokenizer, config.to_json(), config.keep_last, every, extra
            )
        if env.world > 1:
            dist.barrier()

    def validate(step: int) -> dict:
        result = evaluate(model, val_tokens, val_meta, T, micro, config.eval_tokens, device, config.precision)
        metrics.log(step, "validation", result)
        return result

    bar = tqdm(
        total=config.steps,
        initial=step,
        desc=model_config.name,
        unit="step",
        disable=not (config.progress and env.main),
        dynamic_ncols=True,
    )
    seen, t_start, window_t0, window_tokens = 0, time.perf_counter(), time.perf_counter(), 0
    net.train()
    stop, clock = StopRequest("the current step"), SaveClock(config.save_every_minutes)
    with stop:  # SIGINT/SIGTERM: finish the step, save, raise Interrupted (a second signal stops at once)
        while step < last:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, config)
            if config.carry_state:
                starts, fresh = lane_starts(step, config.batch_size, len(train_tokens), T)
                if fresh:
                    carried = [None] * config.grad_accum
            else:
                starts = window_starts(config.seed, step, config.batch_size, len(train_tokens), T + 1)
            loss_sum = 0.0
            for m in range(config.grad_accum):
                rows = starts[m * micro * env.world : (m + 1) * micro * env.world][env.rank :: env.world]
                x = gather(train_tokens, rows, T + 1).to(device)
                sync = m == config.grad_accum - 1 or env.world == 1 or config.parallel != "ddp"
                ddp = getattr(net, "_orig_mod", net)  # under torch.compile, no_sync lives on the wrapped DDP module
                with contextlib.nullcontext() if sync else ddp.no_sync():
                    with autocast(device, config.precision):  # the forward only, as torch.amp recommends
                        logits, state = net(x[:, :-1], carried[m])
                        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1))
                    (loss / config.grad_accum).backward()
                if config.carry_state:
                    carried[m] = state.detach()
                loss_sum += loss.item()
                # Gone before the next forward: kept alive, this step's graph leftovers fragment the heap, and Hope's
                # next step ran 1.3x slower on CPU (fresh memory faulted in; docs/benchmarks.md)
                del logits, state, loss
            grad_norm = nn.utils.clip_grad_norm_(net.parameters(), config.grad_clip or float("inf"))
            if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP
                grad_norm = grad_norm.full_tensor()
            if levels is not None:
                levels.step(tokens=T)  # each row's stream advanced by T tokens
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            seen += config.batch_size * T
            window_tokens += config.batch_size * T
            loss_value, flags = loss_sum / config.grad_accum, [float(stop.requested), float(clock.due())]
            if env.world > 1:  # one collective: the mean loss, and whether any process was signalled or is due
                t = torch.tensor([loss_value, *flags], dtype=torch.float64)
                dist.all_reduce(t)
                loss_value, flags = t[0].item() / env.world, t[1:].tolist()
            stop_now, save_now = flags[0] > 0, flags[1] > 0
            if not math.isfinite(loss_value):
                raise FloatingPointError(
                    f"training loss is {loss_value} at step {step}: lower --lr or raise --warmup-steps"
                )
            bar.update(1)
            if step % config.log_every == 0 or step == last:
                now = time.perf_counter()
                tps = window_tokens / (now - window_t0)
                values = {
                    "loss": loss_value,
                    "lr": lr_at(step - 1, config),
                    "grad_norm": float(grad_norm),
                    "tokens_per_s": tps,
                    "tokens": seen,
                }
                metrics.log(step, "train", values)
                bar.set_postfix(loss=f"{loss_value:.3f}", tok_s=f"{tps:.0f}")
                window_t0, window_tokens = now, 0
            if config.eval_every and step % config.eval_every == 0 and step < last:
                validate(step)
            if step < last and (stop_now or save_now or (config.save_every and step % config.save_every == 0)):
                save(step)
                clock.reset()
            if stop_now and step < last:
                bar.close()
                metrics.close()
                signum = stop.signum or signal.SIGTERM  # a process that was not signalled stops with the others
                raise Interrupted(
                    signum,
                    f"stopped by {signal.Signals(signum).name} at step {step} of {config.steps}; saved "
                    f"{out_dir / CHECKPOINTS / f'step-{step:08d}'}. Resume with the same command, or "
                    f"`nestlearn train --out-dir {out_dir}`",
                )
        bar.close()
        train_seconds = time.perf_counter() - t_start
        result = validate(step)
        save(step)
        metrics.close()
        # tokens over the wall time of the loop, periodic validation and checkpoints included
        result["train_tokens_per_s"] = seen / train_seconds if seen else float("nan")
        return result
