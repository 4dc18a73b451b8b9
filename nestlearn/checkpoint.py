"""Checkpoints of a training run: written atomically, found again, read back with clear errors.

`out_dir/checkpoints/step-XXXXXXXX/` holds the model (config.json, model.safetensors: `nestlearn.load` reads it),
the tokenizer, train_config.json and trainer.pt (optimizer, schedule, RNG, step, carried state). A checkpoint is
written into a temporary folder and renamed into place, and older ones are deleted only after that, so an
interrupted save never destroys the last good checkpoint. The model state carried across segments is saved with
plain containers only, so that trainer.pt loads with `weights_only=True`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import re
import shutil
import zipfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from .data.tokenizer import Tokenizer, load_tokenizer
from .model import LanguageModel, ModelState, load
from .state import MemoryState

__all__ = [
    "CHECKPOINTS",
    "TRAINER_FILE",
    "TRAIN_CONFIG_FILE",
    "encode_state",
    "decode_state",
    "latest_checkpoint",
    "resolve_checkpoint",
    "load_checkpoint",
    "save_checkpoint",
    "read_trainer",
    "checkpoint_problem",
    "newest_intact",
]

TRAINER_FILE, TRAIN_CONFIG_FILE, CHECKPOINTS = "trainer.pt", "train_config.json", "checkpoints"
STEP_DIR = re.compile(r"^step-(\d{8})$")


def encode_state(x: Any) -> Any:
    if isinstance(x, ModelState):
        return {"__model_state__": encode_state(x.layers), "__task__": encode_state(x.task)}
    if isinstance(x, MemoryState):
        return {"__memory_state__": {f.name: encode_state(getattr(x, f.name)) for f in dataclasses.fields(x)}}
    if isinstance(x, dict):
        return {k: encode_state(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [encode_state(v) for v in x]
    return x


def decode_state(x: Any) -> Any:
    if isinstance(x, dict) and "__model_state__" in x:
        return ModelState(decode_state(x["__model_state__"]), decode_state(x.get("__task__")))
    if isinstance(x, dict) and "__memory_state__" in x:
        return MemoryState(**{k: decode_state(v) for k, v in x["__memory_state__"].items()})
    if isinstance(x, dict):
        return {k: decode_state(v) for k, v in x.items()}
    if isinstance(x, list):
        return [decode_state(v) for v in x]
    return x


def latest_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint of a run folder, or None."""
    root = Path(out_dir) / CHECKPOINTS
    if not root.is_dir():
        return None
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / TRAINER_FILE).is_file())
    return steps[-1] if steps else None


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A checkpoint folder, or a run folder (its newest checkpoint). Errors say what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: give a checkpoint folder or a run's --out-dir")
    if (path / "config.json").is_file():
        return path
    found = latest_checkpoint(path)
    if found is None:
        raise FileNotFoundError(
            f"{path} holds no checkpoint (no config.json, no {CHECKPOINTS}/step-*/ with "
            f"{TRAINER_FILE}): is it a folder written by nestlearn train?"
        )
    return found


def load_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> tuple[LanguageModel, Tokenizer]:
    """The model and tokenizer of a checkpoint folder, of a run folder's newest checkpoint, or of a Hugging Face
    Llama folder (its own tokenizer.json)."""
    path = resolve_checkpoint(path)
    try:
        model = load(path, device=device)
    except Exception as e:  # safetensors and json raise many kinds; say which file is bad
        raise ValueError(
            f"cannot load the model in {path}: {e}. The checkpoint is corrupt or incomplete; "
            "use an earlier one (checkpoints/step-*)"
        ) from e
    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(
            f"{path / 'tokenizer.json'} is missing: every nestlearn checkpoint saves its tokenizer, and a pretrained "
            "model folder must bring its own (tokenizer.json, as transformers' save_pretrained writes it)"
        )
    tokenizer = load_tokenizer(path)
    if tokenizer.vocab_size > model.config.vocab_size:
        raise ValueError(
            f"{path / 'tokenizer.json'} has {tokenizer.vocab_size} tokens but the model's vocabulary is "
            f"{model.config.vocab_size}: they do not belong together; put the model's own tokenizer beside it"
        )
    return model, tokenizer


def save_checkpoint(
    out_dir: Path,
    step: int,
    model: LanguageModel,
    model_sd: dict,
    optim_sd: dict,
    tokenizer: Tokenizer,
    train_config: str,
    keep_last: int,
    carried: Any,
    extra: dict | None = None,
) -> Path:
    """Write checkpoints/step-XXXXXXXX atomically (a temporary folder renamed into place), then keep the newest
    `keep_last`. train_config: the run's TrainConfig as JSON; carried: the state carried across segments."""
    root = out_dir / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    for stale in root.glob(".tmp-step-*"):  # left by a save that was interrupted
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    plain = LanguageModel(model.config)  # unwrapped (DDP/FSDP) weights in an ordinary module for save_pretrained
    plain.load_state_dict(model_sd)
    plain.save_pretrained(tmp)
    tokenizer.save(tmp)
    (tmp / TRAIN_CONFIG_FILE).write_text(train_config)
    trainer = {
        "step": step,
        "optimizer": optim_sd,
        "torch_rng": torch.get_rng_state(),
        "python_rng": random.getstate(),
        "carried": encode_state(carried),
        **(extra or {}),
    }
    torch.save(trainer, tmp / TRAINER_FILE)
    if final.exists():  # the same step saved again (a rerun): replace it only now that the new one is complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    kept = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name))
    for old in kept[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_trainer(path: Path) -> dict:
    """trainer.pt of a checkpoint folder, with a clear error when it is unreadable."""
    try:
        return torch.load(path / TRAINER_FILE, map_location="cpu", weights_only=True)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(
            f"cannot read {path / TRAINER_FILE} ({first}): the checkpoint is corrupt; delete {path} to "
            "resume from the one before it"
        ) from e


def checkpoint_problem(path: Path) -> str | None:
    """Why the checkpoint folder `path` cannot be read back whole, or None when it can (a save cut short by a full
    disk or a killed job leaves a truncated file, not a missing one). Checked without loading the tensors, which
    resume then reads once: the JSON files are parsed, the weights' header must cover the whole file, and every
    member of trainer.pt (a zip archive) must match its CRC."""
    try:
        for name in ("config.json", "tokenizer.json", TRAIN_CONFIG_FILE):
            json.loads((path / name).read_text())
        with safe_open(path / "model.safetensors", "pt"):
            pass
        with zipfile.ZipFile(path / TRAINER_FILE) as archive:
            bad = archive.testzip()
        if bad is not None:
            return f"{TRAINER_FILE}: {bad} does not match its checksum"
    except Exception as e:  # json, safetensors, zip and the OS raise many kinds
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}"[:200]
    return None


def newest_intact(out_dir: str | os.PathLike) -> tuple[Path | None, list[tuple[Path, str]]]:
    """The newest checkpoint of a run folder that reads back whole, and the newer ones that do not, with why."""
    root = Path(out_dir) / CHECKPOINTS
    steps = sorted(p for p in root.iterdir() if STEP_DIR.match(p.name)) if root.is_dir() else []
    bad = []
    for path in reversed(steps):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, bad
        bad.append((path, problem))
    return None, bad
