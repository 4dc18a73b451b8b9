"""The user's own text as a corpus (nestlearn.data.local): every source kind, the split, the cache, the errors.

Small, seeded and offline: every corpus is written here into tmp_path, and every cache lives there too.
"""

from __future__ import annotations

import json
import os
import random
from collections import Counter
from pathlib import Path

import pytest

from nestlearn.data import download, local, shards
from nestlearn.data.corpora import (
    SPLITS,
    DataSourceError,
    LocalSource,
    UnknownCorpusError,
    corpus_key,
    load_split,
    resolve_split_file,
    write_documents,
)
from nestlearn.data.shards import prepare, shard_dir
from nestlearn.data.tokenizer import ByteTokenizer

WORDS = ["the", "memory", "learns", "nested", "levels", "über", "café", "fast", "slow", "weights", "and", "日本"]


def paragraphs(n: int, seed: int = 0) -> list[str]:
    """n distinct paragraphs of one to three lines of made-up text."""
    rng = random.Random(seed)
    return [
        f"{i}: "
        + "\n".join(" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(rng.randint(1, 3)))
        for i in range(n)
    ]


def splits_of(data, root) -> dict[str, list[str]]:
    return {split: load_split(data, split, root) for split in SPLITS}


def assert_partition(splits: dict[str, list[str]], documents: list[str]) -> None:
    """Every document in exactly one split, every split non-empty and in source order."""
    assert all(splits[s] for s in SPLITS)
    assert Counter(d for s in SPLITS for d in splits[s]) == Counter(documents)
    position = {doc: i for i, doc in enumerate(documents)}
    assert all([position[d] for d in splits[s]] == sorted(position[d] for d in splits[s]) for s in SPLITS)


def write_jsonl(path: Path, texts: list[str], field: str = "text") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps({"id": i, field: t}) + "\n" for i, t in enumerate(texts)), encoding="utf-8")
    return path


# ---------------------------------------------------------------------------------------------------------------
# Each kind of source


def make_source(kind: str, base: Path) -> tuple[Path, list[str]]:
    """A source of the given kind under `base`, and the documents it should give, in order."""
    docs = paragraphs(60)
    if kind == "text file":
        path = base / "book.txt"
        path.write_text("\n\n\n".join(docs) + "\n", encoding="utf-8")
        return path, docs
    if kind == "folder":
        # Sorted by path, nested folders included; hidden files and other endings are not read.
        for i, doc in enumerate(docs):
            name = f"part{i // 20}/{i % 20:02d}" + (".md" if i % 3 else ".txt")
            (base / "notes" / name).parent.mkdir(parents=True, exist_ok=True)
            (base / "notes" / name).write_text(doc + "\n", encoding="utf-8")
        (base / "notes/.hidden.txt").write_text("not read", encoding="utf-8")
        (base / "notes/data.csv").write_text("not,read", encoding="utf-8")
        return base / "notes", docs
    if kind == "jsonl file":
        return write_jsonl(base / "dump.jsonl", docs), docs
    if kind == "jsonl folder":
        write_jsonl(base / "dumps/a.jsonl", docs[:30])
        write_jsonl(base / "dumps/b.jsonl", docs[30:])
        return base / "dumps", docs
    assert kind == "spec"
    write_jsonl(base / "raw/records.jsonl", docs, field="body")
    return LocalSource(paths=(base / "raw/records.jsonl",), text_field="body").write(base / "raw/body.json"), docs


KINDS = ["text file", "folder", "jsonl file", "jsonl folder", "spec"]


@pytest.mark.parametrize("kind", KINDS)
def test_each_source_kind_is_split_into_disjoint_covering_deterministic_splits(kind, tmp_path):
    path, docs = make_source(kind, tmp_path)
    first = splits_of(path, tmp_path / "cache-a")
    assert_partition(first, docs)
    # A fresh cache, and the text read again: the same documents in the same splits.
    assert splits_of(path, tmp_path / "cache-b") == first
    assert [len(first[s]) for s in SPLITS] == [58, 1, 1]  # 1% of 60 rounds to 0: one held-out document each


