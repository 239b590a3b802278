"""GLUE metrics: a thin mapping from metric name to scikit-learn / scipy, which GLUE's reference
numbers were computed with.

- ``accuracy``: ``sklearn.metrics.accuracy_score``.
- ``f1``: F1 of the positive class (label id 1), ``sklearn.metrics.f1_score``; 0.0 when there
  are no true, predicted or actual positives (``zero_division=0``).
- ``matthews``: ``sklearn.metrics.matthews_corrcoef`` (multi-class R_K; the phi coefficient for
  two classes); 0.0 when undefined (a constant prediction or a constant truth).
- ``pearson`` / ``spearman``: ``scipy.stats.pearsonr`` / ``spearmanr`` (average ranks for ties);
  NaN when undefined (a constant input, fewer than two examples).

Undefined cases return those values without the libraries' warnings: an evaluation on a tiny or
degenerate split is reported in the metrics, not as a warning on every evaluation.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np
from scipy import stats
from sklearn import metrics as sk_metrics

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


def _quietly(metric: Callable[..., float], *args: object, **kwargs: object) -> float:
    # sklearn's UndefinedMetricWarning and scipy's ConstantInputWarning announce the 0.0 / NaN
    # that the module docstring promises; the caller gets the value, not the warning.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return float(metric(*args, **kwargs))


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of predictions equal to their label."""
    pred, true = _pair(predictions, labels, np.int64)
    return float(sk_metrics.accuracy_score(true, pred))


def f1_binary(predictions: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of class ``positive``: ``2 TP / (2 TP + FP + FN)``, 0.0 when that is 0 / 0."""
    pred, true = _pair(predictions, labels, np.int64)
    # labels=[positive] with micro averaging is the one-class F1 whatever other label ids occur;
    # average="binary" would refuse labels with more than two classes, or without `positive`.
    return _quietly(
        sk_metrics.f1_score, true, pred, labels=[positive], average="micro", zero_division=0
    )


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Multi-class Matthews correlation; 0.0 for a constant prediction or truth."""
    pred, true = _pair(predictions, labels, np.int64)
    value = _quietly(sk_metrics.matthews_corrcoef, true, pred)
    # Older sklearn returned NaN instead of 0.0 for a constant prediction or truth.
    return 0.0 if math.isnan(value) else value


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson's product-moment correlation; NaN for a constant input."""
    x, y = _pair(predictions, labels, np.float64)
    if x.size < 2:  # scipy refuses one example; the correlation is undefined, as for constants
        return math.nan
    value = _quietly(lambda a, b: stats.pearsonr(a, b).statistic, x, y)
    # pearsonr normalises before its dot product, which leaves an exact linear relation a few
    # ulps short of +-1 (0.9999999999999998); 15 decimals restore 1.0 and change no real digit.
    return value if math.isnan(value) else round(value, 15)


def average_ranks(values: Sequence[float] | np.ndarray) -> np.ndarray:
    """1-based ranks; tied values all get the mean of the positions they span."""
    data = np.asarray(values, dtype=np.float64).reshape(-1)
    return stats.rankdata(data, method="average").astype(np.float64)


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on tie-averaged ranks); NaN for a constant input."""
    x, y = _pair(predictions, labels, np.float64)
    if x.size < 2:
        return math.nan
    return _quietly(lambda a, b: stats.spearmanr(a, b).statistic, x, y)


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
