"""Local corpora of any size: a streamed tokenisation into a memory-mapped token cache.

A ``.txt`` file is one document and may be larger than memory, so it is read in pieces and
tokenised in segments of about :data:`SEGMENT_CHARS` characters. Cutting a text changes its
tokens where a token would span the cut, and (SentencePiece's dummy prefix) at the start of the
second part. So each segment is tokenised behind the :data:`CONTEXT_CHARS` characters before it,
whose tokens are then dropped, and a cut is taken only where appending the next
:data:`CONTEXT_CHARS` characters leaves the tokens before it unchanged. Where no token depends on
text more than :data:`CONTEXT_CHARS` characters away (true of BPE, unigram and WordPiece
vocabularies), the ids are those of tokenising each document whole, as
:func:`~gnlorp_dist.data.corpus.tokenize_documents` does.

The ids go to ``<cache>/tokens/local-<key>.bin`` (uint16 where the vocabulary fits, else int32),
then a manifest ``local-<key>.json`` marks it complete. The key hashes the files' contents (in
order), the ``.jsonl`` text field and the tokenizer's definition, so renaming a file reuses it
and editing one does not. The content hashes are remembered by (size, mtime, inode), so a second
run reads no corpus bytes at all.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO

import numpy as np

from gnlorp_dist.data.corpus import (
    cache_dir,
    jsonl_documents,
    local_text_files,
    text_pieces,
    tokenizer_fingerprint,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

# Bump when the tokenisation or the file layout changes: it keys the cache.
TOKEN_CACHE_VERSION = 1
SEGMENT_CHARS = 1 << 18
"""Characters of one document tokenised per item; longer documents are cut into segments."""
CONTEXT_CHARS = 1024
"""Characters of left context each segment is tokenised behind (and the cut check's reach)."""
BATCH_CHARS = 1 << 22
"""Characters per tokenizer call: the fast tokenizers spread a batch over threads."""
_CUT_TRIES = 64


@dataclass(frozen=True, kw_only=True)
class Item:
    """A piece of one document to tokenise."""

    context: str
    """Text just before ``text`` in the same document, tokenised with it and dropped."""
    text: str
    """The text whose ids are emitted."""
    first: bool
    """The document starts here: BOS goes before the ids."""
    last: bool
    """The document ends here: EOS goes after the ids."""


def document_items(pieces: Iterator[str], tokenizer: PreTrainedTokenizerBase) -> Iterator[Item]:
    """One document, given as text pieces, as items of at most about :data:`SEGMENT_CHARS`
    characters, each cut where the tokens before the cut do not depend on the text after it."""
    buffer, start, first = "", 0, True  # buffer[:start] is the context of buffer[start:]
    for piece in pieces:
        buffer += piece
        while len(buffer) - start >= SEGMENT_CHARS + CONTEXT_CHARS:
            cut = _safe_cut(buffer, start, tokenizer)
            if cut is None:
                break  # no safe cut yet: read on, and search the longer text
            yield Item(context=buffer[:start], text=buffer[start:cut], first=first, last=False)
            first = False
            buffer = buffer[cut - min(cut, CONTEXT_CHARS) :]
            start = min(cut, CONTEXT_CHARS)
    yield Item(context=buffer[:start], text=buffer[start:], first=first, last=True)


def _safe_cut(buffer: str, start: int, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """A position in the second half of the next segment, before a space or newline where one
    is found, whose tokens to the left stay the same when the text to its right is appended."""
    low = start + SEGMENT_CHARS // 2
    high = min(start + SEGMENT_CHARS, len(buffer) - CONTEXT_CHARS)
    candidates: list[int] = []
    position = high
    while len(candidates) < _CUT_TRIES // 2:
        position = max(buffer.rfind(" ", low, position), buffer.rfind("\n", low, position))
        if position <= low:
            break
        candidates.append(position)
    # Text without whitespace (some scripts, encoded data): any position may do.
    candidates += range(high - 1, low, -max(1, (high - low) // _CUT_TRIES))[: _CUT_TRIES // 2]
    for cut in candidates:
        left = buffer[cut - CONTEXT_CHARS : cut]
        alone, joined = _encode(tokenizer, [left, left + buffer[cut : cut + CONTEXT_CHARS]])
        if joined[: len(alone)] == alone:
            return cut
    return None


def _encode(tokenizer: PreTrainedTokenizerBase, texts: list[str]) -> list[list[int]]:
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def item_ids(items: list[Item], tokenizer: PreTrainedTokenizerBase) -> np.ndarray:
    """The framed ids of ``items`` (one tokenizer call), as 1-D int64."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    assert eos is not None, "local_token_ids refuses a tokenizer without EOS"
    encoded = _encode(tokenizer, [item.context + item.text for item in items])
    with_context = [i for i, item in enumerate(items) if item.context]
    alone = _encode(tokenizer, [items[i].context for i in with_context]) if with_context else []
    context_ids = dict(zip(with_context, alone, strict=True))
    pieces: list[np.ndarray] = []
    for index, (item, ids) in enumerate(zip(items, encoded, strict=True)):
        dropped = context_ids.get(index, [])
        if ids[: len(dropped)] != dropped:
            raise ValueError(
                f"tokenizer {tokenizer.name_or_path!r} merges tokens across more than "
                f"{CONTEXT_CHARS} characters, so a document of over {SEGMENT_CHARS:,} "
                "characters cannot be tokenised in pieces; split the file into documents "
                "(one per line of a .jsonl file)"
            )
        framed = [bos] if item.first and bos is not None else []
        framed += ids[len(dropped) :]
        pieces.append(np.asarray(framed + ([eos] if item.last else []), dtype=np.int64))
    return np.concatenate(pieces)


def corpus_items(
    files: list[Path], text_field: str, tokenizer: PreTrainedTokenizerBase
) -> Iterator[Item]:
    """Items of every document of ``files``, in order: each ``.txt`` file is one document."""
    for file in files:
        if file.suffix == ".txt":
            yield from document_items(text_pieces(file), tokenizer)
            continue
        for text in jsonl_documents(file, text_field):
            yield from document_items(iter([text]), tokenizer)


def write_token_ids(
    items: Iterator[Item], tokenizer: PreTrainedTokenizerBase, out: BinaryIO, dtype: np.dtype
) -> int:
    """Tokenise ``items`` in batches of about :data:`BATCH_CHARS` characters, appending the ids
    to ``out`` as ``dtype``; the number of ids written."""
    written, batch, chars = 0, [], 0
    for item in _with_end(items):
        if item is not None:
            batch.append(item)
            chars += len(item.text) + len(item.context)
        if batch and (item is None or chars >= BATCH_CHARS or len(batch) >= 256):
            ids = item_ids(batch, tokenizer)
            out.write(ids.astype(dtype).tobytes())
            written, batch, chars = written + ids.size, [], 0
    return written


def _with_end(items: Iterator[Item]) -> Iterator[Item | None]:
    yield from items
    yield None


# ------------------------------------------------------------------------------------- the cache


@dataclass(frozen=True, kw_only=True)
class CachedTokens:
    """The ids of a local corpus and where they live."""

    ids: np.ndarray
    """All framed ids, 1-D, read-only (memory-mapped from ``path`` when cached)."""
    path: Path | None
    """The cache file, or None where the tokenizer gives no key to cache under."""
    reused: bool
    """Whether an earlier run wrote the cache file."""


def local_token_ids(
    data: str | os.PathLike,
    text_field: str,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_name_or_path: str | os.PathLike | None,
) -> CachedTokens:
    """The ids of a local ``.txt``/``.jsonl`` file or folder, from the token cache, tokenised
    into it first (streamed, bounded memory) when absent. Concurrent processes (the ranks of a
    job) wait for the first one's tokenisation instead of repeating it."""
    if tokenizer.eos_token_id is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end documents")
    files = local_text_files(data)
    folder = cache_dir() / "tokens"
    folder.mkdir(parents=True, exist_ok=True)
    key = _corpus_key(files, text_field, tokenizer, tokenizer_name_or_path, folder)
    if key is None:
        scratch = folder / f"local-uncached-{os.getpid()}"
        try:
            _tokenize_into(scratch, files, text_field, tokenizer)
            return CachedTokens(ids=_open(scratch), path=None, reused=False)
        finally:  # the mapping outlives the names
            for path in (scratch.with_suffix(".bin"), scratch.with_suffix(".json")):
                path.unlink(missing_ok=True)
    stem = folder / f"local-{key[:32]}"
    if stem.with_suffix(".json").is_file():
        return CachedTokens(ids=_open(stem), path=stem.with_suffix(".bin"), reused=True)
    with open(stem.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        reused = stem.with_suffix(".json").is_file()  # another process wrote it meanwhile
        if not reused:
            _tokenize_into(stem, files, text_field, tokenizer)
    return CachedTokens(ids=_open(stem), path=stem.with_suffix(".bin"), reused=reused)


def _tokenize_into(
    stem: Path, files: list[Path], text_field: str, tokenizer: PreTrainedTokenizerBase
) -> None:
    """``stem.bin`` (the ids) then ``stem.json`` (the manifest that marks it complete)."""
    dtype = np.dtype(np.uint16 if len(tokenizer) <= np.iinfo(np.uint16).max + 1 else np.int32)
    # Writers hold the lock (or a name of their own), so another temporary is a killed run's.
    for leftover in stem.parent.glob(f"{stem.name}.tmp-*"):
        leftover.unlink(missing_ok=True)
    tmp = stem.with_name(f"{stem.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb", buffering=1 << 20) as out:
            count = write_token_ids(
                corpus_items(files, text_field, tokenizer), tokenizer, out, dtype
            )
        os.replace(tmp, stem.with_suffix(".bin"))
        manifest = {"version": TOKEN_CACHE_VERSION, "dtype": dtype.str, "tokens": count,
                    "files": [str(f) for f in files], "tokenizer": str(tokenizer.name_or_path)}  # fmt: skip
        tmp.write_text(json.dumps(manifest, indent=1))
        os.replace(tmp, stem.with_suffix(".json"))
    finally:
        tmp.unlink(missing_ok=True)


def _open(stem: Path) -> np.ndarray:
    manifest = json.loads(stem.with_suffix(".json").read_text())
    dtype, count = np.dtype(manifest["dtype"]), int(manifest["tokens"])
    data = stem.with_suffix(".bin")
    assert data.stat().st_size == count * dtype.itemsize, f"{data} does not match its manifest"
    if count == 0:
        return np.zeros(0, dtype=dtype)
    return np.memmap(data, dtype=dtype, mode="r", shape=(count,))


def _corpus_key(
    files: list[Path],
    text_field: str,
    tokenizer: PreTrainedTokenizerBase,
    tokenizer_name_or_path: str | os.PathLike | None,
    folder: Path,
) -> str | None:
    """A hash of what the ids depend on, or None where the tokenizer cannot be hashed."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        tokenizer_key = hashlib.sha256(backend.to_str().encode()).hexdigest()
    else:
        tokenizer_key = tokenizer_fingerprint(tokenizer_name_or_path)
        if tokenizer_key is None:
            return None
    special = [type(tokenizer).__name__, tokenizer.bos_token_id, tokenizer.eos_token_id]
    field = text_field if any(f.suffix == ".jsonl" for f in files) else None
    contents = [[f.suffix, h] for f, h in zip(files, content_hashes(files, folder), strict=True)]
    key = [
        TOKEN_CACHE_VERSION,
        SEGMENT_CHARS,
        CONTEXT_CHARS,
        tokenizer_key,
        special,
        field,
        contents,
    ]
    return hashlib.sha256(json.dumps(key).encode()).hexdigest()


def content_hashes(files: list[Path], folder: Path) -> list[str]:
    """The SHA-256 of each file's bytes, remembered in ``folder/content-hashes.json`` by path,
    size, mtime, ctime and inode so that an unchanged file is not read again."""
    index_path = folder / "content-hashes.json"
    try:
        index = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    hashes, changed = [], False
    for file in files:
        info = file.stat()
        stamp = [info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino]
        entry = index.get(str(file.resolve()))
        if entry is None or entry[:4] != stamp:
            entry, changed = [*stamp, _sha256_streamed(file)], True
            index[str(file.resolve())] = entry
        hashes.append(entry[4])
    if changed:
        tmp = index_path.with_name(f"{index_path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(index))
        os.replace(tmp, index_path)
    return hashes


def _sha256_streamed(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while chunk := stream.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()
