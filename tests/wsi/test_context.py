"""The context task: lesions whose interiors look like normal tissue, marked by a margin."""

from __future__ import annotations

import dataclasses
import hashlib

import numpy as np
import pytest

from histoseg.errors import ConfigError
from histoseg.wsi.design import make_design
from histoseg.wsi.raster import fill_polygons
from histoseg.wsi.render import TileRenderer
from histoseg.wsi.synth import ensure_synthetic_dataset

SIZE_PX = (2048, 1536)
TILE_PX = 256
WINDOW_PX = 32


def _tiles(renderer: TileRenderer):
    for ty in range(SIZE_PX[1] // TILE_PX):
        for tx in range(SIZE_PX[0] // TILE_PX):
            yield tx * TILE_PX, ty * TILE_PX, renderer.render(tx, ty)


def test_lesions_lie_inside_the_slide_apart_and_nested():
    for seed in range(4):
        design = make_design(*SIZE_PX, seed, task="context")
        assert len(design.lesions) >= 2, seed
        assert design.groups == {"_0": [lesion.outline for lesion in design.lesions]}
        whole = (0, 0, *SIZE_PX)
        seen = np.zeros((SIZE_PX[1], SIZE_PX[0]), dtype=bool)
        for lesion in design.lesions:
            for polygon in (lesion.inner, lesion.outline, lesion.outer):
                assert polygon[:, 0].min() >= 0 and polygon[:, 0].max() < SIZE_PX[0]
                assert polygon[:, 1].min() >= 0 and polygon[:, 1].max() < SIZE_PX[1]
            inner, outline, outer = (
                fill_polygons([p], whole) for p in (lesion.inner, lesion.outline, lesion.outer)
            )
            assert inner.any() and not (inner & ~outline).any() and not (outline & ~outer).any()
            assert not (seen & outer).any(), "lesions overlap"
            seen |= outer


def test_lesion_interior_renders_exactly_like_the_tissue_without_the_lesion():
    design = make_design(*SIZE_PX, 1, task="context")
    plain = dataclasses.replace(design, groups={}, lesions=[])
    with_lesions, without = TileRenderer(design, TILE_PX), TileRenderer(plain, TILE_PX)
    compared = 0
    for x0, y0, tile in _tiles(with_lesions):
        other = without.render(x0 // TILE_PX, y0 // TILE_PX)
        region = (x0, y0, TILE_PX, TILE_PX)
        interior = fill_polygons([lesion.inner for lesion in design.lesions], region)
        interior &= without.tissue_mask(*region)  # where the field itself has tissue
        outside = ~fill_polygons([lesion.outer for lesion in design.lesions], region)
        if tile is None:
            assert other is None
            continue
        same = interior | outside
        np.testing.assert_array_equal(tile[same], other[same])
        # the margin itself is painted differently: it is the only evidence
        margin = ~same & with_lesions.evidence_mask(*region)
        if margin.any():
            assert np.abs(tile[margin].astype(int) - other[margin]).mean() > 10
        compared += int(interior.sum())
    assert compared > 100_000  # the lesions' interiors were really compared


def _window_stats(task: str, seeds=(0, 1)) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel (mean, std) of 32 px windows wholly inside tumour and without evidence
    (first) and wholly in normal tissue (second), each averaged over the windows."""
    inside, normal = [], []
    for seed in seeds:
        renderer = TileRenderer(make_design(*SIZE_PX, seed, task=task), TILE_PX)
        for x0, y0, tile in _tiles(renderer):
            if tile is None:
                continue
            region = (x0, y0, TILE_PX, TILE_PX)
            tumour = renderer.tumor_mask(*region)
            # "local": the tumour is its own evidence; "context": the margin bands are
            evidence = renderer.evidence_mask(*region)
            textured = task == "local"  # "context": keep windows that miss the margin
            tissue = renderer.tissue_mask(*region)
            for wy in range(0, TILE_PX, WINDOW_PX):
                for wx in range(0, TILE_PX, WINDOW_PX):
                    window = (slice(wy, wy + WINDOW_PX), slice(wx, wx + WINDOW_PX))
                    pixels = tile[window].reshape(-1, 3).astype(np.float64)
                    stats = np.stack([pixels.mean(0), pixels.std(0)])
                    if tumour[window].all() and (textured or not evidence[window].any()):
                        inside.append(stats)
                    elif tissue[window].all() and not (tumour | evidence)[window].any():
                        normal.append(stats)
    assert len(inside) > 50 and len(normal) > 50
    return np.mean(inside, axis=0), np.mean(normal, axis=0)


def test_small_windows_inside_lesions_match_normal_tissue_statistics():
    # four slides: the lesions are small on a slide this size, and their windows sample
    # the stain field in fewer places than normal tissue does
    inside, normal = _window_stats("context", seeds=(0, 1, 2, 3))
    assert np.abs(inside[0] - normal[0]).max() < 3.0  # channel means, grey levels
    assert np.abs(inside[1] - normal[1]).max() < 1.0  # channel standard deviations


def test_local_tumour_windows_differ_from_normal_tissue():
    # the control of the test above: the same statistics tell local tumour apart
    inside, normal = _window_stats("local")
    assert np.abs(inside[0] - normal[0]).max() > 20.0


def _render_digest() -> str:
    digest = hashlib.sha256()
    for seed, tumor in ((4000, True), (4002, False), (7, True)):
        design = make_design(1024, 768, seed, tumor=tumor)
        for name, polygons in sorted(design.groups.items()):
            for polygon in polygons:
                digest.update(name.encode())
                digest.update(polygon.tobytes())
        renderer = TileRenderer(design, TILE_PX)
        for ty in range(3):
            for tx in range(4):
                tile = renderer.render(tx, ty)
                digest.update(b"none" if tile is None else tile.tobytes())
    return digest.hexdigest()


def test_local_task_renders_the_same_pixels_as_before_tasks_existed():
    # digest of the slides rendered by the generator before the context task was added
    assert _render_digest() == "9686cd1807dcfb74a39a3c867abde9303faa73cd7a56feb17edc9953a097e81c"


def test_dataset_keeps_one_manifest_per_task(tmp_path):
    local = ensure_synthetic_dataset(tmp_path / "l", 1, (512, 512), tile_px=256, progress=False)
    context = ensure_synthetic_dataset(
        tmp_path / "c", 1, (512, 512), tile_px=256, progress=False, task="context"
    )
    assert "task" not in (tmp_path / "l" / "synthetic.json").read_text()
    assert '"task": "context"' in (tmp_path / "c" / "synthetic.json").read_text()
    assert local[0][0].read_bytes() != context[0][0].read_bytes()
    with pytest.raises(ConfigError, match="not one of local, context"):
        make_design(512, 512, 0, task="global")
