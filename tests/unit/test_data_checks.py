"""Data-path refusals: a batch larger than an epoch, non-string JSONL text, a tokenizer folder
without a tokenizer (issue #26)."""

import json

import pytest

from gnlorp_dist.data.corpus import load_tokenizer, local_documents
from gnlorp_dist.data.loader import StreamingBatches, build_data

pytestmark = pytest.mark.usefixtures("offline_shared_cache")


@pytest.fixture(scope="module")
def tokenizer(offline_shared_cache):
    return load_tokenizer()


def test_an_epoch_shorter_than_one_global_batch_is_refused_with_the_numbers(tmp_path):
    corpus = tmp_path / "tiny.txt"
    corpus.write_text("To be, or not to be, that is the question. " * 4)  # ~60 tokens
    with pytest.raises(ValueError) as refused:
        build_data(data=str(corpus), seq_len=16, eval_fraction=0.25, global_batch=64, seed=0)
    message = str(refused.value)
    assert "2 training blocks of 16 tokens" in message and "global batch of 64" in message
    assert "--batch-size" in message and "--seq-len" in message
    # Exactly one global batch per epoch is fine.
    data = build_data(data=str(corpus), seq_len=16, eval_fraction=0.25, global_batch=2, seed=0)
    assert data.train.next_batch().shape == (2, 16)


def test_a_streamed_epoch_shorter_than_one_global_batch_is_refused(tokenizer):
    documents = ["a short document"] * 3

    def stream(epoch, skip):
        return iter(documents[skip:])

    source = StreamingBatches(stream, tokenizer, seq_len=8, global_batch=16)
    with pytest.raises(ValueError, match=r"one pass over the training stream gives \d+ tokens"):
        source.next_batch()


@pytest.mark.parametrize(
    ("value", "kind"),
    [(42, "a number"), (["a", "b"], "a list"), (None, "null"), (True, "a boolean")],
)
def test_jsonl_text_that_is_not_a_string_names_file_line_and_type(tmp_path, value, kind):
    corpus = tmp_path / "rows.jsonl"
    rows = [{"text": "fine"}, {"text": value}]
    corpus.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    with pytest.raises(ValueError, match=rf"rows\.jsonl:2: field 'text' is {kind}"):
        list(local_documents(corpus))
    with pytest.raises(ValueError, match=rf"rows\.jsonl:2: field 'text' is {kind}"):
        build_data(data=str(corpus), seq_len=4, global_batch=1, seed=0)


def test_a_tokenizer_folder_without_a_tokenizer_names_the_folder_and_what_it_lacks(tmp_path):
    folder = tmp_path / "my-tokenizer"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    with pytest.raises(ValueError) as refused:
        load_tokenizer(folder)
    message = str(refused.value)
    assert str(folder) in message and "tokenizer.json" in message and "tokenizer.model" in message
    assert "config.json" in message  # what it does hold
    assert "You need to have sentencepiece" not in message  # the loader's own advice
    (folder / "tokenizer.model").write_text("not a sentencepiece model")
    with pytest.raises(ValueError, match=f"tokenizer folder '{folder}'.* could not be loaded"):
        load_tokenizer(folder)
    with pytest.raises(ValueError, match="is a file; pass the folder"):
        load_tokenizer(folder / "tokenizer.model")
