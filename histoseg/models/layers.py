"""Small Keras layers and layer recipes shared by the backbones and the DeepLabV3+ head.

Everything here is plain Keras 3 (``keras.layers`` and ``keras.ops``), so the model is not
tied to one backend.
"""

from __future__ import annotations

import contextlib
import threading

import keras
from keras import ops

_recomputation = threading.local()


def prepare_images(images):
    """Images as the model wants them: uint8 [0, 255] -> float32 [-1, 1]; floats pass as float32.

    The data pipeline delivers uint8 patches (4x smaller than float32 in transit); the cast
    and scaling happen here, at the model's edge (the train step, the spatial step and
    inference all call this).
    """
    images = ops.convert_to_tensor(images)
    if keras.backend.standardize_dtype(images.dtype) == "uint8":
        return ops.cast(images, "float32") / 127.5 - 1.0
    return ops.cast(images, "float32")


@contextlib.contextmanager
def recomputing():
    """Mark the code inside as a recomputation (rematerialisation) of a forward pass.

    Batch norm must not update its moving statistics a second time when a block is
    recomputed in the backward pass; :class:`BatchNorm` reads this flag at trace time.
    """
    previous = getattr(_recomputation, "active", False)
    _recomputation.active = True
    try:
        yield
    finally:
        _recomputation.active = previous


def is_recomputing() -> bool:
    """True inside :func:`recomputing`."""
    return getattr(_recomputation, "active", False)


@keras.saving.register_keras_serializable(package="histoseg")
class BatchNorm(keras.layers.BatchNormalization):
    """Batch normalisation that skips its moving-statistic update while recomputing.

    In training mode the forward pass normalises with the batch moments and updates the
    moving mean and variance once. When the same layer runs again inside
    :func:`recomputing` (the backward pass of a rematerialised block) it normalises with
    the batch moments again, which gives the same activations, but leaves the moving
    statistics alone, so a remat step updates them exactly as a plain step does.

    Under Keras's torch backend a training-mode call runs PyTorch's fused batch norm
    (:func:`_torch_batch_norm`): Keras's own computes it op by op from a float32 copy of
    the input, and autograd keeps that copy and the centred input for the backward pass,
    two float32 maps per layer beside the layer's input.
    """

    def call(self, inputs, training=None, mask=None):
        batch_moments = training and self.trainable and mask is None and not self.renorm
        last_axis = self.axis in (-1, len(inputs.shape) - 1)
        if batch_moments and last_axis and keras.backend.backend() == "torch":
            return _torch_batch_norm(self, inputs, update=not is_recomputing())
        if not (training and self.trainable and is_recomputing()) or self.renorm:
            return super().call(inputs, training=training, mask=mask)
        # BN overflows in float16/bfloat16, so it computes in float32 like the parent.
        compute_dtype = keras.backend.result_type(inputs.dtype, "float32")
        inputs = ops.cast(inputs, compute_dtype)
        mean, variance = self._moments(inputs, mask)
        gamma = ops.cast(self.gamma, compute_dtype) if self.scale else None
        beta = ops.cast(self.beta, compute_dtype) if self.center else None
        outputs = ops.batch_normalization(
            x=inputs,
            mean=mean,
            variance=variance,
            axis=self.axis,
            offset=beta,
            scale=gamma,
            epsilon=self.epsilon,
        )
        return ops.cast(outputs, self.compute_dtype)


