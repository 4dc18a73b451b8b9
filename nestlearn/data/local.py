"""The user's own text as a corpus: a text file, a folder of text files, or JSONL, split and cached like a pinned one.

    load_split("notes.txt", "train")              # one file: cut into documents at blank lines
    load_split("articles/", "validation")         # a folder: every *.txt, *.md, *.jsonl in it, recursively
    load_split("dump.jsonl", "test")              # one document per line, from its "text" field
    load_split("mydata/", "train")                # a folder holding nestlearn-data.json: the source as it says

How the text is read and split is a property of the data, not of a command: training and a later evaluation
must agree on which documents are held out, or the test split would hold training text. So the options live in a
small JSON file next to the data (`SPEC_FILE`, or any `*.json` given in place of the data), not in flags that
every command would have to repeat identically:

    {"sources": ["dump.jsonl"], "text_field": "body", "fractions": [0.9, 0.05, 0.05]}

Documents. A `.jsonl` file gives one document per non-blank line, the string in its text field. Any other file is
UTF-8 text: lines that hold only `<|endoftext|>` separate documents, and a file without such lines is one
document, except when the whole source comes down to one text file, which is cut at blank lines (one paragraph
per document), since one document cannot be split three ways. Blank lines around a text document and trailing
whitespace are dropped, and so are documents that are only whitespace.

Splits. The split rule of the pinned corpora (nestlearn.data.store), keyed by the document's text: identical
documents share a split, so no text is both trained on and held out, and which split a document is in depends on
the set of texts alone, not on their order or on the files they are in. Each held-out split gets at least one
document; a source with too few documents for that is refused with the number it needs.

Cache. The splits are written once to `<data root>/local/<name>-<hash of the path>/` with a manifest, and found
afterwards while the source's fingerprint (the options, and the path, size and mtime of every file read) is
unchanged; any change rebuilds them. Token shards record each split's sha256, so a rebuild that changes no text
does not tokenize again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .store import (
    DOC_SEPARATOR,
    EOS_TEXT,
    SPLITS,
    atomic_write_bytes,
    min_documents,
    split_documents,
    split_rule,
)

__all__ = ["SPEC_FILE", "DataSourceError", "LocalSource", "cache_key", "source_of", "build_splits"]

SPEC_FILE = "nestlearn-data.json"
# Bumped whenever reading or splitting changes, so that cached splits are rebuilt rather than trusted.
FORMAT_VERSION = 1

# A line holding only the separator, as the split files write it; in a user's file it may end in "\r\n".
_SEPARATOR_LINE = re.compile(r"^[ \t]*" + re.escape(EOS_TEXT) + r"[ \t]*\r?(?:\n|\Z)", re.MULTILINE)
# One or more blank (or whitespace-only) lines between two paragraphs.
_BLANK_LINES = re.compile(r"\n(?:[ \t\r]*\n)+")


class DataSourceError(ValueError):
    """The user's text cannot be read or split as it is; the message names the file, the rule and the fix."""


