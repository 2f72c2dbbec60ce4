"""Normalisation choices: group norm is the same in training and inference, at any batch."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from histoseg.errors import ConfigError
from histoseg.models import build_deeplabv3plus
from histoseg.models.layers import BatchNorm
from histoseg.models.norm import FrozenBatchNorm, GroupNorm


def _model(norm: str) -> keras.Model:
    keras.utils.set_random_seed(0)
    return build_deeplabv3plus("mobilenetv2", (64, 64, 3), alpha=0.35, norm=norm)


def _norm_types(model: keras.Model) -> set[type]:
    return {type(layer) for layer in model._flatten_layers() if "Norm" in type(layer).__name__}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.uniform(-1, 1, (2, 64, 64, 3)).astype("float32")


def test_each_norm_builds_its_own_layers():
    assert _norm_types(_model("batch")) == {BatchNorm}
    assert _norm_types(_model("frozen")) == {FrozenBatchNorm}
    assert _norm_types(_model("group")) == {GroupNorm}
    with pytest.raises(ConfigError, match="norm='instance' is not allowed; choose one of"):
        _model("instance")


def test_group_norm_is_per_patch_and_the_same_in_training_and_inference(images):
    model = _model("group")
    pair = model(images, training=True).numpy()
    alone = model(images[:1], training=True).numpy()
    inference = model(images, training=False).numpy()
    np.testing.assert_allclose(alone[0], pair[0], atol=1e-4)
    np.testing.assert_allclose(inference, pair, atol=1e-4)
    # the control: batch norm at batch 1 normalises with one patch's own moments, and its
    # ASPP image-pooling branch (a 1x1 map) with a single value, unlike at inference
    batch = _model("batch")
    assert np.abs(batch(images[:1], training=True) - batch(images[:1], training=False)).max() > 0.1


def test_frozen_batch_norm_never_updates_its_statistics(images):
    model = _model("frozen")
    before = [v.numpy().copy() for v in model.non_trainable_variables]
    trained = model(images, training=True).numpy()
    np.testing.assert_allclose(trained, model(images, training=False).numpy(), atol=1e-5)
    for old, new in zip(before, model.non_trainable_variables, strict=True):
        np.testing.assert_array_equal(old, new.numpy())


def test_group_norm_picks_a_group_count_that_divides_the_channels():
    layer = GroupNorm(epsilon=1e-3)
    layer.build((None, 4, 4, 24))
    assert layer.groups == 8
    config = layer.get_config()
    assert config["max_groups"] == 32
    assert GroupNorm.from_config(config).max_groups == 32
