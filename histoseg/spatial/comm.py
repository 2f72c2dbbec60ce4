"""The collectives spatial parallelism needs, with gradients that fit a sum of rank losses.

Every rank differentiates its *share* of the loss (its slab's pixel losses over the global
pixel count); the loss is the sum of the shares. So the gradient of an allreduce (sum) is
the allreduce (sum) of the incoming gradients, and the gradient of an allgather is the sum
over ranks of each rank's gradient for the gathered copy of this rank's tensor. Horovod's
own registered gradients average instead (``_allgather_grad`` uses ``Average``, written
for data parallelism), so :class:`HorovodComm` defines its own with ``tf.custom_gradient``.
Every collective has an explicit name, forward and backward, so the ranks' operations are
matched by name whatever order each rank's backward pass runs them in.

Horovod's TensorFlow ops take no bfloat16 (``mixed_bfloat16`` maps): a gather carries its
bits as uint16 (exact), a sum runs in float32 and is rounded back once.
"""

from __future__ import annotations

import os

from histoseg.errors import ConfigError


class SingleProcess:
    """One rank: collectives are identities. The executor then runs the plain model."""

    rank = 0
    size = 1
    replicas = 1

    def allreduce_sum(self, x, name: str):
        return x

    def sum_gradients(self, grads: list) -> list:
        return grads

    def allgather(self, x, name: str):
        """``x`` of every rank stacked on a new first axis: here ``x[None]``."""
        import tensorflow as tf

        return tf.expand_dims(x, 0)

    def gather_values(self, x, name: str):
        """Not differentiable: ``x`` of every rank stacked on a new first axis."""
        return self.allgather(x, name)

    def sum_values(self, x, name: str):
        """Not differentiable: the sum of ``x`` over the ranks."""
        return x


class _Traffic:
    """Set ``traffic`` to a list to record every collective a step's trace builds
    (forward, backward and recomputation): ``{"name", "kind" ("gather" or "sum"),
    "bytes"}``, the bytes this rank puts into it, from the static shapes."""

    traffic: list[dict] | None = None

    def _record(self, kind: str, t, name: str) -> None:
        if self.traffic is not None:
            count = t.shape.num_elements()
            nbytes = None if count is None else count * t.dtype.size
            self.traffic.append({"name": name, "kind": kind, "bytes": nbytes})


class NoExchange(_Traffic):
    """Rank ``rank`` of ``size`` with the halo exchange and the moment reductions left out.

    Every collective returns what it would on this rank with the shapes it would have (a
    gather stacks ``size`` copies of this rank's rows, a sum returns this rank's part), so
    the step does the same local work as under :class:`HorovodComm` without exchanging a
    byte; its numbers are wrong. Timing the same step with both says what the spatial
    communication costs (``bench.scaling --spatial-workers``). The gradient sum over the
    ranks (:meth:`sum_gradients`) still runs, as in the real step.
    """

    replicas = 1

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

    def sum_gradients(self, grads: list) -> list:
        """The real gradient sum over the ranks (Horovod's), as in the step it stands in for."""
        return grads if self.size == 1 else _gradient_allreduce(grads, replicas=1)

    def allreduce_sum(self, x, name: str):
        import tensorflow as tf

        @tf.custom_gradient
        def reduce(t):
            self._record("sum", t, name)

            def grad(dy):
                self._record("sum", dy, f"{name}.grad")
                return dy

            return tf.identity(t), grad

        return reduce(x)

    def allgather(self, x, name: str):
        import tensorflow as tf

        self._record("gather", x, name)
        return tf.repeat(tf.expand_dims(x, 0), self.size, axis=0)

    def gather_values(self, x, name: str):
        import tensorflow as tf

        return self.allgather(tf.stop_gradient(x), name)

    def sum_values(self, x, name: str):
        import tensorflow as tf

        self._record("sum", x, name)
        return tf.stop_gradient(x)


