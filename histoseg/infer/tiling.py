"""Where the tiles of a slide go and how their predictions are blended into one map.

Tiles of ``tile_size_px`` (pixels of the inference level) step by ``tile_size - 2 *
margin``, so neighbours overlap by twice the margin. Each tile's prediction is weighted by
a window that is 0 in its outer half-margin, rises linearly over the next margin and is 1
inside: across every overlap the two windows cross-fade and sum to exactly 1, so the
blended map needs no weight channel, and no pixel takes any weight from a tile whose edge
is nearer than half a margin. Tile origins sit on a grid of the model's output stride,
so every tile sees the same sampling phase.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from histoseg.errors import ConfigError

ALIGN_PX = 32  # tile size and margin are multiples of this: output stride and map cell


@dataclass(frozen=True)
class TileGrid:
    """The tiling of a ``width_px`` x ``height_px`` image (pixels of the inference level)."""

    width_px: int
    height_px: int
    tile_size_px: int
    margin_px: int

    def __post_init__(self) -> None:
        t, m = self.tile_size_px, self.margin_px
        if t < ALIGN_PX or t % ALIGN_PX:
            raise ConfigError(f"--tile-size must be a multiple of {ALIGN_PX} px, got {t}")
        if m < 0 or m % ALIGN_PX or 4 * m >= t:
            raise ConfigError(
                f"--margin {m} px must be a multiple of {ALIGN_PX} px, >= 0 and under a "
                f"quarter of the tile ({t} px)"
            )

    @property
    def step_px(self) -> int:
        return self.tile_size_px - 2 * self.margin_px

    @property
    def columns(self) -> int:
        return _count(self.width_px, self.tile_size_px, self.margin_px)

    @property
    def rows(self) -> int:
        return _count(self.height_px, self.tile_size_px, self.margin_px)

    def origin_px(self, column: int, row: int) -> tuple[int, int]:
        """Top-left corner of tile (column, row); the first tile starts one margin outside."""
        return column * self.step_px - self.margin_px, row * self.step_px - self.margin_px

    def owned_box_px(self, column: int, row: int) -> tuple[int, int, int, int]:
        """(x0, y0, x1, y1): the step-sized square the tile answers for, clipped to the image."""
        x0, y0 = column * self.step_px, row * self.step_px
        return (
            x0,
            y0,
            min(x0 + self.step_px, self.width_px),
            min(y0 + self.step_px, self.height_px),
        )

    def weights(self, column: int, row: int) -> np.ndarray:
        """float32 (tile, tile) blending window of a tile; a border tile is flat outwards."""
        wx = _window(self.tile_size_px, self.margin_px, column == 0, column == self.columns - 1)
        wy = _window(self.tile_size_px, self.margin_px, row == 0, row == self.rows - 1)
        return np.outer(wy, wx)

    def tiles(self) -> Iterator[tuple[int, int]]:
        """(column, row) of every tile, row by row."""
        for row in range(self.rows):
            for column in range(self.columns):
                yield column, row


def _count(extent_px: int, tile_px: int, margin_px: int) -> int:
    step = tile_px - 2 * margin_px
    return max(1, math.ceil((extent_px + 2 * margin_px - tile_px) / step) + 1)


def _window(tile_px: int, margin_px: int, flat_start: bool, flat_end: bool) -> np.ndarray:
    w = np.ones(tile_px, dtype=np.float32)
    if margin_px == 0:
        return w
    half = margin_px // 2
    ramp = (np.arange(margin_px, dtype=np.float32) + 0.5) / margin_px
    if not flat_start:
        w[:half] = 0.0
        w[half : half + margin_px] = ramp
    if not flat_end:
        w[tile_px - half :] = 0.0
        w[tile_px - half - margin_px : tile_px - half] = ramp[::-1]
    return w


def default_margin_px(receptive_radius_px: float, tile_size_px: int) -> int:
    """The receptive-field radius rounded up to :data:`ALIGN_PX`, at most an eighth of the
    tile (beyond that, tiles would mostly recompute their neighbours)."""
    cap = (tile_size_px // 8) // ALIGN_PX * ALIGN_PX
    if not math.isfinite(receptive_radius_px):
        return cap
    return min(cap, math.ceil(receptive_radius_px / ALIGN_PX) * ALIGN_PX)