@dataclass(frozen=True)
class LocalSource:
    """A local source and how to read and split it: the contents of a nestlearn-data.json.

    Attributes:
        paths: files and folders to read, in this order; folders are searched recursively.
        text_field: the field of each JSONL record that holds the document.
        fractions: (train, validation, test) shares of the documents; they sum to 1.
        suffixes: which files of a folder are read (`.jsonl` as JSONL, the others as text).
    """

    paths: tuple[Path, ...]
    text_field: str = "text"
    fractions: tuple[float, float, float] = (0.98, 0.01, 0.01)
    suffixes: tuple[str, ...] = (".txt", ".md", ".jsonl")

    def __post_init__(self) -> None:
        if not self.paths:
            raise DataSourceError("a local source needs at least one file or folder in `sources`")
        if not (isinstance(self.text_field, str) and self.text_field):
            raise DataSourceError(f"text_field={self.text_field!r} must be a non-empty string, e.g. 'text'")
        fractions = tuple(self.fractions)
        if (
            len(fractions) != 3
            or not all(isinstance(f, (int, float)) and 0 < f < 1 for f in fractions)
            or not math.isclose(sum(fractions), 1.0, abs_tol=1e-6)
        ):
            raise DataSourceError(
                f"fractions={list(self.fractions)} must be three numbers in (0, 1), for train, validation and test, "
                f"that sum to 1, e.g. [0.98, 0.01, 0.01]"
            )
        if not self.suffixes or not all(isinstance(s, str) and s.startswith(".") for s in self.suffixes):
            raise DataSourceError(f"suffixes={list(self.suffixes)} must be file endings with a dot, e.g. ['.txt']")
        object.__setattr__(self, "paths", tuple(Path(p) for p in self.paths))
        object.__setattr__(self, "fractions", fractions)
        object.__setattr__(self, "suffixes", tuple(s.lower() for s in self.suffixes))

    @property
    def holdout(self) -> tuple[float, float]:
        """(validation, test), as `split_documents` takes them."""
        return self.fractions[1], self.fractions[2]

    @classmethod
    def from_spec(cls, path: str | Path) -> LocalSource:
        """Read a spec file; its `sources` are relative to the file's folder and default to that folder."""
        path = Path(path)
        try:
            spec = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{path}, line {e.lineno}: not JSON ({e.msg}); see docs/data.md") from None
        if not isinstance(spec, dict):
            raise DataSourceError(f'{path} must hold a JSON object, e.g. {{"text_field": "body"}}')
        known = {"sources", *(f.name for f in fields(cls) if f.name != "paths")}
        unknown = set(spec) - known
        if unknown:
            raise DataSourceError(f"{path}: unknown keys {sorted(unknown)}; the keys are {sorted(known)}")
        sources = spec.pop("sources", ["."])
        if isinstance(sources, str) or not isinstance(sources, list):
            raise DataSourceError(f'{path}: sources={sources!r} must be a list of paths, e.g. ["dump.jsonl"]')
        paths = tuple((path.parent / Path(s).expanduser()).resolve() for s in sources)
        for p in paths:
            if not p.exists():
                raise DataSourceError(f"{path}: source {p} does not exist; sources are relative to {path.parent}")
        for key in ("fractions", "suffixes"):
            if key in spec:
                if not isinstance(spec[key], list):
                    raise DataSourceError(f"{path}: {key}={spec[key]!r} must be a list, e.g. {list(getattr(cls, key))}")
                spec[key] = tuple(spec[key])
        return cls(paths=paths, **spec)

    def write(self, path: str | Path) -> Path:
        """Save as a spec file (paths relative to its folder where they can be); returns the file's path."""
        path = Path(path)
        if path.is_dir():
            path = path / SPEC_FILE
        base = path.parent.resolve()
        sources = [
            p.resolve().relative_to(base).as_posix() if p.resolve().is_relative_to(base) else str(p.resolve())
            for p in self.paths
        ]
        spec = {"sources": sources, **self.options}
        atomic_write_bytes(path, (json.dumps(spec, indent=2) + "\n").encode("utf-8"))
        return path

    @property
    def options(self) -> dict:
        """Everything but the paths: how the files are read and split."""
        return {k: v for k, v in asdict(self).items() if k != "paths"}


def source_of(path: str | Path) -> LocalSource:
    """The source that a `--data` path names: a spec file, a folder with one, or a plain file or folder."""
    path = Path(path).expanduser().resolve()
    if path.is_file() and path.suffix.lower() == ".json":
        return LocalSource.from_spec(path)
    if path.is_dir() and (path / SPEC_FILE).is_file():
        return LocalSource.from_spec(path / SPEC_FILE)
    return LocalSource(paths=(path,))


def cache_key(path: str | Path) -> str:
    """A folder name for a local source: its own name, made safe, and a digest of its full path."""
    path = Path(path).expanduser().resolve()
    name = re.sub(r"[^A-Za-z0-9._-]+", "_", path.name) or "root"
    return f"{name}-{hashlib.sha256(str(path).encode()).hexdigest()[:10]}"


# ---------------------------------------------------------------------------------------------------------------
# Reading