def _torch_batch_norm(layer: keras.layers.BatchNormalization, inputs, *, update: bool):
    """``layer`` in training mode as one ``torch.native_batch_norm`` (torch backend only).

    The channels-last map is handed over as its channels-first view, which PyTorch's
    kernels read in place; the kernel normalises in float32 whatever the input's dtype,
    returns the input's dtype, and keeps only its input and two per-channel vectors for
    the backward pass. The batch's mean and (biased) variance come back from the kernel,
    so the moving statistics are updated as Keras's layer updates them (its momentum, no
    unbiasing), unless ``update`` is False (a recomputation).
    """
    import torch  # only on the torch backend

    def value(variable):
        return None if variable is None else variable.value

    x = inputs.permute(0, inputs.ndim - 1, *range(1, inputs.ndim - 1))  # NHWC -> NCHW view
    out, mean, invstd = torch.native_batch_norm(
        x, value(layer.gamma), value(layer.beta), None, None, True, 0.0, layer.epsilon
    )
    if update:
        with torch.no_grad():
            variance = (invstd.float().pow(-2) - layer.epsilon).clamp_min(0.0)
            m = layer.momentum
            layer.moving_mean.assign(layer.moving_mean.value * m + mean.float() * (1.0 - m))
            layer.moving_variance.assign(layer.moving_variance.value * m + variance * (1.0 - m))
    return out.permute(0, *range(2, inputs.ndim), 1)


@keras.saving.register_keras_serializable(package="histoseg")
class ResizeBilinear(keras.layers.Layer):
    """Bilinear resize of an NHWC feature map to a fixed ``(height, width)``.

    Args:
        height: Output height in pixels.
        width: Output width in pixels.
        **kwargs: Passed to ``keras.layers.Layer`` (``name``, ``dtype``).
    """

    def __init__(self, height: int, width: int, **kwargs):
        super().__init__(**kwargs)
        self.height = int(height)
        self.width = int(width)

    def call(self, inputs):
        return ops.image.resize(
            inputs, (self.height, self.width), interpolation="bilinear", data_format="channels_last"
        )

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.height, self.width, input_shape[-1])

    def get_config(self):
        return {**super().get_config(), "height": self.height, "width": self.width}


def conv_bn(
    x,
    filters: int,
    kernel_size: int = 1,
    *,
    strides: int = 1,
    dilation_rate: int = 1,
    activation: bool = True,
    epsilon: float = 1e-3,
    name: str,
):
    """Conv2D (no bias) -> normalisation (:mod:`histoseg.models.norm`) -> optional ReLU."""
    from histoseg.models.norm import norm_layer  # norm.py imports this module

    x = keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=False,
        name=f"{name}_conv",
    )(x)
    x = norm_layer(epsilon=epsilon, name=f"{name}_bn")(x)
    if activation:
        x = keras.layers.ReLU(name=f"{name}_relu")(x)
    return x


def separable_conv_bn(
    x,
    filters: int,
    kernel_size: int = 3,
    *,
    strides: int = 1,
    dilation_rate: int = 1,
    depth_activation: bool = False,
    epsilon: float = 1e-3,
    name: str,
):
    """DeepLab's separable convolution: depthwise -> BN -> pointwise -> BN, with ReLU.

    As in DeepLab's ``xception.py`` (``activation_fn_in_separable_conv``): with
    ``depth_activation=False`` a ReLU comes first (pre-activation, used in Xception's
    residual units); with ``True`` a ReLU follows each BN (used in the exit flow's last
    unit, in ASPP and in the decoder).
    """
    from histoseg.models.norm import norm_layer  # norm.py imports this module

    if not depth_activation:
        x = keras.layers.ReLU(name=f"{name}_prerelu")(x)
    x = keras.layers.DepthwiseConv2D(
        kernel_size,
        strides=strides,
        dilation_rate=dilation_rate,
        padding="same",
        use_bias=False,
        name=f"{name}_depthwise",
    )(x)
    x = norm_layer(epsilon=epsilon, name=f"{name}_depthwise_bn")(x)
    if depth_activation:
        x = keras.layers.ReLU(name=f"{name}_depthwise_relu")(x)
    x = keras.layers.Conv2D(filters, 1, padding="same", use_bias=False, name=f"{name}_pointwise")(x)
    x = norm_layer(epsilon=epsilon, name=f"{name}_pointwise_bn")(x)
    if depth_activation:
        x = keras.layers.ReLU(name=f"{name}_pointwise_relu")(x)
    return x
