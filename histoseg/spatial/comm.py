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


class SingleProcess:
    """One rank: collectives are identities. The executor then runs the plain model."""

    rank = 0
    size = 1

    def allreduce_sum(self, x, name: str):
        return x

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
    ranks (:func:`histoseg.spatial.step.sum_gradients`) still runs, as in the real step.
    """

    def __init__(self, rank: int, size: int):
        self.rank, self.size = rank, size

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
    """Horovod collectives (Gloo or MPI) over all ranks, differentiable as a sum of shares;
    ``traffic`` records them (:class:`_Traffic`)."""

    def __init__(self):
        import horovod.tensorflow as hvd

        hvd.init()
        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()

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
            bits = self._hvd.allgather(tf.bitcast(t, tf.uint16), name=name)
            return tf.bitcast(bits, tf.bfloat16)
        return self._hvd.allgather(t, name=name)

    def _sum(self, t, name: str):
        import tensorflow as tf

        self._record("sum", t, name)
        if t.dtype == tf.bfloat16:
            total = self._hvd.allreduce(tf.cast(t, tf.float32), op=self._hvd.Sum, name=name)
            return tf.cast(total, tf.bfloat16)
        return self._hvd.allreduce(t, op=self._hvd.Sum, name=name)

    def broadcast_variables(self, variables) -> None:
        """Give every rank rank 0's values of ``variables`` (Keras variables)."""
        self._hvd.broadcast_variables([v.value for v in variables], root_rank=0)


def under_horovod() -> bool:
    """True in a process started by ``horovodrun`` (its rank is in the environment)."""
    return "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ
