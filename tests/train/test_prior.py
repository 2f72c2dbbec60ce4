"""The prior correction (histoseg.train.prior) and metrics at another threshold."""

from __future__ import annotations

import math

import numpy as np
import pytest

from histoseg.train.metrics import PixelMetrics
from histoseg.train.prior import PriorCorrection, corrected_probability, tumour_share


def _posterior(x, prior, weight=1.0):
    """P(tumour | x) a weighted loss converges to, for N(+1, 1) tumour against N(-1, 1)."""
    tumour = weight * prior * np.exp(-0.5 * (x - 1) ** 2)
    background = (1 - prior) * np.exp(-0.5 * (x + 1) ** 2)
    return tumour / (tumour + background)


def test_correction_turns_the_training_posterior_into_the_slides_one():
    """Label shift: the posterior of a tumour-rich, weighted training set, corrected, is the
    posterior at the slides' prior (the model a run learns is the first, the one its
    validation slides need the second)."""
    x = np.linspace(-4, 4, 81)
    correction = PriorCorrection(tumour_weight=3.0, train_tumour_share=0.4, slide_tumour_share=0.03)
    learned = _posterior(x, 0.4, weight=3.0)
    assert np.allclose(corrected_probability(learned, correction.logit_shift), _posterior(x, 0.03))
    # and the threshold it moves: log-odds log 3 + logit 0.4 - logit 0.03 by hand
    assert correction.logit_shift == pytest.approx(math.log(3 * (0.4 / 0.6) / (0.03 / 0.97)))


def test_corrected_probability_keeps_certainty_and_order():
    p = np.array([0.0, 1e-9, 0.2, 0.5, 0.9, 1.0])
    q = corrected_probability(p, 2.0)
    assert q[0] == 0.0 and q[-1] == 1.0
    assert np.all(np.diff(q) > 0)  # a monotone map: the ROC AUC is unchanged
    assert q[3] == pytest.approx(1 / (1 + math.exp(2.0)))
    assert corrected_probability(0.3, 0.0) == pytest.approx(0.3)


def test_shares_at_zero_or_one_leave_only_the_loss_weight():
    assert PriorCorrection(2.0, 0.3, 0.0).logit_shift == pytest.approx(math.log(2.0))
    assert PriorCorrection(1.0, 1.0, 0.1).logit_shift == 0.0
    assert PriorCorrection(1.0, 0.5, 0.5).as_row()["logit_shift"] == 0.0


def test_tumour_share_is_the_mean_tumour_fraction():
    class Ref:
        def __init__(self, f):
            self.tumor_fraction = f

    assert tumour_share([Ref(0.0), Ref(0.5), Ref(1.0)]) == pytest.approx(0.5)
    assert tumour_share([]) == 0.0


def test_metrics_at_another_threshold_match_a_direct_count():
    rng = np.random.default_rng(0)
    masks = rng.integers(0, 2, (4, 32, 32))
    prob = np.clip(masks * 0.3 + rng.uniform(0, 0.7, masks.shape), 0, 1)
    metrics = PixelMetrics()
    metrics.update(masks, prob)
    for threshold in (0.5, 0.37, 0.81):
        direct = PixelMetrics()
        direct.update(masks, (prob > threshold).astype(float))  # 0/1 "probabilities"
        expected = direct.result()
        got = metrics.at_threshold(threshold)
        for key in ("accuracy", "miou", "iou_background", "iou_tumour"):
            # exact but for the pixels in the one bin that holds the threshold
            assert got[key] == pytest.approx(expected[key], abs=2e-3), (threshold, key)
    assert metrics.at_threshold(0.5)["miou"] == pytest.approx(metrics.result()["miou"], abs=2e-3)
    with pytest.raises(Exception, match="threshold"):
        metrics.at_threshold(1.5)
