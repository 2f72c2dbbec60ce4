"""Analytic multiply-adds (MACs) and parameter counts of DeepLabV3+ from its layer shapes."""

from __future__ import annotations

import math

import keras

from histoseg.models.deeplabv3plus.builder import build_deeplabv3plus
from histoseg.models.remat import RematBlock


def _node_shapes(layer) -> tuple[tuple, tuple]:
    node = layer._inbound_nodes[0]
    return tuple(node.input_tensors[0].shape), tuple(node.output_tensors[0].shape)


def model_macs(model: keras.Layer) -> int:
    """Multiply-adds of one forward pass per image, summed over convolutions and dense layers.

    Counts what dominates and what the DeepLab model zoo counts: every Conv2D
    (``out_h * out_w * out_c * k_h * k_w * in_c / groups``), DepthwiseConv2D
    (``out_h * out_w * in_c * multiplier * k_h * k_w``) and Dense layer. Batch norm,
    activations, pooling, resizing and bias additions are left out (under 1%).

    Args:
        model: A built functional model; nested functional blocks and
            :class:`~histoseg.models.remat.RematBlock` wrappers are walked into.
    """
    if isinstance(model, RematBlock):
        return model_macs(model.block)
    if isinstance(model, keras.Model):
        return sum(model_macs(layer) for layer in model.layers)
    if isinstance(model, keras.layers.DepthwiseConv2D):
        _, out_shape = _node_shapes(model)
        k_h, k_w = model.kernel_size
        return math.prod(out_shape[1:]) * k_h * k_w
    if isinstance(model, keras.layers.Conv2D):
        in_shape, out_shape = _node_shapes(model)
        k_h, k_w = model.kernel_size
        return math.prod(out_shape[1:]) * k_h * k_w * in_shape[-1] // model.groups
    if isinstance(model, keras.layers.Dense):
        in_shape, out_shape = _node_shapes(model)
        return math.prod(out_shape[1:]) * in_shape[-1]
    return 0


def count_macs(
    backbone: str = "xception65",
    input_size_px: int = 513,
    num_classes: int = 2,
    output_stride: int = 16,
    **backbone_kwargs,
) -> int:
    """Multiply-adds of one DeepLabV3+ forward pass on a square ``input_size_px`` image.

    Any input size is accepted: sizes that are not a multiple of ``output_stride`` (the
    DeepLab model zoo's 513 px) get the 'same'-padding feature-map sizes,
    ``ceil(size / stride)``, exactly as TensorFlow DeepLab computes them.

    Example:
        >>> round(count_macs("xception65", 513, 21, 16) / 1e9, 1)  # zoo: 54.17
    """
    model = _square_model(backbone, input_size_px, num_classes, output_stride, backbone_kwargs)
    return model_macs(model)


def count_params(
    backbone: str = "xception65",
    input_size_px: int = 512,
    num_classes: int = 2,
    output_stride: int = 16,
    **backbone_kwargs,
) -> int:
    """Trainable parameters of DeepLabV3+ (batch-norm moving statistics excluded)."""
    model = _square_model(backbone, input_size_px, num_classes, output_stride, backbone_kwargs)
    return sum(math.prod(v.shape) for v in model.trainable_weights)


def _square_model(backbone, input_size_px, num_classes, output_stride, backbone_kwargs):
    """The model the counts walk: square input, any size (ceil feature maps if needed)."""
    return build_deeplabv3plus(
        backbone,
        (input_size_px, input_size_px, 3),
        num_classes,
        output_stride,
        allow_any_size=True,
        **backbone_kwargs,
    )