def test_single_text_file_is_cut_at_blank_lines_unless_it_has_separator_lines(tmp_path):
    text = "first paragraph\nline two\n\n  \nsecond\r\n\r\nthird  \n\n\nfourth\n\nfifth"
    (tmp_path / "a.txt").write_text(text, encoding="utf-8")
    got = splits_of(tmp_path / "a.txt", tmp_path / "cache")
    assert sorted(d for s in SPLITS for d in got[s]) == sorted(
        ["first paragraph\nline two", "second", "third", "fourth", "fifth"]
    )
    # With separator lines (CRLF or not), those decide: blank lines stay inside documents.
    (tmp_path / "b.txt").write_text("one\n\npara\n<|endoftext|>\r\ntwo\n<|endoftext|>\nthree\n", encoding="utf-8")
    got = splits_of(tmp_path / "b.txt", tmp_path / "cache")
    assert sorted(d for s in SPLITS for d in got[s]) == ["one\n\npara", "three", "two"]


def test_fractions_are_respected(tmp_path):
    write_jsonl(tmp_path / "d.jsonl", paragraphs(1000))
    spec = LocalSource(paths=(tmp_path / "d.jsonl",), fractions=(0.8, 0.15, 0.05)).write(tmp_path)
    assert spec == tmp_path / local.SPEC_FILE
    got = splits_of(tmp_path, tmp_path / "cache")  # the folder with nestlearn-data.json: the spec decides
    assert [len(got[s]) for s in SPLITS] == [800, 150, 50]


def test_identical_documents_share_a_split_and_membership_follows_the_text_not_its_order(tmp_path):
    docs = paragraphs(200)
    write_jsonl(tmp_path / "a.jsonl", docs + docs[:50])  # 50 documents twice
    got = splits_of(tmp_path / "a.jsonl", tmp_path / "cache")
    split_of = {doc: s for s in SPLITS for doc in got[s]}
    assert all(Counter(got[s])[d] == 2 for d in docs[:50] for s in [split_of[d]])
    # The same texts in another order and spread over two files: the same splits.
    shuffled = docs + docs[:50]
    random.Random(0).shuffle(shuffled)
    write_jsonl(tmp_path / "b/1.jsonl", shuffled[:120])
    write_jsonl(tmp_path / "b/2.jsonl", shuffled[120:])
    again = splits_of(tmp_path / "b", tmp_path / "cache")
    assert {s: set(again[s]) for s in SPLITS} == {s: set(got[s]) for s in SPLITS}


def test_a_split_folder_is_still_read_as_it_is(tmp_path):
    write_documents(tmp_path / "train.txt", ["a", "b"])
    write_documents(tmp_path / "validation.txt", ["c"])
    write_documents(tmp_path / "test.txt", ["d"])
    assert splits_of(tmp_path, tmp_path / "cache") == {"train": ["a", "b"], "validation": ["c"], "test": ["d"]}
    assert not (tmp_path / "cache").exists()  # nothing to split, nothing cached


# ---------------------------------------------------------------------------------------------------------------
# The cache: made once, remade when the source changes


def test_splits_are_built_once_and_rebuilt_when_the_source_or_options_change(tmp_path, monkeypatch):
    path, docs = make_source("text file", tmp_path)
    cache = tmp_path / "cache"
    before = splits_of(path, cache)
    reads = []
    real_read = local._read
    monkeypatch.setattr(local, "_read", lambda *a: reads.append(1) or real_read(*a))
    splits_of(path, cache)
    assert reads == []  # found in the cache
    path.write_text("\n\n".join([*docs, "a new paragraph"]), encoding="utf-8")
    after = splits_of(path, cache)
    assert reads == [1] and after != before
    assert "a new paragraph" in [d for s in SPLITS for d in after[s]]
    LocalSource(paths=(path,), fractions=(0.9, 0.05, 0.05)).write(tmp_path / "spec.json")
    assert len(load_split(tmp_path / "spec.json", "test", cache)) == 3  # other options: split again


