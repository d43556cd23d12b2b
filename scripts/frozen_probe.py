"""The standard frozen-feature probe the analysis scripts hold selectune's linear probe against.

scikit-learn on features standardised on the training rows: LogisticRegression (lbfgs) for classes, Ridge
(alpha = 1/C) for a regression score; the inverse regularisation C chosen on a validation split from one grid.
text_probe.py (GLUE on the frozen MiniLM) and reference_probe.py (the DINOv2 image tasks) share it, so the
two references are the same estimator and the same rule for choosing C.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

C_GRID = [float(10.0 ** e) for e in np.arange(-4, 2.5, 0.5)]  # 1e-4 ... 1e2, half-decade steps


def fitted(x_train: np.ndarray, y_train: np.ndarray, c: float, regression: bool = False):
    """StandardScaler then the probe, fitted on (x_train, y_train): a scikit-learn pipeline."""
    from sklearn.linear_model import LogisticRegression, Ridge
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    head = Ridge(alpha=1.0 / c) if regression else LogisticRegression(C=c, max_iter=5000)
    return make_pipeline(StandardScaler(), head).fit(x_train, y_train)


def choose_c(val_scores: Mapping[float, float]) -> float:
    """The C with the best validation score; ties go to the stronger regularisation (the smaller C)."""
    return max(val_scores, key=lambda c: (val_scores[c], -c))
