"""Synthetic whole-slide images: the embedded default data of histoseg.

A slide is an analytic description (tissue islands, tumour polygons, stain fields) that is
evaluated tile by tile with vectorised numpy, so a gigapixel level 0 is never in memory.
Two tasks share the tissue and stain model: ``local``, whose tumour has its own texture
everywhere, and ``context`` (:mod:`histoseg.wsi.context`), whose lesions look like normal
tissue inside and are marked only by their margin.
:mod:`histoseg.wsi.pyramid` streams the tiles into a pyramidal TIFF OpenSlide reads, and
the tumour polygons are written as ASAP XML with CAMELYON16 group names.

Example:
    python -m histoseg.wsi.synth --out data/synthetic --slides 6 --size 20000x16000
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage

from histoseg.cli import run_main
from histoseg.errors import ConfigError, SlideError
from histoseg.wsi.annotations import write_asap_xml
from histoseg.wsi.context import (
    CAPSULE_STROMA_DARK,
    CAPSULE_STROMA_LIGHT,
    CONTEXT_GENERATOR,
    Lesion,
    draw_lesions,
)
from histoseg.wsi.pyramid import write_pyramid_tiff
from histoseg.wsi.raster import fill_polygons
from histoseg.wsi.slide import open_slide

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
def _hash_uniform(*keys: np.ndarray | int, count: int) -> list[np.ndarray]:
    """``count`` independent uniforms in [0, 1) per element, a pure function of the keys."""
    with np.errstate(over="ignore"):
        h = np.uint64(0x9E3779B97F4A7C15)
        for key in keys:
            h = _splitmix64(h ^ np.asarray(key).astype(np.uint64))
        out = []
        for _ in range(count):
            h = _splitmix64(h)
            out.append((h >> np.uint64(40)).astype(np.float32) / np.float32(1 << 24))
    return out


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def _interp_matrix(origin_px: int, n_px: int) -> tuple[np.ndarray, int, int]:
    """Bilinear weights from coarse-grid nodes to pixel centres along one axis."""
    u = (origin_px + np.arange(n_px) + 0.5) / COARSE_CELL_PX
    g0 = np.floor(u).astype(np.int64)
    frac = (u - g0).astype(np.float32)
    first, last = int(g0[0]), int(g0[-1]) + 1
    weights = np.zeros((n_px, last - first + 1), dtype=np.float32)
    rows = np.arange(n_px)
    weights[rows, g0 - first] = 1 - frac
    weights[rows, g0 - first + 1] = frac
    return weights, first, last + 1


class TileRenderer:
    """Renders RGB level-0 tiles of a :class:`SlideDesign`; thread-safe."""

    def __init__(self, design: SlideDesign, tile_px: int):
        for layer in (NORMAL_NUCLEI, TUMOR_NUCLEI):
            if tile_px % layer.cell_px:
                raise ConfigError(f"tile_px must be a multiple of {layer.cell_px}, got {tile_px}")
        self.design = design
        self.tile_px = tile_px
        rng = np.random.default_rng([design.seed, 7])
        self._noise = rng.standard_normal((NOISE_BANK_SIZE, tile_px, tile_px)).astype(np.float32)
        # The last tiles run past the slide edge: extend the coarse fields to cover them.
        need_w = math.ceil(design.width_px / tile_px) * tile_px // COARSE_CELL_PX + 2
        need_h = math.ceil(design.height_px / tile_px) * tile_px // COARSE_CELL_PX + 2
        pad = (
            (0, max(0, need_h - design.tissue_field.shape[0])),
            (0, max(0, need_w - design.tissue_field.shape[1])),
        )
        self._tissue_field = np.pad(design.tissue_field, pad, mode="edge")
        self._density_field = np.pad(design.density_field, pad, mode="edge")
        self._tumor_boxes = [_bbox(p) for p in design.tumor_polygons]
        self._exclusion_boxes = [_bbox(p) for p in design.exclusion_polygons]
        self._inner = [lesion.inner for lesion in design.lesions]
        self._outer = [lesion.outer for lesion in design.lesions]
        self._outer_boxes = [_bbox(p) for p in self._outer]

    def tumor_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level-0 tumour mask of a region: positive polygons minus exclusions."""
        return self._masks(x0, y0, w, h)[0]

    def tissue_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level-0 mask of the stained pixels of a region inside the slide, by the rule
        :meth:`render` paints with: the tissue field, plus every annotated or margin pixel."""
        ay, gy0, gy1 = _interp_matrix(y0, h)
        ax, gx0, gx1 = _interp_matrix(x0, w)
        tissue = ay @ self._tissue_field[gy0:gy1, gx0:gx1] @ ax.T > 0
        tumor, excluded = self._masks(x0, y0, w, h)
        tissue |= tumor
        if excluded is not None:
            tissue |= excluded
        if self.design.lesions:
            tissue |= self._margins(x0, y0, w, h, tumor)[1]
        return tissue

    def evidence_mask(self, x0: int, y0: int, w: int, h: int) -> np.ndarray:
        """Level-0 mask of the pixels whose texture is not normal tissue's.

        "local": the tumour itself. "context": the two margin bands of each lesion; the
        lesion interior is not evidence, it renders as normal tissue.
        """
        tumor = self.tumor_mask(x0, y0, w, h)
        if not self.design.lesions:
            return tumor
        band, capsule = self._margins(x0, y0, w, h, tumor)
        return band | capsule

    def _margins(
        self, x0: int, y0: int, w: int, h: int, tumor: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """(inner tumour band, outer capsule) of the lesions in a region (context task)."""
        region = (x0, y0, w, h)
        hit = _indices_hitting(self._outer_boxes, region)
        if not hit:
            return tumor, np.zeros_like(tumor)
        outer = [self._outer[i] for i in hit]
        band = tumor & ~fill_polygons([self._inner[i] for i in hit], region)
        capsule = fill_polygons(outer, region) & ~tumor
        return band, capsule

    def _masks(self, x0: int, y0: int, w: int, h: int) -> tuple[np.ndarray, np.ndarray | None]:
        """(tumour, excluded-or-None): excluded areas are normal tissue inside a tumour."""
        region = (x0, y0, w, h)
        positives = _polygons_hitting(self.design.tumor_polygons, self._tumor_boxes, region)
        if not positives:
            return np.zeros((h, w), dtype=bool), None
        mask = fill_polygons(positives, region)
        excluded = _polygons_hitting(self.design.exclusion_polygons, self._exclusion_boxes, region)
        if not excluded:
            return mask, None
        excluded_mask = fill_polygons(excluded, region)
        return mask & ~excluded_mask, excluded_mask

    def render(self, tx: int, ty: int) -> np.ndarray | None:
        """The tile at tile column ``tx``, row ``ty``; None when it is all background."""
        t = self.tile_px
        x0, y0 = tx * t, ty * t
        design = self.design
        ay, gy0, gy1 = _interp_matrix(y0, t)
        ax, gx0, gx1 = _interp_matrix(x0, t)
        tissue_nodes = self._tissue_field[gy0:gy1, gx0:gx1]
        tumor, excluded = self._masks(x0, y0, t, t)
        any_tumor = bool(tumor.any())
        near_margin = bool(_indices_hitting(self._outer_boxes, (x0, y0, t, t)))
        if float(tissue_nodes.max()) <= 0 and not any_tumor and not near_margin:
            return None
        # Tumours (and the normal islands inside them) are tissue even where the smooth
        # tissue field says glass, so every annotated pixel carries a stain.
        tissue = (ay @ tissue_nodes @ ax.T > 0) | tumor
        if excluded is not None:
            tissue |= excluded
        # What each pixel looks like: the tumour itself ("local"), or only a lesion's inner
        # band, with a capsule outside it ("context"; interiors look like normal tissue).
        tumor_texture, capsule = tumor, None
        if self.design.lesions:
            tumor_texture, capsule = self._margins(x0, y0, t, t, tumor)
            tissue |= capsule
        # Pixels beyond the slide stay background so the pyramid halves cleanly.
        if x0 + t > design.width_px:
            tissue[:, design.width_px - x0 :] = False
        if y0 + t > design.height_px:
            tissue[design.height_px - y0 :, :] = False
        density = ay @ self._density_field[gy0:gy1, gx0:gx1] @ ax.T
        key = _hash_uniform(tx, ty, design.seed, count=2)
        noise = self._noise[int(key[0] * NOISE_BANK_SIZE)]
        if key[1] < 0.5:
            noise = noise.T

        rgb = np.empty((t, t, 3), dtype=np.float32)
        rgb[:] = BACKGROUND_RGB
        normal = tissue & ~tumor_texture
        if capsule is not None:
            normal &= ~capsule
        for region, layer, light, dark, nucleus in (
            (normal, NORMAL_NUCLEI, NORMAL_STROMA_LIGHT, NORMAL_STROMA_DARK, NORMAL_NUCLEUS),
            (tumor_texture, TUMOR_NUCLEI, TUMOR_STROMA_LIGHT, TUMOR_STROMA_DARK, TUMOR_NUCLEUS),
        ):
            if not region.any():
                continue
            nuclei = _nuclei_alpha(layer, x0, y0, t, design.seed)
            # Chromatin texture: nuclei are not flat discs.
            nuclei *= np.clip(0.85 + 0.12 * noise, 0, 1)
            stroma = light + density[..., None] * (dark - light)
            colour = stroma + nuclei[..., None] * (nucleus - stroma)
            rgb[region] = colour[region]
        if capsule is not None and capsule.any():
            pale = CAPSULE_STROMA_LIGHT + density[..., None] * (
                CAPSULE_STROMA_DARK - CAPSULE_STROMA_LIGHT
            )
            rgb[capsule] = pale[capsule]
        rgb += (3.0 * noise)[..., None]
        return np.clip(rgb, 0, 255).astype(np.uint8)


def _nuclei_alpha(layer: NucleusLayer, x0: int, y0: int, tile_px: int, seed: int) -> np.ndarray:
    """Nucleus opacity over a tile, computed on the (cells, px-in-cell) view of the tile."""
    c = layer.cell_px
    n = tile_px // c
    cy = (y0 // c + np.arange(n, dtype=np.int64))[:, None]
    cx = (x0 // c + np.arange(n, dtype=np.int64))[None, :]
    u_x, u_y, u_r, u_e, u_a, u_p = _hash_uniform(cy, cx, seed, layer.salt, count=6)
    radius = layer.radius_min_px + u_r * (layer.radius_max_px - layer.radius_min_px)
    jitter = np.maximum(c / 2 - 0.8 * radius, 0.0)
    centre_x = c / 2 + (2 * u_x - 1) * jitter
    centre_y = c / 2 + (2 * u_y - 1) * jitter
    minor = radius * (0.6 + 0.4 * u_e)
    cos_a, sin_a = np.cos(u_a * np.pi), np.sin(u_a * np.pi)
    present = (u_p < layer.presence).astype(np.float32)

    local = np.arange(c, dtype=np.float32) + 0.5
    # Shapes broadcast to (cell row, y in cell, cell column, x in cell).
    dx = local[None, None, None, :] - centre_x[:, None, :, None]
    dy = local[None, :, None, None] - centre_y[:, None, :, None]
    along = (dx * cos_a[:, None, :, None] + dy * sin_a[:, None, :, None]) / radius[:, None, :, None]
    across = (dy * cos_a[:, None, :, None] - dx * sin_a[:, None, :, None]) / minor[:, None, :, None]
    alpha = np.clip((1.0 - (along * along + across * across)) * 3.0, 0.0, 1.0)
    alpha *= present[:, None, :, None]
    return alpha.reshape(tile_px, tile_px)


def _bbox(polygon: np.ndarray) -> tuple[float, float, float, float]:
    return (
        float(polygon[:, 0].min()),
        float(polygon[:, 1].min()),
        float(polygon[:, 0].max()),
        float(polygon[:, 1].max()),
    )


def _indices_hitting(boxes: list[tuple[float, float, float, float]], region) -> list[int]:
    x0, y0, w, h = region
    return [
        i
        for i, (bx0, by0, bx1, by1) in enumerate(boxes)
        if bx1 >= x0 - 1 and by1 >= y0 - 1 and bx0 <= x0 + w + 1 and by0 <= y0 + h + 1
    ]


def _polygons_hitting(
    polygons: list[np.ndarray], boxes: list[tuple[float, float, float, float]], region
) -> list[np.ndarray]:
    return [polygons[i] for i in _indices_hitting(boxes, region)]


def write_synthetic_slide(
    path_tif: str | Path,
    size_px: tuple[int, int] = (8000, 6000),
    seed: int = 0,
    tile_px: int = 512,
    mpp: float = 0.25,
    *,
    tumor: bool = True,
    progress: bool = True,
    threads: int | None = None,
    task: str = DEFAULT_TASK,
) -> tuple[Path, Path | None]:
    """Write one synthetic pyramidal JPEG-tiled TIFF and its ASAP XML.

    Args:
        path_tif: output TIFF; the XML goes beside it with the suffix ``.xml``.
        size_px: level-0 (width, height) in pixels.
        seed: the same seed gives byte-identical files.
        tile_px: TIFF tile size (a multiple of 32, e.g. 256 or 512).
        mpp: micrometres per level-0 pixel written to the resolution tags.
        tumor: False makes a "normal" slide: no tumour and no XML.
        progress: show a progress bar on stderr.
        threads: render threads (default: CPU count, at most 4).
        task: "local" (textured tumour) or "context" (lesions marked only by a margin).

    Returns:
        (tif_path, xml_path), xml_path None for a normal slide.
    """
    width_px, height_px = (int(v) for v in size_px)
    if width_px < 64 or height_px < 64:
        raise ConfigError(f"slide size must be at least 64x64 px, got {width_px}x{height_px}")
    if tile_px <= 0 or tile_px % 32:
        raise ConfigError(f"tile_px must be a positive multiple of 32, got {tile_px}")
    path_tif = Path(path_tif)
    design = make_design(width_px, height_px, seed, tumor=tumor, task=task)
    renderer = TileRenderer(design, tile_px)
    write_pyramid_tiff(
        path_tif,
        renderer.render,
        (width_px, height_px),
        tile_px=tile_px,
        mpp=mpp,
        background_rgb=tuple(int(v) for v in BACKGROUND_RGB),
        threads=threads,
        progress=progress,
        software="histoseg.wsi.synth",
    )

    xml_path = path_tif.with_suffix(".xml")
    if design.groups:
        write_asap_xml(xml_path, design.groups)
        return path_tif, xml_path
    if xml_path.exists():
        xml_path.unlink()
    return path_tif, None


def slide_seed(dataset_seed: int, index: int) -> int:
    """The design seed of slide ``index`` of a synthetic dataset made with ``dataset_seed``."""
    return dataset_seed * 1000 + index


def dataset_designs(
    n_slides: int, size_px: tuple[int, int], seed: int = 0, task: str = DEFAULT_TASK
) -> dict[str, SlideDesign]:
    """File name -> design of each slide :func:`ensure_synthetic_dataset` makes (no pixels)."""
    width_px, height_px = (int(v) for v in size_px)
    return {
        name: make_design(width_px, height_px, slide_seed(seed, i), tumor=tumor, task=task)
        for i, (name, tumor) in enumerate(synthetic_slide_names(n_slides))
    }


def synthetic_slide_names(n_slides: int) -> list[tuple[str, bool]]:
    """(file name, has tumour) for a synthetic dataset: every third slide is normal."""
    return [(f"slide_{i:03d}.tif", i % 3 != 2) for i in range(n_slides)]


def ensure_synthetic_dataset(
    folder: str | Path,
    n_slides: int = 6,
    size_px: tuple[int, int] = (8000, 6000),
    seed: int = 0,
    *,
    tile_px: int = 512,
    mpp: float = 0.25,
    progress: bool = True,
    task: str = DEFAULT_TASK,
) -> list[tuple[Path, Path | None]]:
    """Make (or reuse) a folder of synthetic slides; returns [(tif, xml or None)].

    Idempotent: slides already written with the same size, seed and tile size are kept
    (a small manifest records how they were made), so the training CLI may call it on every
    start. Slide ``i`` uses seed ``seed * 1000 + i`` (:func:`slide_seed`); every third
    slide is a normal one. ``task`` is "local" or "context" (see :func:`make_design`).
    """
    import json

    if n_slides < 1:
        raise ConfigError(f"n_slides must be >= 1, got {n_slides}")
    check_task(task)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / "synthetic.json"
    recipe = {
        "size_px": [int(size_px[0]), int(size_px[1])],
        "seed": int(seed),
        "tile_px": int(tile_px),
        "mpp": float(mpp),
        "generator": "histoseg.wsi.synth/1",
    }
    if task != DEFAULT_TASK:  # "local" manifests stay as they were before tasks existed
        recipe["task"] = task
        # slides of an older lesion geometry are redrawn, not reused
        recipe["task_generator"] = CONTEXT_GENERATOR
    done: dict[str, dict] = {}
    if manifest_path.exists():
        try:
            done = json.loads(manifest_path.read_text()).get("slides", {})
        except (ValueError, AttributeError):
            done = {}
        if not isinstance(done, dict):
            done = {}
    out: list[tuple[Path, Path | None]] = []
    for i, (name, has_tumor) in enumerate(synthetic_slide_names(n_slides)):
        tif = folder / name
        xml = tif.with_suffix(".xml")
        entry = dict(done[name]) if isinstance(done.get(name), dict) else {}
        recorded_bytes = entry.pop("bytes", None)
        if entry == recipe and tif.exists() and (xml.exists() or not has_tumor):
            if _slide_is_sound(tif, recorded_bytes, size_px):
                out.append((tif, xml if has_tumor else None))
                continue
            # Say so: a silent rewrite of a multi-GB slide would look like a hang.
            print(
                f"warning: {tif} is damaged (truncated or unreadable); regenerating it",
                file=sys.stderr,
            )
        out.append(
            write_synthetic_slide(
                tif,
                size_px,
                slide_seed(seed, i),
                tile_px,
                mpp,
                tumor=has_tumor,
                progress=progress,
                task=task,
            )
        )
        # The byte count lets the next run spot a truncated slide without decoding it.
        done[name] = {**recipe, "bytes": tif.stat().st_size}
        tmp = manifest_path.with_suffix(".json.part")
        tmp.write_text(json.dumps({"slides": done}, indent=1, sort_keys=True))
        os.replace(tmp, manifest_path)
    return out


def _slide_is_sound(tif: Path, recorded_bytes: object, size_px: tuple[int, int]) -> bool:
    """Cheap check that a slide on disk is whole: the size the manifest recorded, and
    OpenSlide opens it at the expected size and decodes a tile at its far corner.

    Reading one small level-0 region costs milliseconds, so reuse stays cheap.
    """
    if recorded_bytes is not None and tif.stat().st_size != recorded_bytes:
        return False
    width_px, height_px = (int(v) for v in size_px)
    try:
        with open_slide(tif) as slide:
            if slide.dimensions != (width_px, height_px):
                return False
            corner = min(32, width_px, height_px)
            slide.read_region((width_px - corner, height_px - corner), 0, (corner, corner))
    except SlideError:
        return False
    return True


# --- CLI -------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """'20000x16000' -> (20000, 16000)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(
            f"size must look like WIDTHxHEIGHT (e.g. 20000x16000), got {text!r}"
        ) from None
    if w < 64 or h < 64:
        raise ConfigError(f"size must be at least 64x64 px, got {text!r}")
    return w, h


