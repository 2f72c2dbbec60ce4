"""Run a functional Keras model on one horizontal slab of its input per rank.

:class:`SpatialExecutor` walks the model's graph (nested functional blocks included) in
topological order and applies every layer to this rank's slab of that layer's input:

- pointwise layers (ReLU, Add, Concatenate on channels, ...) run as they are;
- convolutions, depthwise convolutions and max pooling first fetch the halo rows their
  kernel, dilation and stride reach into (:mod:`histoseg.spatial.halo`), fill the map's
  outer border as "same" padding does, and run the layer's own weights with "valid" rows;
- batch norm in training mode normalises with the global moments (local sums, allreduced);
- group norm, in training and inference, normalises each patch's channel groups with their
  moments over the whole map (local sums, allreduced);
- global average pooling allreduces local sums; its output is *replicated* (the whole
  tensor on every rank), and layers on a replicated tensor run as they are;
- bilinear resizing reads, for this rank's output rows, exactly the input rows (and
  weights) ``tf.image.resize`` would, fetched through the halo exchange;
- a remat block (:class:`~histoseg.models.remat.RematBlock`) in training is recomputed in
  the backward pass, its halo exchanges and moments included, as the Keras step does.

Every slab of a map is ``height / workers`` rows, so every map's height must be a multiple
of the number of ranks: an input size that is a multiple of ``workers x output stride``.
The layers' weights are the model's own variables, so a ``tf.GradientTape`` around the
executor gives this rank's weight gradients of its loss share (:mod:`histoseg.spatial.step`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import keras
from keras import ops

from histoseg.errors import ConfigError
from histoseg.models.layers import ResizeBilinear, is_recomputing
from histoseg.models.norm import FrozenBatchNorm
from histoseg.models.remat import RematBlock, sequenced_recompute
from histoseg.spatial.halo import fetch_rows, halo_apply
from histoseg.spatial.slabs import (
    conv_rows,
    exchange_plan,
    resize_coordinates,
    resize_rows,
    same_padding,
    slab_rows,
)

_MERGING = (
    keras.layers.Add,
    keras.layers.Subtract,
    keras.layers.Multiply,
    keras.layers.Average,
    keras.layers.Maximum,
    keras.layers.Minimum,
    keras.layers.Concatenate,
)
_POINTWISE = (
    keras.layers.ReLU,
    keras.layers.Activation,
    keras.layers.LeakyReLU,
    keras.layers.Identity,
    *_MERGING,
)


@dataclass(frozen=True)
class Slab:
    """A rank's part of one feature map: rows of a map ``height`` rows high, or all of it.

    ``replicated``: ``value`` is the whole map (the same on every rank), e.g. a globally
    pooled 1x1 map; otherwise it is this rank's slab (``height / workers`` rows).
    """

    value: Any
    height: int
    replicated: bool = False


class SpatialExecutor:
    """Apply ``model`` to this rank's slab of its input; see the module docstring.

    Args:
        model: A functional Keras model (channels-last), e.g. from
            ``histoseg.models.build_deeplabv3plus``, in any remat mode and precision.
        comm: :class:`~histoseg.spatial.comm.HorovodComm` or ``SingleProcess``.
        training: Batch norm with batch moments (global over all slabs) and moving
            statistics updated, as ``model(x, training=True)``; False: inference mode.

    Example:
        >>> executor = SpatialExecutor(model, HorovodComm())
        >>> logits_slab = executor(images[:, start:stop])  # this rank's rows
    """

    def __init__(self, model: keras.Model, comm, *, training: bool = True):
        self.model = model
        self.comm = comm
        self.training = training
        self._calls = 0
        self._again = ""  # ".again" per recomputation being traced (collective names)
        #: Set to a dict to record every layer's output :class:`Slab` by layer name.
        self.trace: dict | None = None

    def __call__(self, images):
        """This rank's slab of the model's output for this rank's slab ``images``."""
        height = int(self.model.inputs[0].shape[1])
        start, stop = slab_rows(height, self.comm.size, self.comm.rank)
        if int(images.shape[1]) != stop - start:
            raise ConfigError(
                f"rank {self.comm.rank} got {images.shape[1]} rows; its slab of the "
                f"{height}-row input is rows {start}-{stop}"
            )
        self._calls = 0
        (output,) = self._run(self.model, [Slab(images, height)])
        return output.value

    def _run(self, function, inputs: list[Slab]) -> list[Slab]:
        values = {id(t): s for t, s in zip(function.inputs, inputs, strict=True)}
        nodes_by_depth = function._nodes_by_depth  # Keras' own walk order (Function)
        for depth in sorted(nodes_by_depth, reverse=True):
            for node in nodes_by_depth[depth]:
                if node.operation is None or node.is_input:
                    continue
                args = [values[id(t)] for t in node.input_tensors]
                outs = self._apply(node.operation, args, node.outputs)
                for tensor, slab in zip(node.outputs, outs, strict=True):
                    values[id(tensor)] = slab
                if self.trace is not None:
                    self.trace[node.operation.name] = outs[0]
        return [values[id(t)] for t in function.outputs]

    def _apply(self, op, args: list[Slab], outputs) -> list[Slab]:
        if isinstance(op, RematBlock):  # recomputed in training, as in the Keras step
            return self._recomputed(op.block, args) if self.training else self._run(op.block, args)
        if isinstance(op, keras.Model):
            return self._run(op, args)
        self._calls += 1
        name = f"spatial.{self._calls}{self._again}.{op.name}"
        if isinstance(op, ResizeBilinear):  # a replicated map is resized into slabs too
            return [self._resize(op, args[0], name)]
        if all(a.replicated for a in args):  # the whole map on every rank
            return [Slab(self._call_whole(op, args), int(outputs[0].shape[1]), True)]
        if any(a.replicated for a in args):
            raise ConfigError(f"layer {op.name} mixes a replicated map with slabs")
        height = int(outputs[0].shape[1])
        if isinstance(op, _POINTWISE):
            if isinstance(op, keras.layers.Concatenate) and op.axis not in (-1, 3):
                raise ConfigError(f"{op.name}: only channel concatenation is supported")
            return [Slab(self._call_whole(op, args), height)]
        (slab,) = args
        if isinstance(op, (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)):
            return [self._conv(op, slab, name)]
        if isinstance(op, keras.layers.MaxPooling2D):
            return [self._max_pool(op, slab, name)]
        if isinstance(op, keras.layers.BatchNormalization):
            return [self._batch_norm(op, slab, name)]
        if isinstance(op, keras.layers.GroupNormalization):
            return [self._group_norm(op, slab, name)]
        if isinstance(op, keras.layers.GlobalAveragePooling2D):
            return [self._global_average(op, slab, name)]
        raise ConfigError(
            f"spatial parallelism does not support layer {op.name} ({type(op).__name__})"
        )

    def _recomputed(self, block, args: list[Slab]) -> list[Slab]:
        """``block`` on ``args``, recomputed in the backward pass as a :class:`RematBlock`
        is in the Keras step (``histoseg.models.remat.sequenced_recompute``).

        The recomputation's collectives are named after the forward pass's, plus
        ``.again``: every rank traces the backward pass's recomputations in its own order,
        and the names, not that order, match the ranks' collectives.
        """
        first, outer = self._calls, self._again  # where the forward pass names them from
        shapes: list[tuple[int, bool]] = []

        def forward(*values):
            again = bool(shapes)
            calls, suffix = self._calls, self._again
            if again:
                self._calls, self._again = first, outer + ".again"
            try:
                slabs = [Slab(v, a.height, a.replicated) for v, a in zip(values, args, strict=True)]
                outs = self._run(block, slabs)
            finally:
                if again:
                    self._calls, self._again = calls, suffix
            shapes[:] = [(o.height, o.replicated) for o in outs]
            values = [o.value for o in outs]
            return values[0] if len(values) == 1 else values

        values = sequenced_recompute(forward, [a.value for a in args])
        values = values if isinstance(values, (list, tuple)) else [values]
        return [Slab(v, h, r) for v, (h, r) in zip(values, shapes, strict=True)]

    def _call_whole(self, op, args: list[Slab]):
        values = [a.value for a in args]
        inputs = values if isinstance(op, _MERGING) else values[0]
        if isinstance(op, keras.layers.BatchNormalization):
            return op(inputs, training=self.training)
        return op(inputs)

    def _with_halo(self, op, slab: Slab, name: str, layer, *, fill: float, weights=()) -> Slab:
        """``layer`` on this rank's rows of ``op``'s input extended by the halo rows, the
        map's border fill and the column padding; the extended rows are recomputed, not
        kept, for the backward pass (:func:`~histoseg.spatial.halo.halo_apply`)."""
        kernel, stride, dilation = _geometry(op)
        out_height, needs = conv_rows(
            slab.height,
            self.comm.size,
            kernel=kernel[0],
            stride=stride[0],
            dilation=dilation[0],
            padding=op.padding,
        )
        exchange = exchange_plan(slab.height, self.comm.size, needs)
        columns = (0, 0)
        if op.padding == "same":
            width = int(slab.value.shape[2])
            _, left, right = same_padding(width, kernel[1], stride[1], dilation[1])
            columns = (left, right)

        def padded_layer(rows, *weights):
            if any(columns):
                rows = ops.pad(rows, [[0, 0], [0, 0], list(columns), [0, 0]], constant_values=fill)
            return layer(rows, *weights)

        x = ops.cast(slab.value, op.compute_dtype)
        y = halo_apply(x, exchange, self.comm, padded_layer, weights=weights, name=name, fill=fill)
        return Slab(y, out_height)

    def _conv(self, op, slab: Slab, name: str) -> Slab:
        if op.data_format != "channels_last" or getattr(op, "groups", 1) != 1:
            raise ConfigError(f"{op.name}: only channels-last, ungrouped convolutions")
        depthwise = isinstance(op, keras.layers.DepthwiseConv2D)
        convolve = ops.depthwise_conv if depthwise else ops.conv

        def layer(x, kernel, *bias):
            y = convolve(
                x, kernel, strides=op.strides, padding="valid", dilation_rate=op.dilation_rate
            )
            if bias:
                y = ops.add(y, bias[0])
            return y if op.activation is None else op.activation(y)

        dtype = op.compute_dtype
        weights = [op.kernel, *([op.bias] if op.use_bias else [])]
        weights = [ops.cast(w, dtype) for w in weights]
        return self._with_halo(op, slab, name, layer, fill=0.0, weights=weights)

    def _max_pool(self, op, slab: Slab, name: str) -> Slab:
        def layer(x):  # no weights
            return ops.max_pool(x, op.pool_size, strides=op.strides, padding="valid")

        return self._with_halo(op, slab, name, layer, fill=float("-inf"))

    def _batch_norm(self, op, slab: Slab, name: str) -> Slab:
        frozen = isinstance(op, FrozenBatchNorm) or not op.trainable
        if not self.training or frozen:
            return Slab(op(slab.value, training=self.training), slab.height)
        if op.renorm or op.axis not in (-1, 3):
            raise ConfigError(f"{op.name}: batch renorm / non-channel axis not supported")
        import tensorflow as tf

        x = ops.cast(slab.value, keras.backend.result_type(slab.value.dtype, "float32"))
        shape = tf.shape(x)
        count = tf.cast(shape[0] * shape[2], x.dtype) * slab.height
        axes = (0, 1, 2)
        total = self.comm.allreduce_sum(tf.reduce_sum(x, axes), f"{name}.sum")
        mean = total / count
        squares = tf.reduce_sum(tf.math.squared_difference(x, tf.stop_gradient(mean)), axes)
        variance = self.comm.allreduce_sum(squares, f"{name}.squares") / count
        if not is_recomputing():  # a recomputed block updates nothing a second time
            momentum = op.momentum
            op.moving_mean.assign(op.moving_mean * momentum + mean * (1.0 - momentum))
            op.moving_variance.assign(op.moving_variance * momentum + variance * (1.0 - momentum))
        y = ops.batch_normalization(
            x,
            mean,
            variance,
            axis=-1,
            offset=ops.cast(op.beta, x.dtype) if op.center else None,
            scale=ops.cast(op.gamma, x.dtype) if op.scale else None,
            epsilon=op.epsilon,
        )
        return Slab(ops.cast(y, op.compute_dtype), slab.height)

    def _group_norm(self, op, slab: Slab, name: str) -> Slab:
        """``keras.layers.GroupNormalization`` with each patch's moments per channel group
        over the whole map: local sums over this slab's rows, summed over the ranks."""
        if op.axis not in (-1, 3):
            raise ConfigError(f"{op.name}: only channels-last group norm is supported")
        import tensorflow as tf

        x = ops.cast(slab.value, keras.backend.result_type(slab.value.dtype, "float32"))
        shape = tf.shape(x)
        channels = int(x.shape[-1])
        groups = op.groups
        x = tf.reshape(x, [shape[0], shape[1], shape[2], groups, channels // groups])
        count = tf.cast(shape[2] * (channels // groups), x.dtype) * slab.height
        axes = (1, 2, 4)
        total = self.comm.allreduce_sum(tf.reduce_sum(x, axes, keepdims=True), f"{name}.sum")
        mean = total / count
        squares = tf.reduce_sum(
            tf.math.squared_difference(x, tf.stop_gradient(mean)), axes, keepdims=True
        )
        variance = self.comm.allreduce_sum(squares, f"{name}.squares") / count
        # as GroupNormalization._apply_normalization: x * inv + (beta - mean * inv)
        inv = tf.math.rsqrt(variance + op.epsilon)
        if op.scale:
            inv = inv * tf.reshape(ops.cast(op.gamma, x.dtype), [groups, -1])
        offset = -mean * inv
        if op.center:
            offset = offset + tf.reshape(ops.cast(op.beta, x.dtype), [groups, -1])
        y = tf.reshape(x * inv + offset, shape)
        return Slab(ops.cast(y, op.compute_dtype), slab.height)

    def _global_average(self, op, slab: Slab, name: str) -> Slab:
        if op.data_format != "channels_last":
            raise ConfigError(f"{op.name}: only channels-last pooling is supported")
        x = ops.cast(slab.value, op.compute_dtype)
        local = ops.sum(x, axis=(1, 2), keepdims=op.keepdims)
        total = self.comm.allreduce_sum(local, f"{name}.sum")
        return Slab(total / float(slab.height * int(x.shape[2])), 1, True)

    def _resize(self, op, slab: Slab, name: str) -> Slab:
        import tensorflow as tf

        first, stop = slab_rows(op.height, self.comm.size, self.comm.rank)
        lower, upper, lerp = resize_coordinates(slab.height, op.height)
        x = ops.cast(slab.value, op.compute_dtype)
        base = 0  # a replicated map has every row already
        if not slab.replicated:
            needs = resize_rows(slab.height, op.height, self.comm.size)
            exchange = exchange_plan(slab.height, self.comm.size, needs)
            x = fetch_rows(x, exchange, self.comm, name=name)
            base = needs[self.comm.rank][0]
        upper_rows = tf.gather(x, upper[first:stop] - base, axis=1)
        lower_rows = tf.gather(x, lower[first:stop] - base, axis=1)
        weights = tf.constant(lerp[first:stop], x.dtype)[None, :, None, None]
        rows = lower_rows + (upper_rows - lower_rows) * weights
        # Rows are done; resizing to the same row count is exact in rows (weights 0).
        y = ops.image.resize(
            rows, (stop - first, op.width), interpolation="bilinear", data_format="channels_last"
        )
        return Slab(y, op.height)


def _geometry(op) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
    if isinstance(op, keras.layers.MaxPooling2D):
        return tuple(op.pool_size), tuple(op.strides), (1, 1)
    return tuple(op.kernel_size), tuple(op.strides), tuple(op.dilation_rate)
