"""Receptive-field radius of small graphs and of the model built for tiled inference."""

from __future__ import annotations

import math

import keras

from histoseg.infer.receptive import receptive_field_radius_px


def test_stride_multiplies_later_kernels():
    x = keras.Input((64, 64, 1))
    y = keras.layers.Conv2D(1, 3, strides=2, padding="same")(x)  # radius 1, jump 2
    y = keras.layers.Conv2D(1, 3, padding="same")(y)  # + 1 * 2
    assert receptive_field_radius_px(keras.Model(x, y)) == 3.0


def test_global_pooling_is_unbounded_and_local_pooling_is_not():
    from histoseg.models import build_deeplabv3plus

    global_model = build_deeplabv3plus("mobilenetv2", (128, 128, 3), alpha=0.35)
    local_model = build_deeplabv3plus(
        "mobilenetv2", (128, 128, 3), alpha=0.35, image_pooling_px=128
    )
    assert math.isinf(receptive_field_radius_px(global_model))
    assert 100 < receptive_field_radius_px(local_model) < 2000
    assert [v.path for v in global_model.variables] == [v.path for v in local_model.variables]
