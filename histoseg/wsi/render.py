"""A slide description (:mod:`histoseg.wsi.design`) rendered tile by tile with vectorised
numpy: every tile is a pure function of the design and its position, so a gigapixel level 0
is never in memory and any tile can be drawn again alone."""

from __future__ import annotations

import math

import numpy as np

from histoseg.errors import ConfigError
from histoseg.wsi.context import (
    CAPSULE_STROMA_DARK,
    CAPSULE_STROMA_LIGHT,
)
from histoseg.wsi.design import (
    BACKGROUND_RGB,
    COARSE_CELL_PX,
    NOISE_BANK_SIZE,
    NORMAL_NUCLEI,
    NORMAL_NUCLEUS,
    NORMAL_STROMA_DARK,
    NORMAL_STROMA_LIGHT,
    TUMOR_NUCLEI,
    TUMOR_NUCLEUS,
    TUMOR_STROMA_DARK,
    TUMOR_STROMA_LIGHT,
    NucleusLayer,
    SlideDesign,
)
from histoseg.wsi.raster import fill_polygons


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