def test_shards_are_remade_when_the_text_changes_and_only_then(tmp_path, monkeypatch):
    path, docs = make_source("folder", tmp_path)
    cache, tok = tmp_path / "cache", ByteTokenizer()
    out = shard_dir(path, tok, cache)
    first = prepare(path, tok, out, progress=False)
    assert sum(first[s].num_documents for s in SPLITS) == 60
    # The same text with a new mtime: the splits are rebuilt, but their sha256 is unchanged, so no shard is redone.
    victim = next(path.rglob("*.md"))
    os.utime(victim, ns=(1, 1))
    real_write = shards._write_split
    monkeypatch.setattr(shards, "_write_split", lambda *a, **k: pytest.fail("tokenized again"))
    assert prepare(path, tok, out, progress=False) == first
    # Other text: the split that holds it is tokenized again, and the shard counts it.
    monkeypatch.setattr(shards, "_write_split", real_write)
    (path / "part2/99.txt").write_text("one more document", encoding="utf-8")
    again = prepare(path, tok, out, progress=False)
    assert sum(again[s].num_documents for s in SPLITS) == 61


def test_one_name_per_corpus_and_tokenizer(tmp_path):
    (tmp_path / "a/data").mkdir(parents=True)
    (tmp_path / "b/data").mkdir(parents=True)
    tok = ByteTokenizer()
    assert corpus_key("handbook") == corpus_key("handbook-en-US") == "handbook-en-US"
    assert corpus_key(tmp_path / "a/data") != corpus_key(tmp_path / "b/data")  # same name, other folder
    assert corpus_key(tmp_path / "a/data").startswith("data-")
    assert shard_dir("wiki", tok, tmp_path) == tmp_path / "shards" / f"wiki-bytes-{tok.fingerprint[:12]}"


# ---------------------------------------------------------------------------------------------------------------
# Careless input: each error names the value, the rule and the fix


def error_of(data, root) -> str:
    with pytest.raises((DataSourceError, UnknownCorpusError, FileNotFoundError)) as error:
        resolve_split_file(data, "train", root)
    return str(error.value)


def test_empty_inputs_are_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n\n", encoding="utf-8")
    assert f"{tmp_path / 'empty.txt'} is empty" in error_of(tmp_path / "empty.txt", tmp_path / "cache")
    (tmp_path / "nothing").mkdir()
    assert "is an empty folder" in error_of(tmp_path / "nothing", tmp_path / "cache")
    (tmp_path / "split").mkdir()
    (tmp_path / "split/train.txt").write_text("", encoding="utf-8")
    message = error_of(tmp_path / "split", tmp_path / "cache")
    assert "train.txt is empty" in message and "at least one document" in message
    write_jsonl(tmp_path / "blank.jsonl", ["", "  "])
    assert "no document with any text" in error_of(tmp_path / "blank.jsonl", tmp_path / "cache")


def test_folder_without_text_files_names_what_it_found(tmp_path):
    (tmp_path / "pdfs").mkdir()
    (tmp_path / "pdfs/a.pdf").write_bytes(b"%PDF")
    (tmp_path / "pdfs/b.csv").write_text("x,y", encoding="utf-8")
    message = error_of(tmp_path / "pdfs", tmp_path / "cache")
    assert "has 2 files but none ending in .txt, .md, .jsonl" in message and ".csv, .pdf" in message
    assert "suffixes" in message


