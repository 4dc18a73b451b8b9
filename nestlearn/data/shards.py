"""Token shards: a split of a corpus as one flat array of token ids on disk, read back as a numpy memmap.

    meta = prepare("wiki", tokenizer, "shards/wiki-bpe8k")        # once; a second call finds it done
    out = shard_dir("wiki", tokenizer)                             # the cache's one folder for (corpus, tokenizer)
    tokens, meta = open_shard("shards/wiki-bpe8k/validation.bin")  # np.memmap, read-only, no copy
    bits_per_byte = total_nll_in_nats / (math.log(2) * meta.num_bytes)

`<out_dir>/<split>.bin` holds the ids of every document of the split in order, with the tokenizer's eos id between
two documents (d1 eos d2 eos ... dn: none before the first or after the last), little-endian uint16 when the
vocabulary has at most 65535 ids and uint32 otherwise. `<out_dir>/<split>.json` is its `ShardMeta`, and
`<out_dir>/tokenizer.json` the tokenizer, so a shard directory is readable on its own.

`num_bytes` is the number of UTF-8 bytes of the documents' text (separators excluded), the denominator of
bits per byte, which compares models across tokenizers.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from .corpora import SPLITS, corpus_key, data_dir, read_documents, resolve_split_file
from .tokenizer import ByteTokenizer, Tokenizer, load_tokenizer, train_bpe

__all__ = ["ShardMeta", "shard_dtype", "shard_dir", "prepare", "open_shard", "main"]

# Bumped whenever the layout of .bin files changes, so that older shards are rebuilt rather than misread.
FORMAT_VERSION = 1
# Texts handed to the tokenizer at once: large enough for encode_batch to keep every core busy.
BATCH_CHARACTERS = 1 << 21


@dataclass(frozen=True)
class ShardMeta:
    """What `<split>.json` records about `<split>.bin`."""

    split: str
    dtype: str  # numpy dtype string, "<u2" or "<u4"
    num_tokens: int  # eos ids included
    num_documents: int
    num_bytes: int  # UTF-8 bytes of the documents' text, the denominator of bits per byte
    num_characters: int
    tokenizer_kind: str  # "bytes" or "bpe"
    vocab_size: int
    eos_id: int
    tokenizer_fingerprint: str  # sha256 of the tokenizer.json the ids come from
    corpus: str  # registry name, or the absolute path of a local source
    source_sha256: str  # sha256 of the corpus's manifest.json, or of the local split file
    format: int = FORMAT_VERSION

    @classmethod
    def from_file(cls, path: str | Path) -> ShardMeta:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        names = {f.name for f in fields(cls)}
        missing = names - set(data) - {"format"}
        if missing:
            raise ValueError(f"{path} is not a shard meta file: it lacks {sorted(missing)}; rerun prepare")
        return cls(**{k: v for k, v in data.items() if k in names})


def shard_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65535), else uint32; little-endian on every machine."""
    return np.dtype("<u2") if vocab_size <= 65535 else np.dtype("<u4")


def shard_dir(corpus: str | Path, tokenizer: Tokenizer, root: str | Path | None = None) -> Path:
    """`<root>/shards/<corpus>-<kind>-<fingerprint>`: the one folder for the shards of a corpus and a tokenizer.

    Named by what decides the ids (the corpus and the tokenizer's fingerprint), not by who asks for them, so a
    training run and a later evaluation with the same tokenizer share one copy of each split.
    """
    root = Path(root) if root else data_dir()
    return root / "shards" / f"{corpus_key(corpus)}-{tokenizer.kind}-{tokenizer.fingerprint[:12]}"


