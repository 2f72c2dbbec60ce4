"""DeepLabV3+ builder: shapes, parameter and multiply-add counts, precision, validation."""

from __future__ import annotations

import functools
import math

import keras
import pytest

from histoseg.errors import ConfigError
from histoseg.models import (
    BACKBONES,
    PRECISIONS,
    REMAT_MODES,
    build_deeplabv3plus,
    count_macs,
    count_params,
    model_macs,
)
from histoseg.models.remat import RematBlock

TINY = {"alpha": 0.35}


@functools.cache
def built(backbone: str, output_stride: int, **kwargs) -> keras.Model:
    """One 64x96 px, 21-class model per backbone and stride, shared by the tests (builds are slow)."""
    return build_deeplabv3plus(backbone, (64, 96, 3), 21, output_stride, **kwargs)


def trainable(model) -> int:
    return sum(math.prod(v.shape) for v in model.trainable_weights)


def head_params(high_channels: int, low_channels: int, num_classes: int, f: int = 256) -> int:
    """Trainable parameters of ASPP + decoder, written out from the paper's layer list
    (``f`` channels in ASPP and the decoder; the paper's 256)."""
    bn = 2  # gamma, beta
    aspp = 2 * (high_channels * f + bn * f)  # image pooling 1x1, 1x1 branch
    aspp += 3 * (9 * high_channels + bn * high_channels + high_channels * f + bn * f)
    aspp += 5 * f * f + bn * f  # projection of the concatenation
    decoder = low_channels * 48 + bn * 48
    fused = f + 48
    decoder += 9 * fused + bn * fused + fused * f + bn * f
    decoder += 9 * f + bn * f + f * f + bn * f
    return aspp + decoder + f * num_classes + num_classes


