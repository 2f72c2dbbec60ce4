"""What a finished probability map becomes: a pyramid, a coarse map, an overlay, a summary.

All of them read the map in row bands through :class:`~histoseg.infer.store.MapReader`,
so none holds more than a band of it (or a map coarse enough to be small).
"""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from histoseg.infer.store import MapReader
from histoseg.wsi.pyramid import write_pyramid_tiff

PYRAMID_TILE_PX = 512
OVERLAY_MAX_PX = 1024
TUMOUR_THRESHOLD = 0.5
SOFTWARE = "histoseg.infer"


def write_probability_pyramid(
    path: Path,
    reader: MapReader,
    size_px: tuple[int, int],
    cell_px0: float,
    mpp: float,
    *,
    progress: bool = True,
) -> Path:
    """Write the map at level-0 geometry as a single-channel deflate pyramid (0..255 = p).

    Args:
        path: the TIFF to write (whole or not at all: :func:`histoseg.files.atomic_output`).
        reader: the finished map.
        size_px: the slide's level-0 (width, height).
        cell_px0: level-0 px per map cell.
        mpp: the slide's micrometres per level-0 px.
    """
    cache: dict[int, np.ndarray] = {}
    lock = threading.Lock()
    t = PYRAMID_TILE_PX

    def band(row: int) -> tuple[np.ndarray, int]:
        first = math.floor(row * t / cell_px0)
        with lock:
            if row not in cache:
                last = math.floor(((row + 1) * t - 1) / cell_px0) + 1
                cache[row] = reader.rows(first, last)
                for old in [k for k in cache if k < row - 1]:
                    del cache[old]
            return cache[row], first

    def render(tx: int, ty: int) -> np.ndarray | None:
        rows, first = band(ty)
        ys = np.minimum(
            (np.arange(ty * t, (ty + 1) * t) // cell_px0).astype(np.int64) - first,
            rows.shape[0] - 1,
        )
        xs = np.minimum(
            (np.arange(tx * t, (tx + 1) * t) // cell_px0).astype(np.int64), reader.shape[1] - 1
        )
        if rows.shape[0] == 0:
            return None
        tile = rows[np.ix_(ys, xs)]
        if not tile.any():
            return None
        return np.clip(np.rint(tile * 255.0), 0, 255).astype(np.uint8)

    return write_pyramid_tiff(
        path,
        render,
        size_px,
        tile_px=t,
        mpp=mpp,
        background_rgb=(0,),
        threads=2,
        progress=progress,
        software=SOFTWARE,
        compression="deflate",
    )


@dataclass
class MapSummary:
    """One pass over the map: a coarse mean-pooled copy, its maximum and the tumour area."""

    coarse: np.ndarray  # float32, mean of ``factor x factor`` map cells
    factor: int
    tumour_cells: int
    max_probability: float


def summarise_map(reader: MapReader, factor: int) -> MapSummary:
    """Mean-pool the map by ``factor`` cells (reading ``factor`` rows at a time)."""
    height, width = reader.shape
    out_h, out_w = math.ceil(height / factor), math.ceil(width / factor)
    coarse = np.zeros((out_h, out_w), dtype=np.float32)
    tumour = 0
    top = 0.0
    for i in range(out_h):
        rows = reader.rows(i * factor, (i + 1) * factor)
        tumour += int((rows >= TUMOUR_THRESHOLD).sum())
        top = max(top, float(rows.max(initial=0.0)))
        pad_w = out_w * factor - width
        padded = np.pad(rows, ((0, 0), (0, pad_w)))
        sums = padded.reshape(rows.shape[0], out_w, factor).sum(axis=(0, 2))
        counts = np.full(out_w, rows.shape[0] * factor, dtype=np.float32)
        counts[-1] = rows.shape[0] * (factor - pad_w)
        coarse[i] = sums / counts
    return MapSummary(coarse, factor, tumour, top)


def write_overlay_png(path: Path, thumbnail_rgb: np.ndarray, coarse: np.ndarray) -> Path:
    """The heatmap (probability as colour and opacity) over the slide's thumbnail."""
    from matplotlib import colormaps
    from PIL import Image

    from histoseg.files import atomic_output

    h, w = thumbnail_rgb.shape[:2]
    heat = np.asarray(
        Image.fromarray(coarse.astype(np.float32), mode="F").resize(
            (w, h), Image.Resampling.BILINEAR
        )
    )
    heat = np.clip(heat, 0.0, 1.0)
    colour = colormaps["inferno"](heat)[..., :3] * 255.0
    alpha = (0.75 * heat)[..., None]
    blended = thumbnail_rgb.astype(np.float32) * (1 - alpha) + colour * alpha
    with atomic_output(path) as tmp:
        Image.fromarray(np.clip(blended, 0, 255).astype(np.uint8)).save(tmp, format="PNG")
    return path


def detections(summary: MapSummary, cell_px0: float, threshold: float = TUMOUR_THRESHOLD):
    """Lesion candidates in CAMELYON16's form: (probability, x, y), level-0 px.

    One per connected region (8-connected) of the coarse map at or above ``threshold``,
    at the region's most probable coarse cell, with that cell's probability.
    """
    from scipy import ndimage

    labels, count = ndimage.label(summary.coarse >= threshold, structure=np.ones((3, 3)))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    peaks = ndimage.maximum(summary.coarse, labels, index)
    where = ndimage.maximum_position(summary.coarse, labels, index)
    size_px0 = summary.factor * cell_px0
    found = [
        (float(p), float((x + 0.5) * size_px0), float((y + 0.5) * size_px0))
        for p, (y, x) in zip(peaks, where, strict=True)
    ]
    found.sort(key=lambda d: -d[0])
    return found
