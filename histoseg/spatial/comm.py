"""The collectives spatial parallelism needs, with gradients that fit a sum of rank losses.

Every rank differentiates its *share* of the loss (its slab's pixel losses over the global
pixel count); the loss is the sum of the shares. So the gradient of an allreduce (sum) is
the allreduce (sum) of the incoming gradients, and the gradient of an allgather is the sum
over ranks of each rank's gradient for the gathered copy of this rank's tensor. Horovod's
own registered gradients average instead (``_allgather_grad`` uses ``Average``, written
for data parallelism), so :class:`HorovodComm` defines its own with ``tf.custom_gradient``.
Every collective has an explicit name, forward and backward, so the ranks' operations are
matched by name whatever order each rank's backward pass runs them in.
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


class HorovodComm:
    """Horovod collectives (Gloo or MPI) over all ranks, differentiable as a sum of shares."""

    def __init__(self):
        import horovod.tensorflow as hvd

        hvd.init()
        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()

    def allreduce_sum(self, x, name: str):
        import tensorflow as tf

        hvd = self._hvd

        @tf.custom_gradient
        def reduce(t):
            def grad(dy):
                return hvd.allreduce(dy, op=hvd.Sum, name=f"{name}.grad")

            return hvd.allreduce(t, op=hvd.Sum, name=name), grad

        return reduce(x)

    def allgather(self, x, name: str):
        import tensorflow as tf

        hvd, rank = self._hvd, self.rank

        @tf.custom_gradient
        def gather(t):
            def grad(dy):
                return hvd.allreduce(dy, op=hvd.Sum, name=f"{name}.grad")[rank]

            return hvd.allgather(tf.expand_dims(t, 0), name=name), grad

        return gather(x)

    def gather_values(self, x, name: str):
        import tensorflow as tf

        return self._hvd.allgather(tf.expand_dims(tf.stop_gradient(x), 0), name=name)

    def sum_values(self, x, name: str):
        import tensorflow as tf

        return self._hvd.allreduce(tf.stop_gradient(x), op=self._hvd.Sum, name=name)

    def broadcast_variables(self, variables) -> None:
        """Give every rank rank 0's values of ``variables`` (Keras variables)."""
        self._hvd.broadcast_variables([v.value for v in variables], root_rank=0)


def under_horovod() -> bool:
    """True in a process started by ``horovodrun`` (its rank is in the environment)."""
    return "HOROVOD_RANK" in os.environ and "HOROVOD_SIZE" in os.environ
