"""Local corpora streamed into a memory-mapped token cache: the same ids, blocks and batch order
as tokenising whole documents in memory, reused by a second run (issue #26)."""

import json
import os

import numpy as np
import pytest
import torch

from gnlorp_dist.data import token_cache
from gnlorp_dist.data.corpus import (
    load_tokenizer,
    local_documents,
    read_utf8,
    shakespeare_documents,
    shakespeare_token_ids,
    text_pieces,
    tokenize_documents,
)
from gnlorp_dist.data.loader import (
    BlockSampler,
    InMemoryBatches,
    blocks_from_ids,
    build_data,
    split_train_eval,
)

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


@pytest.fixture(scope="module")
def tokenizer(offline_shared_cache):
    return load_tokenizer()


@pytest.fixture
def small_segments(monkeypatch):
    """Segments of 4,096 characters, so that a 100 kB document is cut some 40 times."""
    monkeypatch.setattr(token_cache, "SEGMENT_CHARS", 4096)
    monkeypatch.setattr(token_cache, "BATCH_CHARS", 16384)


def _corpus(tmp_path, play=0):
    """Two .txt and a .jsonl file; another ``play``, other contents (the cache is shared)."""
    plays = shakespeare_documents()
    (tmp_path / "a.txt").write_text(plays[play][:100_000] + "  Ünïcödé ✓ 漢字\r\n\n  indented\n")
    (tmp_path / "b.txt").write_text("")  # an empty document is still framed
    rows = [{"text": plays[play + 1][:3000]}, {"text": ""}, {"text": "x\u2028y"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_streamed_pieces_equal_the_whole_file_at_any_read_size(tmp_path):
    text = "Ünïcödé ✓ 漢字 \r\n two\rthree\r\r\n" * 40
    path = tmp_path / "a.txt"
    path.write_bytes(text.encode())
    for read_bytes in (1, 2, 3, 5, 64):
        assert "".join(text_pieces(path, read_bytes)) == read_utf8(path)
    path.write_bytes(b"line one\nline two \xe9\n")
    with pytest.raises(ValueError, match=r"byte 0xe9 at offset 18 \(line 2\)"):
        "".join(text_pieces(path, 4))
    path.write_bytes("ok ✓".encode()[:-1])  # cut inside the last character
    with pytest.raises(ValueError, match="is not UTF-8 text: byte 0xe2 at offset 3"):
        "".join(text_pieces(path, 2))


def test_segmented_ids_equal_whole_document_ids(tmp_path, tokenizer, small_segments):
    corpus = _corpus(tmp_path)
    cached = token_cache.local_token_ids(corpus, "text", tokenizer, None)
    whole = tokenize_documents(list(local_documents(corpus)), tokenizer)
    assert cached.ids.dtype == np.uint16 and isinstance(cached.ids, np.memmap)
    assert np.array_equal(np.asarray(cached.ids, dtype=np.int64), whole)
    assert (whole == 2).sum() == 5  # five documents, one EOS each
    items = list(token_cache.corpus_items([corpus / "a.txt"], "text", tokenizer))
    assert len(items) > 20 and all(len(i.text) <= 4096 + 1024 for i in items)


def test_second_run_reuses_the_cache_without_reading_the_corpus(tmp_path, tokenizer, monkeypatch):
    corpus = _corpus(tmp_path, play=2)
    first = token_cache.local_token_ids(corpus, "text", tokenizer, None)
    assert not first.reused and first.path.is_file()
    with monkeypatch.context() as patched:
        patched.setattr(token_cache, "write_token_ids", lambda *a: pytest.fail("re-tokenised"))
        patched.setattr(token_cache, "_sha256_streamed", lambda *a: pytest.fail("re-hashed"))
        again = token_cache.local_token_ids(corpus, "text", tokenizer, None)
    assert again.reused and again.path == first.path
    assert np.array_equal(again.ids, first.ids)
    # Touched but unchanged: hashed again, and the same cache serves it.
    os.utime(corpus / "a.txt", ns=(1, 1))
    assert token_cache.local_token_ids(corpus, "text", tokenizer, None).path == first.path
    # Edited: a new key, tokenised again.
    with open(corpus / "b.txt", "w") as file:
        file.write("now it says something")
    edited = token_cache.local_token_ids(corpus, "text", tokenizer, None)
    assert not edited.reused and edited.path != first.path
    assert (edited.ids == 2).sum() == 5 and edited.ids.size > first.ids.size
    # A run killed while tokenising left a temporary and no manifest: the next one cleans up.
    leftover = edited.path.with_name(f"{edited.path.stem}.tmp-999999")
    leftover.write_bytes(b"partial")
    edited.path.with_suffix(".json").unlink()
    rebuilt = token_cache.local_token_ids(corpus, "text", tokenizer, None)
    assert not rebuilt.reused and not leftover.exists()
    assert np.array_equal(rebuilt.ids, edited.ids)


def _reference_batches(ids, seq_len, global_batch, seed, steps):
    """Batches and held-out blocks as the in-memory loader built them before the cache."""
    train, held_out = split_train_eval(blocks_from_ids(ids, seq_len), 0.05)
    source = InMemoryBatches(train, BlockSampler(train.shape[0], global_batch, seed))
    return [source.next_batch() for _ in range(steps)], held_out


def test_local_data_gives_the_same_blocks_order_and_resume_as_in_memory(tmp_path, tokenizer):
    corpus = _corpus(tmp_path, play=4)
    whole = tokenize_documents(list(local_documents(corpus)), tokenizer)
    expected, held_out = _reference_batches(whole, 32, 6, seed=5, steps=8)
    data = build_data(data=str(corpus), seq_len=32, global_batch=6, seed=5)
    assert "token cache written" in data.description
    assert torch.equal(data.eval_blocks, held_out) and data.eval_blocks.dtype == torch.long
    got = [data.train.next_batch() for _ in range(3)]
    state = json.loads(json.dumps(data.train.state_dict()))
    resumed = build_data(data=str(corpus), seq_len=32, global_batch=6, seed=5)
    assert "token cache reused" in resumed.description
    resumed.train.load_state_dict(state)
    got += [resumed.train.next_batch() for _ in range(5)]
    assert all(a.dtype == torch.long and torch.equal(a, b) for a, b in zip(got, expected))


def test_embedded_corpus_batches_are_unchanged(tokenizer):
    ids = shakespeare_token_ids(tokenizer)
    expected, held_out = _reference_batches(ids, 64, 8, seed=0, steps=4)
    data = build_data(seq_len=64, global_batch=8, seed=0)
    assert torch.equal(data.eval_blocks, held_out)
    assert all(torch.equal(data.train.next_batch(), batch) for batch in expected)
