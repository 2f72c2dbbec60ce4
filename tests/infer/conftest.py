"""A tiny checkpoint (MobileNetV2 x0.35, as histoseg.train saves one) and a tiny slide."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

TILE_PX = 256


@pytest.fixture(autouse=True)
def _one_process(monkeypatch):
    """Tests run as one process, whatever launcher started the test run."""
    from histoseg.train.launch import WORLD_VARIABLES

    for names in WORLD_VARIABLES:
        for name in names:
            monkeypatch.delenv(name, raising=False)


SLIDE_PX = (2048, 1536)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, tiny_slide) -> Path:
    """A run folder: options.json and checkpoints/ckpt-00000001.npz of a seeded model."""
    import keras

    from histoseg.models import build_deeplabv3plus
    from histoseg.train.checkpoints import save_checkpoint
    from histoseg.train.engines import get_engine
    from histoseg.train.step import make_optimizer
    from histoseg.train.validation import recalibrate_batch_norm
    from histoseg.wsi.slide import open_slide

    run = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(0)
    model = build_deeplabv3plus("mobilenetv2", (128, 128, 3), alpha=0.35)
    # A fresh model's activations fade layer by layer (its batch-norm statistics are 0 and
    # 1) and it predicts 0.5 everywhere; statistics from real patches make its output swing
    # between 0 and 1 with the image, so agreement between tilings means something.
    with open_slide(tiny_slide) as slide:
        patches = np.stack(
            [
                slide.read_region((x, y), 0, (128, 128))
                for x in (700, 1000, 1300)
                for y in (600, 900)
            ]
        )
    recalibrate_batch_norm(model, [(patches, None)] * 3, get_engine("none").init(), 3)
    optimizer = make_optimizer("adam", 1e-3)
    save_checkpoint(run / "checkpoints", 1, model, optimizer, bn_recalibrated=True)
    options = {
        "backbone": "mobilenetv2",
        "alpha": 0.35,
        "output_stride": 16,
        "norm": "batch",
        "patch_size": 128,
        "remat": "none",
    }
    (run / "options.json").write_text(json.dumps(options))
    return run


@pytest.fixture(scope="session")
def tiny_slide(tmp_path_factory) -> Path:
    from histoseg.wsi.synth import write_synthetic_slide

    tif, _ = write_synthetic_slide(
        tmp_path_factory.mktemp("slide") / "tiny.tif", SLIDE_PX, seed=4, progress=False
    )
    return tif


@pytest.fixture(scope="session")
def predictors(tiny_run):
    """tile size -> (checkpoint info, compiled predict, receptive-field radius px)."""
    from histoseg.infer.model import build_tile_model, find_checkpoint, tumour_probability_fn
    from histoseg.infer.receptive import receptive_field_radius_px

    info = find_checkpoint(tiny_run)
    cache = {}

    def get(tile_px: int):
        if tile_px not in cache:
            model = build_tile_model(info, tile_px)
            cache[tile_px] = (info, tumour_probability_fn(model), receptive_field_radius_px(model))
        return cache[tile_px]

    return get
