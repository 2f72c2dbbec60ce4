"""Where the tissue is: a low-resolution mask (HSV saturation, Otsu) queried in level-0 px."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from histoseg.errors import SlideError
from histoseg.wsi.slide import Slide

DEFAULT_TISSUE_DOWNSAMPLE = 32.0  # ~8 um/px at 0.25 um/px: glands and islands, not cells
MIN_SATURATION = 0.07  # glass is nearly grey; never call it tissue, even on an empty slide
MAX_MASK_PX = 1 << 25


@dataclass(frozen=True)
class CoverageGrid:
    """A binary mask over the whole slide on a grid of ``downsample`` level-0 px per cell.

    Answers "what fraction of this level-0 rectangle is covered" exactly for the
    piecewise-constant mask (area-weighted, sub-cell precise) through a summed-area table,
    for one rectangle or thousands at once.
    """

    mask: np.ndarray  # bool (rows, cols)
    downsample: float

    def __post_init__(self) -> None:
        table = np.zeros((self.mask.shape[0] + 1, self.mask.shape[1] + 1), dtype=np.float64)
        np.cumsum(np.cumsum(self.mask, axis=0, dtype=np.float64), axis=1, out=table[1:, 1:])
        object.__setattr__(self, "_table", table)

    def fraction(self, x: float, y: float, width: float, height: float) -> float:
        """Covered fraction of the level-0 rectangle (x, y, width, height)."""
        return float(self.fractions(np.array([x]), np.array([y]), width, height)[0])

    def fractions(self, xs: np.ndarray, ys: np.ndarray, width: float, height: float) -> np.ndarray:
        """Covered fraction of rectangles with top-left corners (xs, ys), level-0 px."""
        d = self.downsample
        u0, u1 = np.asarray(xs, float) / d, (np.asarray(xs, float) + width) / d
        v0, v1 = np.asarray(ys, float) / d, (np.asarray(ys, float) + height) / d
        covered = (
            self._integral(u1, v1) - self._integral(u0, v1) - self._integral(u1, v0)
        ) + self._integral(u0, v0)
        area = (width / d) * (height / d)
        return np.clip(covered / area, 0.0, 1.0)

    def _integral(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        """Mask integral over [0, u) x [0, v), bilinear between table nodes (exact here)."""
        table = self._table
        rows, cols = self.mask.shape
        u = np.clip(u, 0, cols)
        v = np.clip(v, 0, rows)
        c0 = np.minimum(np.floor(u).astype(np.int64), cols - 1)
        r0 = np.minimum(np.floor(v).astype(np.int64), rows - 1)
        fu, fv = u - c0, v - r0
        top = table[r0, c0] * (1 - fu) + table[r0, c0 + 1] * fu
        bottom = table[r0 + 1, c0] * (1 - fu) + table[r0 + 1, c0 + 1] * fu
        return top * (1 - fv) + bottom * fv

    @property
    def covered_fraction(self) -> float:
        return float(self.mask.mean()) if self.mask.size else 0.0


def otsu_threshold(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1]."""
    hist, edges = np.histogram(values, bins=bins, range=(0.0, 1.0))
    hist = hist.astype(np.float64)
    total = hist.sum()
    if total == 0:
        return 1.0
    centres = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = total - weight_low
    mean_low = np.cumsum(hist * centres) / np.maximum(weight_low, 1)
    mean_high = (np.sum(hist * centres) - np.cumsum(hist * centres)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(edges[int(np.argmax(between)) + 1])


def saturation(rgb: np.ndarray) -> np.ndarray:
    """HSV saturation in [0, 1] of a uint8 RGB image."""
    rgb = rgb.astype(np.float32)
    high = rgb.max(axis=-1)
    low = rgb.min(axis=-1)
    return np.where(high > 0, (high - low) / np.maximum(high, 1), 0.0)


def detect_tissue(
    slide: Slide,
    target_downsample: float = DEFAULT_TISSUE_DOWNSAMPLE,
    *,
    min_saturation: float = MIN_SATURATION,
    opening_px: int = 1,
    closing_px: int = 2,
) -> CoverageGrid:
    """Tissue mask of a slide from the pyramid level nearest ``target_downsample``.

    Tissue is stained, glass is grey: threshold the HSV saturation with Otsu (never below
    ``min_saturation``), then open (drop dust) and close (bridge thin gaps).
    """
    level = slide.best_level_for_downsample(target_downsample)
    width, height = slide.level_dimensions[level]
    if width * height > MAX_MASK_PX:
        raise SlideError(
            f"{slide.path}: smallest usable level is {width}x{height} px; tissue detection "
            f"needs a pyramid level under {MAX_MASK_PX} px (write a pyramid)"
        )
    sat = saturation(slide.read_level(level))
    threshold = max(otsu_threshold(sat), min_saturation)
    mask = sat > threshold
    if opening_px:
        mask = ndimage.binary_opening(mask, iterations=opening_px)
    if closing_px:
        mask = ndimage.binary_closing(mask, iterations=closing_px, border_value=0)
    return CoverageGrid(mask, slide.level_downsamples[level])


def annotation_grid(annotations, dimensions: Sequence[int], downsample: float) -> CoverageGrid:
    """Tumour coverage of a whole slide on a grid of ``downsample`` level-0 px per cell."""
    width0, height0 = dimensions
    # Keep the grid affordable on gigapixel slides.
    downsample = max(downsample, math.sqrt(width0 * height0 / MAX_MASK_PX), 1.0)
    size = (math.ceil(width0 / downsample), math.ceil(height0 / downsample))
    mask = annotations.rasterize(
        (0, 0, size[0] * downsample, size[1] * downsample), downsample, size_px=size
    )
    return CoverageGrid(mask > 0, downsample)
