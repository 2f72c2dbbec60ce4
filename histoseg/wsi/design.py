"""A synthetic slide as an analytic description: tissue islands, tumour polygons and the
stain and nucleus fields they are painted with, drawn from a seed and nothing else. No pixel
is rendered here (:mod:`histoseg.wsi.render` does that, tile by tile)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from scipy import ndimage

from histoseg.errors import ConfigError
from histoseg.wsi.context import (
    Lesion,
    draw_lesions,
)

# Stain palette (RGB). Normal tissue: pink eosin stroma, small violet nuclei. Tumour: a
# bluer, darker stroma with large, crowded, darker nuclei, so a model has signal to learn.
BACKGROUND_RGB = np.array([243.0, 242.0, 244.0], dtype=np.float32)
NORMAL_STROMA_LIGHT = np.array([240.0, 196.0, 222.0], dtype=np.float32)
NORMAL_STROMA_DARK = np.array([218.0, 138.0, 182.0], dtype=np.float32)
NORMAL_NUCLEUS = np.array([96.0, 56.0, 146.0], dtype=np.float32)
TUMOR_STROMA_LIGHT = np.array([206.0, 160.0, 214.0], dtype=np.float32)
TUMOR_STROMA_DARK = np.array([168.0, 112.0, 180.0], dtype=np.float32)
TUMOR_NUCLEUS = np.array([62.0, 30.0, 112.0], dtype=np.float32)

COARSE_CELL_PX = 64  # level-0 px between nodes of the smooth tissue/stain fields
NOISE_BANK_SIZE = 4
TASKS = ("local", "context")
DEFAULT_TASK = "local"


@dataclass(frozen=True)
class NucleusLayer:
    """Nuclei on a jittered grid: one candidate nucleus per ``cell_px`` square."""

    cell_px: int
    radius_min_px: float
    radius_max_px: float
    presence: float
    salt: int


NORMAL_NUCLEI = NucleusLayer(cell_px=32, radius_min_px=3.0, radius_max_px=5.5, presence=0.8, salt=1)
TUMOR_NUCLEI = NucleusLayer(cell_px=16, radius_min_px=4.5, radius_max_px=7.0, presence=0.9, salt=2)


@dataclass
class SlideDesign:
    """Everything that defines one synthetic slide; rendering is a pure function of it."""

    width_px: int
    height_px: int
    seed: int
    tissue_field: np.ndarray  # coarse grid; tissue where > 0
    density_field: np.ndarray  # coarse grid in [0, 1]; stain intensity
    groups: dict[str, list[np.ndarray]] = field(default_factory=dict)  # ASAP group -> polygons
    # context task only: the lesions whose margins mark the tumour polygons of ``groups``
    lesions: list[Lesion] = field(default_factory=list)

    @property
    def tumor_polygons(self) -> list[np.ndarray]:
        return self.groups.get("_0", []) + self.groups.get("_1", [])

    @property
    def exclusion_polygons(self) -> list[np.ndarray]:
        return self.groups.get("_2", [])


# --- the analytic description --------------------------------------------------------
def check_task(task: str) -> str:
    """``task`` if it is one of :data:`TASKS`, else a ConfigError naming the choices."""
    if task not in TASKS:
        raise ConfigError(f"synthetic task {task!r} is not one of {', '.join(TASKS)}")
    return task


def make_design(
    width_px: int, height_px: int, seed: int, *, tumor: bool = True, task: str = DEFAULT_TASK
) -> SlideDesign:
    """Draw tissue islands, stain fields and tumour polygons for one slide.

    ``task`` picks how tumour is drawn: "local" (textured tumours, one with a normal island
    inside) or "context" (lesions marked only by their margin); tissue and stain fields
    are the same for both.
    """
    check_task(task)
    rng = np.random.default_rng(seed)
    grid_w = math.ceil(width_px / COARSE_CELL_PX) + 2
    grid_h = math.ceil(height_px / COARSE_CELL_PX) + 2
    gy, gx = np.mgrid[0:grid_h, 0:grid_w].astype(np.float32) * COARSE_CELL_PX
    short_side = min(width_px, height_px)

    islands = np.full((grid_h, grid_w), -1.0, dtype=np.float32)
    for _ in range(int(rng.integers(2, 5))):
        cx = rng.uniform(0.2, 0.8) * width_px
        cy = rng.uniform(0.2, 0.8) * height_px
        ax = rng.uniform(0.14, 0.30) * short_side
        ay = rng.uniform(0.10, 0.24) * short_side
        angle = rng.uniform(0, math.pi)
        u = (gx - cx) * math.cos(angle) + (gy - cy) * math.sin(angle)
        v = -(gx - cx) * math.sin(angle) + (gy - cy) * math.cos(angle)
        islands = np.maximum(islands, 1.0 - np.sqrt((u / ax) ** 2 + (v / ay) ** 2))
    sigma_cells = max(1.0, 0.04 * short_side / COARSE_CELL_PX)
    wobble = _smooth_noise(rng, (grid_h, grid_w), sigma_cells)
    holes = _smooth_noise(rng, (grid_h, grid_w), sigma_cells / 3)
    tissue = islands + 0.35 * wobble - 0.25 * np.clip(holes - 1.2, 0, None)
    # Keep a white margin along the border, as on a glass slide.
    margin = np.minimum.reduce([gx, gy, width_px - gx, height_px - gy]) / (0.08 * short_side)
    tissue = np.minimum(tissue, np.clip(margin, -1, 1) - 0.35).astype(np.float32)
    density = _smooth_noise(rng, (grid_h, grid_w), sigma_cells / 2)
    density = np.clip(0.5 + 0.25 * density, 0, 1).astype(np.float32)

    design = SlideDesign(width_px, height_px, seed, tissue, density)
    if tumor and task == "context":
        design.lesions = draw_lesions(rng, tissue, width_px, height_px, COARSE_CELL_PX)
        if design.lesions:
            design.groups = {"_0": [lesion.outline for lesion in design.lesions]}
    elif tumor:
        design.groups = _draw_tumors(rng, tissue, width_px, height_px)
    return design


def _smooth_noise(rng: np.random.Generator, shape: tuple[int, int], sigma: float) -> np.ndarray:
    noise = ndimage.gaussian_filter(rng.standard_normal(shape).astype(np.float32), sigma)
    return noise / max(float(noise.std()), 1e-6)


def _draw_tumors(
    rng: np.random.Generator, tissue: np.ndarray, width_px: int, height_px: int
) -> dict[str, list[np.ndarray]]:
    """One large tumour with an exclusion inside (`_0`, `_2`) and a few small ones (`_1`)."""
    short_side = min(width_px, height_px)
    deep = np.argwhere(tissue > 0.25 * float(tissue.max()))
    if len(deep) == 0:
        deep = np.argwhere(tissue > 0)
    if len(deep) == 0:
        return {}

    def centre() -> tuple[float, float]:
        gy, gx = deep[rng.integers(len(deep))]
        return float(gx * COARSE_CELL_PX), float(gy * COARSE_CELL_PX)

    large_r = rng.uniform(0.07, 0.10) * short_side
    lx, ly = centre()
    large = _star_polygon(rng, lx, ly, large_r)
    angle = rng.uniform(0, 2 * math.pi)
    ex, ey = lx + 0.3 * large_r * math.cos(angle), ly + 0.3 * large_r * math.sin(angle)
    exclusion = _star_polygon(rng, ex, ey, 0.22 * large_r, roughness=0.05)
    small = []
    for _ in range(int(rng.integers(2, 4))):
        sx, sy = centre()
        small.append(_star_polygon(rng, sx, sy, rng.uniform(0.010, 0.022) * short_side))
    groups = {"_0": [large], "_1": small, "_2": [exclusion]}
    return {
        name: [_clip_to_slide(p, width_px, height_px) for p in polys]
        for name, polys in groups.items()
    }


def _star_polygon(
    rng: np.random.Generator, cx: float, cy: float, radius: float, roughness: float = 0.12
) -> np.ndarray:
    n_vertices = int(np.clip(radius / 4, 24, 160))
    theta = np.linspace(0, 2 * math.pi, n_vertices, endpoint=False)
    r = np.ones_like(theta)
    for harmonic in range(2, 7):
        r += rng.uniform(0, roughness / harmonic**0.5) * np.cos(
            harmonic * theta + rng.uniform(0, 2 * math.pi)
        )
    r = radius * np.clip(r, 0.4, None)
    return np.round(np.stack([cx + r * np.cos(theta), cy + r * np.sin(theta)], axis=1), 2)


def _clip_to_slide(polygon: np.ndarray, width_px: int, height_px: int) -> np.ndarray:
    polygon = polygon.copy()
    polygon[:, 0] = np.clip(polygon[:, 0], 0, width_px - 1)
    polygon[:, 1] = np.clip(polygon[:, 1], 0, height_px - 1)
    return polygon


# --- tile rendering --------------------------------------------------------------------
