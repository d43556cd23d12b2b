"""scripts/frozen_probe.py: the reference probe text_probe.py and reference_probe.py hold selectune's against."""

from __future__ import annotations

import sys

import numpy as np

from conftest import REPO

sys.path.insert(0, str(REPO / "scripts"))
from frozen_probe import C_GRID, choose_c, fitted


def test_ties_on_val_go_to_the_stronger_regularisation():
    assert choose_c({1.0: 60.0, 0.1: 60.0, 10.0: 55.0}) == 0.1
    assert C_GRID[0] == 1e-4 and C_GRID[-1] == 100.0 and len(C_GRID) == 13


def test_features_are_standardised_on_the_training_rows_and_c_is_the_inverse_penalty():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 3)) * [1.0, 1000.0, 1e-3] + [0.0, 5000.0, 0.0]  # the label's feature is tiny
    y = (x[:, 2] > 0).astype(int)
    # unscaled, C=1 could not afford the ~1000x weight that feature needs; standardised, it is one unit
    assert (fitted(x, y, 1.0).predict(x) == y).mean() > 0.97
    score = 1000.0 * x[:, 2]
    strong, weak = fitted(x, score, 1e-4, regression=True), fitted(x, score, 100.0, regression=True)
    assert np.corrcoef(weak.predict(x), score)[0, 1] > 0.99  # Ridge, alpha = 1/C = 0.01: the line itself
    assert strong.predict(x).std() < 0.1 * score.std()  # alpha = 1e4 on 400 rows: shrunk to the mean
