"""Pixel metrics against hand-computed values and brute-force references."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histoseg.errors import ConfigError
from histoseg.train.metrics import (
    PixelMetrics,
    accuracy_from_confusion,
    auc_exact,
    auc_from_histograms,
    auc_tie_bound,
    confusion_matrix,
    constant_background_metrics,
    iou_per_class,
    miou_from_confusion,
)


def brute_force_auc(labels, scores):
    """O(n^2) definition: P(positive scores above negative) + half the ties."""
    labels = np.asarray(labels, bool).ravel()
    scores = np.asarray(scores, float).ravel()
    pos, neg = scores[labels], scores[~labels]
    wins = (pos[:, None] > neg[None, :]).sum() + 0.5 * (pos[:, None] == neg[None, :]).sum()
    return wins / (len(pos) * len(neg))


def test_confusion_accuracy_and_iou_by_hand():
    masks = np.array([[0, 0, 1, 1], [0, 1, 1, 0]])
    preds = np.array([[0, 1, 1, 0], [0, 1, 1, 0]])
    cm = confusion_matrix(masks, preds)
    # truth 0: predicted 0 three times, 1 once; truth 1: predicted 1 three times, 0 once
    assert cm.tolist() == [[3, 1], [1, 3]]
    assert accuracy_from_confusion(cm) == pytest.approx(6 / 8)
    # IoU = TP / (TP + FP + FN) = 3 / 5 for both classes
    assert iou_per_class(cm).tolist() == pytest.approx([0.6, 0.6])
    assert miou_from_confusion(cm) == pytest.approx(0.6)


def test_miou_skips_a_class_absent_from_truth_and_prediction():
    cm = np.array([[10, 0], [0, 0]])
    assert math.isnan(iou_per_class(cm)[1])
    assert miou_from_confusion(cm) == 1.0


def test_constant_background_baseline():
    cm = np.array([[70, 10], [5, 15]])  # 80 background, 20 tumour pixels
    base = constant_background_metrics(cm)
    assert base["accuracy"] == pytest.approx(0.8)
    assert base["miou"] == pytest.approx(0.8 / 2)  # background IoU 0.8, tumour IoU 0
    assert base["auc"] == 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_exact_auc_matches_brute_force_with_ties(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(600) < 0.3
    scores = np.round(rng.normal(labels * 0.7, 1.0), 1)  # rounding makes many ties
    assert auc_exact(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_histogram_auc_is_exact_on_grid_scores_and_within_its_bound_otherwise():
    rng = np.random.default_rng(3)
    labels = rng.random(2000) < 0.4
    # scores on bin centres of a 100-bin grid: the histogram AUC must equal the exact one
    grid_scores = (rng.integers(0, 100, 2000) + 0.5) / 100
    m = PixelMetrics(num_bins=100)
    m.update(labels.reshape(2, 1000), grid_scores.reshape(2, 1000))
    assert m.result()["auc"] == pytest.approx(brute_force_auc(labels, grid_scores), abs=1e-12)
    # continuous scores: within the tie bound of the exact AUC
    scores = 1 / (1 + np.exp(-rng.normal(labels * 1.5, 1.0)))
    m = PixelMetrics(num_bins=64)
    m.update(labels.reshape(2, 1000), scores.reshape(2, 1000))
    exact = brute_force_auc(labels, scores)
    assert abs(m.result()["auc"] - exact) <= m.auc_error_bound + 1e-12
    assert m.auc_error_bound < 0.02
    fine = PixelMetrics()  # default 16384 bins
    fine.update(labels.reshape(2, 1000), scores.reshape(2, 1000))
    assert fine.result()["auc"] == pytest.approx(exact, abs=1e-3)


def test_auc_from_histograms_by_hand():
    # positives in bins 1 and 2, negatives in bins 0 and 1
    positive, negative = np.array([0, 1, 1]), np.array([1, 1, 0])
    # pairs: (b1 vs b0) win, (b1 vs b1) tie, (b2 vs b0) win, (b2 vs b1) win -> 3.5 / 4
    assert auc_from_histograms(positive, negative) == pytest.approx(3.5 / 4)
    assert auc_tie_bound(positive, negative) == pytest.approx(0.5 * 1 / 4)
    assert math.isnan(auc_from_histograms(np.array([0, 0]), np.array([1, 2])))


def test_streaming_equals_one_shot_and_merge_equals_whole():
    rng = np.random.default_rng(4)
    masks = (rng.random((6, 16, 16)) < 0.3).astype(np.uint8)
    probs = rng.random((6, 16, 16))
    whole = PixelMetrics()
    whole.update(masks, probs)
    a, b = PixelMetrics(), PixelMetrics()
    for i in range(3):
        a.update(masks[i : i + 1], probs[i : i + 1])
    b.update(masks[3:], probs[3:])
    merged = a.merge(b)
    assert merged.result() == pytest.approx(whole.result(), nan_ok=True)
    assert merged.result()["val_patches"] == 6
    restored = PixelMetrics()
    restored.load_state([s * 1 for s in whole.state()])
    assert restored.result() == pytest.approx(whole.result(), nan_ok=True)


def test_prediction_threshold_and_logits():
    masks = np.array([[[1, 0, 1, 0]]])
    logits = np.array([[[[0.0, 2.0], [2.0, 0.0], [0.0, 0.0], [1.0, -1.0]]]])
    m = PixelMetrics()
    m.update_from_logits(masks, logits)
    # pixel 2 is a tie (p = 0.5): argmax picks background, so do we
    assert m.confusion.tolist() == [[2, 0], [1, 1]]
    assert m.result()["val_patches"] == 1


def test_bad_inputs_raise_config_error():
    with pytest.raises(ConfigError):
        PixelMetrics(num_bins=1)
    with pytest.raises(ConfigError):
        PixelMetrics().update(np.zeros((1, 4, 4)), np.zeros((1, 4, 5)))
    with pytest.raises(ConfigError):
        confusion_matrix(np.array([0, 2]), np.array([0, 1]))
    with pytest.raises(ConfigError):
        PixelMetrics(10).merge(PixelMetrics(20))
