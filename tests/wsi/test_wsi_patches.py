"""Tissue detection, patch grids and samplers, shards, patch lists, and image/mask alignment."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from histoseg.errors import ConfigError
from histoseg.wsi import (
    Annotations,
    PatchRef,
    arrange_by_tumor_ratio,
    detect_tissue,
    grid_patches,
    load_patches,
    open_slide,
    sample_patches,
    save_patches,
    shard,
)
from histoseg.wsi.tissue import CoverageGrid, otsu_threshold, saturation


@pytest.fixture(scope="module")
def tumor_slide(synthetic_slides):
    with open_slide(synthetic_slides.tumor_tif) as slide:
        yield slide


@pytest.fixture(scope="module")
def tumor_annotations(synthetic_slides):
    return Annotations.from_xml(synthetic_slides.tumor_xml)


def test_coverage_grid_is_exact_for_the_piecewise_constant_mask():
    rng = np.random.default_rng(0)
    mask = rng.random((20, 30)) > 0.5
    grid = CoverageGrid(mask, downsample=4.0)
    fine = np.kron(mask, np.ones((4, 4), dtype=bool))  # level-0 mask
    for x, y, w, h in [(0, 0, 8, 8), (3, 5, 17, 9), (50, 30, 40, 33), (110, 70, 10, 10)]:
        window = fine[y : y + h, x : x + w]
        expected = window.sum() / (w * h)  # outside the slide counts as no tissue
        assert grid.fraction(x, y, w, h) == pytest.approx(expected, abs=1e-9)


def test_otsu_splits_two_populations():
    values = np.concatenate([np.full(1000, 0.02), np.full(500, 0.4)])
    assert 0.02 < otsu_threshold(values) <= 0.4
    assert saturation(np.array([[[255, 0, 0], [200, 200, 200]]], np.uint8)).tolist() == [[1.0, 0.0]]


def test_tissue_filter_drops_background_patches(tumor_slide, tumor_annotations):
    everything = grid_patches(tumor_slide, 128, min_tissue=0.0, annotations=tumor_annotations)
    kept = grid_patches(tumor_slide, 128, min_tissue=0.5, annotations=tumor_annotations)
    assert len(everything) == (2048 // 128) * (1536 // 128)
    assert 0 < len(kept) < len(everything)
    kept_xy = {(r.x, r.y) for r in kept}
    for ref in everything:
        image = tumor_slide.read_region((ref.x, ref.y), 0, (128, 128))
        stained = (saturation(image) > 0.1).mean()
        if (ref.x, ref.y) in kept_xy:
            assert stained > 0.35, ref
        elif ref.tissue_fraction < 0.05:
            assert stained < 0.1, ref  # background really is glass


def test_normal_slide_has_tissue_but_no_tumour(synthetic_slides):
    refs = grid_patches(synthetic_slides.normal_tif, 256, min_tissue=0.5)
    assert refs and all(r.tumor_fraction == 0 and r.annotations_path is None for r in refs)
    tissue = detect_tissue(open_slide(synthetic_slides.normal_tif))
    assert 0.05 < tissue.covered_fraction < 0.9


def test_grid_at_level_1_and_stride(tumor_slide, tumor_annotations):
    refs = grid_patches(tumor_slide, 128, level=1, min_tissue=0.0, stride=64)
    assert len(refs) == ((1024 - 128) // 64 + 1) * ((768 - 128) // 64 + 1)
    assert {r.x % 128 for r in refs} == {0} and refs[1].x - refs[0].x == 128
    tumor = grid_patches(tumor_slide, 128, level=1, annotations=tumor_annotations)
    assert any(r.is_tumor for r in tumor) and all(r.level == 1 for r in tumor)


def test_patch_larger_than_slide(tumor_slide):
    with pytest.raises(ConfigError, match="larger than the slide at level 2"):
        grid_patches(tumor_slide, 1024, level=2)
    with pytest.raises(ConfigError, match="min_tissue"):
        grid_patches(tumor_slide, 128, min_tissue=1.5)


def test_shards_are_disjoint_and_cover_the_grid(tumor_slide):
    refs = grid_patches(tumor_slide, 128, min_tissue=0.3)
    for size in (1, 2, 3, 4, 7):
        shards = [shard(refs, rank, size) for rank in range(size)]
        flat = [r for s in shards for r in s]
        assert len(flat) == len(refs) and set(flat) == set(refs)
        assert max(map(len, shards)) - min(map(len, shards)) <= 1
        equal = [shard(refs, rank, size, equal=True) for rank in range(size)]
        assert len({len(s) for s in equal}) == 1
    with pytest.raises(ConfigError, match="rank"):
        shard(refs, 2, 2)


def test_patch_list_round_trip(tmp_path, tumor_slide, tumor_annotations):
    refs = grid_patches(tumor_slide, 256, annotations=tumor_annotations)
    refs.append(PatchRef("other.tif", 1, 2, 0, 256))
    path = save_patches(tmp_path / "list.csv", refs)
    assert load_patches(path) == refs
    bad = tmp_path / "bad.csv"
    bad.write_text("slide_path,x,y,level,patch_size\ns.tif,1,two,0,256\n")
    with pytest.raises(ConfigError, match=r"bad.csv:2"):
        load_patches(bad)
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ConfigError, match="missing column"):
        load_patches(bad)


def test_sampler_is_deterministic_and_keeps_the_tumour_ratio(tumor_slide, tumor_annotations):
    def draw(seed):
        return sample_patches(
            tumor_slide,
            128,
            64,
            seed=seed,
            annotations=tumor_annotations,
            tumor_ratio=0.5,
            batch_size=4,
        )

    refs = draw(3)
    assert refs == draw(3) and refs != draw(4)
    assert len(refs) == 64
    assert all(r.tissue_fraction >= 0.5 for r in refs)
    for b in range(0, 64, 4):
        assert sum(r.is_tumor for r in refs[b : b + 4]) == 2


def test_arrange_by_tumor_ratio_across_pools():
    tumor = [PatchRef("t.tif", i, 0, 0, 64, 1.0, 0.5) for i in range(3)]
    normal = [PatchRef("n.tif", i, 0, 0, 64, 1.0, 0.0) for i in range(10)]
    out = arrange_by_tumor_ratio(tumor, normal, 40, 0.25, batch_size=8, seed=1)
    assert len(out) == 40
    assert [sum(r.is_tumor for r in out[b : b + 8]) for b in range(0, 40, 8)] == [2] * 5
    with pytest.warns(UserWarning, match="no tumour"):
        assert len(arrange_by_tumor_ratio([], normal, 5, 0.5)) == 5


def _tumour_stain(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(is tumour stroma, is stroma): in the synth palette only tumour stroma has red
    between 150 and 212; nuclei (red < 150) say nothing about the label."""
    red = image[..., 0].astype(np.int16)
    return red < 212, red > 150


@pytest.mark.parametrize("level", [0, 1, 2])
def test_masks_line_up_with_the_image_at_every_level(tumor_slide, tumor_annotations, level):
    image = tumor_slide.read_level(level)
    d = tumor_slide.level_downsamples[level]
    w, h = tumor_slide.level_dimensions[level]
    mask = tumor_annotations.rasterize((0, 0, w * d, h * d), d, size_px=(w, h)).astype(bool)
    assert mask.any()
    tumour_stain, stroma = _tumour_stain(image)
    # Judge the pixels near the tumour outline, where a misplaced mask shows.
    band = ndimage.binary_dilation(mask, iterations=4) & ~ndimage.binary_erosion(mask, iterations=4)
    judged = band & stroma
    agreement = {}
    for dy in range(-2, 3):
        for dx in range(-2, 3):
            shifted = np.roll(mask, (dy, dx), axis=(0, 1))
            agreement[dy, dx] = (tumour_stain == shifted)[judged].mean()
    # Tumour pixels carry tumour stain, other pixels do not ...
    assert agreement[0, 0] > 0.9
    # ... and the mask sits exactly on the image: any shift fits worse.
    assert max(agreement, key=agreement.get) == (0, 0)
