"""Every GLUE metric against values computed by hand."""

import math

import numpy as np
import pytest

from selectune.tasks import metrics


def test_accuracy():
    assert metrics.accuracy(np.array([1, 0, 1, 1]), np.array([1, 1, 1, 0])) == pytest.approx(50.0)


def test_f1_positive_class():
    # tp=2 (rows 0,2), fp=1 (row 3), fn=1 (row 1): P=2/3, R=2/3, F1=2/3
    assert metrics.f1(np.array([1, 0, 1, 1, 0]), np.array([1, 1, 1, 0, 0])) == pytest.approx(200 / 3)


def test_f1_no_positive_prediction_is_zero():
    assert metrics.f1(np.array([0, 0]), np.array([1, 0])) == 0.0


def test_matthews_by_hand():
    preds, labels = np.array([1, 1, 0, 0, 1, 0]), np.array([1, 0, 0, 0, 1, 1])
    tp, tn, fp, fn = 2, 2, 1, 1
    expected = (tp * tn - fp * fn) / math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    assert metrics.matthews(preds, labels) == pytest.approx(100 * expected)


def test_matthews_constant_prediction_is_zero():
    assert metrics.matthews(np.array([1, 1, 1]), np.array([1, 0, 1])) == 0.0


def test_pearson_by_hand():
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 1.0, 4.0, 3.0])
    xc, yc = x - x.mean(), y - y.mean()
    expected = (xc * yc).sum() / math.sqrt((xc**2).sum() * (yc**2).sum())  # 0.6
    assert metrics.pearson(x, y) == pytest.approx(100 * expected)
    assert expected == pytest.approx(0.6)


def test_spearman_by_hand():
    # ranks of x: 1 2 3 4; ranks of y: 3 1 4 2 -> d = -2 1 -1 2, sum d^2 = 10
    x, y = np.array([0.1, 0.5, 0.7, 2.0]), np.array([3.0, 1.0, 9.0, 2.0])
    expected = 1 - 6 * 10 / (4 * (16 - 1))
    assert metrics.spearman(x, y) == pytest.approx(100 * expected)


def test_correlation_of_constant_predictions_is_undefined():
    assert metrics.pearson(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None
    assert metrics.spearman(np.array([1.0, 1.0, 1.0]), np.array([1.0, 2.0, 3.0])) is None


def test_task_scoring_uses_argmax_or_scores():
    from selectune.tasks import Task
    from selectune.tasks.glue import GLUE

    mrpc = Task(GLUE["mrpc"], {}, 128)
    logits = np.array([[0.1, 0.9], [0.8, 0.2], [0.3, 0.7]])
    assert mrpc.score(logits, np.array([1, 0, 0])) == {"f1": pytest.approx(200 / 3), "accuracy": pytest.approx(200 / 3)}
    stsb = Task(GLUE["stsb"], {}, 128)
    scores = stsb.score(np.array([[1.0], [2.0], [3.0]]), np.array([1.0, 2.0, 3.0]))
    assert scores["pearson"] == pytest.approx(100.0) and scores["spearman"] == pytest.approx(100.0)
