"""The study's validation metrics over every pixel of a validation set, streamed and mergeable.

Pixel accuracy and mIoU come from a 2x2 confusion matrix; the ROC AUC of the tumour
probability comes from two histograms of that probability (tumour pixels, background
pixels) on a fine fixed grid. Both are sums, so per-batch, per-rank and per-slide states
merge by adding them, and the result is the same however the validation set was split
across ranks. Memory stays constant however many pixels are seen.

The histogram AUC is the Mann-Whitney statistic of the probabilities rounded down to the
grid (``num_bins`` bins over [0, 1]); it differs from the exact AUC only through pairs whose
two probabilities fall in the same bin, and :attr:`PixelMetrics.auc_error_bound` bounds that
difference from the histograms themselves.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from histoseg.errors import ConfigError

NUM_CLASSES = 2
DEFAULT_NUM_BINS = 1 << 14


def confusion_matrix(masks: Any, predictions: Any, num_classes: int = NUM_CLASSES) -> np.ndarray:
    """Counts ``[true class, predicted class]`` over all pixels (int64, num_classes^2)."""
    true = np.asarray(masks).astype(np.int64).ravel()
    pred = np.asarray(predictions).astype(np.int64).ravel()
    if true.shape != pred.shape:
        raise ConfigError(f"masks ({true.size} px) and predictions ({pred.size} px) differ")
    if true.size and (true.min() < 0 or true.max() >= num_classes):
        raise ConfigError(f"mask values must be in 0..{num_classes - 1}, got {true.max()}")
    counts = np.bincount(true * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def accuracy_from_confusion(confusion: np.ndarray) -> float:
    """Fraction of pixels predicted right (NaN when there are no pixels)."""
    total = float(np.sum(confusion))
    return float(np.trace(confusion)) / total if total else math.nan


def iou_per_class(confusion: np.ndarray) -> np.ndarray:
    """IoU of each class, TP / (TP + FP + FN); NaN for a class absent from truth and prediction."""
    confusion = np.asarray(confusion, dtype=np.float64)
    tp = np.diag(confusion)
    union = confusion.sum(axis=0) + confusion.sum(axis=1) - tp
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(union > 0, tp / np.where(union > 0, union, 1.0), np.nan)


def miou_from_confusion(confusion: np.ndarray) -> float:
    """Mean IoU over the classes present in the truth or the prediction (NaN if none)."""
    ious = iou_per_class(confusion)
    present = ious[~np.isnan(ious)]
    return float(present.mean()) if present.size else math.nan


def scores_from_confusion(confusion: np.ndarray) -> dict[str, float]:
    """accuracy, miou, iou_background and iou_tumour of a 2x2 confusion matrix."""
    ious = iou_per_class(confusion)
    return {
        "accuracy": accuracy_from_confusion(confusion),
        "miou": miou_from_confusion(confusion),
        "iou_background": float(ious[0]),
        "iou_tumour": float(ious[1]),
    }


def auc_from_histograms(positive: np.ndarray, negative: np.ndarray) -> float:
    """ROC AUC from score histograms on one shared grid of increasing bins.

    Mann-Whitney on the binned scores: a positive beats every negative in a lower bin and
    ties (counts half) with the negatives in its own bin. NaN when a class has no samples.
    """
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    negatives_below = np.cumsum(negative) - negative
    wins = np.sum(positive * (negatives_below + 0.5 * negative))
    return float(wins / (n_pos * n_neg))


def auc_tie_bound(positive: np.ndarray, negative: np.ndarray) -> float:
    """Largest possible |histogram AUC - exact AUC|: half the positive-negative pairs that share
    a bin (within a bin the exact order is unknown, and the histogram counts each as half)."""
    positive = np.asarray(positive, dtype=np.float64)
    negative = np.asarray(negative, dtype=np.float64)
    n_pos, n_neg = positive.sum(), negative.sum()
    if n_pos == 0 or n_neg == 0:
        return math.nan
    return float(0.5 * np.sum(positive * negative) / (n_pos * n_neg))


def auc_exact(labels: Any, scores: Any) -> float:
    """Exact ROC AUC by ranks (Mann-Whitney U, mid-ranks for ties): a sort of all n scores.

    For reference and tests; validation uses the constant-memory histogram form.
    """
    labels = np.asarray(labels).astype(bool).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return math.nan
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    # mid-ranks: every member of a run of equal scores gets the run's mean (1-based) rank
    new_run = np.concatenate([[True], np.diff(sorted_scores) != 0])
    run_id = np.cumsum(new_run) - 1
    starts = np.flatnonzero(new_run)
    ends = np.concatenate([starts[1:], [scores.size]])
    ranks = np.empty(scores.size, dtype=np.float64)
    ranks[order] = 0.5 * (starts + ends - 1)[run_id] + 1.0
    u = ranks[labels].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


class PixelMetrics:
    """Streaming pixel accuracy, mIoU and ROC AUC of the tumour probability (2 classes).

    Example:
        >>> m = PixelMetrics()
        >>> m.update(masks, tumour_probability)   # per batch, [B, H, W] each
        >>> m.reduce(engine)                      # sum the states of all ranks
        >>> m.result()["miou"]

    Args:
        num_bins: histogram bins over [0, 1] for the AUC (finer: smaller tie bound).
    """

    def __init__(self, num_bins: int = DEFAULT_NUM_BINS) -> None:
        if num_bins < 2:
            raise ConfigError(f"num_bins must be >= 2, got {num_bins}")
        self.num_bins = int(num_bins)
        self.confusion = np.zeros((NUM_CLASSES, NUM_CLASSES), dtype=np.int64)
        self.positive_hist = np.zeros(self.num_bins, dtype=np.int64)
        self.negative_hist = np.zeros(self.num_bins, dtype=np.int64)
        self.patches = 0

    def update(self, masks: Any, tumour_probability: Any, patches: int | None = None) -> None:
        """Add a batch: ``masks`` (0 background, 1 tumour) and P(tumour), same shape.

        A pixel is predicted tumour when P(tumour) > 0.5, i.e. the argmax of two classes
        (a tie goes to background, as argmax picks the first class). ``patches``: how many
        patches the batch adds (default: its batch size; the ranks that score other slabs
        of the same patches add 0, so that the sum over ranks counts each patch once).
        """
        masks = np.asarray(masks)
        prob = np.asarray(tumour_probability, dtype=np.float64)
        if masks.shape != prob.shape:
            raise ConfigError(f"masks {masks.shape} and probabilities {prob.shape} differ")
        truth = masks.astype(bool)
        self.confusion += confusion_matrix(truth, prob > 0.5)
        bins = np.clip((prob * self.num_bins).astype(np.int64), 0, self.num_bins - 1)
        self.positive_hist += np.bincount(bins[truth], minlength=self.num_bins)
        self.negative_hist += np.bincount(bins[~truth], minlength=self.num_bins)
        if patches is None:
            patches = masks.shape[0] if masks.ndim == 3 else 1
        self.patches += patches

    def update_from_logits(self, masks: Any, logits: Any) -> None:
        """Add a batch from model logits ``[B, H, W, 2]`` (softmax taken here)."""
        logits = np.asarray(logits, dtype=np.float64)
        # P(tumour) of a 2-class softmax is the sigmoid of the logit difference (stable form)
        diff = logits[..., 1] - logits[..., 0]
        self.update(masks, 0.5 * (1.0 + np.tanh(0.5 * diff)))

    def merge(self, other: PixelMetrics) -> PixelMetrics:
        """Add ``other``'s counts into this one (same ``num_bins``); returns self."""
        if other.num_bins != self.num_bins:
            raise ConfigError(f"cannot merge {other.num_bins} bins into {self.num_bins}")
        self.load_state([a + b for a, b in zip(self.state(), other.state(), strict=True)])
        return self

    def state(self) -> list[np.ndarray]:
        """The counts as float64 arrays (exact up to 2^53 pixels), for an allreduce."""
        return [
            self.confusion.astype(np.float64),
            self.positive_hist.astype(np.float64),
            self.negative_hist.astype(np.float64),
            np.array([self.patches], dtype=np.float64),
        ]

    def load_state(self, state: Sequence[Any]) -> None:
        """Replace the counts with ``state`` (as returned by :meth:`state`, possibly summed)."""
        confusion, positive, negative, patches = (np.asarray(s) for s in state)
        self.confusion = np.rint(confusion).astype(np.int64)
        self.positive_hist = np.rint(positive).astype(np.int64)
        self.negative_hist = np.rint(negative).astype(np.int64)
        self.patches = int(np.rint(patches[0]))

    def reduce(self, engine: Any) -> PixelMetrics:
        """Sum this state over all ranks of ``engine`` (every rank ends with the total)."""
        summed = engine.allreduce_sum(self.state())
        self.load_state([np.asarray(s) for s in summed])
        return self

    @property
    def pixels(self) -> int:
        return int(self.confusion.sum())

    @property
    def auc_error_bound(self) -> float:
        """Bound on |histogram AUC - exact AUC| for the pixels seen."""
        return auc_tie_bound(self.positive_hist, self.negative_hist)

    def at_threshold(self, threshold: float) -> dict[str, float]:
        """accuracy, miou, iou_background, iou_tumour had pixels been called tumour above
        ``threshold`` instead of 0.5, from the histograms: exact up to the pixels in the one
        bin (1/num_bins wide) that holds the threshold, which count as below it."""
        if not 0.0 <= threshold <= 1.0:
            raise ConfigError(f"threshold must be in [0, 1], got {threshold}")
        first_above = min(math.floor(threshold * self.num_bins) + 1, self.num_bins)
        tp = int(self.positive_hist[first_above:].sum())
        fp = int(self.negative_hist[first_above:].sum())
        fn = int(self.positive_hist.sum()) - tp
        tn = int(self.negative_hist.sum()) - fp
        return scores_from_confusion(np.array([[tn, fp], [fn, tp]], dtype=np.int64))

    def result(self) -> dict[str, float | int]:
        """accuracy, miou, iou_background, iou_tumour, auc, auc_error_bound, pixels, val_patches."""
        return {
            **scores_from_confusion(self.confusion),
            "auc": auc_from_histograms(self.positive_hist, self.negative_hist),
            "auc_error_bound": self.auc_error_bound,
            "tumour_fraction": float(self.confusion[1].sum() / self.pixels) if self.pixels else 0.0,
            "pixels": self.pixels,
            "val_patches": self.patches,
        }


def constant_background_metrics(confusion: np.ndarray) -> dict[str, float]:
    """The metrics a model scores by predicting background everywhere, on the same pixels.

    The baseline a trained model must beat: its accuracy is the background fraction and its
    mIoU half of that (tumour IoU 0) when tumour is present; its AUC is 0.5.
    """
    confusion = np.asarray(confusion)
    truth = confusion.sum(axis=1)
    constant = np.zeros_like(confusion)
    constant[:, 0] = truth
    return {
        "accuracy": accuracy_from_confusion(constant),
        "miou": miou_from_confusion(constant),
        "auc": 0.5,
    }
