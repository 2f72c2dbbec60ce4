"""Polygon scan conversion at sub-pixel correct scale, in memory bounded by the output.

A polygon edge crosses every pixel row it spans, so a zigzag of many tall edges has
edges x rows crossings: far more than the output has pixels. Crossings are therefore
handled in chunks of at most :data:`CROSSINGS_PER_CHUNK` and folded into a per-row parity
table the size of the output, so peak memory is a few times the output plus one chunk,
whatever the vertex count.

Pillow's ``ImageDraw.polygon`` would bound memory too, but it rounds vertices to whole
pixels and fills boundary pixels on both sides, so a 40 px square becomes 41 px and masks
at a level's downsample no longer line up with level 0.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Iterator, Sequence

import numpy as np

# Crossings computed at once; each costs about 60 bytes of scratch (int64 and float64
# arrays), so one chunk stays near 30 MiB.
CROSSINGS_PER_CHUNK = 1 << 19
# Rows of the parity table turned into mask rows at once (bounds the cumsum scratch).
ROWS_PER_BAND = 256


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
        rows = row_stop - row_first
        parity = np.zeros((rows, width + 1), dtype=np.uint8)
        flat = parity.reshape(-1)
        for cells in _crossing_cells(px, py - row_first, rows, width):
            # uint8 wraps at 256, which keeps the parity (all that is read below).
            np.add.at(flat, cells, 1)
        for band in range(0, rows, ROWS_PER_BAND):
            block = parity[band : band + ROWS_PER_BAND]
            inside = np.cumsum(block, axis=1, dtype=np.uint8)[:, :width] & 1
            out[row_first + band : row_first + band + len(block)] |= inside.astype(bool)
    return out


def _crossing_cells(
    px: np.ndarray, py: np.ndarray, height: int, width: int
) -> Iterator[np.ndarray]:
    """Flat (row * (width + 1) + column) cells where an edge crosses a row, chunk by chunk.

    A crossing of row i at x lands in column ceil(x) (clipped to 0..width), so an odd
    count of crossings left of pixel j's centre marks it inside. Rows are half-open per
    edge (y_lo <= i < y_hi) so a vertex shared by two edges counts once.
    """
    xa, ya = px, py
    xb, yb = np.roll(px, -1), np.roll(py, -1)
    row_first = np.clip(np.ceil(np.minimum(ya, yb)), 0, height).astype(np.int64)
    row_stop = np.clip(np.ceil(np.maximum(ya, yb)), 0, height).astype(np.int64)
    counts = np.maximum(row_stop - row_first, 0)
    slope = (xb - xa) / np.where(yb == ya, 1.0, yb - ya)
    ends = np.cumsum(counts)
    if len(ends) == 0 or ends[-1] == 0:
        return
    # Edge ranges [lo, hi) whose crossings add up to about one chunk (an edge is never
    # split, and one edge has at most `height` crossings).
    cuts = np.searchsorted(ends, np.arange(CROSSINGS_PER_CHUNK, ends[-1], CROSSINGS_PER_CHUNK))
    bounds = np.unique(np.concatenate([[0], cuts + 1, [len(counts)]]).clip(0, len(counts)))
    for lo, hi in itertools.pairwise(bounds):
        part = counts[lo:hi]
        total = int(part.sum())
        if total == 0:
            continue
        edge = np.repeat(np.arange(lo, hi), part)
        starts = np.cumsum(part) - part
        rows = row_first[edge] + (np.arange(total) - starts[edge - lo])
        x_cross = xa[edge] + (rows - ya[edge]) * slope[edge]
        cols = np.clip(np.ceil(x_cross), 0, width).astype(np.int64)
        yield rows * (width + 1) + cols
