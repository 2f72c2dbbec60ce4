"""Prior correction: the tumour probability a run's training implies for the slides it serves.

Two training choices raise the tumour odds a model learns above a slide's:

- the tumour-balanced sampler (``--tumor-ratio``) shows the model far more tumour pixels
  than the tissue of a slide holds, and
- ``--tumour-weight W`` counts each tumour pixel W times in the loss.

Under label shift (each class's pixels look the same in training and on the slides, only the
classes' shares differ; Saerens, Latinne & Decaestecker, Neural Computation 14(1), 2002),
the slides' posterior log-odds are the model's minus

    shift = log W + logit(training tumour share) - logit(slide tumour share).

Both shares come from the training slides only: the tumour share of the pixels of the
training patches, and that of the tissue grid of the same slides (the patches validation
and inference tile a slide into). Nothing is read from the validation slides. The correction
moves the 0.5 threshold and leaves the ranking of pixels (the ROC AUC) as it was.

A run applies it only when asked (``--prior-correction``): the model a short run learns is
not the calibrated posterior the argument assumes, and on the committed sweeps the
correction helps some points and costs others (docs/context-task.md). Every run records
both scorings.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class PriorCorrection:
    """What one run's training did to the tumour prior, and the logit shift that undoes it.

    Attributes:
        tumour_weight: the loss weight of tumour pixels.
        train_tumour_share: share of tumour among the pixels of the training patches.
        slide_tumour_share: share of tumour among the pixels of the training slides' tissue
            grid at the run's patch size (``min_tissue`` as validation uses).
    """

    tumour_weight: float = 1.0
    train_tumour_share: float = 0.0
    slide_tumour_share: float = 0.0

    @property
    def logit_shift(self) -> float:
        """What to subtract from the tumour-minus-background logit.

        The sampler's part needs both shares strictly between 0 and 1 (a slide set without
        tumour, or patches that are all tumour, leave only the loss weight's part).
        """
        shift = math.log(self.tumour_weight)
        shares = (self.train_tumour_share, self.slide_tumour_share)
        if all(0.0 < s < 1.0 for s in shares):
            shift += _logit(self.train_tumour_share) - _logit(self.slide_tumour_share)
        return shift

    def as_row(self) -> dict[str, float]:
        return {
            "tumour_weight": self.tumour_weight,
            "train_tumour_share": self.train_tumour_share,
            "slide_tumour_share": self.slide_tumour_share,
            "logit_shift": self.logit_shift,
        }


def corrected_probability(tumour_probability: Any, logit_shift: float) -> Any:
    """sigmoid(logit(p) - shift), written on p so it needs no logits (p may be 0 or 1)."""
    factor = math.exp(logit_shift)
    p = tumour_probability
    return p / (p + (1.0 - p) * factor)


def tumour_share(refs: Sequence[Any]) -> float:
    """Share of tumour among the pixels of equal-sized patches (their mean tumour fraction)."""
    return float(sum(r.tumor_fraction for r in refs) / len(refs)) if refs else 0.0


def _logit(p: float) -> float:
    return math.log(p / (1.0 - p))
