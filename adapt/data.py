"""Training text: a folder of text or JSONL files, tokenized, split by document, packed.

Every file is a document, except JSONL files (`*.jsonl`), where every line is one: an object
with a string `text`. Documents go to the held-out part by a hash of their name, so the split is
stable when files are added and a held-out document is never trained on. Each part's documents
are tokenized with the model's tokenizer, joined with the end-of-text token and cut into rows of
`seq_len` tokens (the tail shorter than a row is dropped).

The order in which training rows are used is a pure function of (seed, step): epoch e visits the
rows in the permutation drawn from `seed + e`, and step s takes the next `batch` of them. A
resumed run therefore sees exactly the rows an uninterrupted one would, and data-parallel worker
r of W takes rows r, r+W, ... of every step's batch.
"""

from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Debian's python3.11-doc package (installed by `make setup`): the reStructuredText sources of
# the Python 3.11 documentation, about 500 files and 3M tokens of English technical prose.
DEFAULT_DATA = Path("/usr/share/doc/python3.11/html/_sources")


class DataError(ValueError):
    """The training data cannot be used; the message names the file or folder and the problem."""


@dataclass(frozen=True, slots=True)
class Document:
    name: str  # file path relative to the folder, with `:line` for a JSONL line
    text: str


def read_documents(folder: str | Path) -> list[Document]:
    """Every document under `folder` (recursively, sorted; hidden files skipped)."""
    folder = Path(folder)
    if not folder.is_dir():
        hint = (" (install Debian's python3.11-doc package: `make setup` does)"
                if folder == DEFAULT_DATA else "")
        raise DataError(f"{folder}: no such folder{hint}")
    files = sorted(p for p in folder.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise DataError(f"{folder}: the folder is empty (expected text or JSONL files)")
    docs: list[Document] = []
    for path in files:
        name = str(path.relative_to(folder))
        text = _read_text(path)
        if path.suffix.lower() == ".jsonl":
            docs += _jsonl_documents(path, name, text)
        elif text.strip():
            docs.append(Document(name, text))
    if not docs:
        raise DataError(f"{folder}: no text in any of its {len(files)} files")
    return docs


def _read_text(path: Path) -> str:
    raw = path.read_bytes()
    if b"\0" in raw:
        raise DataError(f"{path}: not a text file (it contains NUL bytes); give a folder of "
                        "UTF-8 text or JSONL files")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not a text file (not UTF-8 at byte {e.start}); give a "
                        "folder of UTF-8 text or JSONL files") from None


def _jsonl_documents(path: Path, name: str, text: str) -> list[Document]:
    docs = []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{i}: not valid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise DataError(f"{path}:{i}: expected an object with a string 'text' field")
        if obj["text"].strip():
            docs.append(Document(f"{name}:{i}", obj["text"]))
    return docs


def held_out_share(name: str) -> float:
    """A document's place in [0, 1): it is held out when below the held-out fraction."""
    digest = hashlib.sha256(name.encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def split(docs: list[Document], held_out: float) -> tuple[list[Document], list[Document]]:
    """(training, held-out) documents; each part gets at least one when there are two."""
    if not 0 < held_out < 1:
        raise DataError(f"the held-out fraction must be between 0 and 1, got {held_out}")
    if len(docs) < 2:
        raise DataError(f"{docs[0].name if docs else 'the data'}: one document cannot be split "
                        "into training and held-out parts; give at least two")
    ranked = sorted(docs, key=lambda d: held_out_share(d.name))
    k = min(max(1, sum(held_out_share(d.name) < held_out for d in docs)), len(docs) - 1)
    held = {d.name for d in ranked[:k]}
    return [d for d in docs if d.name not in held], [d for d in docs if d.name in held]


@dataclass(slots=True)
class Packed:
    """Token rows of both parts, and what they came from."""

    train: np.ndarray  # [N, seq_len] int32
    held_out: np.ndarray  # [M, seq_len] int32
    train_docs: int
    held_out_docs: int
    source: str

    @property
    def seq_len(self) -> int:
        return self.train.shape[1]

    def describe(self) -> str:
        return (f"{self.source}: {self.train_docs} training documents -> {len(self.train)} rows, "
                f"{self.held_out_docs} held-out documents -> {len(self.held_out)} rows of "
                f"{self.seq_len} tokens")

    def save(self, path: Path) -> None:
        np.savez(path, train=self.train, held_out=self.held_out,
                 meta=json.dumps([self.train_docs, self.held_out_docs, self.source]))

    @classmethod
    def load(cls, path: Path) -> "Packed":
        with np.load(path) as z:
            docs, held, source = json.loads(str(z["meta"]))
            return cls(z["train"], z["held_out"], docs, held, source)


def pack(docs: list[Document], tokenizer, seq_len: int) -> np.ndarray:
    """Documents tokenized, joined by end-of-text, cut into rows [n, seq_len] (int32)."""
    eos = list(tokenizer.eos_token_ids[:1])
    ids: list[int] = []
    for d in docs:
        ids += tokenizer.encode(d.text, add_special_tokens=False) + eos
    n = len(ids) // seq_len
    return np.asarray(ids[:n * seq_len], dtype=np.int32).reshape(n, seq_len)


def prepare(folder: str | Path, tokenizer, *, seq_len: int, max_seq_len: int,
            held_out: float = 0.05, model: str = "the model",
            parts: tuple[str, ...] = ("train", "held_out")) -> Packed:
    """Read, split and pack `folder` for a model whose context is `max_seq_len` (only the
    `parts` asked for are tokenized: an evaluation needs no training rows)."""
    if seq_len < 2:
        raise DataError(f"--seq-len must be at least 2, got {seq_len}")
    if seq_len > max_seq_len:
        raise DataError(f"--seq-len {seq_len} is past the context of {model} "
                        f"({max_seq_len} tokens)")
    train_docs, held_docs = split(read_documents(folder), held_out)
    empty = np.zeros((0, seq_len), dtype=np.int32)
    train = pack(train_docs, tokenizer, seq_len) if "train" in parts else empty
    held = pack(held_docs, tokenizer, seq_len) if "held_out" in parts else empty
    for rows, part, label, docs in ((train, "train", "training", train_docs),
                                    (held, "held_out", "held-out", held_docs)):
        if len(rows) == 0 and part in parts:
            raise DataError(f"{folder}: the {label} part ({len(docs)} documents) holds fewer "
                            f"tokens than one row of --seq-len {seq_len}; give more text or a "
                            "shorter --seq-len")
    return Packed(train, held, len(train_docs), len(held_docs), str(folder))


def step_rows(step: int, batch: int, n_rows: int, seed: int) -> np.ndarray:
    """Indices of the training rows of step `step` (all workers together)."""
    pos = step * batch + np.arange(batch)
    out = np.empty(batch, dtype=np.int64)
    for epoch in np.unique(pos // n_rows):
        sel = pos // n_rows == epoch
        perm = np.random.default_rng(seed + int(epoch)).permutation(n_rows)
        out[sel] = perm[pos[sel] % n_rows]
    return out


def fingerprint(rows: np.ndarray) -> int:
    """A short checksum of a step's row indices (progress records show the data order)."""
    return zlib.crc32(np.asarray(rows, dtype=np.int64).tobytes())
