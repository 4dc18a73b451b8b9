"""How a corpus is stored: split files, the rule that assigns documents to splits, and the cache they live in.

Every corpus, pinned or the user's own, ends up as three split files in the cache, which is what token shards are
made from. Keeping the format and the rule in one place is what makes a user's text and a pinned corpus behave
the same way downstream.

A split file holds its documents in order, each followed by the line `<|endoftext|>` (`DOC_SEPARATOR`); documents
never contain that string, so reading gives back every document exactly. A plain text file without separators is
one document.

Split rule (`split_documents`): documents are ordered by sha256(SPLIT_SALT + NUL + key), where key is a stable
per-document name (a path, or the text itself). The first max(1, round(test * n)) of that order are test, the
next max(1, round(validation * n)) are validation, the rest train; each split keeps the source order. Membership
depends only on the salt and the key, never on the machine, the order of files or Python's hash seed.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "SPLITS",
    "EOS_TEXT",
    "DOC_SEPARATOR",
    "SPLIT_SALT",
    "data_dir",
    "write_documents",
    "read_documents",
    "split_documents",
    "min_documents",
    "split_rule",
    "atomic_write_bytes",
    "sha256_file",
]

SPLITS = ("train", "validation", "test")
EOS_TEXT = "<|endoftext|>"
DOC_SEPARATOR = f"\n{EOS_TEXT}\n"
SPLIT_SALT = "nestlearn-split-v1"


def data_dir() -> Path:
    """The cache root: $NESTLEARN_DATA, else ${XDG_CACHE_HOME:-~/.cache}/nestlearn."""
    if os.environ.get("NESTLEARN_DATA"):
        return Path(os.environ["NESTLEARN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nestlearn"


def _check_documents(documents: Sequence[str], where: str) -> None:
    for i, doc in enumerate(documents):
        if not doc:
            raise ValueError(f"{where}: document {i} is empty; a split file cannot represent an empty document")
        if EOS_TEXT in doc:
            raise ValueError(
                f"{where}: document {i} contains {EOS_TEXT!r}, the document separator of split files and the "
                f"end-of-document token of the tokenizers; remove or rewrite it before writing the split"
            )


def write_documents(path: str | Path, documents: Sequence[str]) -> int:
    """Write documents, each followed by the separator line, atomically; returns the file's size in bytes."""
    path = Path(path)
    _check_documents(documents, str(path))
    data = "".join(doc + DOC_SEPARATOR for doc in documents).encode("utf-8")
    atomic_write_bytes(path, data)
    return len(data)


def read_documents(path: str | Path) -> list[str]:
    """Documents of a split file; a file without separator lines is a single document."""
    path = Path(path)
    # newline="" keeps "\r\n" inside documents as it is, so reading gives back exactly what was written.
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    return split_on_separators(text)


def split_on_separators(text: str) -> list[str]:
    """The documents of a text in the split-file format (see `read_documents`)."""
    if text.endswith(DOC_SEPARATOR[:-1]):
        text += "\n"
    documents = text.split(DOC_SEPARATOR)
    if documents and documents[-1] == "":
        documents.pop()
    return documents


def _held_out(n: int, holdout: tuple[float, float]) -> tuple[int, int]:
    n_validation, n_test = (max(1, round(fraction * n)) for fraction in holdout)
    return n_validation, n_test


def min_documents(holdout: tuple[float, float]) -> int:
    """The fewest documents that `split_documents` can split with `holdout` into three non-empty splits."""
    n = 3
    while sum(_held_out(n, holdout)) >= n:
        n += 1
    return n


def split_documents(
    keys: Sequence[str], holdout: tuple[float, float] = (0.01, 0.01), salt: str = SPLIT_SALT
) -> dict[str, list[int]]:
    """Indices of the train, validation and test documents, each in source order (see the module docstring).

    Args:
        keys: one stable, unique name per document.
        holdout: fractions of the documents for (validation, test); each gets at least one document.
    """
    n = len(keys)
    if len(set(keys)) != n:
        raise ValueError(f"split keys must be unique: {n - len(set(keys))} of {n} repeat an earlier key")
    n_validation, n_test = _held_out(n, holdout)
    if n_validation + n_test >= n:
        raise ValueError(
            f"{n} documents cannot give non-empty train, validation ({n_validation}) and test ({n_test}) splits; "
            f"a corpus needs at least {min_documents(holdout)} documents with the holdout {holdout}"
        )
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}\0{keys[i]}".encode()).digest())
    return {
        "train": sorted(order[n_test + n_validation :]),
        "validation": sorted(order[n_test : n_test + n_validation]),
        "test": sorted(order[:n_test]),
    }


def split_rule(holdout: tuple[float, float]) -> str:
    """The split rule in words, as manifests record it: a cache made with another rule is rebuilt."""
    return (
        f"order documents by sha256('{SPLIT_SALT}' + NUL + key); the first max(1, round({holdout[1]} * n)) are "
        f"test, the next max(1, round({holdout[0]} * n)) validation, the rest train; each split in source order"
    )


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary name and rename, so a reader never sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
