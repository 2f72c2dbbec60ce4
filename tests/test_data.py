"""The tf.data pipeline from patch lists to (image, mask) batches."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import tensorflow as tf

from histoseg.data import augment_patch, make_dataset, normalize, read_patch
from histoseg.errors import ConfigError, SlideError
from histoseg.wsi import PatchRef, grid_patches, save_patches
from histoseg.wsi.synth import write_synthetic_slide


@pytest.fixture(scope="module")
def refs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("data")
    tif, xml = write_synthetic_slide(
        folder / "s.tif", (1024, 768), seed=4, tile_px=256, progress=False
    )
    out = grid_patches(tif, 64, level=0, min_tissue=0.3, annotations=xml)
    assert any(r.is_tumor for r in out) and len(out) >= 8
    return out


def test_batches_have_the_right_shapes_and_dtypes(refs):
    ds = make_dataset(refs, 4, seed=1)
    assert ds.element_spec[0].shape.as_list() == [4, 64, 64, 3]
    assert ds.element_spec[1].shape.as_list() == [4, 64, 64]
    images, masks = next(iter(ds))
    assert images.dtype == tf.uint8 and masks.dtype == tf.uint8
    assert set(np.unique(masks.numpy())) <= {0, 1}
    x = normalize(images)
    assert x.dtype == tf.float32 and float(tf.reduce_min(x)) >= -1 and float(tf.reduce_max(x)) <= 1


def test_one_pass_without_shuffle_reads_every_patch_in_order(refs):
    ds = make_dataset(refs, 3, shuffle=False, repeat=False, drop_remainder=False)
    images = np.concatenate([b[0].numpy() for b in ds])
    masks = np.concatenate([b[1].numpy() for b in ds])
    assert len(images) == len(refs)
    for i in (0, len(refs) // 2, len(refs) - 1):
        image, mask = read_patch(refs[i])
        np.testing.assert_array_equal(images[i], image)
        np.testing.assert_array_equal(masks[i], mask)
    tumour = [i for i, r in enumerate(refs) if r.tumor_fraction > 0.2]
    assert masks[tumour].mean() > 0.1


def test_shuffle_is_deterministic_for_a_seed(refs):
    def first_masks(seed):
        ds = make_dataset(refs, 2, seed=seed, augment=True)
        return [m.numpy() for _, m in ds.take(4)]

    a, b = first_masks(7), first_masks(7)
    assert all((x == y).all() for x, y in zip(a, b, strict=True))


def test_augmentation_moves_image_and_mask_together():
    image = np.arange(4 * 4 * 3, dtype=np.uint8).reshape(4, 4, 3)
    mask = (image[..., 0] % 7 == 0).astype(np.uint8)
    seen = set()
    for code in range(8):
        im2, m2 = augment_patch(image, mask, code)
        np.testing.assert_array_equal(m2, (im2[..., 0] % 7 == 0).astype(np.uint8))
        seen.add(im2.tobytes())
    assert len(seen) == 8  # the eight symmetries of the square


def test_csv_input_and_errors(tmp_path, refs):
    path = save_patches(tmp_path / "p.csv", refs)
    assert next(iter(make_dataset(path, 2)))[0].shape == (2, 64, 64, 3)
    with pytest.raises(ConfigError, match="empty"):
        make_dataset([], 2)
    with pytest.raises(ConfigError, match="one patch size"):
        make_dataset([refs[0], PatchRef(refs[0].slide_path, 0, 0, 0, 128)], 1)
    with pytest.raises(ConfigError, match="batch_size"):
        make_dataset(refs, 0)
    with pytest.raises(SlideError, match=r"gone\.tif"):
        make_dataset([PatchRef(str(tmp_path / "gone.tif"), 0, 0, 0, 64)], 1)
    with pytest.raises(SlideError, match="level 5 out of range"):
        make_dataset([dataclasses.replace(refs[0], level=5)], 1)
