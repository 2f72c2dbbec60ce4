"""Modified aligned Xception-65, the DeepLabV3+ backbone (Chen et al., 2018, section 3.2).

Follows DeepLab's ``core/xception.py`` (``xception_65``): an entry flow of two 3x3 convs
and three Xception blocks with strided separable convolutions (no max pooling), a middle
flow of 16 identity-residual blocks of three 728-channel separable convolutions, and an
exit flow of a 728-1024-1024 block with a 1x1 conv shortcut and a 1536-1536-2048 block of
separable convolutions with ReLU after each batch norm. Strides beyond the output stride
become atrous rates, as in DeepLab's ``stack_blocks_dense``.
"""

from __future__ import annotations

import keras

from histoseg.models.layers import conv_bn, separable_conv_bn
from histoseg.models.remat import apply_block


def _xception_module(
    x,
    depths,
    *,
    shortcut: str,
    stride: int,
    rate: int,
    depth_activation: bool,
    return_skip: bool,
    name: str,
):
    """One Xception unit: three separable convs (stride on the last) plus a shortcut."""
    residual = x
    skip = None
    for i, depth in enumerate(depths):
        residual = separable_conv_bn(
            residual,
            depth,
            3,
            strides=stride if i == 2 else 1,
            dilation_rate=rate,
            depth_activation=depth_activation,
            name=f"{name}_separable{i + 1}",
        )
        if i == 1:
            skip = residual
    if shortcut == "conv":
        projected = conv_bn(
            x, depths[-1], 1, strides=stride, activation=False, name=f"{name}_shortcut"
        )
        outputs = keras.layers.Add(name=f"{name}_add")([residual, projected])
    elif shortcut == "sum":
        outputs = keras.layers.Add(name=f"{name}_add")([residual, x])
    else:
        outputs = residual
    return [outputs, skip] if return_skip else outputs


def xception65(inputs, *, output_stride: int = 16, remat: bool = False):
    """Apply Xception-65 to ``inputs``; return ``(low_level, high_level)`` features.

    Args:
        inputs: Image tensor, NHWC, already scaled to [-1, 1].
        output_stride: 16 or 8: the input-to-``high_level`` resolution ratio.
        remat: Recompute each block (stem, 3 entry, 16 middle, 2 exit) in the backward pass.

    Returns:
        ``low_level``: stride-4 feature of entry block 2 (256 channels);
        ``high_level``: stride-``output_stride`` feature (2048 channels).
    """
    entry3_stride, middle_rate, exit_rates = (
        (2, 1, (1, 2)) if output_stride == 16 else (1, 2, (2, 4))
    )

    def stem(x):
        x = conv_bn(x, 32, 3, strides=2, name="entry_conv1")
        return conv_bn(x, 64, 3, name="entry_conv2")

    x = apply_block(stem, inputs, name="xception_stem", remat=remat)

    def module(**kwargs):
        return lambda t: _xception_module(t, **kwargs)

    x = apply_block(
        module(
            depths=(128, 128, 128),
            shortcut="conv",
            stride=2,
            rate=1,
            depth_activation=False,
            return_skip=False,
            name="entry_block1",
        ),
        x,
        name="entry_block1",
        remat=remat,
    )
    x, low_level = apply_block(
        module(
            depths=(256, 256, 256),
            shortcut="conv",
            stride=2,
            rate=1,
            depth_activation=False,
            return_skip=True,
            name="entry_block2",
        ),
        x,
        name="entry_block2",
        remat=remat,
    )
    x = apply_block(
        module(
            depths=(728, 728, 728),
            shortcut="conv",
            stride=entry3_stride,
            rate=1,
            depth_activation=False,
            return_skip=False,
            name="entry_block3",
        ),
        x,
        name="entry_block3",
        remat=remat,
    )
    for i in range(16):
        x = apply_block(
            module(
                depths=(728, 728, 728),
                shortcut="sum",
                stride=1,
                rate=middle_rate,
                depth_activation=False,
                return_skip=False,
                name=f"middle_block{i + 1}",
            ),
            x,
            name=f"middle_block{i + 1}",
            remat=remat,
        )
    x = apply_block(
        module(
            depths=(728, 1024, 1024),
            shortcut="conv",
            stride=1,
            rate=exit_rates[0],
            depth_activation=False,
            return_skip=False,
            name="exit_block1",
        ),
        x,
        name="exit_block1",
        remat=remat,
    )
    x = apply_block(
        module(
            depths=(1536, 1536, 2048),
            shortcut="none",
            stride=1,
            rate=exit_rates[1],
            depth_activation=True,
            return_skip=False,
            name="exit_block2",
        ),
        x,
        name="exit_block2",
        remat=remat,
    )
    return low_level, x
