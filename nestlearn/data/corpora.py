"""Corpora by name or by path: what `--data` accepts, resolved to split files in the cache.

    python -m nestlearn.data.corpora wiki shakespeare      # what `nestlearn fetch-data wiki shakespeare` runs
    docs = load_split("wiki", "validation")                # list[str], one string per document
    docs = load_split("notes.txt", "train")                # the user's own text, split and cached the same way

A corpus is one of:

- a registry name (`list_corpora()`): a pinned corpus fetched beforehand by `nestlearn fetch-data NAME`
  (nestlearn.data.registry describes them, nestlearn.data.download fetches them);
- a folder holding train.txt, validation.txt and test.txt: already split, read as it is;
- a text file, a JSONL file, a folder of such files, or a `*.json` spec (or a folder with `nestlearn-data.json`)
  that says how to read them: split deterministically and cached (nestlearn.data.local).

Whichever it is, `resolve_split_file` gives a split file in one format (nestlearn.data.store) and a digest of its
content, which is all that token shards need. Nothing here downloads; a corpus that is not fetched yet raises an
error naming the command that fetches it.
"""

from __future__ import annotations

import hashlib
import sys
from pathlib import Path

from .download import ChecksumError, CorpusNotFetchedError, FetchError, fetch, is_current, load_manifest, main
from .local import SPEC_FILE, DataSourceError, LocalSource, build_splits, cache_key, source_of
from .registry import (
    ALIASES,
    BBC_CLASSES,
    CORPORA,
    HANDBOOK_LANGUAGES,
    Corpus,
    UnknownCorpusError,
    get_corpus,
    html_to_text,
    list_corpora,
)
from .store import (
    DOC_SEPARATOR,
    EOS_TEXT,
    SPLIT_SALT,
    SPLITS,
    data_dir,
    read_documents,
    sha256_file,
    split_documents,
    write_documents,
)

__all__ = [
    "Corpus",
    "CORPORA",
    "ALIASES",
    "HANDBOOK_LANGUAGES",
    "BBC_CLASSES",
    "SPLITS",
    "DOC_SEPARATOR",
    "SPLIT_SALT",
    "SPEC_FILE",
    "FetchError",
    "ChecksumError",
    "CorpusNotFetchedError",
    "UnknownCorpusError",
    "DataSourceError",
    "LocalSource",
    "data_dir",
    "list_corpora",
    "get_corpus",
    "corpus_key",
    "fetch",
    "load_split",
    "load_manifest",
    "resolve_split_file",
    "split_documents",
    "read_documents",
    "write_documents",
    "html_to_text",
    "main",
]


def _is_registered(corpus: str | Path) -> bool:
    return isinstance(corpus, str) and (corpus in CORPORA or corpus in ALIASES)


def _is_presplit(path: Path) -> bool:
    """A folder that is already split: it has train.txt, validation.txt or test.txt at its top (and no spec)."""
    return (
        path.is_dir()
        and not (path / SPEC_FILE).is_file()
        and any((path / f"{split}.txt").is_file() for split in SPLITS)
    )


def corpus_key(corpus: str | Path) -> str:
    """A stable folder name for anything `--data` accepts, for caches keyed by corpus (token shards, splits).

    A registry name gives its canonical name (an alias gives the name it stands for); a path gives its own name
    and a digest of its absolute path, so two folders called `data` do not share a cache.
    """
    return get_corpus(corpus).name if _is_registered(corpus) else cache_key(corpus)


def _presplit_file(directory: Path, split: str) -> Path:
    path = directory / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"local corpus {directory} has no {split}.txt; a split folder holds train.txt, validation.txt and "
            f"test.txt (documents separated by a line {EOS_TEXT!r}, or one document per file). To have a folder "
            f"of text split for you, name none of its files train.txt, validation.txt or test.txt"
        )
    if path.stat().st_size == 0:
        raise DataSourceError(f"{path} is empty: the {split} split of a local corpus needs at least one document")
    return path


def resolve_split_file(corpus: str | Path, split: str, root: str | Path | None = None) -> tuple[Path, str, str]:
    """(split file, corpus label, source digest) for a registry name or a local path.

    The label is the registry name or the absolute path. The digest identifies the split's content cheaply: the
    manifest's sha256 for a fetched corpus, the split file's sha256 otherwise. Token shards record it to notice
    when their source changed. A local source that is not split yet is split into the cache under `root` now.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    root = Path(root) if root else data_dir()
    if _is_registered(corpus):
        load_manifest(corpus, root)  # raises with the fetch command when missing
        directory = root / get_corpus(corpus).name
        if not is_current(get_corpus(corpus), directory):
            raise CorpusNotFetchedError(
                f"corpus {corpus!r} in {directory} is incomplete or was built from another pin or format; "
                f"run `nestlearn fetch-data --force {corpus}`"
            )
        digest = hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
        return directory / f"{split}.txt", get_corpus(corpus).name, digest
    path = Path(corpus).expanduser()
    if not path.exists():
        raise UnknownCorpusError(
            f"{str(corpus)!r} is neither a corpus name nor an existing file or folder; valid names: "
            f"{', '.join(list_corpora())}"
        )
    label = str(path.resolve())
    if _is_presplit(path):
        split_file = _presplit_file(path, split)
        return split_file, label, sha256_file(split_file)
    directory = root / "local" / cache_key(path)
    manifest = build_splits(source_of(path), directory)
    return directory / f"{split}.txt", label, manifest["splits"][split]["sha256"]


def load_split(corpus: str | Path, split: str, root: str | Path | None = None) -> list[str]:
    """Documents of one split of a fetched corpus (by name) or of a local source (by path)."""
    path, _, _ = resolve_split_file(corpus, split, root)
    return read_documents(path)


if __name__ == "__main__":
    sys.exit(main())
