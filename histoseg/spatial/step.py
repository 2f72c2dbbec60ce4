"""One spatially parallel forward/backward pass: loss share, gradients, gathered logits.

The loss is the mean pixel cross-entropy over the whole patch (as
``histoseg.train.step.pixel_loss`` at ``tumour_weight=1``). Each rank differentiates its
share, the sum of its slab's pixel losses over the global pixel count; the loss is the sum
of the shares, and so is every weight gradient (one grouped allreduce, as in data
parallelism but summed, not averaged).
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
    import tensorflow as tf

    comm = executor.comm
    height = int(executor.model.inputs[0].shape[1])
    shape = tf.shape(masks)
    with tf.GradientTape() as tape:
        logits = executor(images)
        losses = tf.nn.sparse_softmax_cross_entropy_with_logits(
            labels=tf.cast(masks, tf.int32), logits=logits
        )
        count = tf.cast(shape[0] * shape[2] * height, losses.dtype)
        share = tf.reduce_sum(losses) / count
    grads = tape.gradient(share, list(variables))
    grads = [
        tf.zeros_like(v) if g is None else tf.convert_to_tensor(g)
        for g, v in zip(grads, variables, strict=True)
    ]
    grads = sum_gradients(comm, grads)
    loss = comm.sum_values(share, "spatial.loss")
    return loss, logits, grads


def sum_gradients(comm, grads: list) -> list:
    """Sum ``grads`` over the ranks (one grouped allreduce under Horovod)."""
    if comm.size == 1:
        return grads
    import horovod.tensorflow as hvd

    return list(hvd.grouped_allreduce(grads, op=hvd.Sum, name="spatial.grads"))


def gather_rows(comm, slab):
    """The whole map from every rank's slab (rows in rank order); not differentiable."""
    import tensorflow as tf

    stacked = comm.gather_values(slab, "spatial.gather_rows")  # [ranks, batch, rows, ...]
    rank = len(slab.shape)
    moved = tf.transpose(stacked, [1, 0, *range(2, rank + 1)])
    shape = tf.shape(slab)
    return tf.reshape(moved, tf.concat([shape[:1], [-1], shape[2:]], 0))