def test_too_small_a_corpus_says_how_many_documents_it_needs(tmp_path):
    (tmp_path / "short.txt").write_text("only\n\ntwo paragraphs\n", encoding="utf-8")
    message = error_of(tmp_path / "short.txt", tmp_path / "cache")
    assert "gives 2 distinct documents" in message and "at least 3" in message and "blank line" in message
    write_jsonl(tmp_path / "d.jsonl", paragraphs(3))
    LocalSource(paths=(tmp_path / "d.jsonl",), fractions=(0.2, 0.5, 0.3)).write(tmp_path / "big-holdout.json")
    message = error_of(tmp_path / "big-holdout.json", tmp_path / "cache")
    assert "gives 3 distinct documents" in message and "at least 4" in message and "add lines" in message
    write_jsonl(tmp_path / "d.jsonl", paragraphs(4))
    assert [len(d) for d in splits_of(tmp_path / "big-holdout.json", tmp_path / "cache").values()] == [1, 2, 1]


def test_bad_jsonl_names_file_line_and_fields(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "fine"}\n\n{"text": "broken\n', encoding="utf-8")
    message = error_of(path, tmp_path / "cache")
    assert f"{path}, line 3: not JSON" in message
    path.write_text('{"text": "fine"}\n{"body": "b", "id": 2}\n', encoding="utf-8")
    message = error_of(path, tmp_path / "cache")
    assert f"{path}, line 2: no field 'text'; its fields are ['body', 'id']" in message
    assert '"text_field": "body"' in message
    path.write_text('["text"]\n', encoding="utf-8")
    assert "line 1: a JSON list, not an object" in error_of(path, tmp_path / "cache")
    path.write_text('{"text": 3}\n', encoding="utf-8")
    assert "field 'text' is a JSON int, not a string" in error_of(path, tmp_path / "cache")


def test_separator_inside_text_and_non_utf8_are_refused(tmp_path):
    (tmp_path / "a.txt").write_text("one\n\ntwo says <|endoftext|> here\n", encoding="utf-8")
    message = error_of(tmp_path / "a.txt", tmp_path / "cache")
    assert f"{tmp_path / 'a.txt'}, line 3: '<|endoftext|>' inside the text" in message
    (tmp_path / "b.txt").write_bytes("café\n\nna\xefve\n".encode("latin-1"))
    message = error_of(tmp_path / "b.txt", tmp_path / "cache")
    assert f"{tmp_path / 'b.txt'}, line 1: byte 3" in message and "iconv" in message


def test_bad_specs_and_paths_are_refused(tmp_path):
    spec = tmp_path / "spec.json"
    spec.write_text('{"fractions": [0.9, 0.1]}', encoding="utf-8")
    assert "fractions=[0.9, 0.1] must be three numbers" in error_of(spec, tmp_path / "cache")
    spec.write_text('{"fractions": [0.5, 0.3, 0.3]}', encoding="utf-8")
    assert "that sum to 1" in error_of(spec, tmp_path / "cache")
    spec.write_text('{"text-field": "body"}', encoding="utf-8")
    assert "unknown keys ['text-field']" in error_of(spec, tmp_path / "cache")
    spec.write_text('{"sources": ["missing.jsonl"]}', encoding="utf-8")
    assert f"source {tmp_path / 'missing.jsonl'} does not exist" in error_of(spec, tmp_path / "cache")
    message = error_of(tmp_path / "no-such.txt", tmp_path / "cache")
    assert "neither a corpus name nor an existing file or folder" in message and "wiki" in message


# ---------------------------------------------------------------------------------------------------------------
# fetch-data's cache option


@pytest.mark.parametrize("flag", ["--data-root", "--root"])
def test_fetch_data_takes_data_root_and_still_the_old_root(flag, tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(download, "fetch", lambda names, **kwargs: calls.append(kwargs["root"]) or {})
    assert download.main([flag, str(tmp_path), "--quiet", "wiki"]) == 0
    assert calls == [tmp_path]
    with pytest.raises(SystemExit):
        download.main(["--help"])
    usage = capsys.readouterr().out
    assert "--data-root" in usage and "--root" not in usage.replace("--data-root", "")  # the alias is hidden