def _files(source: LocalSource) -> list[Path]:
    """Every file the source reads, in a fixed order: each path in turn, a folder's files sorted by their path."""
    files: list[Path] = []
    for path in source.paths:
        if path.is_file():
            files.append(path)
            continue
        everything = sorted(
            (p for p in path.rglob("*") if p.is_file() and not _hidden(p.relative_to(path))),
            key=lambda p: p.relative_to(path).as_posix(),
        )
        if not everything:
            raise DataSourceError(f"{path} is an empty folder: put the text in .txt, .md or .jsonl files there")
        chosen = [p for p in everything if p.suffix.lower() in source.suffixes and p.name != SPEC_FILE]
        if not chosen:
            found = sorted({p.suffix or "(no suffix)" for p in everything})
            raise DataSourceError(
                f"{path} has {len(everything)} files but none ending in {', '.join(source.suffixes)} (it has "
                f"{', '.join(found[:8])}); put the text in such files, or list the endings to read as "
                f'"suffixes" in a {SPEC_FILE} there'
            )
        files += chosen
    return files


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _decode(path: Path) -> str:
    data = path.read_bytes()
    try:
        # utf-8-sig drops a byte-order mark; "\r\n" is kept as it is, as split files keep it.
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise DataSourceError(
            f"{path}, line {line}: byte {e.start} ({data[e.start : e.start + 1]!r}) is not UTF-8; convert the file "
            f"to UTF-8 (e.g. `iconv -f latin1 -t utf-8`), or remove it from the source"
        ) from None


def _check_no_separator(path: Path, piece: str, text: str, start: int) -> None:
    """Refuse the separator inside a document; `piece` starts at `start` in the file's `text`."""
    where = piece.find(EOS_TEXT)
    if where >= 0:
        line = text.count("\n", 0, start + where) + 1
        raise DataSourceError(
            f"{path}, line {line}: {EOS_TEXT!r} inside the text. It is the end-of-document token: on a line of its "
            f"own it separates two documents, anywhere else it is refused; remove it or give it a line of its own"
        )


def _pieces(text: str, boundary: re.Pattern) -> list[tuple[int, str]]:
    """(start, piece) of the text between the matches of `boundary`."""
    pieces, position = [], 0
    for match in boundary.finditer(text):
        pieces.append((position, text[position : match.start()]))
        position = match.end()
    pieces.append((position, text[position:]))
    return pieces


def _text_documents(path: Path, text: str, paragraphs: bool) -> list[str]:
    """A text file's documents: between separator lines, or, if asked and there are none, between blank lines."""
    pieces = _pieces(text, _SEPARATOR_LINE)
    if paragraphs and len(pieces) == 1:
        pieces = _pieces(text, _BLANK_LINES)
    documents = []
    for start, piece in pieces:
        _check_no_separator(path, piece, text, start)
        document = piece.strip("\r\n").rstrip()
        if document.strip():
            documents.append(document)
    return documents


def _jsonl_documents(path: Path, text: str, field: str) -> list[str]:
    """The text field of each record, one record per non-blank line."""
    documents = []
    # Split on "\n" only: str.splitlines would also break inside strings holding U+2028 and the like.
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataSourceError(
                f"{path}, line {number}: not JSON ({e.msg}, column {e.colno}); a .jsonl file holds one JSON object "
                f'per line, e.g. {{"{field}": "..."}}'
            ) from None
        if not isinstance(record, dict):
            raise DataSourceError(
                f"{path}, line {number}: a JSON {type(record).__name__}, not an object; each line must be an "
                f'object with the text in a field, e.g. {{"{field}": "..."}}'
            )
        if field not in record:
            # The longest string is the likeliest text, for the example in the message.
            strings = sorted((v for v in record.items() if isinstance(v[1], str)), key=lambda v: -len(v[1]))
            spec = json.dumps({"sources": [path.name], "text_field": strings[0][0] if strings else "FIELD"})
            raise DataSourceError(
                f"{path}, line {number}: no field {field!r}; its fields are {sorted(record)}. Say which field holds "
                f"the text in a spec file, e.g. {spec} in {path.with_suffix('.json')}, and give that file as the "
                f"data (docs/data.md)"
            )
        value = record[field]
        if not isinstance(value, str):
            raise DataSourceError(
                f"{path}, line {number}: field {field!r} is a JSON {type(value).__name__}, not a string; "
                f"text_field must name the field that holds the document's text"
            )
        if EOS_TEXT in value:
            raise DataSourceError(
                f"{path}, line {number}: the text holds {EOS_TEXT!r}, the end-of-document token, which a document "
                f"may not contain; remove or rewrite it"
            )
        if value.strip():
            documents.append(value)
    return documents


