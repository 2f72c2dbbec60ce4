"""The compiled DeepLabV3+ train step every benchmark and training run reuses.

One step = forward pass under a GradientTape, pixel-wise sparse cross-entropy from logits,
gradients, optional transform of the gradients (an engine's allreduce), optimizer update.
Gradient computation and application are separate functions so that distributed engines
can put their collective between them.

For the memory harness the step can read TF's allocator at three points inside the
compiled graph (``bytes_before_step``, ``bytes_after_forward``, ``bytes_after_gradients``):
each read is a ``tf.py_function`` pinned by control dependencies, after the loss and
before the first gradient op, and after the last gradient and before the update.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import keras
import tensorflow as tf

from histoseg.errors import ConfigError
from histoseg.memory.probe import allocator_bytes_op
from histoseg.models.layers import prepare_images

OPTIMIZERS: tuple[str, ...] = ("adam", "sgd")
MEMORY_DEVICES: tuple[str, ...] = ("CPU:0", "GPU:0")


def make_optimizer(name: str = "adam", learning_rate: float = 1e-3, momentum: float = 0.9):
    """Return a Keras optimizer: ``"adam"`` or ``"sgd"`` (with ``momentum``).

    Raises:
        ConfigError: An unknown optimizer name or a non-positive learning rate.
    """
    if not learning_rate > 0:
        raise ConfigError(f"learning_rate={learning_rate!r} must be > 0")
    if name == "adam":
        return keras.optimizers.Adam(learning_rate=learning_rate)
    if name == "sgd":
        return keras.optimizers.SGD(learning_rate=learning_rate, momentum=momentum)
    raise ConfigError(f"optimizer={name!r} is not allowed; choose one of: {', '.join(OPTIMIZERS)}")


def pixel_loss(masks, logits, tumour_weight: float = 1.0):
    """Weighted mean over pixels of the sparse categorical cross-entropy, in float32.

    Tumour pixels (label 1) count ``tumour_weight`` times as much as the others: tumour is
    a small share of most patches, and a model that calls everything background is a
    deep, early minimum of the unweighted loss. At 1 this is the plain mean.
    """
    labels = tf.cast(masks, tf.int32)
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=labels, logits=tf.cast(logits, tf.float32)
    )
    if tumour_weight == 1.0:
        return tf.reduce_mean(losses)
    weights = tf.where(tf.equal(labels, 1), float(tumour_weight), 1.0)
    return tf.reduce_sum(losses * weights) / tf.reduce_sum(weights)


def uses_float16(model: keras.Model) -> bool:
    """True when any layer computes in float16 (then the loss needs scaling)."""
    return any(
        getattr(layer, "compute_dtype", None) == "float16" for layer in model._flatten_layers()
    )


def _gradients(
    model,
    images,
    masks,
    *,
    optimizer=None,
    num_classes=None,
    memory_device=None,
    tumour_weight: float = 1.0,
):
    """Forward + loss + gradients; returns ``(loss, grads, memory_reads)``."""
    reads = {}
    if memory_device is not None:
        reads["bytes_before_step"] = allocator_bytes_op(memory_device)
        with tf.control_dependencies([reads["bytes_before_step"]]):
            inputs = prepare_images(images)
    else:
        inputs = prepare_images(images)
    variables = model.trainable_variables
    with tf.GradientTape() as tape:
        logits = model(inputs, training=True)
        if num_classes is not None and logits.shape[-1] != num_classes:
            raise ConfigError(
                f"model gives {logits.shape[-1]} classes, the step expects num_classes={num_classes}"
            )
        loss = pixel_loss(masks, logits, tumour_weight)
        scaled_loss = optimizer.scale_loss(loss) if hasattr(optimizer, "scale_loss") else loss
    if memory_device is not None:
        with tf.control_dependencies([scaled_loss]):
            reads["bytes_after_forward"] = allocator_bytes_op(memory_device)
        # Every gradient op descends from the seed, so none starts before the read.
        with tf.control_dependencies([reads["bytes_after_forward"]]):
            seed = tf.ones_like(scaled_loss)
        grads = tape.gradient(scaled_loss, variables, output_gradients=seed)
        with tf.control_dependencies([g for g in grads if g is not None]):
            reads["bytes_after_gradients"] = allocator_bytes_op(memory_device)
        with tf.control_dependencies([reads["bytes_after_gradients"]]):
            grads = [None if g is None else tf.identity(g) for g in grads]
    else:
        grads = tape.gradient(scaled_loss, variables)
    return loss, grads, reads


def compute_gradients(
    model, images, masks, *, optimizer=None, memory_device=None, tumour_weight: float = 1.0
):
    """Forward pass, pixel-wise cross-entropy and its gradients w.r.t. trainable variables.

    Args:
        model: A DeepLabV3+ model (float32 logits).
        images: ``[B, H, W, 3]`` uint8 (scaled here) or float already in [-1, 1].
        masks: ``[B, H, W]`` integer class labels.
        optimizer: When it is a ``LossScaleOptimizer`` the loss is scaled before the
            gradients (and the gradients are then scaled too; its ``apply`` unscales).
        memory_device: Unused here unless set (see :func:`make_train_step`).
        tumour_weight: Loss weight of tumour pixels (:func:`pixel_loss`).

    Returns:
        ``(loss, grads)``: the unscaled float32 loss and one gradient per
        ``model.trainable_variables``.
    """
    loss, grads, _ = _gradients(
        model,
        images,
        masks,
        optimizer=optimizer,
        memory_device=memory_device,
        tumour_weight=tumour_weight,
    )
    return loss, grads


def apply_gradients(optimizer, grads: Sequence, variables: Sequence) -> None:
    """Apply ``grads`` to ``variables`` with ``optimizer`` (a loss-scale optimizer unscales)."""
    optimizer.apply_gradients(zip(grads, variables, strict=True))


def make_train_step(
    model: keras.Model,
    optimizer,
    *,
    num_classes: int = 2,
    loss_scale: bool | float | None = None,
    memory_device: str | None = None,
    grad_transform: Callable[[list], list] | None = None,
    jit_compile: bool = False,
):
    """Return a compiled ``step(images, masks) -> dict`` that trains ``model`` one step.

    Args:
        model: The model to train.
        optimizer: A Keras optimizer, e.g. from :func:`make_optimizer`.
        num_classes: Expected logit channels (checked when the step is traced).
        loss_scale: Wrap ``optimizer`` in ``keras.optimizers.LossScaleOptimizer``:
            ``None`` = when the model computes in float16; ``True``/``False`` forces it;
            a number = on, with that initial scale.
        memory_device: ``"CPU:0"`` or ``"GPU:0"``: also return TF allocator reads
            ``bytes_before_step``, ``bytes_after_forward``, ``bytes_after_gradients``
            (int64) taken inside the compiled step. Activation bytes =
            after_forward - before_step; gradient bytes = after_gradients - before_step.
        grad_transform: Called on the list of gradients before they are applied (an
            engine's allreduce goes here).
        jit_compile: Compile with XLA.

    Returns:
        A ``tf.function`` returning ``{"loss": float32 scalar, ...memory reads}``. Its
        ``optimizer`` attribute is the optimizer it applies (the loss-scale wrapper when
        used).

    Raises:
        ConfigError: A bad ``memory_device``.
    """
    if memory_device is not None and memory_device not in MEMORY_DEVICES:
        raise ConfigError(
            f"memory_device={memory_device!r} is not allowed; choose one of: {', '.join(MEMORY_DEVICES)}"
        )
    if loss_scale is None:
        loss_scale = uses_float16(model)
    if loss_scale is not False and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        kwargs = {} if loss_scale is True else {"initial_scale": float(loss_scale)}
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, **kwargs)
    variables = model.trainable_variables
    # Build the optimizer's state outside the tf.function (no variable creation in a trace).
    optimizer.build(variables)

    @tf.function(jit_compile=jit_compile)
    def step(images, masks):
        loss, grads, reads = _gradients(
            model,
            images,
            masks,
            optimizer=optimizer,
            num_classes=num_classes,
            memory_device=memory_device,
        )
        if grad_transform is not None:
            grads = grad_transform(list(grads))
        apply_gradients(optimizer, grads, variables)
        return {"loss": loss, **reads}

    step.optimizer = optimizer
    return step
