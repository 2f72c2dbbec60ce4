"""The one entry point that builds a DeepLabV3+ model from validated plain arguments."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import keras

from histoseg.config import HEAD_FILTERS, StepConfig
from histoseg.errors import ConfigError
from histoseg.models.backbones import BACKBONES
from histoseg.models.deeplabv3plus.aspp import aspp
from histoseg.models.deeplabv3plus.decoder import decoder
from histoseg.models.norm import DEFAULT_NORM, check_norm, normalization
from histoseg.models.remat import REMAT_MODES, REMAT_PARTS

PRECISIONS: tuple[str, ...] = ("float32", "mixed_bfloat16", "mixed_float16")
OUTPUT_STRIDES: tuple[int, ...] = (8, 16)
# ASPP atrous rates at output stride 16; doubled at 8 (DeepLabV3+ paper, section 4).
_ASPP_RATES_OS16 = (6, 12, 18)


def _check_choice(name: str, value, allowed: Sequence) -> None:
    if value not in allowed:
        raise ConfigError(
            f"{name}={value!r} is not allowed; choose one of: {', '.join(map(str, allowed))}"
        )


def _check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r} must be a positive int")


def validate_config(
    backbone: str,
    input_shape: Sequence[int],
    num_classes: int,
    output_stride: int,
    precision: str,
    remat: str,
    backbone_kwargs: dict,
    *,
    allow_any_size: bool = False,
) -> tuple[int, int, int]:
    """Check the builder's arguments; raise ConfigError naming the bad value and what is allowed.

    Returns:
        ``input_shape`` as a tuple of three ints.
    """
    _check_choice("backbone", backbone, tuple(BACKBONES))
    _check_choice("output_stride", output_stride, OUTPUT_STRIDES)
    _check_choice("precision", precision, PRECISIONS)
    _check_choice("remat", remat, REMAT_MODES)
    if len(input_shape) != 3 or not all(isinstance(d, int) and d > 0 for d in input_shape):
        raise ConfigError(
            f"input_shape={tuple(input_shape)!r} must be (height, width, channels), positive ints"
        )
    height, width, _ = input_shape
    if not allow_any_size and (height % output_stride or width % output_stride):
        raise ConfigError(
            f"input size {height}x{width} px is not a multiple of output_stride={output_stride}; "
            f"use e.g. {max(1, round(height / output_stride)) * output_stride} px"
        )
    if min(height, width) < output_stride:
        raise ConfigError(
            f"input size {height}x{width} px is smaller than output_stride={output_stride}"
        )
    _check_positive_int("num_classes", num_classes)
    accepted = set(inspect.signature(BACKBONES[backbone]).parameters) - {
        "inputs",
        "output_stride",
        "remat",
    }
    unknown = sorted(set(backbone_kwargs) - accepted)
    if unknown:
        raise ConfigError(
            f"backbone {backbone!r} takes no argument(s) {', '.join(unknown)}; "
            f"it takes: {', '.join(sorted(accepted)) or 'none'}"
        )
    alpha = backbone_kwargs.get("alpha", 1.0)
    if not isinstance(alpha, (int, float)) or alpha <= 0:
        raise ConfigError(f"alpha={alpha!r} must be a positive number (width multiplier)")
    return (int(height), int(width), int(input_shape[2]))


def build_for_step(config: StepConfig, num_classes: int = 2) -> keras.Model:
    """The DeepLabV3+ a :class:`StepConfig` describes: a square ``patch_size`` input, its
    backbone and options, output stride, precision and remat mode (what every harness builds)."""
    return build_deeplabv3plus(
        config.backbone,
        (config.patch_size, config.patch_size, 3),
        num_classes=num_classes,
        output_stride=config.output_stride,
        precision=config.precision,
        remat=config.remat,
        **config.backbone_kwargs,
    )


def build_deeplabv3plus(
    backbone: str = "xception65",
    input_shape: Sequence[int] = (1024, 1024, 3),
    num_classes: int = 2,
    output_stride: int = 16,
    precision: str = "float32",
    remat: str = "none",
    *,
    allow_any_size: bool = False,
    norm: str = DEFAULT_NORM,
    image_pooling_px: int | None = None,
    head_filters: int = HEAD_FILTERS,
    **backbone_kwargs,
) -> keras.Model:
    """Build DeepLabV3+ (Chen et al., 2018): backbone, ASPP, decoder, logits.

    The model takes float32 NHWC images scaled to [-1, 1] (see
    ``histoseg.train.step.prepare_images``) and returns float32 logits of shape
    ``(batch, height, width, num_classes)``.

    Args:
        backbone: One of ``BACKBONES`` ("xception65", "mobilenetv2", "resnet50").
        input_shape: ``(height, width, channels)``; height and width must be multiples
            of ``output_stride``.
        num_classes: Number of classes (logit channels).
        output_stride: 16 or 8: input-to-ASPP resolution ratio.
        precision: "float32", "mixed_bfloat16" or "mixed_float16". Mixed policies apply
            to this model's layers only (the global Keras policy is restored); variables
            and logits stay float32. Loss scaling for float16 is in the train step.
        remat: One of ``REMAT_MODES``: what to recompute in the backward pass.
        allow_any_size: Accept any input size (feature maps then use 'same'-padding
            ceil sizes, as the DeepLab model zoo does at 513 px). Used for counting.
        norm: One of ``NORMS`` (:mod:`histoseg.models.norm`): "batch", "frozen" or
            "group" normalisation in every conv block.
        image_pooling_px: ASPP image pooling over a window of this many input px around
            each position (the training patch size, for tiled inference) instead of the
            whole input; None (training) pools globally. The weights are the same.
        head_filters: Channels of ASPP and of the decoder's separable convs (the
            paper's 256; fewer make a narrow backbone's step much cheaper).
        **backbone_kwargs: Passed to the backbone, e.g. ``alpha=0.35`` for mobilenetv2.

    Returns:
        An uncompiled functional ``keras.Model`` named ``deeplabv3plus_<backbone>``.

    Raises:
        ConfigError: A bad backbone, size, stride, precision, remat mode or argument.

    Example:
        >>> model = build_deeplabv3plus("mobilenetv2", (128, 128, 3), alpha=0.35)
        >>> model.output_shape
        (None, 128, 128, 2)
    """
    height, width, channels = validate_config(
        backbone,
        input_shape,
        num_classes,
        output_stride,
        precision,
        remat,
        backbone_kwargs,
        allow_any_size=allow_any_size,
    )
    check_norm(norm)
    _check_positive_int("head_filters", head_filters)
    previous_policy = keras.config.dtype_policy()
    keras.config.set_dtype_policy(precision)
    try:
        with normalization(norm):
            return _assemble(
                backbone,
                (height, width, channels),
                num_classes,
                output_stride,
                remat,
                image_pooling_px,
                head_filters,
                backbone_kwargs,
            )
    finally:
        keras.config.set_dtype_policy(previous_policy)


def _assemble(
    backbone: str,
    shape: tuple[int, int, int],
    num_classes: int,
    output_stride: int,
    remat: str,
    image_pooling_px: int | None,
    head_filters: int,
    backbone_kwargs: dict,
) -> keras.Model:
    """Backbone, ASPP, decoder, under the dtype policy and normalisation already set."""
    height, width, channels = shape
    backbone_remat, head_remat = REMAT_PARTS[remat]
    rates = tuple(r * 16 // output_stride for r in _ASPP_RATES_OS16)
    images = keras.Input(shape=(height, width, channels), dtype="float32", name="images")
    low_level, high_level = BACKBONES[backbone](
        images, output_stride=output_stride, remat=backbone_remat, **backbone_kwargs
    )
    pooling_cells = None
    if image_pooling_px is not None:
        pooling_cells = max(1, int(image_pooling_px) // output_stride)
    features = aspp(
        high_level,
        rates=rates,
        filters=head_filters,
        remat=head_remat,
        image_pooling_cells=pooling_cells,
    )
    logits = decoder(
        features,
        low_level,
        num_classes=num_classes,
        output_size=(height, width),
        filters=head_filters,
        remat=head_remat,
    )
    return keras.Model(images, logits, name=f"deeplabv3plus_{backbone}")