def _read(source: LocalSource, files: list[Path]) -> list[str]:
    """Every document of the source's files, in order (see the module docstring for what a document is)."""
    # A single text file on its own is cut at blank lines: one document could not be split three ways.
    paragraphs = len(files) == 1 and files[0].suffix.lower() != ".jsonl"
    documents: list[str] = []
    for path in files:
        text = _decode(path)
        if not text.strip():
            if len(files) == 1:
                raise DataSourceError(
                    f"{path} is empty: there is no text to split into train, validation and test. Give a file with "
                    f"at least {min_documents(source.holdout)} documents (for a text file, paragraphs separated by "
                    f"a blank line)"
                )
            continue  # one empty file among others is skipped, as a whitespace-only document would be
        if path.suffix.lower() == ".jsonl":
            documents += _jsonl_documents(path, text, source.text_field)
        else:
            documents += _text_documents(path, text, paragraphs)
    if not documents:
        what = f"its {len(files)} files" if len(files) > 1 else str(files[0])
        raise DataSourceError(
            f"{', '.join(map(str, source.paths))}: {what} hold no document with any text (JSONL records whose "
            f"{source.text_field!r} is empty or only whitespace are skipped)"
        )
    return documents


# ---------------------------------------------------------------------------------------------------------------
# Splitting and caching


def _fingerprint(source: LocalSource, files: list[Path]) -> str:
    """sha256 of the options and of (path, size, mtime) of every file read: any edit changes it."""
    stats = [(str(p), s.st_size, s.st_mtime_ns) for p, s in ((p, p.stat()) for p in files)]
    state = {"format": FORMAT_VERSION, "options": source.options, "files": stats}
    return hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()


def _is_current(directory: Path, fingerprint: str) -> dict | None:
    """The manifest of splits built from this very source, if their files are whole."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        if manifest["fingerprint"] != fingerprint:
            return None
        whole = all((directory / f"{s}.txt").stat().st_size == manifest["splits"][s]["file_bytes"] for s in SPLITS)
        return manifest if whole else None
    except (OSError, KeyError, ValueError):
        return None


def _too_few(source: LocalSource, files: list[Path], documents: list[str], distinct: int) -> DataSourceError:
    needed = min_documents(source.holdout)
    if len(files) == 1 and files[0].suffix.lower() == ".jsonl":
        rule = "each non-blank line of a .jsonl file is one document: add lines"
    elif len(files) == 1:
        rule = "a single text file is cut at blank lines: give it more paragraphs, separated by a blank line"
    else:
        rule = f"each text file is one document (or several, between lines {EOS_TEXT!r}): add files or documents"
    characters = sum(map(len, documents))
    return DataSourceError(
        f"{', '.join(map(str, source.paths))} gives {distinct} distinct documents ({characters} characters), too few "
        f"to split into train, validation and test at fractions {list(source.fractions)}: that takes at least "
        f"{needed}; {rule}"
    )


def build_splits(source: LocalSource, directory: Path) -> dict:
    """Split files of `source` in `directory`, built now or found current; returns their manifest."""
    files = _files(source)
    fingerprint = _fingerprint(source, files)
    manifest = _is_current(directory, fingerprint)
    if manifest is not None:
        return manifest
    documents = _read(source, files)
    # Keyed by text: every copy of a document lands in the same split.
    distinct = list(dict.fromkeys(documents))
    if len(distinct) < min_documents(source.holdout):
        raise _too_few(source, files, documents, len(distinct))
    indices = split_documents(distinct, source.holdout)
    split_of = {distinct[i]: split for split in SPLITS for i in indices[split]}
    manifest = {
        "format": FORMAT_VERSION,
        "sources": [str(p) for p in source.paths],
        "options": source.options,
        "fingerprint": fingerprint,
        "split_rule": split_rule(source.holdout) + "; the key is the document's text",
        "separator": DOC_SEPARATOR,
        "splits": {},
    }
    for split in SPLITS:
        chosen = [doc for doc in documents if split_of[doc] == split]
        # The documents were checked as they were read (non-empty, no separator): written as write_documents would.
        data = "".join(doc + DOC_SEPARATOR for doc in chosen).encode("utf-8")
        atomic_write_bytes(directory / f"{split}.txt", data)
        manifest["splits"][split] = {
            "documents": len(chosen),
            "characters": sum(map(len, chosen)),
            "bytes": sum(len(doc.encode("utf-8")) for doc in chosen),
            "file_bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        }
    # Written last: a manifest means every split file before it is complete.
    atomic_write_bytes(directory / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest
