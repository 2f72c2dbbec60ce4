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
    unit_remat: bool = False,
):
    """One Xception unit: three separable convs (stride on the last) plus a shortcut.

    With ``unit_remat`` each separable conv and the conv shortcut is its own
    rematerialised block (finer than recomputing the whole unit at once).
    """

    def part(build, inputs, part_name):
        if not unit_remat:
            return build(inputs)
        return apply_block(build, inputs, name=part_name, remat=True)

    residual = x
    skip = None
    for i, depth in enumerate(depths):
        unit_name = f"{name}_separable{i + 1}"
        residual = part(
            lambda t, d=depth, s=(stride if i == 2 else 1), n=unit_name: separable_conv_bn(
                t, d, 3, strides=s, dilation_rate=rate, depth_activation=depth_activation, name=n
            ),
            residual,
            unit_name,
        )
        if i == 1:
            skip = residual
    if shortcut == "conv":
        projected = part(
            lambda t: conv_bn(
                t, depths[-1], 1, strides=stride, activation=False, name=f"{name}_shortcut"
            ),
            x,
            f"{name}_shortcut",
        )
        outputs = keras.layers.Add(name=f"{name}_add")([residual, projected])
    elif shortcut == "sum":
        outputs = keras.layers.Add(name=f"{name}_add")([residual, x])
    else:
        outputs = residual
    return [outputs, skip] if return_skip else outputs


def xception65(inputs, *, output_stride: int = 16, remat: bool | str = False):
    """Apply Xception-65 to ``inputs``; return ``(low_level, high_level)`` features.

    Args:
        inputs: Image tensor, NHWC, already scaled to [-1, 1].
        output_stride: 16 or 8: the input-to-``high_level`` resolution ratio.
        remat: ``False``/"none": plain; ``True``/"blocks": recompute each block (stem,
            3 entry, 16 middle, 2 exit) in the backward pass; "units": the same, but the
            three entry-flow blocks (at stride 2 to 8, where activations are largest) are
            recomputed one separable conv at a time, which lowers the backward pass's peak.

    Returns:
        ``low_level``: stride-4 feature of entry block 2 (256 channels);
        ``high_level``: stride-``output_stride`` feature (2048 channels).
    """
    mode = {False: "none", True: "blocks"}.get(remat, remat)
    blocks = mode in ("blocks", "units")
    entry3_stride, middle_rate, exit_rates = (
        (2, 1, (1, 2)) if output_stride == 16 else (1, 2, (2, 4))
    )

    def module(x, name, *, entry=False, **kwargs):
        kwargs = {"rate": 1, "stride": 1, "depth_activation": False, "return_skip": False, **kwargs}
        if entry and mode == "units":
            return _xception_module(x, name=name, unit_remat=True, **kwargs)
        return apply_block(
            lambda t: _xception_module(t, name=name, **kwargs), x, name=name, remat=blocks
        )

    def stem(x):
        x = conv_bn(x, 32, 3, strides=2, name="entry_conv1")
        return conv_bn(x, 64, 3, name="entry_conv2")

    x = apply_block(stem, inputs, name="xception_stem", remat=blocks)
    x = module(x, "entry_block1", entry=True, depths=(128, 128, 128), shortcut="conv", stride=2)
    x, low_level = module(
        x,
        "entry_block2",
        entry=True,
        depths=(256, 256, 256),
        shortcut="conv",
        stride=2,
        return_skip=True,
    )
    x = module(
        x, "entry_block3", entry=True, depths=(728, 728, 728), shortcut="conv", stride=entry3_stride
    )
    for i in range(16):
        x = module(
            x, f"middle_block{i + 1}", depths=(728, 728, 728), shortcut="sum", rate=middle_rate
        )
    x = module(x, "exit_block1", depths=(728, 1024, 1024), shortcut="conv", rate=exit_rates[0])
    x = module(
        x,
        "exit_block2",
        depths=(1536, 1536, 2048),
        shortcut="none",
        rate=exit_rates[1],
        depth_activation=True,
    )
    return low_level, x
