"""ResNet-50 (He et al., 2016) as a DeepLabV3+ backbone.

Bottleneck blocks (1x1, 3x3, 1x1 x4) with the stride on the 3x3 conv (ResNet v1.5, as in
torchvision and DeepLabV3+ implementations); the stage strides beyond the output stride
become atrous rates. The low-level feature is the output of the first stage (stride 4).
"""

from __future__ import annotations

import keras

from histoseg.models.layers import conv_bn
from histoseg.models.remat import apply_block

# (bottleneck width, blocks, first stride) of stages conv2_x .. conv5_x.
_STAGES = ((64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2))


def _bottleneck(x, *, width: int, stride: int, rate: int, name: str):
    shortcut = x
    if stride != 1 or x.shape[-1] != 4 * width:
        shortcut = conv_bn(
            x, 4 * width, 1, strides=stride, activation=False, name=f"{name}_shortcut"
        )
    y = conv_bn(x, width, 1, epsilon=1e-5, name=f"{name}_conv1")
    y = conv_bn(y, width, 3, strides=stride, dilation_rate=rate, epsilon=1e-5, name=f"{name}_conv2")
    y = conv_bn(y, 4 * width, 1, activation=False, epsilon=1e-5, name=f"{name}_conv3")
    y = keras.layers.Add(name=f"{name}_add")([y, shortcut])
    return keras.layers.ReLU(name=f"{name}_relu")(y)


def resnet50(inputs, *, output_stride: int = 16, remat: bool | str = False):
    """Apply ResNet-50 to ``inputs``; return ``(low_level, high_level)`` features.

    Args:
        inputs: Image tensor, NHWC, already scaled to [-1, 1].
        output_stride: 16 or 8.
        remat: ``True``, "blocks" or "units": recompute each block (stem and every bottleneck) in the backward pass.

    Returns:
        ``low_level``: stride-4 output of stage conv2_x (256 channels);
        ``high_level``: stride-``output_stride`` output of conv5_x (2048 channels).
    """

    remat = remat not in (False, "none")

    def stem(x):
        x = conv_bn(x, 64, 7, strides=2, epsilon=1e-5, name="stem")
        return keras.layers.MaxPooling2D(3, strides=2, padding="same", name="stem_pool")(x)

    x = apply_block(stem, inputs, name="resnet_stem", remat=remat)
    current_stride, rate = 4, 1
    low_level = None
    for stage, (width, blocks, first_stride) in enumerate(_STAGES, start=2):
        for b in range(blocks):
            stride = first_stride if b == 0 else 1
            if current_stride == output_stride:
                layer_stride, layer_rate, rate = 1, rate, rate * stride
            else:
                layer_stride, layer_rate = stride, rate
                current_stride *= stride
            name = f"conv{stage}_block{b + 1}"

            def block(t, w=width, s=layer_stride, d=layer_rate, n=name):
                return _bottleneck(t, width=w, stride=s, rate=d, name=n)

            x = apply_block(block, x, name=name, remat=remat)
        if stage == 2:
            low_level = x
    return low_level, x
