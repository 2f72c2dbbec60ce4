"""The Horovod engine: ring-allreduce over Gloo (or MPI), launched with ``horovodrun``.

Horovod 0.28.1 meets Keras 3 halfway: ``hvd.DistributedGradientTape`` fails on Keras 3
variables (``'Variable' object has no attribute 'ref'``), so the engine averages gradients
itself: in the overlapped step with one ``hvd.allreduce`` op per gradient inside the compiled
step (what the tape does), in the separate step with one ``hvd.grouped_allreduce`` call; and
variables are broadcast through the ``tf.Variable`` each Keras variable wraps.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from histoseg.errors import EngineUnavailableError
from histoseg.train.engines.base import Engine, check_compression, unwrap_variables

#: Horovod's background thread wakes every HOROVOD_CYCLE_TIME ms to negotiate with the other
#: ranks, even when nothing is queued: a short cycle burns a core's share that the compute
#: threads need (docs/cluster.md has the measurement and its command). In the separate step
#: one fused allreduce per step waits at most one cycle. In the overlapped step the
#: gradients reach the thread during the backward pass and each cycle sends what is ready,
#: so only the last cycle's gradients (the first layers', made last) wait for a cycle after
#: the backward pass (docs/cluster.md has what the overlapped step exposes here). Set
#: HOROVOD_CYCLE_TIME (or horovodrun --cycle-time-ms) to override.
DEFAULT_CYCLE_TIME_MS = "20"


def _import_horovod() -> Any:
    try:
        import horovod.tensorflow as hvd
    except ImportError as exc:
        raise EngineUnavailableError(
            f"engine 'horovod' needs Horovod built against this TensorFlow ({exc}); "
            "run scripts/build_horovod.sh, or use --engine tf or --engine none"
        ) from None
    return hvd


class HorovodEngine(Engine):
    """Data parallelism through Horovod: one process per worker, started by ``horovodrun``.

    Run as a single process (no ``horovodrun``) it is a valid world of size 1.
    """

    name = "horovod"

    def __init__(self) -> None:
        super().__init__()
        self._hvd = _import_horovod()

    def init(self) -> HorovodEngine:
        if not self._initialised:
            os.environ.setdefault("HOROVOD_CYCLE_TIME", DEFAULT_CYCLE_TIME_MS)
            self._hvd.init()
            self._initialised = True
        return self

    @property
    def rank(self) -> int:
        return int(self._hvd.rank())

    @property
    def size(self) -> int:
        return int(self._hvd.size())

    @property
    def local_rank(self) -> int:
        return int(self._hvd.local_rank())

    def _compression(self, compression: str) -> Any:
        check_compression(compression)
        hvd_compression = self._hvd.Compression
        return hvd_compression.fp16 if compression == "fp16" else hvd_compression.none

    def allreduce_gradients(self, grads: Sequence[Any], compression: str = "none") -> list[Any]:
        import tensorflow as tf

        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present or self.size == 1:
            # Horovod would still round-trip fp16 here; skip it so size 1 equals no engine.
            self._compression(compression)
            return grads
        tensors = [tf.convert_to_tensor(grads[i]) for i in present]
        reduced = self._hvd.grouped_allreduce(
            tensors, op=self._hvd.Average, compression=self._compression(compression)
        )
        out = list(grads)
        for i, r in zip(present, reduced, strict=True):
            out[i] = r
        return out

    def allreduce_gradients_in_graph(
        self, grads: Sequence[Any], compression: str = "none"
    ) -> list[Any]:
        hvd_compression = self._compression(compression)
        out = list(grads)
        if self.size == 1:
            return out
        # One allreduce op per gradient, last variable first (the order the backward pass
        # makes them). Horovod's ops are asynchronous kernels and not stateful, so the
        # tf.function adds no control edges between them: each is handed to Horovod's
        # background thread the moment its gradient exists, the thread fuses whatever is
        # ready each cycle into one ring allreduce, and the executor goes on with the
        # backward pass meanwhile. The tests check that no op is chained to another.
        for i in reversed(range(len(out))):
            if out[i] is not None:
                out[i] = self._hvd.allreduce(
                    out[i],
                    op=self._hvd.Average,
                    compression=hvd_compression,
                    name=f"histoseg_grad_{i}",
                )
        return out

    def allreduce_sum(self, values: Sequence[Any]) -> list[Any]:
        import tensorflow as tf

        values = [tf.convert_to_tensor(v) for v in values]
        if not values or self.size == 1:
            return values
        return list(self._hvd.grouped_allreduce(values, op=self._hvd.Sum))

    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        variables = unwrap_variables(variables)
        if variables and self.size > 1:
            self._hvd.broadcast_variables(variables, root_rank=root_rank)

    def barrier(self) -> None:
        # horovod.tensorflow has no barrier(); a tiny allreduce waits for every rank the same.
        if self.size > 1:
            import tensorflow as tf

            self._hvd.allreduce(tf.zeros([1]), op=self._hvd.Sum, name="histoseg_barrier")

    def shutdown(self) -> None:
        if self._initialised:
            self._hvd.shutdown()
        super().shutdown()