class HorovodComm(_Traffic):
    """Horovod collectives (Gloo or MPI) over the ranks of one patch, differentiable as a
    sum of shares; ``traffic`` records them (:class:`_Traffic`).

    Args:
        spatial_workers: Ranks one patch is cut across; None: all of them. Fewer than the
            world's ranks compose spatial with data parallelism: consecutive blocks of
            ``spatial_workers`` ranks each cut one patch (a Horovod process set each), and
            the gradients are averaged over the ``replicas`` blocks.
        world_size: The launcher's rank count, needed (with ``spatial_workers``) to
            register the blocks' process sets, which Horovod takes only at its first
            ``init``: make this comm before anything else starts Horovod.

    Raises:
        ConfigError: the world is not whole blocks of ``spatial_workers`` ranks.
    """

    def __init__(self, spatial_workers: int | None = None, world_size: int | None = None):
        import horovod.tensorflow as hvd

        self._hvd = hvd
        self._set = hvd.global_process_set
        blocks = []
        if (spatial_workers is None) != (world_size is None):
            raise ConfigError("HorovodComm takes spatial_workers and world_size together")
        if spatial_workers is not None and world_size is not None:
            if spatial_workers < 1 or world_size % spatial_workers:
                raise ConfigError(
                    f"{world_size} ranks cannot be cut into blocks of {spatial_workers} "
                    "spatial workers: the rank count must be a multiple of --spatial-workers"
                )
            if world_size > spatial_workers:
                blocks = [
                    hvd.ProcessSet(list(range(start, start + spatial_workers)))
                    for start in range(0, world_size, spatial_workers)
                ]
        hvd.init(process_sets=blocks or None)
        if blocks:
            if hvd.size() != world_size:
                raise ConfigError(f"expected {world_size} ranks, Horovod started {hvd.size()}")
            self._set = blocks[hvd.rank() // spatial_workers]
        self.rank = self._set.rank()
        self.size = self._set.size()
        #: Patches cut in parallel (data-parallel replicas): the gradients' divisor.
        self.replicas = hvd.size() // self.size

    def allreduce_sum(self, x, name: str):
        import tensorflow as tf

        @tf.custom_gradient
        def reduce(t):
            def grad(dy):
                return self._sum(dy, f"{name}.grad")

            return self._sum(t, name), grad

        return reduce(x)

    def allgather(self, x, name: str):
        import tensorflow as tf

        @tf.custom_gradient
        def gather(t):
            def grad(dy):
                return self._sum(dy, f"{name}.grad")[self.rank]

            return self._gather(tf.expand_dims(t, 0), name), grad

        return gather(x)

    def gather_values(self, x, name: str):
        import tensorflow as tf

        return self._gather(tf.expand_dims(tf.stop_gradient(x), 0), name)

    def sum_values(self, x, name: str):
        import tensorflow as tf

        return self._sum(tf.stop_gradient(x), name)

    def _gather(self, t, name: str):
        import tensorflow as tf

        self._record("gather", t, name)
        if t.dtype == tf.bfloat16:
            bits = self._hvd.allgather(tf.bitcast(t, tf.uint16), name=name, process_set=self._set)
            return tf.bitcast(bits, tf.bfloat16)
        return self._hvd.allgather(t, name=name, process_set=self._set)

    def _sum(self, t, name: str):
        import tensorflow as tf

        self._record("sum", t, name)
        if t.dtype == tf.bfloat16:
            total = self._hvd.allreduce(
                tf.cast(t, tf.float32), op=self._hvd.Sum, name=name, process_set=self._set
            )
            return tf.cast(total, tf.bfloat16)
        return self._hvd.allreduce(t, op=self._hvd.Sum, name=name, process_set=self._set)

    def sum_gradients(self, grads: list) -> list:
        """Sum ``grads`` over the ranks of every patch and average over the replicas."""
        return grads if self._hvd.size() == 1 else _gradient_allreduce(grads, self.replicas)

    def broadcast_variables(self, variables) -> None:
        """Give every rank rank 0's values of ``variables`` (Keras variables)."""
        self._hvd.broadcast_variables([v.value for v in variables], root_rank=0)


def _gradient_allreduce(grads: list, replicas: int) -> list:
    """One grouped allreduce of ``grads`` over all ranks: summed, then divided by the
    ``replicas`` (blocks of ranks that each cut their own patches)."""
    import horovod.tensorflow as hvd

    return list(
        hvd.grouped_allreduce(
            grads, op=hvd.Sum, postscale_factor=1.0 / replicas, name="spatial.grads"
        )
    )


def under_horovod() -> bool:
    """True in a process started by ``horovodrun`` (its rank is in the environment)."""
    return "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ
