"""GLUE metrics as pure functions of predictions and labels (no sklearn, no scipy).

Conventions follow sklearn / scipy, which GLUE's reference numbers were computed with:

- ``f1``: binary F1 of the positive class (label id 1); 0.0 when there are no true, predicted
  or actual positives (sklearn's ``zero_division=0``).
- ``matthews``: the multi-class Matthews correlation (Gorodkin's R_K, sklearn's
  ``matthews_corrcoef``); equal to the binary phi coefficient for two classes; 0.0 when
  undefined (a constant prediction or a constant truth).
- ``pearson`` / ``spearman``: product-moment correlation; Spearman's is Pearson's on average
  ranks (ties share the mean of the positions they occupy, scipy's ``rankdata("average")``).
  NaN when undefined (a constant input), as scipy returns.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

METRIC_NAMES = ("accuracy", "f1", "matthews", "pearson", "spearman")
CLASSIFICATION_METRICS = ("accuracy", "f1", "matthews")
REGRESSION_METRICS = ("pearson", "spearman")


def _pair(
    predictions: Sequence[float] | np.ndarray, labels: Sequence[float] | np.ndarray, dtype: type
) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(predictions, dtype=dtype).reshape(-1)
    true = np.asarray(labels, dtype=dtype).reshape(-1)
    if pred.shape != true.shape:
        raise ValueError(
            f"{pred.size} predictions but {true.size} labels; pass one prediction per label"
        )
    if pred.size == 0:
        raise ValueError("no predictions: a metric needs at least one example")
    return pred, true


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    pred, true = _pair(predictions, labels, np.int64)
    return float(np.mean(pred == true))


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """Binary F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)``."""
    pred, true = _pair(predictions, labels, np.int64)
    tp = int(np.sum((pred == positive) & (true == positive)))
    fp = int(np.sum((pred == positive) & (true != positive)))
    fn = int(np.sum((pred != positive) & (true == positive)))
    denominator = 2 * tp + fp + fn
    return 2.0 * tp / denominator if denominator else 0.0


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Multi-class Matthews correlation from the confusion matrix ``C`` (rows: truth)::

        (c·s - Σ_k p_k t_k) / sqrt((s² - Σ_k p_k²) (s² - Σ_k t_k²))

    with ``c`` correct predictions, ``s`` examples, ``p_k``/``t_k`` predicted/true counts of k.
    """
    pred, true = _pair(predictions, labels, np.int64)
    classes, encoded = np.unique(np.concatenate([true, pred]), return_inverse=True)
    k = classes.size
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (encoded[: true.size], encoded[true.size :]), 1.0)
    t_k, p_k = confusion.sum(axis=1), confusion.sum(axis=0)
    c, s = np.trace(confusion), confusion.sum()
    cov_pred_true = c * s - p_k @ t_k
    cov_pred = s * s - p_k @ p_k
    cov_true = s * s - t_k @ t_k
    if cov_pred == 0.0 or cov_true == 0.0:
        return 0.0
    return float(cov_pred_true / math.sqrt(cov_pred * cov_true))


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson's product-moment correlation (float64, centred first for accuracy)."""
    x, y = _pair(predictions, labels, np.float64)
    x, y = x - x.mean(), y - y.mean()
    denominator = math.sqrt(float(x @ x) * float(y @ y))
    if denominator == 0.0:
        return math.nan
    # Rounding can push |r| a hair past 1 for perfectly (anti-)correlated inputs.
    return float(np.clip((x @ y) / denominator, -1.0, 1.0))


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the positions they span."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    order = np.argsort(data, kind="stable")
    sorted_values = data[order]
    # A run of ties occupies positions [start, end); its members all get (start + 1 + end) / 2.
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], data.size]
    run_ranks = (starts + 1 + ends) / 2.0
    ranks = np.empty(data.size, dtype=np.float64)
    ranks[order] = np.repeat(run_ranks, ends - starts)
    return ranks


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman's rank correlation: Pearson's on tie-averaged ranks."""
    x, y = _pair(predictions, labels, np.float64)
    return pearson(average_ranks(x), average_ranks(y))


METRICS: dict[str, Callable[[Sequence, Sequence], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def parse_metric_names(text: str, regression: bool) -> tuple[str, ...]:
    """``"accuracy,f1"`` -> ``("accuracy", "f1")``, checked against the problem type."""
    names = tuple(dict.fromkeys(n.strip().lower() for n in text.split(",") if n.strip()))
    allowed = REGRESSION_METRICS if regression else CLASSIFICATION_METRICS
    for name in names:
        if name not in METRIC_NAMES:
            raise ValueError(
                f"--metric {name!r} is unknown; choose from {', '.join(METRIC_NAMES)} "
                "(comma-separated)"
            )
        if name not in allowed:
            kind = "regression" if regression else "classification"
            raise ValueError(
                f"--metric {name!r} does not apply to a {kind} task; use {', '.join(allowed)}"
            )
    if not names:
        raise ValueError(f"--metric {text!r} names no metric; e.g. --metric {allowed[0]}")
    return names


def default_metric_names(regression: bool, num_labels: int) -> tuple[str, ...]:
    """What a local dataset is scored with when ``--metric`` is not given."""
    if regression:
        return REGRESSION_METRICS
    if num_labels == 2:
        return ("accuracy", "f1", "matthews")
    return ("accuracy", "matthews")


def compute_metrics(
    names: Sequence[str], predictions: Sequence[float], labels: Sequence[float]
) -> dict[str, float]:
    """``{name: value}`` for each metric name, in order."""
    return {name: METRICS[name](predictions, labels) for name in names}
