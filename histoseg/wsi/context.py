"""The context task: lesions told apart from normal tissue only by their margin.

A lesion's interior renders exactly like the normal tissue around it (same stain field,
same nuclei, same noise), so no window that lies wholly inside a lesion, or wholly in
normal tissue, carries any evidence of which one it is. Only the margin marks a lesion:
a band of tumour-like stroma just inside the outline and a pale, nucleus-free capsule just
outside it. The two bands differ, so a window that holds any part of the margin also shows
which side is the lesion. How much of a lesion a model can label therefore depends on how
far its field of view reaches, which is what a patch-size benchmark needs to measure;
:mod:`histoseg.wsi.ceiling` turns this geometry into the best score a P x P patch allows.

The labelled tumour region is the outline (interior plus the inner band), written as
CAMELYON16 group ``_0``. Lesions lie inside the slide, centred on tissue, and never touch
each other; where one reaches past the tissue field it is tissue all the same (normal
texture inside, the capsule around it), so glass never borders a lesion's interior.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

#: Version of the context slides' geometry, recorded in a synthetic folder's manifest so
#: slides drawn by an older geometry are redrawn rather than reused.
CONTEXT_GENERATOR = "histoseg.wsi.context/2"
#: Width of each of the two margin bands (inner tumour band, outer capsule), level-0 px:
#: a band covers more than one cell of a stride-16 feature map.
MARGIN_BAND_PX = 24
#: Lesion radius as a share of the slide's short side. Wide enough that a 256 px patch
#: fits inside many lesions (so small patches cannot decide them), small enough that a
#: 1024 px patch never does, so no interior pixel is far from a margin a large patch shows.
LESION_RADIUS_SHARE = (0.06, 0.10)
#: Many lesions a slide, so tumour is not rare in any patch sampler or validation grid.
LESIONS_PER_SLIDE = (6, 12)  # drawn from [low, high)
#: Radial roughness of a lesion outline (relative amplitude of its low harmonics).
OUTLINE_ROUGHNESS = 0.10
#: Capsule stroma: pale fibrous tissue without nuclei, unlike any other texture.
CAPSULE_STROMA_LIGHT = np.array([250.0, 226.0, 236.0], dtype=np.float32)
CAPSULE_STROMA_DARK = np.array([238.0, 204.0, 220.0], dtype=np.float32)
PLACEMENT_TRIES = 400
#: Share of a lesion's radius, around its centre, that must lie on tissue.
TISSUE_CORE_SHARE = 0.7


@dataclass(frozen=True)
class Lesion:
    """One lesion as three nested polygons sharing one radial profile (level-0 x, y).

    ``inner`` lies ``MARGIN_BAND_PX`` inside ``outline`` and ``outer`` as far outside it:
    the inner band (outline minus inner) renders as tumour stroma, the capsule (outer
    minus outline) as pale stroma, everything inside ``inner`` as normal tissue.
    """

    outline: np.ndarray
    inner: np.ndarray
    outer: np.ndarray


def draw_lesions(
    rng: np.random.Generator,
    tissue_field: np.ndarray,
    width_px: int,
    height_px: int,
    coarse_cell_px: int,
) -> list[Lesion]:
    """Place 6-11 non-overlapping lesions centred on tissue (fewer if they do not fit).

    Args:
        rng: the slide's generator (the lesions are a pure function of its state).
        tissue_field: the design's coarse tissue field (tissue where > 0).
        width_px, height_px: level-0 slide size.
        coarse_cell_px: level-0 px between nodes of ``tissue_field``.
    """
    short_side = min(width_px, height_px)
    gy, gx = np.mgrid[0 : tissue_field.shape[0], 0 : tissue_field.shape[1]]
    node_x, node_y = gx * coarse_cell_px, gy * coarse_cell_px
    inside = np.argwhere(tissue_field > 0)
    wanted = int(rng.integers(*LESIONS_PER_SLIDE))
    lesions: list[Lesion] = []
    placed: list[tuple[float, float, float]] = []  # centre x, y and outer radius bound
    if len(inside) == 0:
        return lesions
    for _ in range(PLACEMENT_TRIES):
        if len(lesions) >= wanted:
            break
        radius = float(rng.uniform(*LESION_RADIUS_SHARE)) * short_side
        row, col = inside[rng.integers(len(inside))]
        cx, cy = float(col * coarse_cell_px), float(row * coarse_cell_px)
        theta, profile = _radial_profile(rng, radius)
        reach = float(profile.max()) + MARGIN_BAND_PX
        if cx - reach < 0 or cy - reach < 0 or cx + reach >= width_px or cy + reach >= height_px:
            continue
        if any(math.hypot(cx - x, cy - y) < reach + r + 2 * MARGIN_BAND_PX for x, y, r in placed):
            continue
        # Most of the lesion on tissue, so it reads as a lesion within tissue; where it
        # reaches glass the renderer makes it tissue (the capsule bounds it there too).
        near = np.hypot(node_x - cx, node_y - cy) <= TISSUE_CORE_SHARE * reach
        if not bool(np.all(tissue_field[near] > 0)):
            continue
        lesions.append(
            Lesion(
                outline=_polygon(cx, cy, theta, profile),
                inner=_polygon(cx, cy, theta, profile - MARGIN_BAND_PX),
                outer=_polygon(cx, cy, theta, profile + MARGIN_BAND_PX),
            )
        )
        placed.append((cx, cy, reach))
    return lesions


def _radial_profile(rng: np.random.Generator, radius: float) -> tuple[np.ndarray, np.ndarray]:
    """Vertex angles and radii of a smooth, star-shaped outline of mean radius ``radius``."""
    n_vertices = int(np.clip(radius / 4, 48, 400))
    theta = np.linspace(0, 2 * math.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for harmonic in range(2, 6):
        r += rng.uniform(0, OUTLINE_ROUGHNESS / harmonic) * np.cos(
            harmonic * theta + rng.uniform(0, 2 * math.pi)
        )
    # Radii stay well above the band width, so the inner polygon never folds over.
    return theta, np.maximum(radius * r, 4.0 * MARGIN_BAND_PX)


def _polygon(cx: float, cy: float, theta: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.round(np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1), 2)
