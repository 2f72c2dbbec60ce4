"""A checkpoint over a slide: the pyramid's geometry, seam-free tiling, resume after SIGINT."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import openslide
import pytest
import tifffile

from histoseg.infer.run import InferSettings, infer_slide, output_paths
from histoseg.infer.tiling import default_margin_px

SLIDE_PX = (2048, 1536)  # as tests/infer/conftest.py writes it

# A model whose receptive field fits in the margin gives, inside tissue and away from the
# slide's edges, the same probability at tiles of 256 and 512 px up to the pyramid's
# rounding to 1/255 (float sums in another order can round the other way).
SEAM_TOLERANCE_STEPS = 1
EDGE_PX = 256
SMALL_FIELD_MARGIN_PX = 32


def _run(predictors, slide, out, tile_px, **kwargs):
    info, predict, radius = predictors(tile_px)
    settings = InferSettings(0, tile_px, default_margin_px(radius, tile_px), radius)
    return infer_slide(slide, out, predict, info, settings, progress=False, **kwargs)


def _level0(path) -> np.ndarray:
    with tifffile.TiffFile(path) as tif:
        return tif.pages[0].asarray()


@pytest.fixture(scope="module")
def runs(predictors, tiny_slide, tmp_path_factory):
    out = {t: tmp_path_factory.mktemp(f"tile{t}") for t in (256,)}
    return {t: (_run(predictors, tiny_slide, folder, t), folder) for t, folder in out.items()}


def test_pyramid_opens_at_the_slides_geometry(runs, tiny_slide):
    summary, folder = runs[256]
    with (
        openslide.OpenSlide(summary["outputs"]["pyramid"]) as pyramid,
        openslide.OpenSlide(tiny_slide) as slide,
    ):
        assert pyramid.dimensions == slide.dimensions == SLIDE_PX
        assert pyramid.properties["openslide.mpp-x"] == slide.properties["openslide.mpp-x"]
        assert pyramid.level_count >= 2
    assert (folder / "tiny.png").stat().st_size > 0
    on_disk = json.loads((folder / "tiny.json").read_text())
    assert on_disk["schema"] == "histoseg.infer/1"
    assert 0 < on_disk["tissue_tiles"] < on_disk["tiles"]
    assert {"tumour_area_mm2", "slide_score", "detections"} <= set(on_disk)
    assert not output_paths(folder, tiny_slide)["work"].exists()


def _small_field_predict():
    """A real conv net with a 4 px receptive-field radius, well inside the margin."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(1)
    net = keras.Sequential(
        [
            keras.Input((None, None, 3)),
            keras.layers.Conv2D(8, 3, padding="same", activation="tanh"),
            keras.layers.Conv2D(8, 3, padding="same", dilation_rate=2, activation="tanh"),
            keras.layers.Conv2D(1, 3, padding="same"),
        ]
    )

    @tf.function
    def predict(images):
        x = tf.cast(images, tf.float32) / 127.5 - 1.0
        return tf.sigmoid(4.0 * net(x))[0, ..., 0]

    return predict


def _inner_tissue(slide_path) -> np.ndarray:
    from scipy import ndimage

    from histoseg.wsi.slide import open_slide
    from histoseg.wsi.tissue import detect_tissue

    with open_slide(slide_path) as slide:
        tissue = detect_tissue(slide)
    cell = int(tissue.downsample)
    inner = ndimage.binary_erosion(tissue.mask, iterations=max(1, 64 // cell))
    mask = np.kron(inner, np.ones((cell, cell), bool))[: SLIDE_PX[1], : SLIDE_PX[0]]
    mask[:EDGE_PX] = mask[-EDGE_PX:] = False
    mask[:, :EDGE_PX] = mask[:, -EDGE_PX:] = False
    return mask


def test_tiling_at_two_sizes_agrees_inside_the_receptive_field(tiny_run, tiny_slide, tmp_path):
    from histoseg.infer.model import find_checkpoint

    info, predict = find_checkpoint(tiny_run), _small_field_predict()
    maps = []
    for tile_px in (256, 512):
        settings = InferSettings(0, tile_px, SMALL_FIELD_MARGIN_PX, 4.0)
        out = tmp_path / str(tile_px)
        summary = infer_slide(tiny_slide, out, predict, info, settings, progress=False)
        maps.append(_level0(summary["outputs"]["pyramid"]).astype(int))
    inside = _inner_tissue(tiny_slide)
    assert maps[0][inside].std() > 5  # the output varies: agreement is not trivial
    difference = np.abs(maps[0] - maps[1])[inside]
    assert difference.max() <= SEAM_TOLERANCE_STEPS, difference.max()


def test_resume_after_sigint_writes_the_same_pyramid(predictors, tiny_slide, runs, tmp_path):
    def interrupt_after(n):
        seen = []

        def on_tile(column, row):
            seen.append((column, row))
            if len(seen) == n:
                os.kill(os.getpid(), signal.SIGINT)

        return on_tile

    with pytest.raises(KeyboardInterrupt):
        _run(predictors, tiny_slide, tmp_path, 256, on_tile=interrupt_after(60))
    state = json.loads((output_paths(tmp_path, tiny_slide)["work"] / "state.json").read_text())
    assert state["tile_rows_done"] > 0
    resumed = _run(predictors, tiny_slide, tmp_path, 256)
    assert resumed["resumed_from_tile_row"] == state["tile_rows_done"]
    with (
        tifffile.TiffFile(resumed["outputs"]["pyramid"]) as new,
        tifffile.TiffFile(runs[256][0]["outputs"]["pyramid"]) as old,
    ):
        assert len(new.pages) == len(old.pages)
        for p, q in zip(new.pages, old.pages, strict=True):
            np.testing.assert_array_equal(p.asarray(), q.asarray())
