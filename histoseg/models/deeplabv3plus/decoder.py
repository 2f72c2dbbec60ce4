"""The DeepLabV3+ decoder: refine ASPP output with the low-level feature, then upsample."""

from __future__ import annotations

import keras

from histoseg.models.layers import ResizeBilinear, conv_bn, separable_conv_bn
from histoseg.models.remat import apply_block

LOW_LEVEL_FILTERS = 48


def decoder(
    high,
    low_level,
    *,
    num_classes: int,
    output_size: tuple[int, int],
    filters: int,
    remat: bool = False,
):
    """Decode ASPP features into per-pixel logits at the input resolution.

    The low-level feature is projected to 48 channels (1x1 conv, BN, ReLU); the ASPP
    feature is upsampled bilinearly to its size and concatenated; two 3x3 separable convs
    of ``filters`` channels (the paper's 256) refine it; a 1x1 conv gives ``num_classes``
    logits, upsampled bilinearly to ``output_size``. The final upsampling runs in float32,
    so the logits are float32 under any mixed-precision policy.

    Args:
        high: ASPP output (stride ``output_stride``).
        low_level: Backbone's stride-4 feature.
        num_classes: Number of logit channels.
        output_size: ``(height, width)`` of the input image.
        filters: Channels of the two separable convs.
        remat: Recompute the projection and each separable conv in the backward pass.

    Returns:
        Logits, NHWC, float32, ``output_size`` x ``num_classes``.
    """
    low_height, low_width = low_level.shape[1], low_level.shape[2]
    low = apply_block(
        lambda t: conv_bn(t, LOW_LEVEL_FILTERS, 1, epsilon=1e-5, name="decoder_low_level"),
        low_level,
        name="decoder_low_level",
        remat=remat,
    )

    def fuse(ts):
        up = ResizeBilinear(low_height, low_width, name="decoder_upsample")(ts[0])
        t = keras.layers.Concatenate(name="decoder_concat")([up, ts[1]])
        return separable_conv_bn(
            t, filters, 3, depth_activation=True, epsilon=1e-5, name="decoder_separable1"
        )

    x = apply_block(fuse, [high, low], name="decoder_fuse", remat=remat)
    x = apply_block(
        lambda t: separable_conv_bn(
            t, filters, 3, depth_activation=True, epsilon=1e-5, name="decoder_separable2"
        ),
        x,
        name="decoder_refine",
        remat=remat,
    )
    x = keras.layers.Conv2D(num_classes, 1, name="logits")(x)
    return ResizeBilinear(*output_size, dtype="float32", name="logits_upsample")(x)
