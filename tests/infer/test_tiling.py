"""Tile placement and blending windows: every pixel's weights sum to exactly one."""

from __future__ import annotations

import numpy as np
import pytest

from histoseg.errors import ConfigError
from histoseg.infer.tiling import TileGrid, default_margin_px


@pytest.mark.parametrize(
    ("size", "tile", "margin"), [((1000, 700), 256, 32), ((257, 64), 128, 0), ((640, 640), 512, 64)]
)
def test_windows_sum_to_one_everywhere(size, tile, margin):
    grid = TileGrid(*size, tile, margin)
    pad = tile
    total = np.zeros((size[1] + 2 * pad, size[0] + 2 * pad))
    for column, row in grid.tiles():
        x, y = grid.origin_px(column, row)
        total[y + pad : y + pad + tile, x + pad : x + pad + tile] += grid.weights(column, row)
    inside = total[pad : pad + size[1], pad : pad + size[0]]
    np.testing.assert_allclose(inside, 1.0, atol=1e-6)


def test_no_weight_within_half_a_margin_of_an_inner_tile_edge():
    grid = TileGrid(2000, 2000, 512, 64)
    w = grid.weights(1, 1)
    assert not w[:32].any() and not w[:, -32:].any() and w[256, 256] == 1.0


def test_bad_geometry_is_refused_with_the_allowed_values():
    with pytest.raises(ConfigError, match="multiple of 32"):
        TileGrid(100, 100, 250, 0)
    with pytest.raises(ConfigError, match="quarter of the tile"):
        TileGrid(100, 100, 256, 64)


def test_default_margin_follows_the_receptive_field_up_to_an_eighth_of_the_tile():
    assert default_margin_px(40.0, 1024) == 64
    assert default_margin_px(561.0, 1024) == 128
    assert default_margin_px(float("inf"), 2048) == 256