@pytest.mark.parametrize("output_stride", [8, 16])
@pytest.mark.parametrize(
    ("backbone", "kwargs", "high_channels"),
    [("mobilenetv2", TINY, 112), ("resnet50", {}, 2048), ("xception65", {}, 2048)],
)
def test_output_and_feature_shapes(backbone, kwargs, high_channels, output_stride):
    model = built(backbone, output_stride, **kwargs)
    assert model.output_shape == (None, 64, 96, 21)
    high = model.get_layer("aspp_branch0").input
    assert tuple(high.shape) == (None, 64 // output_stride, 96 // output_stride, high_channels)
    low = model.get_layer("decoder_low_level").input
    assert tuple(low.shape[1:3]) == (16, 24)


def test_xception65_parameter_count_matches_reference():
    # Reference: the widely used Keras port of DeepLab's Xception-65 DeepLabV3+
    # (bonlime/keras-deeplab-v3-plus) reports 41,258,213 parameters for 21 classes,
    # batch-norm statistics included; 41.05 M of them trainable for 2 classes.
    model = built("xception65", 16)
    assert sum(math.prod(v.shape) for v in model.weights) == 41_258_213
    two_classes = trainable(model) - 19 * (256 + 1)  # 19 fewer logit channels
    assert two_classes == 41_050_530


def test_resnet50_parameter_count_matches_torchvision_backbone_plus_head():
    # torchvision resnet50 (v1.5, bias-free convs): 25,557,032 parameters, of which the
    # 1000-class fc layer holds 2048 * 1000 + 1000.
    backbone = 25_557_032 - 2048 * 1000 - 1000
    assert trainable(built("resnet50", 16)) == backbone + head_params(2048, 256, 21)


def test_mobilenetv2_parameter_count_matches_keras_applications():
    reference = keras.applications.MobileNetV2(
        input_shape=(64, 64, 3), include_top=False, weights=None, alpha=1.0
    )
    # DeepLab drops MobileNetV2's final 1280-channel 1x1 conv (Conv_1 + its BN).
    dropped = {"Conv_1", "Conv_1_bn"}
    backbone = sum(
        math.prod(v.shape)
        for layer in reference.layers
        if layer.name not in dropped
        for v in layer.trainable_weights
    )
    assert count_params("mobilenetv2", 64, 2, alpha=1.0) == backbone + head_params(320, 24, 2)


def test_head_filters_set_the_width_of_aspp_and_the_decoder():
    backbone = count_params("mobilenetv2", 64, 2, **TINY) - head_params(112, 8, 2)
    narrow = count_params("mobilenetv2", 64, 2, head_filters=64, **TINY)
    assert narrow == backbone + head_params(112, 8, 2, f=64)


def test_xception65_multiply_adds_match_model_zoo():
    # DeepLab model zoo: xception65, OS16, 513x513, 21 classes: 54.17 G multiply-adds.
    macs = count_macs("xception65", 513, 21, 16)
    assert abs(macs - 54.17e9) / 54.17e9 < 0.03


def test_multiply_adds_of_a_plain_conv_and_scaling_with_pixels():
    inputs = keras.Input((10, 12, 4))
    x = keras.layers.Conv2D(6, 3, strides=2, padding="same")(inputs)
    x = keras.layers.DepthwiseConv2D(3, padding="same")(x)
    model = keras.Model(inputs, x)
    assert model_macs(model) == 5 * 6 * 6 * 9 * 4 + 5 * 6 * 6 * 9
    small = count_macs("mobilenetv2", 64, 2, 16, **TINY)
    large = count_macs("mobilenetv2", 128, 2, 16, **TINY)
    assert 3.9 < large / small <= 4.0  # only the image-pooling branch does not scale


def test_remat_blocks_wrap_blocks_and_keep_the_same_weights():
    plain = built("mobilenetv2", 16, **TINY)
    remat = build_deeplabv3plus("mobilenetv2", (64, 96, 3), 21, remat="blocks", **TINY)
    assert any(isinstance(layer, RematBlock) for layer in remat.layers)
    assert [v.shape for v in remat.weights] == [v.shape for v in plain.weights]
    assert model_macs(remat) == model_macs(plain)


@pytest.mark.parametrize("precision", ["mixed_bfloat16", "mixed_float16"])
def test_mixed_precision_keeps_float32_variables_and_logits(precision):
    before = keras.config.dtype_policy().name
    model = build_deeplabv3plus("mobilenetv2", (64, 64, 3), precision=precision, **TINY)
    assert keras.config.dtype_policy().name == before  # no global policy leaks
    assert {v.dtype for v in model.weights} == {"float32"}
    assert model.output.dtype == "float32"
    compute = precision.removeprefix("mixed_")
    assert model.get_layer("logits").compute_dtype == compute
    out = model(keras.ops.zeros((1, 64, 64, 3)))
    assert keras.backend.standardize_dtype(out.dtype) == "float32"


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"backbone": "vgg16"}, ["vgg16", *BACKBONES]),
        ({"input_shape": (100, 100, 3)}, ["100x100", "output_stride=16"]),
        ({"output_stride": 32}, ["output_stride=32", "8", "16"]),
        ({"precision": "float16"}, ["float16", *PRECISIONS]),
        ({"remat": "layers"}, ["layers", *REMAT_MODES]),
        ({"num_classes": 0}, ["num_classes=0"]),
        ({"backbone": "xception65", "alpha": 0.5}, ["alpha"]),
        ({"head_filters": 0}, ["head_filters=0"]),
    ],
)
def test_bad_configuration_raises_config_error_naming_what_is_allowed(kwargs, words):
    args = {"backbone": "mobilenetv2", "input_shape": (64, 64, 3), **kwargs}
    with pytest.raises(ConfigError) as error:
        build_deeplabv3plus(**args)
    for word in words:
        assert word in str(error.value)


def test_models_cli_prints_json(capsys):
    import json

    from histoseg.models.__main__ import main

    assert (
        main(["--backbone", "mobilenetv2", "--alpha", "0.35", "--input-size", "72", "--json"]) == 0
    )
    summary = json.loads(capsys.readouterr().out)
    assert summary["params"] == count_params("mobilenetv2", 72, 2, alpha=0.35)
    assert summary["macs"] == count_macs("mobilenetv2", 72, 2, alpha=0.35)
    assert summary["output_shape"] == [None, 72, 72, 2]
    assert summary["ceil_feature_sizes"] is True


def test_models_cli_counts_a_narrow_head(capsys):
    import json

    from histoseg.models.__main__ import main

    argv = ["--backbone", "mobilenetv2", "--alpha", "0.35", "--input-size", "64", "--json"]
    assert main([*argv, "--head-filters", "64"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["head_filters"] == 64
    assert summary["params"] == count_params("mobilenetv2", 64, 2, head_filters=64, alpha=0.35)
