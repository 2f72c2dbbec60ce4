"""CAMELYON16's slide AUC and lesion FROC on cases small enough to work out by hand."""

from __future__ import annotations

import numpy as np
import pytest

from histoseg.infer import camelyon_metrics as cm


def test_slide_auc_counts_pairs_and_half_ties():
    # tumour scores 0.9, 0.4; normal 0.5, 0.4: pairs (0.9>0.5), (0.9>0.4), (0.4<0.5), tie
    assert cm.slide_auc([1, 1, 0, 0], [0.9, 0.4, 0.5, 0.4]) == pytest.approx(2.5 / 4)


def test_growth_merges_lesions_closer_than_75_um_and_fills_holes():
    tumour = np.zeros((40, 40), bool)
    tumour[5, 5] = tumour[5, 8] = True  # 3 cells apart at 8 um a cell: 24 um apart
    tumour[30, 30] = True  # far away
    labels = cm.evaluation_mask(tumour, 8.0)
    assert labels.max() == 2 and labels[5, 6] == labels[5, 5]


def test_isolated_tumour_cells_are_lesions_under_275_um():
    labels = np.zeros((60, 60), np.int32)
    labels[2:4, 2:6] = 1  # 4 cells long at 10 um a cell: ~ 40 um
    labels[20, 5:50] = 2  # 45 cells long: ~ 450 um
    assert cm.itc_labels(labels, 10.0) == {1}


def test_detections_split_into_hits_false_positives_and_ignored_itc():
    labels = np.zeros((10, 10), np.int32)
    labels[0:2, 0:2] = 1
    labels[5:7, 5:7] = 2  # an ITC
    labels[8:10, 0:2] = 3  # never hit
    # (probability, x, y) in level-0 px; 32 px a cell: (10, 10) and (40, 40) are in lesion 1,
    # (180, 180) in the ITC, (300, 20) in no lesion
    detections = [(0.9, 10, 10), (0.6, 40, 40), (0.3, 180, 180), (0.7, 300, 20), (0.5, 5, 5)]
    scored = cm.score_detections(detections, labels, cell_px0=32, itc={2})
    assert scored.lesions == 2
    assert scored.lesion_probs == [0.9, 0.0]  # lesion 1 at its best hit, lesion 3 missed
    assert scored.false_positive_probs == [0.7]  # 0.3 fell on the ITC: neither TP nor FP


def test_froc_by_hand():
    # two slides, three lesions; thresholds start at the second-smallest probability
    a = cm.SlideLesions(false_positive_probs=[0.2, 0.6], lesion_probs=[0.9, 0.0], lesions=2)
    b = cm.SlideLesions(false_positive_probs=[0.4], lesion_probs=[0.5], lesions=1)
    fps, sensitivity = cm.froc_curve([a, b])
    # thresholds 0.2, 0.4, 0.5, 0.6, 0.9 (0.0 dropped), then the closing (0, 0)
    np.testing.assert_allclose(fps, [1.5, 1.0, 0.5, 0.5, 0.0, 0.0])
    np.testing.assert_allclose(sensitivity, [2 / 3, 2 / 3, 2 / 3, 1 / 3, 1 / 3, 0.0])
    score, at = cm.froc_score([a, b])
    # FP 0.25 -> between (0, 1/3) and (0.5, 2/3) after sorting: 1/3 (np.interp keeps the
    # last of equal x), 0.5 -> 2/3, 1, 2, 4, 8 -> 2/3
    assert at[1:] == pytest.approx([2 / 3] * 5)
    assert score == pytest.approx(np.mean(at))


def test_a_normal_slide_makes_every_detection_a_false_positive():
    scored = cm.score_detections([(0.8, 1, 1), (0.1, 2, 2)], None)
    assert scored.false_positive_probs == [0.8, 0.1] and scored.lesions == 0