def main(argv: Sequence[str] | None = None) -> int:
    from histoseg.cli import ArgumentParser

    parser = ArgumentParser(
        prog="python -m histoseg.wsi.synth",
        description="Write synthetic pyramidal whole-slide TIFFs with ASAP XML tumour annotations.",
        epilog="Examples:\n"
        "  python -m histoseg.wsi.synth --out data/synthetic --slides 6 --size 20000x16000\n"
        "  python -m histoseg.wsi.synth --out /tmp/s --slides 1 --size 8000x6000 --seed 3\n"
        "  python -m histoseg.wsi.synth --out data/synthetic-context --task context",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--slides", type=int, default=6, help="number of slides (default 6)")
    parser.add_argument("--size", default="8000x6000", help="level-0 WIDTHxHEIGHT px")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tile", type=int, default=512, help="TIFF tile size in px")
    parser.add_argument("--mpp", type=float, default=0.25, help="micrometres per pixel")
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=DEFAULT_TASK,
        help="local: tumour has its own texture; context: lesions look like normal tissue "
        "inside and only their margin marks them (default local)",
    )
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    size = parse_size(args.size)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out must be a folder, got the file {args.out}")
    pairs = ensure_synthetic_dataset(
        args.out,
        args.slides,
        size,
        args.seed,
        tile_px=args.tile,
        mpp=args.mpp,
        progress=not args.no_progress,
        task=args.task,
    )
    for tif, xml in pairs:
        size_mb = tif.stat().st_size / 1e6
        print(f"{tif}  {size_mb:7.1f} MB  {xml if xml else '(normal slide, no XML)'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
