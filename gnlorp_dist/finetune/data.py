"""Sentence(-pair) classification and regression data: GLUE tasks and local files.

Local files (CSV, TSV, JSON, JSONL) are read with the standard library, never through
``datasets``: nothing is cached or fetched. A GLUE task without local files is downloaded with
``datasets.load_dataset("nyu-mll/glue", task)``, the one place this module goes online.

Every user mistake (a missing file, a missing column, a label the training split never saw)
raises ``ValueError`` naming the value, before any model is built.
"""

from __future__ import annotations

import csv
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gnlorp_dist.data.corpus import read_utf8

Columns = dict[str, list[Any]]

GLUE_HUB_DATASET = "nyu-mll/glue"
LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl")


@dataclass(frozen=True, kw_only=True)
class GlueTask:
    text_columns: tuple[str, ...]
    """One sentence column, or the two columns of a pair."""
    num_labels: int
    """Classes (1: regression)."""
    metrics: tuple[str, ...]
    """GLUE's official metrics for the task, in reporting order."""
    validation_split: str = "validation"


GLUE_TASKS: dict[str, GlueTask] = {
    "cola": GlueTask(text_columns=("sentence",), num_labels=2, metrics=("matthews",)),
    "sst2": GlueTask(text_columns=("sentence",), num_labels=2, metrics=("accuracy",)),
    "mrpc": GlueTask(
        text_columns=("sentence1", "sentence2"), num_labels=2, metrics=("accuracy", "f1")
    ),
    "qqp": GlueTask(
        text_columns=("question1", "question2"), num_labels=2, metrics=("accuracy", "f1")
    ),
    "stsb": GlueTask(
        text_columns=("sentence1", "sentence2"), num_labels=1, metrics=("pearson", "spearman")
    ),
    "mnli": GlueTask(
        text_columns=("premise", "hypothesis"),
        num_labels=3,
        metrics=("accuracy",),
        validation_split="validation_matched",
    ),
    "qnli": GlueTask(text_columns=("question", "sentence"), num_labels=2, metrics=("accuracy",)),
    "rte": GlueTask(text_columns=("sentence1", "sentence2"), num_labels=2, metrics=("accuracy",)),
    "wnli": GlueTask(text_columns=("sentence1", "sentence2"), num_labels=2, metrics=("accuracy",)),
}

# Tried in order when --text-columns is not given.
_TEXT_COLUMN_GUESSES = (
    ("sentence1", "sentence2"), ("question1", "question2"), ("premise", "hypothesis"),
    ("question", "sentence"), ("sentence",), ("text",),
)  # fmt: skip
_INTEGER = re.compile(r"^[+-]?\d+$")


# ------------------------------------------------------------------------------ reading files


def _rows_to_columns(rows: list[dict[str, Any]], path: Path) -> Columns:
    if not rows:
        raise ValueError(f"{path} holds no examples; check the file or its format")
    names = list(rows[0])
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{path}: example {index} is a {type(row).__name__}, not an object")
        missing = [n for n in names if n not in row]
        if missing:
            raise ValueError(
                f"{path}: example {index} lacks column(s) {missing}; every example needs the "
                f"columns of the first one ({names})"
            )
    return {name: [row[name] for row in rows] for name in names}


