"""CAMELYON16's slide- and lesion-level metrics, from the challenge's published definitions.

Slide level: ROC AUC of one score per slide, tumour slides against normal ones.
Lesion level (FROC): each submitted detection is a (probability, x, y) point in level-0
px. The reference is the *evaluation mask*: the tumour mask at level 5 (32 level-0 px a
cell), every tumour grown by 75 um / 2 (the distance of about five tumour cells), holes
filled, and 8-connected regions labelled as lesions. A lesion whose major axis is under
275 um (200 um, plus the 75 um of growth) holds only isolated tumour cells (ITC): a
detection inside it is neither a true nor a false positive, and it is not counted among the
lesions to find. A detection outside every lesion is a false positive; a lesion is found at
the highest probability of the detections inside it. The FROC score is the mean
sensitivity at 1/4, 1/2, 1, 2, 4 and 8 average false positives per slide, read off the
curve by linear interpolation, as the challenge's ``Evaluation_FROC.py`` does (including
its habit of starting the thresholds from the second-smallest probability).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from histoseg.train.metrics import auc_exact

EVALUATION_CELL_PX0 = 32  # level 5
GROWTH_UM = 75.0
ITC_MAJOR_AXIS_UM = 275.0
FP_RATES = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)


def slide_auc(is_tumour: Sequence[bool], scores: Sequence[float]) -> float:
    """ROC AUC of slide scores (ties count half); NaN without both kinds of slide."""
    return auc_exact(np.asarray(is_tumour, dtype=bool), np.asarray(scores, dtype=np.float64))


def evaluation_mask(tumour: np.ndarray, cell_um: float) -> np.ndarray:
    """Labelled lesions (int32, 0 = none) from a boolean tumour mask of ``cell_um`` cells.

    Example:
        >>> m = np.zeros((20, 20), bool); m[2, 2] = m[2, 5] = True
        >>> int(evaluation_mask(m, 10.0).max())  # 3.75 cells of growth merges the two
        1
    """
    if not tumour.any():
        return np.zeros(tumour.shape, dtype=np.int32)
    distance = ndimage.distance_transform_edt(~tumour)
    grown = distance < GROWTH_UM / (2 * cell_um)
    filled = ndimage.binary_fill_holes(grown)
    labels, _ = ndimage.label(filled, structure=np.ones((3, 3)))
    return labels.astype(np.int32)


def major_axis_length(region: np.ndarray) -> float:
    """Major axis, in cells, of the ellipse with the region's second moments (as skimage's
    ``regionprops``: four times the root of the largest eigenvalue of the covariance)."""
    ys, xs = np.nonzero(region)
    if ys.size == 0:
        return 0.0
    coords = np.stack([ys, xs]).astype(np.float64)
    cov = np.cov(coords, bias=True) if ys.size > 1 else np.zeros((2, 2))
    return float(4.0 * np.sqrt(max(np.linalg.eigvalsh(cov)[-1], 0.0)))


def itc_labels(labels: np.ndarray, cell_um: float) -> set[int]:
    """Lesions made only of isolated tumour cells: major axis under 275 um."""
    threshold_cells = ITC_MAJOR_AXIS_UM / cell_um
    return {
        i
        for i in range(1, int(labels.max()) + 1)
        if major_axis_length(labels == i) < threshold_cells
    }


@dataclass
class SlideLesions:
    """One slide's detections scored against its evaluation mask."""

    false_positive_probs: list[float] = field(default_factory=list)
    lesion_probs: list[float] = field(default_factory=list)  # 0 for a lesion never hit
    lesions: int = 0  # lesions to find (ITC excluded)


def score_detections(
    detections: Sequence[Sequence[float]],
    labels: np.ndarray | None,
    cell_px0: float = EVALUATION_CELL_PX0,
    itc: set[int] | None = None,
) -> SlideLesions:
    """Split (probability, x, y) detections into false positives and per-lesion hits.

    ``labels`` is the slide's evaluation mask (None or all zero for a normal slide).
    """
    out = SlideLesions()
    if labels is None or not labels.any():
        out.false_positive_probs = [float(d[0]) for d in detections]
        return out
    itc = itc or set()
    count = int(labels.max())
    hits = np.zeros(count, dtype=np.float64)
    for probability, x, y in detections:
        row = min(int(y // cell_px0), labels.shape[0] - 1)
        col = min(int(x // cell_px0), labels.shape[1] - 1)
        label = int(labels[row, col])
        if label == 0:
            out.false_positive_probs.append(float(probability))
        elif label not in itc:
            hits[label - 1] = max(hits[label - 1], float(probability))
    out.lesion_probs = [float(hits[i - 1]) for i in range(1, count + 1) if i not in itc]
    out.lesions = count - len(itc)
    return out


def froc_curve(slides: Sequence[SlideLesions]) -> tuple[np.ndarray, np.ndarray]:
    """(average false positives per slide, sensitivity) at every probability threshold."""
    fps = np.array([p for s in slides for p in s.false_positive_probs], dtype=np.float64)
    tps = np.array([p for s in slides for p in s.lesion_probs], dtype=np.float64)
    lesions = sum(s.lesions for s in slides)
    thresholds = np.unique(np.concatenate([fps, tps]))[1:]
    total_fp = [int((fps >= t).sum()) for t in thresholds] + [0]
    total_tp = [int((tps >= t).sum()) for t in thresholds] + [0]
    per_slide = np.asarray(total_fp, dtype=np.float64) / max(len(slides), 1)
    sensitivity = (
        np.asarray(total_tp, dtype=np.float64) / lesions if lesions else np.zeros(len(total_tp))
    )
    return per_slide, sensitivity


def froc_score(slides: Sequence[SlideLesions]) -> tuple[float, list[float]]:
    """CAMELYON16's FROC score and the sensitivities at :data:`FP_RATES` it averages."""
    per_slide, sensitivity = froc_curve(slides)
    at_rates = np.interp(FP_RATES, per_slide[::-1], sensitivity[::-1])
    return float(np.mean(at_rates)), [float(v) for v in at_rates]
