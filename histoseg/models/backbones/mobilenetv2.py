"""MobileNetV2 (Sandler et al., 2018) as a DeepLabV3+ backbone, with a width multiplier.

Inverted residual blocks (1x1 expand, 3x3 depthwise, 1x1 linear projection, identity
shortcut when shapes match), without the final 1280-channel conv, as in DeepLab's
``mobilenet_v2`` feature extractor. Strides beyond the output stride become atrous rates.
"""

from __future__ import annotations

import keras

from histoseg.models.norm import norm_layer
from histoseg.models.remat import apply_block

# (expansion t, output channels c, repeats n, first stride s): the paper's Table 2.
_BLOCKS = (
    (1, 16, 1, 1),
    (6, 24, 2, 2),
    (6, 32, 3, 2),
    (6, 64, 4, 2),
    (6, 96, 3, 1),
    (6, 160, 3, 2),
    (6, 320, 1, 1),
)


def _make_divisible(value: float, divisor: int = 8) -> int:
    """Round channels to a multiple of ``divisor`` as MobileNet does (never below 90%)."""
    rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
    if rounded < 0.9 * value:
        rounded += divisor
    return rounded


def _inverted_residual(x, *, expansion: int, filters: int, stride: int, rate: int, name: str):
    in_channels = x.shape[-1]
    y = x
    if expansion != 1:
        y = keras.layers.Conv2D(in_channels * expansion, 1, use_bias=False, name=f"{name}_expand")(
            y
        )
        y = norm_layer(epsilon=1e-3, name=f"{name}_expand_bn")(y)
        y = keras.layers.ReLU(6.0, name=f"{name}_expand_relu")(y)
    y = keras.layers.DepthwiseConv2D(
        3,
        strides=stride,
        dilation_rate=rate,
        padding="same",
        use_bias=False,
        name=f"{name}_depthwise",
    )(y)
    y = norm_layer(epsilon=1e-3, name=f"{name}_depthwise_bn")(y)
    y = keras.layers.ReLU(6.0, name=f"{name}_depthwise_relu")(y)
    y = keras.layers.Conv2D(filters, 1, use_bias=False, name=f"{name}_project")(y)
    y = norm_layer(epsilon=1e-3, name=f"{name}_project_bn")(y)
    if stride == 1 and in_channels == filters:
        y = keras.layers.Add(name=f"{name}_add")([x, y])
    return y


def mobilenetv2(inputs, *, output_stride: int = 16, remat: bool | str = False, alpha: float = 1.0):
    """Apply MobileNetV2 to ``inputs``; return ``(low_level, high_level)`` features.

    Args:
        inputs: Image tensor, NHWC, already scaled to [-1, 1].
        output_stride: 16 or 8.
        remat: ``True``, "blocks" or "units": recompute each block (stem and every inverted residual) in the backward pass.
        alpha: Width multiplier (1.0 = the paper's network; 0.35 for tiny test models).

    Returns:
        ``low_level``: stride-4 feature (the last 24*alpha-channel block);
        ``high_level``: stride-``output_stride`` feature (320*alpha channels).
    """

    remat = remat not in (False, "none")

    def stem(x):
        x = keras.layers.Conv2D(
            _make_divisible(32 * alpha),
            3,
            strides=2,
            padding="same",
            use_bias=False,
            name="stem_conv",
        )(x)
        x = norm_layer(epsilon=1e-3, name="stem_bn")(x)
        return keras.layers.ReLU(6.0, name="stem_relu")(x)

    x = apply_block(stem, inputs, name="mobilenet_stem", remat=remat)
    current_stride, rate = 2, 1
    low_level = None
    index = 0
    for expansion, channels, repeats, first_stride in _BLOCKS:
        filters = _make_divisible(channels * alpha)
        for r in range(repeats):
            stride = first_stride if r == 0 else 1
            if current_stride == output_stride:
                # Past the output stride a stride becomes a dilation of later layers.
                layer_stride, layer_rate, rate = 1, rate, rate * stride
            else:
                layer_stride, layer_rate = stride, 1
                current_stride *= stride
            name = f"mobilenet_block{index}"

            def block(t, e=expansion, f=filters, s=layer_stride, d=layer_rate, n=name):
                return _inverted_residual(t, expansion=e, filters=f, stride=s, rate=d, name=n)

            x = apply_block(block, x, name=name, remat=remat)
            index += 1
        if current_stride == 4:
            low_level = x
    return low_level, x
