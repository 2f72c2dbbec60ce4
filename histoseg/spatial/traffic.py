"""What the halo exchange of one spatial train step sends: its collectives and their bytes.

Read off a trace of the step (forward pass, backward pass and the recomputations of a
remat model), not a run: nothing is allocated, so it answers for patches far larger than
this machine could train, e.g. the 8192 px patch of a cluster projection
(:mod:`histoseg.scaling.spatial`).
"""

from __future__ import annotations

from typing import Any

from histoseg.spatial.comm import NoExchange
from histoseg.spatial.executor import SpatialExecutor
from histoseg.spatial.slabs import slab_rows


def inner_rank(spatial_workers: int) -> int:
    """The most loaded rank: one with neighbours on both sides where there is one."""
    return 1 if spatial_workers > 2 else 0


def halo_traffic(model, spatial_workers: int, rank: int | None = None) -> dict[str, Any]:
    """The collectives one train step of ``model`` cut across ``spatial_workers`` ranks
    builds on ``rank`` (default :func:`inner_rank`), from a trace.

    Returns:
        ``collectives`` (count per step), ``gather_bytes`` (what this rank puts into the
        allgathers: its boundary rows), ``sum_bytes`` (into the sums: the stacked halo
        gradients, batch-norm moments, pooled sums), ``patch_size_px`` and
        ``spatial_workers``. The gradient sum over the ranks is not included: it is a
        data-parallel allreduce of the weights' gradients, modelled as one.
    """
    import tensorflow as tf

    rank = inner_rank(spatial_workers) if rank is None else rank
    comm = NoExchange(rank, spatial_workers)
    comm.traffic = []
    executor = SpatialExecutor(model, comm)
    height, width, channels = (int(d) for d in model.inputs[0].shape[1:])
    start, stop = slab_rows(height, spatial_workers, rank)
    variables = model.trainable_variables

    @tf.function
    def step(images, masks):
        with tf.GradientTape() as tape:
            logits = tf.cast(executor(images), tf.float32)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=masks, logits=logits)
            )
        return tape.gradient(loss, variables)

    step.get_concrete_function(
        tf.TensorSpec([1, stop - start, width, channels], tf.float32),
        tf.TensorSpec([1, stop - start, width], tf.int32),
    )
    traffic = comm.traffic
    return {
        "patch_size_px": height,
        "spatial_workers": spatial_workers,
        "rank": rank,
        "collectives": len(traffic),
        "gather_bytes": sum(t["bytes"] or 0 for t in traffic if t["kind"] == "gather"),
        "sum_bytes": sum(t["bytes"] or 0 for t in traffic if t["kind"] == "sum"),
    }