def read_table(path: str | Path) -> Columns:
    """Columns of a local ``.csv`` / ``.tsv`` (header row), ``.jsonl`` (one object per line) or
    ``.json`` file (a list of objects, ``{"data": [...]}``, a dict of columns, or JSON lines)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"data file {str(path)!r} does not exist (or is not a file)")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise ValueError(
            f"data file {str(path)!r}: unknown format {suffix!r}; use one of {LOCAL_SUFFIXES}"
        )
    text = read_utf8(path)
    if suffix in (".csv", ".tsv"):
        # GLUE's TSVs contain bare quotes inside sentences: read them literally.
        quoting = csv.QUOTE_NONE if suffix == ".tsv" else csv.QUOTE_MINIMAL
        delimiter = "\t" if suffix == ".tsv" else ","
        reader = csv.DictReader(text.splitlines(), delimiter=delimiter, quoting=quoting)
        rows = [dict(row) for row in reader]
        for index, row in enumerate(rows):
            if None in row or any(v is None for v in row.values()):
                raise ValueError(
                    f"{path}: row {index + 2} has a different number of fields than the header "
                    f"{reader.fieldnames}"
                )
        return _rows_to_columns(rows, path)
    if suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError:
            data = None  # not one JSON document: try JSON lines, as `datasets` writes them
        if isinstance(data, dict) and isinstance(data.get("data"), list):
            data = data["data"]
        if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
            lengths = {len(v) for v in data.values()}
            if len(lengths) != 1:
                raise ValueError(f"{path}: columns have different lengths {sorted(lengths)}")
            return _rows_to_columns(
                [dict(zip(data, values)) for values in zip(*data.values())], path
            )
        if isinstance(data, list):
            return _rows_to_columns(data, path)
    rows = []
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as err:
                raise ValueError(
                    f"{path}: line {number} is not valid JSON ({err.msg}); a JSON-lines file "
                    "holds one JSON object per line"
                ) from None
    return _rows_to_columns(rows, path)


def load_glue(task: str) -> tuple[Columns, Columns]:
    """(train, validation) columns of a GLUE task, downloaded with ``datasets`` (online)."""
    import datasets  # noqa: PLC0415  (slow import; only for hub data)

    spec = GLUE_TASKS[task]
    loaded = datasets.load_dataset(GLUE_HUB_DATASET, task)
    wanted = [*spec.text_columns, "label"]
    return tuple(  # type: ignore[return-value]
        {name: list(loaded[split][name]) for name in wanted}
        for split in ("train", spec.validation_split)
    )


# ---------------------------------------------------------------------------- columns, labels


def resolve_text_columns(
    requested: tuple[str, ...] | None, splits: dict[str, Columns]
) -> tuple[str, ...]:
    """The text column(s) to read, checked against every split."""
    first = next(iter(splits.values()))
    if requested is None:
        for guess in _TEXT_COLUMN_GUESSES:
            if all(name in first for name in guess):
                requested = guess
                break
        else:
            raise ValueError(
                f"no text column found among the columns {list(first)}; name it with "
                "--text-columns COLUMN (or COLUMN1,COLUMN2 for sentence pairs)"
            )
    if not 1 <= len(requested) <= 2:
        raise ValueError(
            f"--text-columns {','.join(requested)!r}: give one column, or two for sentence pairs"
        )
    for split, columns in splits.items():
        for name in requested:
            if name not in columns:
                raise ValueError(
                    f"text column {name!r} is not in the {split} data; its columns are "
                    f"{list(columns)} (set --text-columns)"
                )
    return requested


def check_label_column(label_column: str, splits: dict[str, Columns]) -> None:
    for split, columns in splits.items():
        if label_column not in columns:
            raise ValueError(
                f"label column {label_column!r} is not in the {split} data; its columns are "
                f"{list(columns)} (set --label-column)"
            )


def _is_number(value: Any) -> bool:
    if isinstance(value, bool):
        return False
    if isinstance(value, (int, float)):
        return math.isfinite(value)
    try:
        return math.isfinite(float(str(value).strip()))
    except ValueError:
        return False


def _is_integer_literal(value: Any) -> bool:
    if isinstance(value, bool):
        return True  # JSON true/false: two classes
    if isinstance(value, int):
        return True
    return isinstance(value, str) and bool(_INTEGER.match(value.strip()))


def infer_regression(labels: list[Any]) -> bool:
    """Float labels mean regression: every label is a number and at least one is written as a
    float (``3.2``, ``4.0``, ``1e-1``); integer labels and strings mean classification."""
    return all(_is_number(v) for v in labels) and not all(_is_integer_literal(v) for v in labels)


@dataclass(kw_only=True)
class LabelSpace:
    regression: bool
    names: list[str] = field(default_factory=list)
    """Class names in id order (classification), e.g. ``["0", "1"]`` or ``["neg", "pos"]``."""

    @property
    def num_labels(self) -> int:
        return 1 if self.regression else len(self.names)

    def encode(self, labels: list[Any], split: str, label_column: str) -> torch.Tensor:
        if self.regression:
            values = []
            for index, value in enumerate(labels):
                if not _is_number(value):
                    raise ValueError(
                        f"{split} example {index}: label {value!r} in column {label_column!r} "
                        "is not a number, and this is a regression task"
                    )
                values.append(float(str(value).strip()) if isinstance(value, str) else value)
            return torch.tensor(values, dtype=torch.float32)
        ids = {name: i for i, name in enumerate(self.names)}
        encoded = []
        for index, value in enumerate(labels):
            key = _label_key(value)
            if key not in ids:
                raise ValueError(
                    f"{split} example {index}: label {value!r} is not one of the training "
                    f"labels {self.names}"
                )
            encoded.append(ids[key])
        return torch.tensor(encoded, dtype=torch.long)


def _label_key(value: Any) -> str:
    if isinstance(value, bool):
        return str(int(value))
    if _is_integer_literal(value):
        return str(int(str(value).strip()))
    return str(value).strip()


def label_space(train_labels: list[Any], problem_type: str, num_labels: int | None) -> LabelSpace:
    """Classes seen in training (integer labels: ``0 .. max``), or a regression target.

    ``num_labels`` (a GLUE task's) fixes the class count: GLUE labels are already ``0 .. n-1``.
    """
    regression = (
        infer_regression(train_labels) if problem_type == "auto" else problem_type == "regression"
    )
    if regression or num_labels == 1:
        return LabelSpace(regression=True)
    if num_labels is not None:
        return LabelSpace(regression=False, names=[str(i) for i in range(num_labels)])
    keys = sorted({_label_key(v) for v in train_labels})
    if all(_is_integer_literal(v) for v in train_labels):
        values = sorted(int(k) for k in keys)
        if values[0] < 0:
            raise ValueError(
                f"integer labels must be class ids >= 0; found {values[0]} (GLUE test splits "
                "use -1 for 'no label': train on a split that has labels)"
            )
        names = [str(i) for i in range(values[-1] + 1)]
    else:
        names = keys
    if len(names) < 2:
        raise ValueError(
            f"the training labels hold a single class {names}; classification needs at least "
            "two (for a numeric target use --problem-type regression)"
        )
    return LabelSpace(regression=False, names=names)


# ---------------------------------------------------------------------------------- encoding


@dataclass(kw_only=True)
class EncodedSplit:
    """Token ids of one split (variable length, padded per batch) and its label tensor."""

    features: list[dict[str, list[int]]]
    labels: torch.Tensor
    texts: list[tuple[str, ...]]
    """The raw text(s) of every example (for checks of the saved tokenizer)."""

    def __len__(self) -> int:
        return len(self.features)


def _texts(columns: Columns, names: tuple[str, ...]) -> list[tuple[str, ...]]:
    return [
        tuple("" if v is None else str(v) for v in values)
        for values in zip(*(columns[n] for n in names))
    ]


def encode_split(
    tokenizer: Any,
    columns: Columns,
    text_columns: tuple[str, ...],
    labels: torch.Tensor,
    max_seq_len: int,
) -> EncodedSplit:
    texts = _texts(columns, text_columns)
    first = [t[0] for t in texts]
    second = [t[1] for t in texts] if len(text_columns) == 2 else None
    encoded = tokenizer(first, second, truncation=True, max_length=max_seq_len)
    keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in encoded]
    features = [{k: encoded[k][i] for k in keys} for i in range(len(first))]
    return EncodedSplit(features=features, labels=labels, texts=texts)


def collate(
    split: EncodedSplit, indices: list[int] | torch.Tensor, pad_token_id: int
) -> dict[str, torch.Tensor]:
    """A right-padded batch of ``split``'s examples at ``indices``, with ``labels``."""
    indices = [int(i) for i in indices]
    rows = [split.features[i] for i in indices]
    length = max(len(r["input_ids"]) for r in rows)
    batch: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        pad = pad_token_id if key == "input_ids" else 0
        batch[key] = torch.tensor(
            [r[key] + [pad] * (length - len(r[key])) for r in rows], dtype=torch.long
        )
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.tensor(
            [[1] * len(r["input_ids"]) + [0] * (length - len(r["input_ids"])) for r in rows]
        )
    batch["labels"] = split.labels[indices]
    return batch


# ------------------------------------------------------------------------------ the datasets


@dataclass(kw_only=True)
class RawData:
    """Both splits before tokenisation, with what was resolved about them."""

    train: Columns
    validation: Columns
    text_columns: tuple[str, ...]
    labels: LabelSpace
    train_labels: torch.Tensor
    validation_labels: torch.Tensor
    description: str


def _subsample(columns: Columns, limit: int) -> Columns:
    return columns if limit <= 0 else {k: v[:limit] for k, v in columns.items()}


def _holdout(columns: Columns, fraction: float, seed: int) -> tuple[Columns, Columns]:
    n = len(next(iter(columns.values())))
    n_eval = max(1, round(n * fraction))
    if n - n_eval < 1:
        raise ValueError(
            f"only {n} training examples: too few to hold out {fraction:.0%} for validation; "
            "pass --validation-file"
        )
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    train_idx, eval_idx = sorted(order[n_eval:]), sorted(order[:n_eval])
    return (
        {k: [v[i] for i in train_idx] for k, v in columns.items()},
        {k: [v[i] for i in eval_idx] for k, v in columns.items()},
    )


def load_raw_data(
    *,
    task: str | None,
    train_file: str | None,
    validation_file: str | None,
    validation_fraction: float,
    text_columns: tuple[str, ...] | None,
    label_column: str,
    problem_type: str,
    max_train_samples: int = 0,
    max_eval_samples: int = 0,
    seed: int = 0,
) -> RawData:
    """Read, check and label both splits (no tokenizer needed yet)."""
    spec = GLUE_TASKS.get(task) if task else None
    if train_file is None:
        if spec is None:
            raise ValueError(
                "no data: pass --train-file (and --validation-file), or a GLUE --task "
                f"({', '.join(GLUE_TASKS)}) to download it from the hub"
            )
        if validation_file is not None:
            raise ValueError(f"--validation-file {validation_file!r} needs --train-file too")
        train, validation = load_glue(task)
        label_column = "label"
        description = f"GLUE {task} ({GLUE_HUB_DATASET}, {spec.validation_split})"
    else:
        train = read_table(train_file)
        if validation_file is not None:
            validation = read_table(validation_file)
            description = f"{train_file} / {validation_file}"
        else:
            train, validation = _holdout(train, validation_fraction, seed)
            description = f"{train_file} ({validation_fraction:.0%} held out for validation)"
    train = _subsample(train, max_train_samples)
    validation = _subsample(validation, max_eval_samples)
    splits = {"train": train, "validation": validation}
    if text_columns is None and spec is not None:
        text_columns = spec.text_columns
    text_columns = resolve_text_columns(text_columns, splits)
    check_label_column(label_column, splits)
    if spec is not None and problem_type != "auto":
        wanted = "regression" if spec.num_labels == 1 else "classification"
        if problem_type != wanted:
            raise ValueError(f"--problem-type {problem_type}: GLUE {task} is a {wanted} task")
    labels = label_space(
        train[label_column], problem_type, spec.num_labels if spec is not None else None
    )
    return RawData(
        train=train,
        validation=validation,
        text_columns=text_columns,
        labels=labels,
        train_labels=labels.encode(train[label_column], "train", label_column),
        validation_labels=labels.encode(validation[label_column], "validation", label_column),
        description=description,
    )


def training_texts(raw: RawData) -> list[str]:
    """Every training text (both columns of a pair): what a built-in tokenizer learns from."""
    return [text for row in _texts(raw.train, raw.text_columns) for text in row]
