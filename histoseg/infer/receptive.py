"""The receptive field of a Keras model: how far from a pixel its prediction can look.

Walks the functional graph (nested blocks included) carrying, for every tensor, the jump
(input px between neighbouring cells) and the radius (input px either side of a cell's
centre that can influence it). Tiled inference takes its overlap from this radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import keras


@dataclass(frozen=True)
class Field:
    """Jump and receptive-field radius of one tensor, in input px."""

    jump_px: float
    radius_px: float


_UNBOUNDED = Field(1.0, math.inf)


def receptive_field_radius_px(model: keras.Model) -> float:
    """Input px either side of an output pixel that can change it (inf for a global op).

    Example:
        >>> import keras
        >>> x = keras.Input((64, 64, 1))
        >>> y = keras.layers.Conv2D(1, 3, dilation_rate=2)(keras.layers.Conv2D(1, 3)(x))
        >>> receptive_field_radius_px(keras.Model(x, y))
        3.0
    """
    fields = _propagate(model, [Field(1.0, 0.0) for _ in model.inputs])
    return max(f.radius_px for f in fields)


def _propagate(model: keras.Model, input_fields: list[Field]) -> list[Field]:
    known = {id(t): f for t, f in zip(model.inputs, input_fields, strict=True)}
    for op in model.operations:
        for node in op._inbound_nodes:
            inputs = [known.get(id(t)) for t in node.input_tensors]
            if not inputs or any(f is None for f in inputs):
                continue  # a node of another graph this layer also belongs to
            outputs = _layer_fields(op, inputs, node)
            for t, f in zip(node.output_tensors, outputs, strict=True):
                known[id(t)] = f
    return [known.get(id(t), _UNBOUNDED) for t in model.outputs]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)


def _layer_fields(layer, inputs: list[Field], node) -> list[Field]:
    n_outputs = len(node.output_tensors)
    jump = max(f.jump_px for f in inputs)
    radius = max(f.radius_px for f in inputs)
    if isinstance(layer, keras.Model):
        return _propagate(layer, inputs)
    if isinstance(layer, keras.layers.GlobalAveragePooling2D | keras.layers.GlobalMaxPooling2D):
        return [_UNBOUNDED] * n_outputs
    kernel = getattr(layer, "kernel_size", None) or getattr(layer, "pool_size", None)
    if kernel is not None:
        k = max(_pair(kernel))
        dilation = max(_pair(getattr(layer, "dilation_rate", 1)))
        stride = max(_pair(getattr(layer, "strides", None) or k))
        radius += (k - 1) * dilation / 2 * jump
        jump *= stride
    elif isinstance(getattr(layer, "height", None), int):
        # a bilinear resize to a fixed size: one input cell either side, then finer cells
        radius += jump
        in_height = node.input_tensors[0].shape[1]
        jump = jump * in_height / layer.height if in_height else jump
    return [Field(jump, radius)] * n_outputs
