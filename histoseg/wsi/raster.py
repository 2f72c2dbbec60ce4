"""Polygon scan conversion at sub-pixel correct scale, vectorised with numpy."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import numpy as np


def fill_polygons(
    polygons: Iterable[np.ndarray],
    region_level0_xywh: Sequence[float],
    downsample: float = 1.0,
    size_px: tuple[int, int] | None = None,
) -> np.ndarray:
    """Boolean mask of the pixels whose centres lie inside any of ``polygons``.

    Polygons are (N, 2) arrays of level-0 (x, y) vertices, filled with the even-odd rule
    each, then united. Output pixel (row i, column j) covers level-0
    [x0 + j * d, x0 + (j + 1) * d) x [y0 + i * d, ...) and is inside when its centre is,
    so masks at every level line up with the pixels OpenSlide returns for that level.

    Args:
        polygons: vertices in level-0 pixel coordinates.
        region_level0_xywh: (x0, y0, width, height) of the region in level-0 pixels.
        downsample: level-0 pixels per output pixel.
        size_px: (width, height) of the output; default ceil(region size / downsample).

    Returns:
        bool array of shape (height, width).
    """
    x0, y0, w0, h0 = (float(v) for v in region_level0_xywh)
    if size_px is None:
        width, height = math.ceil(w0 / downsample - 1e-9), math.ceil(h0 / downsample - 1e-9)
    else:
        width, height = (int(v) for v in size_px)
    width, height = max(width, 0), max(height, 0)
    out = np.zeros((height, width), dtype=bool)
    if width == 0 or height == 0:
        return out
    for polygon in polygons:
        poly = np.asarray(polygon, dtype=np.float64)
        if len(poly) < 3:
            continue
        # To output-pixel units where pixel j has its centre at j.
        px = (poly[:, 0] - x0) / downsample - 0.5
        py = (poly[:, 1] - y0) / downsample - 0.5
        row_first = max(0, math.ceil(py.min()))
        row_stop = min(height, math.ceil(py.max()))
        if px.max() < 0 or px.min() > width or row_first >= row_stop:
            continue
        # Work on the rows the polygon spans only: whole-slide masks stay cheap.
        parity = _crossing_parity(px, py - row_first, row_stop - row_first, width)
        out[row_first:row_stop] |= (
            np.cumsum(parity, axis=1, dtype=np.uint8)[:, :width] & 1
        ).astype(bool)
    return out


def _crossing_parity(px: np.ndarray, py: np.ndarray, height: int, width: int) -> np.ndarray:
    """(height, width + 1) uint8: 1 where an odd number of edges cross row i just left of j."""
    parity = np.zeros((height, width + 1), dtype=np.uint8)
    xa, ya = px, py
    xb, yb = np.roll(px, -1), np.roll(py, -1)
    y_lo = np.minimum(ya, yb)
    y_hi = np.maximum(ya, yb)
    # Rows i with y_lo <= i < y_hi (half-open, so shared vertices count once).
    row_first = np.clip(np.ceil(y_lo), 0, height).astype(np.int64)
    row_stop = np.clip(np.ceil(y_hi), 0, height).astype(np.int64)
    counts = np.maximum(row_stop - row_first, 0)
    total = int(counts.sum())
    if total == 0:
        return parity
    edge = np.repeat(np.arange(len(counts)), counts)
    starts = np.cumsum(counts) - counts
    rows = row_first[edge] + (np.arange(total) - starts[edge])
    slope = (xb - xa) / np.where(yb == ya, 1.0, yb - ya)
    x_cross = xa[edge] + (rows - ya[edge]) * slope[edge]
    cols = np.clip(np.ceil(x_cross), 0, width).astype(np.int64)
    cells, hits = np.unique(rows * (width + 1) + cols, return_counts=True)
    parity.ravel()[cells] = hits & 1
    return parity
