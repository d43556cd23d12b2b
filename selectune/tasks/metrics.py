"""GLUE's official metrics, computed with scikit-learn / scipy.

`evaluate.load("glue", ...)` fetches its scripts from the Hub and fails offline with a misleading
message, so the metrics are computed here. All values are percentages (GLUE's convention: F1 86.3,
not 0.863). A correlation that is undefined (constant predictions) is reported as None, not 0.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence

import numpy as np


def accuracy(preds: np.ndarray, labels: np.ndarray) -> float:
    return 100.0 * float(np.mean(preds == labels))


def f1(preds: np.ndarray, labels: np.ndarray) -> float:
    """Binary F1 of the positive class (label 1), as GLUE reports for MRPC and QQP."""
    from sklearn.metrics import f1_score

    return 100.0 * float(f1_score(labels, preds, pos_label=1, average="binary", zero_division=0.0))


def f1_macro(preds: np.ndarray, labels: np.ndarray) -> float:
    """F1 averaged over the classes (each weighs the same): for a custom task of more than two labels."""
    from sklearn.metrics import f1_score

    return 100.0 * float(f1_score(labels, preds, average="macro", zero_division=0.0))


def matthews(preds: np.ndarray, labels: np.ndarray) -> float:
    """Matthews correlation (CoLA). sklearn returns 0 when one side is constant."""
    from sklearn.metrics import matthews_corrcoef

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return 100.0 * float(matthews_corrcoef(labels, preds))


def _correlation(fn: Callable, preds: np.ndarray, labels: np.ndarray) -> float | None:
    if np.std(preds) == 0 or np.std(labels) == 0:
        return None
    value = float(fn(preds, labels)[0])
    return None if math.isnan(value) else 100.0 * value


def pearson(preds: np.ndarray, labels: np.ndarray) -> float | None:
    from scipy.stats import pearsonr

    return _correlation(pearsonr, preds, labels)


def spearman(preds: np.ndarray, labels: np.ndarray) -> float | None:
    from scipy.stats import spearmanr

    return _correlation(spearmanr, preds, labels)


METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float | None]] = {
    "accuracy": accuracy,
    "f1": f1,
    "f1_macro": f1_macro,
    "matthews": matthews,
    "pearson": pearson,
    "spearman": spearman,
}


def compute(names: Sequence[str], preds: np.ndarray, labels: np.ndarray) -> dict[str, float | None]:
    """Every named metric on one set of predictions (class ids, or scores for regression)."""
    return {name: METRICS[name](preds, labels) for name in names}
