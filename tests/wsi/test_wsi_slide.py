"""Slide access over OpenSlide, on synthetic slides and on broken files."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import tifffile

from histoseg.errors import SlideError
from histoseg.wsi import open_slide
from histoseg.wsi.pyramid import pyramid_dimensions
from histoseg.wsi.slide import premultiplied_argb_to_rgb
from histoseg.wsi.synth import write_synthetic_slide


def test_synthetic_slide_opens_with_expected_levels_and_mpp(synthetic_slides):
    with open_slide(synthetic_slides.tumor_tif) as slide:
        assert slide.vendor == "generic-tiff"
        assert slide.dimensions == (2048, 1536)
        assert slide.level_dimensions == ((2048, 1536), (1024, 768), (512, 384))
        assert slide.level_downsamples == (1.0, 2.0, 4.0)
        assert slide.mpp == pytest.approx(0.25, rel=1e-6)
        assert slide.best_level_for_downsample(3.0) == 1
        assert slide.best_level_for_downsample(100) == 2
        for level in range(slide.level_count):
            patch = slide.read_region((512, 256), level, (64, 48))
            assert patch.shape == (48, 64, 3) and patch.dtype == np.uint8
        thumb = slide.thumbnail(200)
        assert thumb.shape == (150, 200, 3)


def test_pyramid_goes_below_1000_px():
    dims = pyramid_dimensions(20000, 16000)
    assert dims[0] == (20000, 16000) and max(dims[-1]) < 1000 and max(dims[-2]) >= 1000
    assert all(w == (pw + 1) // 2 for (pw, _), (w, _) in itertools.pairwise(dims))


def test_outside_the_slide_reads_white(synthetic_slides):
    with open_slide(synthetic_slides.tumor_tif) as slide:
        patch = slide.read_region((2048 - 8, 0), 0, (16, 16))
    assert (patch[:, 8:] == 255).all()


def test_premultiplied_argb_composites_on_white():
    # ARGB, premultiplied: half-transparent red (a=128, r=128) and fully transparent.
    argb = np.array([[(128 << 24) | (128 << 16), 0, 0xFF102030]], dtype=np.uint32)
    rgb = premultiplied_argb_to_rgb(argb)
    assert rgb.tolist() == [[[255, 127, 127], [255, 255, 255], [0x10, 0x20, 0x30]]]


def test_same_seed_gives_identical_files(tmp_path):
    a, _ = write_synthetic_slide(
        tmp_path / "a.tif", (640, 480), seed=5, tile_px=256, progress=False
    )
    b, _ = write_synthetic_slide(
        tmp_path / "b.tif", (640, 480), seed=5, tile_px=256, progress=False
    )
    c, _ = write_synthetic_slide(
        tmp_path / "c.tif", (640, 480), seed=6, tile_px=256, progress=False
    )
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()


def test_missing_file(tmp_path):
    with pytest.raises(SlideError, match=r"not found.*nope\.tif"):
        open_slide(tmp_path / "nope.tif")


def test_not_a_slide(tmp_path):
    path = tmp_path / "notes.tif"
    path.write_text("this is not a TIFF\n")
    with pytest.raises(SlideError, match=r"notes\.tif"):
        open_slide(path)


def test_truncated_tiff(tmp_path, synthetic_slides):
    path = tmp_path / "truncated.tif"
    path.write_bytes(synthetic_slides.tumor_tif.read_bytes()[:3000])
    # It may open (the header is intact) and fail on the read.
    with pytest.raises(SlideError, match=r"truncated\.tif"), open_slide(path) as slide:
        slide.read_region((0, 0), 0, (512, 512))


def test_slide_without_resolution_has_no_mpp(tmp_path):
    path = tmp_path / "nores.tif"
    tifffile.imwrite(path, np.full((256, 256, 3), 200, np.uint8), tile=(128, 128))
    with open_slide(path) as slide:
        assert slide.dimensions == (256, 256)
        with pytest.raises(SlideError, match=r"nores\.tif.*no resolution"):
            _ = slide.mpp


def test_bad_level_and_size(synthetic_slides):
    with open_slide(synthetic_slides.tumor_tif) as slide:
        with pytest.raises(SlideError, match="level 7 out of range"):
            slide.read_region((0, 0), 7, (10, 10))
        with pytest.raises(SlideError, match="positive"):
            slide.read_region((0, 0), 0, (0, 10))
    with pytest.raises(SlideError, match="closed"):
        slide.read_region((0, 0), 0, (10, 10))