def _batches(documents: Sequence[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    size = 0
    for doc in documents:
        batch.append(doc)
        size += len(doc)
        if size >= BATCH_CHARACTERS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def _encode(tokenizer: Tokenizer, texts: list[str], dtype: np.dtype) -> list[np.ndarray]:
    if isinstance(tokenizer, ByteTokenizer):
        # The bytes are the ids: skip building millions of Python ints.
        return [np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype) for text in texts]
    return [np.asarray(ids, dtype=dtype) for ids in tokenizer.encode_batch(texts)]


def _is_done(meta_path: Path, bin_path: Path, expected: dict) -> ShardMeta | None:
    """The existing meta, if it was made from the same source with the same tokenizer and its .bin is whole."""
    try:
        meta = ShardMeta.from_file(meta_path)
        size = bin_path.stat().st_size
    except (OSError, ValueError, TypeError):
        return None
    if any(getattr(meta, k) != v for k, v in expected.items()):
        return None
    return meta if size == meta.num_tokens * np.dtype(meta.dtype).itemsize else None


def _write_split(
    documents: Sequence[str], tokenizer: Tokenizer, bin_path: Path, dtype: np.dtype, desc: str, progress: bool
) -> tuple[int, int, int]:
    """Tokenize documents into bin_path (atomically); returns (tokens, UTF-8 bytes, characters)."""
    eos = np.array([tokenizer.eos_id], dtype=dtype)
    num_tokens = num_bytes = num_characters = 0
    tmp = bin_path.with_name(f".{bin_path.name}.tmp-{os.getpid()}")
    try:
        bar = tqdm(total=sum(map(len, documents)), unit="char", unit_scale=True, desc=desc, disable=not progress)
        with open(tmp, "wb") as f, bar:
            for batch in _batches(documents):
                pieces = []
                for ids in _encode(tokenizer, batch, dtype):
                    if num_tokens or pieces:
                        pieces.append(eos)
                    pieces.append(ids)
                array = np.concatenate(pieces)
                f.write(array.tobytes())
                num_tokens += len(array)
                num_bytes += sum(len(text.encode("utf-8")) for text in batch)
                num_characters += sum(len(text) for text in batch)
                bar.update(sum(len(text) for text in batch))
        os.replace(tmp, bin_path)
    finally:
        tmp.unlink(missing_ok=True)
    return num_tokens, num_bytes, num_characters


def prepare(
    corpus: str | Path,
    tokenizer: Tokenizer,
    out_dir: str | Path,
    splits: Sequence[str] = SPLITS,
    *,
    root: str | Path | None = None,
    progress: bool = True,
) -> dict[str, ShardMeta]:
    """Tokenize splits of a corpus into `out_dir`, skipping every split already done with this tokenizer.

    Args:
        corpus: anything nestlearn.data.corpora accepts: a fetched corpus's name, a split folder, or a text or
            JSONL file or folder (split and cached on first use).
        tokenizer: saved as out_dir/tokenizer.json next to the shards.
        root: the corpus cache, default `data_dir()`.

    Returns:
        the meta of each split, whether written now or found done.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save(out_dir)
    dtype = shard_dtype(tokenizer.vocab_size)
    result = {}
    for split in splits:
        path, label, source_sha256 = resolve_split_file(corpus, split, root)
        bin_path, meta_path = out_dir / f"{split}.bin", out_dir / f"{split}.json"
        expected = dict(
            split=split,
            format=FORMAT_VERSION,
            corpus=label,
            source_sha256=source_sha256,
            tokenizer_fingerprint=tokenizer.fingerprint,
        )
        done = _is_done(meta_path, bin_path, expected)
        if done is not None:
            result[split] = done
            continue
        documents = read_documents(path)
        num_tokens, num_bytes, num_characters = _write_split(
            documents, tokenizer, bin_path, dtype, f"{Path(label).name}/{split}", progress
        )
        meta = ShardMeta(
            **expected,
            dtype=dtype.str,
            num_tokens=num_tokens,
            num_documents=len(documents),
            num_bytes=num_bytes,
            num_characters=num_characters,
            tokenizer_kind=tokenizer.kind,
            vocab_size=tokenizer.vocab_size,
            eos_id=tokenizer.eos_id,
        )
        # The meta goes last: its presence says the .bin before it is complete.
        tmp = meta_path.with_name(f".{meta_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(asdict(meta), indent=2) + "\n", encoding="utf-8")
        os.replace(tmp, meta_path)
        result[split] = meta
    return result


def open_shard(path: str | Path, tokenizer: Tokenizer | None = None) -> tuple[np.ndarray, ShardMeta]:
    """The ids of a shard as a read-only memmap, and its meta.

    Args:
        path: `<dir>/<split>.bin`, `<dir>/<split>.json` or `<dir>/<split>`.
        tokenizer: if given, the shard must have been made with it (same fingerprint).
    """
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".bin", ".json") else path
    bin_path, meta_path = stem.with_name(stem.name + ".bin"), stem.with_name(stem.name + ".json")
    if not meta_path.is_file():
        raise FileNotFoundError(f"no shard meta {meta_path}; make shards with nestlearn.data.shards.prepare")
    meta = ShardMeta.from_file(meta_path)
    if meta.format != FORMAT_VERSION:
        raise ValueError(f"{meta_path} has shard format {meta.format}, this code reads {FORMAT_VERSION}; rerun prepare")
    if tokenizer is not None and tokenizer.fingerprint != meta.tokenizer_fingerprint:
        raise ValueError(
            f"{bin_path} was tokenized with another tokenizer (fingerprint {meta.tokenizer_fingerprint[:12]}, "
            f"given {tokenizer.fingerprint[:12]}); use the tokenizer.json next to it, or rerun prepare"
        )
    dtype = np.dtype(meta.dtype)
    size = bin_path.stat().st_size if bin_path.exists() else -1
    if size != meta.num_tokens * dtype.itemsize:
        raise ValueError(
            f"{bin_path} has {size} bytes but its meta says {meta.num_tokens} tokens of {dtype.itemsize} bytes; "
            f"it is incomplete or stale: delete it and rerun prepare"
        )
    if meta.num_tokens == 0:
        return np.zeros(0, dtype=dtype), meta  # numpy cannot memory-map an empty file
    return np.memmap(bin_path, dtype=dtype, mode="r", shape=(meta.num_tokens,)), meta


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m nestlearn.data.shards CORPUS OUT_DIR --tokenizer bytes|bpe:VOCAB|DIR`."""
    parser = argparse.ArgumentParser(
        prog="python -m nestlearn.data.shards", description=prepare.__doc__, allow_abbrev=False
    )
    parser.add_argument("corpus", help="a fetched corpus's name, or a text/JSONL file or folder (docs/data.md)")
    parser.add_argument("out_dir", type=Path)
    parser.add_argument(
        "--tokenizer",
        default="bytes",
        help="'bytes', 'bpe:VOCAB' (trained here on the train split) or a directory holding tokenizer.json",
    )
    parser.add_argument("--splits", nargs="+", default=list(SPLITS), choices=SPLITS)
    parser.add_argument("--data-root", type=Path, default=None, help="corpus cache (default: $NESTLEARN_DATA)")
    # The option's name before every other command's --data-root; kept so that old scripts still run.
    parser.add_argument("--root", dest="data_root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tokenizer == "bytes":
        tokenizer: Tokenizer = ByteTokenizer()
    elif args.tokenizer.startswith("bpe:"):
        train = read_documents(resolve_split_file(args.corpus, "train", args.data_root)[0])
        tokenizer = train_bpe(train, int(args.tokenizer.removeprefix("bpe:")), length=len(train), progress=True)
    else:
        tokenizer = load_tokenizer(args.tokenizer)
    for split, meta in prepare(args.corpus, tokenizer, args.out_dir, args.splits, root=args.data_root).items():
        ratio = meta.num_bytes / max(1, meta.num_tokens)
        print(f"{split}: {meta.num_tokens} tokens ({ratio:.2f} bytes/token), {meta.num_documents} documents")
    return 0


if __name__ == "__main__":
    sys.exit(main())
