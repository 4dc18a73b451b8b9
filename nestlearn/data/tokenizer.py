"""Tokenizers: UTF-8 bytes (257 ids) and byte-level BPE trained locally with HF `tokenizers`.

    tok = ByteTokenizer()                                   # ids 0..255 are bytes, 256 ends a document
    tok = train_bpe(load_split("wiki", "train"), 8192)      # trained here; no pretrained vocabulary is downloaded
    tok.save(checkpoint_dir)                                # writes checkpoint_dir/tokenizer.json
    tok = load_tokenizer(checkpoint_dir)

A pretrained model's own tokenizer.json (a Hugging Face model folder: SmolLM2, Llama) loads as a `BPETokenizer` too;
its end-of-document id is "<|endoftext|>" when it has one, else another end-of-text token it names.

Both kinds share one interface (`Tokenizer`): encode, encode_batch, decode, vocab_size, eos_id, save. Text never
encodes to the end-of-document id, even text that spells "<|endoftext|>": the id is only inserted between
documents (nestlearn.data.shards), so a model cannot be told "end of document" by its input text.
"""

from __future__ import annotations

import hashlib
import json
import os
from abc import ABC, abstractmethod
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["EOS_TOKEN", "TOKENIZER_FILE", "Tokenizer", "ByteTokenizer", "BPETokenizer", "train_bpe", "load_tokenizer"]

EOS_TOKEN = "<|endoftext|>"
# what pretrained vocabularies call their end of text, in order of preference after EOS_TOKEN (Llama 3, Llama 2)
OTHER_EOS_TOKENS = ("<|end_of_text|>", "</s>", "<eos>")
TOKENIZER_FILE = "tokenizer.json"


class Tokenizer(ABC):
    """Text <-> token ids, with one end-of-document id that text never produces."""

    kind: str

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids, eos included: every id is in [0, vocab_size)."""

    @property
    @abstractmethod
    def eos_id(self) -> int:
        """The end-of-document id placed between documents."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Ids of `text`, without eos."""

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Ids of each text; the BPE tokenizer encodes a batch on every core."""
        return [self.encode(text) for text in texts]

    @abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; eos ids are dropped, incomplete UTF-8 becomes U+FFFD instead of raising."""

    @abstractmethod
    def to_json(self) -> str:
        """The contents of tokenizer.json."""

    @property
    def fingerprint(self) -> str:
        """sha256 of tokenizer.json: two tokenizers with equal fingerprints give equal ids."""
        return hashlib.sha256(self.to_json().encode("utf-8")).hexdigest()

    def save(self, directory: str | Path) -> Path:
        """Write `directory/tokenizer.json` (atomically) and return its path."""
        path = Path(directory) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{TOKENIZER_FILE}.tmp-{os.getpid()}")
        tmp.write_text(self.to_json(), encoding="utf-8")
        tmp.replace(path)
        return path

    def __repr__(self) -> str:
        return f"{type(self).__name__}(vocab_size={self.vocab_size}, eos_id={self.eos_id})"


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255 and id 256 as end of document: no training, no unknown input, 257 ids."""

    kind = "bytes"

    @property
    def vocab_size(self) -> int:
        return 257

    @property
    def eos_id(self) -> int:
        return 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Iterable[int]) -> str:
        ids = list(ids)
        bad = [i for i in ids if not 0 <= i <= 256]
        if bad:
            raise ValueError(f"ids {bad[:5]} are outside the byte tokenizer's range 0..256 (256 is eos)")
        # A window cut from a token stream can start or end inside a multi-byte character; show U+FFFD for it.
        return bytes(i for i in ids if i != 256).decode("utf-8", errors="replace")

    def to_json(self) -> str:
        return json.dumps({"type": "bytes", "vocab_size": 257, "eos_id": 256}, indent=2) + "\n"


class BPETokenizer(Tokenizer):
    """Byte-level BPE (GPT-2 style) held by an HF `tokenizers.Tokenizer`; eos is the special token "<|endoftext|>".

    Byte-level means every string encodes (no unknown token) and decoding gives back the exact text.
    """

    kind = "bpe"

    def __init__(self, tokenizer: Any) -> None:
        eos = next(
            (i for i in map(tokenizer.token_to_id, (EOS_TOKEN, *OTHER_EOS_TOKENS)) if i is not None),
            None,
        )
        if eos is None:
            raise ValueError(
                f"this tokenizer has none of the tokens {[EOS_TOKEN, *OTHER_EOS_TOKENS]}, one of which nestlearn "
                f"uses as end of document; train one with nestlearn.data.tokenizer.train_bpe"
            )
        # Not saved in tokenizer.json, so set on every construction: text that spells "<|endoftext|>" is encoded
        # as ordinary text; the eos id only ever comes from shards placing it between documents.
        tokenizer.encode_special_tokens = True
        self._tokenizer = tokenizer
        self._eos_id = eos

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size()

    @property
    def eos_id(self) -> int:
        return self._eos_id

    @property
    def hf_tokenizer(self) -> Any:
        """The wrapped `tokenizers.Tokenizer`, e.g. to build a transformers tokenizer around it."""
        return self._tokenizer

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)

    def to_json(self) -> str:
        return self._tokenizer.to_str(pretty=True)


def train_bpe(
    texts: Iterable[str], vocab_size: int, *, min_frequency: int = 2, length: int | None = None, progress: bool = False
) -> BPETokenizer:
    """Train a byte-level BPE tokenizer here, on `texts`; deterministic for the same texts and settings.

    Args:
        texts: training documents, e.g. `load_split(name, "train")`.
        vocab_size: the most ids, eos and the 256 byte symbols included; a small corpus may stop short of it
            (the result's `vocab_size` is the real number).
        min_frequency: a pair seen fewer times is never merged.
        length: number of texts, only for the progress bar.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if vocab_size < 258:
        raise ValueError(f"vocab_size={vocab_size} must be at least 258: 256 byte symbols, eos and one merge")
    tokenizer = HFTokenizer(models.BPE())
    # No prefix space and no normalizer, so decode(encode(text)) == text for every string.
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS_TOKEN],
        # Every byte gets an id even if the training text lacks it, so no input is ever unknown.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer, length=length)
    return BPETokenizer(tokenizer)


def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer saved in a directory (a checkpoint, a shard directory) or in a tokenizer.json file."""
    path = Path(path)
    file = path / TOKENIZER_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(
            f"no {TOKENIZER_FILE} at {file}; checkpoints and shard directories hold the tokenizer they were made "
            f"with (Tokenizer.save). Save one with ByteTokenizer().save(dir) or train_bpe(...).save(dir)."
        )
    text = file.read_text(encoding="utf-8")
    data = json.loads(text)
    if data.get("type") == "bytes":
        return ByteTokenizer()
    if data.get("model", {}).get("type") == "BPE":
        from tokenizers import Tokenizer as HFTokenizer

        return BPETokenizer(HFTokenizer.from_str(text))
    raise ValueError(
        f"{file} is neither a nestlearn byte tokenizer ({{'type': 'bytes'}}) nor an HF byte-level BPE tokenizer "
        f"(model.type == 'BPE'); found top-level keys {sorted(data)[:8]}"
    )
