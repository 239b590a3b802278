"""Tokenizers: a local or hub one, or a word-level one learnt from the training split.

The built-in tokenizer is what makes a from-scratch model (``tiny-*`` or ``--model-config``)
run offline: a ``tokenizers`` WordLevel model (lower-cased, accents stripped, split on
whitespace and punctuation) trained on the training texts, with the special tokens and the
single/pair templates of the architecture, wrapped as a fast ``transformers`` tokenizer. It is
saved next to the merged model, so ``AutoTokenizer.from_pretrained`` on the output folder gives
the same ids.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from gnlorp_dist.data.corpus import looks_like_hub_id

# Files any saved transformers tokenizer folder holds at least one of.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model",
    "sentencepiece.bpe.model", "tokenizer.model",
)  # fmt: skip
# BERT-style specials ([CLS] a [SEP] b [SEP], segment ids) vs RoBERTa/BART-style
# (<s> a </s></s> b </s>, no segment ids). Their order fixes the ids, which match the configs'
# default pad/bos/eos ids (BERT pad 0; RoBERTa and BART bos 0, pad 1, eos 2).
BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
ROBERTA_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
BERT_STYLE_MODEL_TYPES = ("bert", "distilbert", "electra")


def has_tokenizer_files(folder: Path) -> bool:
    return any((folder / name).is_file() for name in TOKENIZER_FILES)


def load_pretrained_tokenizer(name_or_path: str) -> Any:
    """A tokenizer from a local folder (offline), or from the hub when given a hub name."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        if not has_tokenizer_files(path):
            raise ValueError(
                f"tokenizer folder {name_or_path!r} holds none of {list(TOKENIZER_FILES)}; pass "
                "--tokenizer with a folder saved by save_pretrained"
            )
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if path.exists():
        raise ValueError(f"tokenizer {name_or_path!r} is a file; pass the folder holding it")
    if looks_like_hub_id(name_or_path) and not name_or_path.startswith((".", "~")):
        return AutoTokenizer.from_pretrained(name_or_path)  # the user named a hub tokenizer
    raise ValueError(f"tokenizer path {name_or_path!r} does not exist")


def build_word_level_tokenizer(
    texts: list[str], *, model_type: str, vocab_size: int, max_length: int
) -> PreTrainedTokenizerFast:
    """A word-level tokenizer learnt from ``texts``: the ``vocab_size`` most frequent words
    (special tokens included), the rest mapped to the unknown token."""
    bert_style = model_type in BERT_STYLE_MODEL_TYPES
    specials = BERT_SPECIALS if bert_style else ROBERTA_SPECIALS
    pad, unk, cls, sep, mask = (
        specials
        if bert_style
        else (specials[1], specials[3], specials[0], specials[2], specials[4])
    )
    if vocab_size <= len(specials):
        raise ValueError(
            f"--vocab-size {vocab_size} leaves no room for words next to the {len(specials)} "
            "special tokens; use a few thousand"
        )
    tokenizer = Tokenizer(models.WordLevel(unk_token=unk))
    tokenizer.normalizer = normalizers.Sequence(
        [normalizers.NFD(), normalizers.Lowercase(), normalizers.StripAccents()]
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.WordLevelTrainer(
        vocab_size=vocab_size, min_frequency=1, special_tokens=list(specials), show_progress=False
    )
    tokenizer.train_from_iterator(texts, trainer)
    ids = {token: tokenizer.token_to_id(token) for token in specials}
    if bert_style:
        template = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} $B:1 {sep}:1",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])],
        )
        input_names = ["input_ids", "token_type_ids", "attention_mask"]
    else:
        # RoBERTa has a single segment embedding: every token gets type 0.
        template = processors.TemplateProcessing(
            single=f"{cls} $A {sep}",
            pair=f"{cls} $A {sep} {sep} $B {sep}",
            special_tokens=[(cls, ids[cls]), (sep, ids[sep])],
        )
        input_names = ["input_ids", "attention_mask"]
    tokenizer.post_processor = template
    extra = {} if bert_style else {"bos_token": cls, "eos_token": sep}
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=pad,
        unk_token=unk,
        cls_token=cls,
        sep_token=sep,
        mask_token=mask,
        model_input_names=input_names,
        model_max_length=max_length,
        **extra,
    )
