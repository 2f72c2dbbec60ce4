"""Patch reading throughput: the tf.data pipeline beside a naive one-read-per-patch loop.

Run (not part of the default ``pytest`` run, whose testpaths is tests/ only):
    flock /tmp/histoseg-cpu.lock .venv/bin/python -m pytest bench/test_patch_read.py \\
        --benchmark-only --benchmark-json results/patch_read.json
    pytest-benchmark compare --group-by=param:patch_size

Both readers read the same random patches (not aligned to the TIFF tiles, as in training)
from one synthetic 8192x6144 slide and produce the same (image, mask) pairs; extra_info
carries patches/s and megapixels/s from the median round.
"""

from __future__ import annotations

import numpy as np
import openslide
import pytest

from histoseg.data import close_cached, make_dataset
from histoseg.wsi import Annotations, sample_patches
from histoseg.wsi.synth import write_synthetic_slide

SLIDE_SIZE_PX = (8192, 6144)
PATCHES_PER_ROUND = {256: 256, 1024: 24}


@pytest.fixture(scope="module")
def bench_slide(tmp_path_factory):
    folder = tmp_path_factory.mktemp("patch_read")
    return write_synthetic_slide(folder / "bench.tif", SLIDE_SIZE_PX, seed=21, progress=False)


@pytest.fixture(scope="module")
def bench_refs(bench_slide):
    tif, xml = bench_slide
    return {
        size: sample_patches(tif, size, n, seed=size, annotations=xml, min_tissue=0.5)
        for size, n in PATCHES_PER_ROUND.items()
    }


def naive_read(refs, annotations):
    """What a first script does: open the slide, read_region, PIL RGBA -> RGB, per patch."""
    out = []
    for ref in refs:
        slide = openslide.OpenSlide(ref.slide_path)
        side = ref.patch_size
        image = np.asarray(
            slide.read_region((ref.x, ref.y), ref.level, (side, side)).convert("RGB")
        )
        mask = annotations.rasterize((ref.x, ref.y, side, side), 1.0, size_px=(side, side))
        slide.close()
        out.append((image, mask))
    return out


def pipeline_read(dataset):
    return [(images.numpy(), masks.numpy()) for images, masks in dataset]


def _record(benchmark, refs, patch_size):
    median_s = benchmark.stats.stats.median
    n = len(refs)
    benchmark.extra_info.update(
        {
            "patch_size": patch_size,
            "patches_per_round": n,
            "patches_per_s": n / median_s,
            "megapixels_per_s": n * patch_size * patch_size / 1e6 / median_s,
        }
    )


@pytest.mark.parametrize("patch_size", [256, 1024])
@pytest.mark.parametrize("reader", ["pipeline", "naive"])
def test_patch_read(benchmark, bench_slide, bench_refs, reader, patch_size):
    refs = bench_refs[patch_size]
    assert len(refs) == PATCHES_PER_ROUND[patch_size]
    benchmark.group = f"patch_read-{patch_size}px"
    if reader == "naive":
        annotations = Annotations.from_xml(bench_slide[1])
        result = benchmark.pedantic(
            naive_read, args=(refs, annotations), rounds=5, warmup_rounds=1, iterations=1
        )
    else:
        close_cached()  # every measured pipeline starts from a fresh process state
        dataset = make_dataset(refs, 4, shuffle=False, repeat=False, drop_remainder=False)
        batches = benchmark.pedantic(
            pipeline_read, args=(dataset,), rounds=5, warmup_rounds=1, iterations=1
        )
        result = [(im, m) for images, masks in batches for im, m in zip(images, masks, strict=True)]
    assert len(result) == len(refs)
    assert result[0][0].shape == (patch_size, patch_size, 3)
    assert result[0][1].shape == (patch_size, patch_size)
    _record(benchmark, refs, patch_size)
