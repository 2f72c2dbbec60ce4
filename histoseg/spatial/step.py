"""One spatially parallel forward/backward pass: loss share, gradients, gathered logits.

The loss is the (tumour-weighted) mean pixel cross-entropy over the whole patch, as
``histoseg.train.step.pixel_loss``. Each rank differentiates its
share, the sum of its slab's pixel losses over the global pixel count; the loss is the sum
of the shares, and so is every weight gradient (one grouped allreduce, as in data
parallelism but summed over a patch's ranks; averaged over the patches when several are cut
in parallel, ``HorovodComm.replicas``).
"""

from __future__ import annotations

from collections.abc import Sequence

from histoseg.spatial.executor import SpatialExecutor


def spatial_gradients(executor: SpatialExecutor, images, masks, variables: Sequence):
    """Forward and backward pass of this rank's slab.

    Args:
        executor: The model's executor on this rank.
        images: This rank's slab of the (prepared, [-1, 1]) images, NHWC float32.
        masks: This rank's slab of the integer class masks, NHW.
        variables: The variables to differentiate (the model's trainable variables).

    Returns:
        ``(loss, logits, grads)``: the whole patch's mean loss (the same on every rank),
        this rank's slab of the logits, and the whole patch's gradients (summed over ranks;
        zeros for a variable the loss does not depend on).
    """
    loss, logits, grads, _ = _gradients(executor, images, masks, variables)
    return loss, logits, grads


def _gradients(
    executor: SpatialExecutor,
    images,
    masks,
    variables: Sequence,
    memory_device=None,
    tumour_weight: float = 1.0,
):
    """:func:`spatial_gradients`, plus the allocator reads of ``memory_device`` (as the
    single-rank step takes them, ``histoseg.train.step``): before the step, after the
    forward pass and loss, after this rank's gradients (before they are summed).
    ``tumour_weight``: tumour pixels count that many times (``pixel_loss``); the weights'
    sum over the whole patch is one more (not differentiated) sum over the ranks."""
    import tensorflow as tf

    from histoseg.memory.probe import allocator_bytes_op

    reads = {}
    if memory_device is not None:
        reads["bytes_before_step"] = allocator_bytes_op(memory_device)
        with tf.control_dependencies([reads["bytes_before_step"]]):
            images = tf.identity(images)
    comm = executor.comm
    height = int(executor.model.inputs[0].shape[1])
    shape = tf.shape(masks)
    labels = tf.cast(masks, tf.int32)
    with tf.GradientTape() as tape:
        logits = executor(images)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=labels, logits=tf.cast(logits, tf.float32)
        )
        if tumour_weight == 1.0:
            count = tf.cast(shape[0] * shape[2] * height, losses.dtype)
        else:
            weights = tf.where(tf.equal(labels, 1), float(tumour_weight), 1.0)
            losses = losses * weights
            count = comm.sum_values(tf.reduce_sum(weights), "spatial.loss_weights")
        share = tf.reduce_sum(losses) / count
    seed = tf.ones_like(share)
    if memory_device is not None:
        with tf.control_dependencies([share]):
            reads["bytes_after_forward"] = allocator_bytes_op(memory_device)
        with tf.control_dependencies([reads["bytes_after_forward"]]):
            seed = tf.identity(seed)  # every gradient op descends from the seed
    grads = tape.gradient(share, list(variables), output_gradients=seed)
    grads = [
        tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
        for g, v in zip(grads, variables, strict=True)
    ]
    if memory_device is not None:
        with tf.control_dependencies(grads):
            reads["bytes_after_gradients"] = allocator_bytes_op(memory_device)
        with tf.control_dependencies([reads["bytes_after_gradients"]]):
            grads = [tf.identity(g) for g in grads]
    grads = comm.sum_gradients(grads)
    loss = comm.sum_values(share, "spatial.loss")
    return loss, logits, grads, reads


def make_spatial_train_step(
    executor: SpatialExecutor, optimizer, *, memory_device=None, tumour_weight: float = 1.0
):
    """This rank's compiled train step: its slab forward, the loss share, the gradients
    summed over the ranks, the optimizer's update (the same on every rank, so the weights
    stay identical without a broadcast).

    Args:
        executor: The model's executor on this rank (training mode).
        optimizer: A Keras optimizer (its state is built here, outside the trace).
        memory_device: ``"CPU:0"`` or ``"GPU:0"``: also return the allocator reads
            ``bytes_before_step``, ``bytes_after_forward`` and ``bytes_after_gradients``
            taken inside the step, as ``histoseg.train.step.make_train_step`` does.
        tumour_weight: Loss weight of tumour pixels (``histoseg.train.step.pixel_loss``).

    Returns:
        A ``tf.function`` ``step(images, masks) -> {"loss": ..., reads...}`` taking this
        rank's slab of uint8 (or [-1, 1] float) images and of the integer masks.
    """
    import tensorflow as tf

    from histoseg.models.layers import prepare_images

    variables = executor.model.trainable_variables
    optimizer.build(variables)

    @tf.function
    def step(images, masks):
        loss, _, grads, reads = _gradients(
            executor, prepare_images(images), masks, variables, memory_device, tumour_weight
        )
        optimizer.apply_gradients(zip(grads, variables, strict=True))
        return {"loss": loss, **reads}

    return step


def gather_rows(comm, slab):
    """The whole map from every rank's slab (rows in rank order); not differentiable."""
    import tensorflow as tf

    stacked = comm.gather_values(slab, "spatial.gather_rows")  # [ranks, batch, rows, ...]
    rank = len(slab.shape)
    moved = tf.transpose(stacked, [1, 0, *range(2, rank + 1)])
    shape = tf.shape(slab)
    return tf.reshape(moved, tf.concat([shape[:1], [-1], shape[2:]], 0))
