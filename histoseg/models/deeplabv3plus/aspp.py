"""Atrous spatial pyramid pooling (ASPP) of DeepLabV3+ (Chen et al., 2018, Fig. 2)."""

from __future__ import annotations

import keras

from histoseg.models.layers import ResizeBilinear, conv_bn, separable_conv_bn
from histoseg.models.remat import apply_block


def aspp(
    x,
    *,
    rates: tuple[int, int, int],
    filters: int,
    remat: bool = False,
    image_pooling_cells: int | None = None,
):
    """Apply ASPP to the backbone's high-level feature.

    Five parallel branches (1x1 conv; three 3x3 atrous separable convs at ``rates``; image
    pooling = global average, 1x1 conv, bilinear upsampling), concatenated and projected
    by a 1x1 conv, each conv with batch norm and ReLU. DeepLab's dropout after the
    projection is left out: it changes neither parameters nor multiply-adds, and it would
    make two steps with the same weights differ.

    Args:
        x: High-level feature, NHWC.
        rates: Atrous rates, (6, 12, 18) at output stride 16 and (12, 24, 36) at 8.
        filters: Channels of every branch and of the projection (the paper's 256).
        remat: Recompute each branch and the projection in the backward pass.
        image_pooling_cells: Pool over a ``cells x cells`` window around each position
            instead of the whole image (DeepLab's ``image_pooling_crop_size``): a model
            trained on patches then sees, at any input size, the context it was trained
            with, and its output no longer depends on where a tile was cut.

    Returns:
        The ``filters``-channel ASPP feature at the input's resolution.
    """
    height, width = x.shape[1], x.shape[2]

    def pooling(t):
        if image_pooling_cells is not None:
            # "same" padding averages only the cells inside the input, as at a patch edge
            t = keras.layers.AveragePooling2D(
                image_pooling_cells, strides=1, padding="same", name="aspp_pool"
            )(t)
            return conv_bn(t, filters, 1, epsilon=1e-5, name="aspp_pool")
        t = keras.layers.GlobalAveragePooling2D(keepdims=True, name="aspp_pool")(t)
        t = conv_bn(t, filters, 1, epsilon=1e-5, name="aspp_pool")
        return ResizeBilinear(height, width, name="aspp_pool_upsample")(t)

    branches = [
        apply_block(pooling, x, name="aspp_pooling", remat=remat),
        apply_block(
            lambda t: conv_bn(t, filters, 1, epsilon=1e-5, name="aspp_conv0"),
            x,
            name="aspp_branch0",
            remat=remat,
        ),
    ]
    for i, rate in enumerate(rates, start=1):
        branches.append(
            apply_block(
                lambda t, r=rate, n=f"aspp_separable{i}": separable_conv_bn(
                    t, filters, 3, dilation_rate=r, depth_activation=True, epsilon=1e-5, name=n
                ),
                x,
                name=f"aspp_branch{i}",
                remat=remat,
            )
        )

    def projection(ts):
        t = keras.layers.Concatenate(name="aspp_concat")(ts)
        return conv_bn(t, filters, 1, epsilon=1e-5, name="aspp_projection")

    return apply_block(projection, branches, name="aspp_projection", remat=remat)
