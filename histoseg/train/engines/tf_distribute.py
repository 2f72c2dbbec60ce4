"""The tf.distribute engine: MultiWorkerMirroredStrategy's ring collectives, one process a worker.

Workers find each other through ``TF_CONFIG`` (``histoseg.train.launch`` writes it for N
workers on localhost; a cluster scheduler or the user writes it elsewhere). Without
``TF_CONFIG`` the strategy is a valid world of one worker.

The model and optimizer are built outside ``strategy.scope()`` on purpose: each worker keeps
plain variables, and the strategy is used for what a data-parallel step needs from it, its
cross-worker collectives (``ReplicaContext.all_reduce`` under ``strategy.run``). That keeps
one train step for every engine, lets the engine time and fp16-compress the gradient
allreduce itself, and avoids two known traps: Keras 3 ``model.fit`` fails under this strategy,
and the Keras 3 optimizer would add its own SUM allreduce inside ``apply_gradients`` on
mirrored variables.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

from histoseg.errors import ConfigError, EngineUnavailableError
from histoseg.train.engines.base import Engine, check_compression, unwrap_variables

_STRATEGY: Any = None  # the strategy configures the process's collectives once; keep one
#: Gradient bytes per packed collective in the overlapped step: small against a DeepLabV3+'s
#: gradients, so they go in a few groups, the first ready early in the backward pass.
BUCKET_BYTES = 2 << 20


def _tf_config() -> dict[str, Any]:
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        config = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"TF_CONFIG is not JSON ({exc.msg}): {raw[:80]!r}") from None
    workers = config.get("cluster", {}).get("worker")
    task = config.get("task", {})
    if not isinstance(workers, list) or not workers or task.get("type") != "worker":
        raise ConfigError(
            "TF_CONFIG must name cluster.worker (a list of host:port) and task "
            f"{{'type': 'worker', 'index': i}}; got {raw[:120]!r}"
        )
    return config


class TFDistributeEngine(Engine):
    """Data parallelism through ``tf.distribute.MultiWorkerMirroredStrategy`` collectives.

    Call :meth:`init` before TensorFlow runs any op: the strategy configures the process's
    collective ops and they can only be set up at program start.
    """

    name = "tf"

    def __init__(self) -> None:
        super().__init__()
        try:
            import tensorflow as tf
        except ImportError as exc:  # pragma: no cover - TensorFlow is a hard dependency
            raise EngineUnavailableError(f"engine 'tf' needs TensorFlow ({exc})") from None
        self._tf = tf
        self._config = _tf_config()
        self._strategy: Any = None
        self._functions: dict[tuple, Any] = {}

    def init(self) -> TFDistributeEngine:
        global _STRATEGY
        if self._initialised:
            return self
        tf = self._tf
        if _STRATEGY is None:
            options = tf.distribute.experimental.CommunicationOptions(
                implementation=tf.distribute.experimental.CommunicationImplementation.RING
            )
            try:
                _STRATEGY = tf.distribute.MultiWorkerMirroredStrategy(communication_options=options)
            except RuntimeError as exc:
                raise EngineUnavailableError(
                    "engine 'tf' must start before TensorFlow runs its first op "
                    f"(call Engine.init() first): {exc}"
                ) from None
        self._strategy = _STRATEGY
        self._initialised = True
        return self

    @property
    def strategy(self) -> Any:
        """The underlying MultiWorkerMirroredStrategy (after :meth:`init`)."""
        return self._strategy

    @property
    def rank(self) -> int:
        return int(self._config.get("task", {}).get("index", 0)) if self._config else 0

    @property
    def size(self) -> int:
        return len(self._config["cluster"]["worker"]) if self._config else 1

    @property
    def local_rank(self) -> int:
        if not self._config:
            return 0
        workers = self._config["cluster"]["worker"]
        host = workers[self.rank].rsplit(":", 1)[0]
        return sum(1 for w in workers[: self.rank] if w.rsplit(":", 1)[0] == host)

    def _all_reduce(self, tensors: Sequence[Any], op_name: str, cast_fp16: bool) -> list[Any]:
        """All-reduce ``tensors`` under ``strategy.run``; call it inside a tf.function."""
        tf = self._tf
        strategy = self._strategy
        op = tf.distribute.ReduceOp.MEAN if op_name == "mean" else tf.distribute.ReduceOp.SUM

        def replica_fn(*tensors: Any) -> list[Any]:
            ctx = tf.distribute.get_replica_context()
            # all_reduce sends each tensor from the device it lives on; the identity puts the
            # arguments (traced with no device) on this replica's device.
            tensors = [tf.identity(t) for t in tensors]
            wire = [
                tf.cast(t, tf.float16) if cast_fp16 and t.dtype.is_floating else t for t in tensors
            ]
            # the strategy packs a list into one buffer, which needs one dtype: reduce each
            # dtype group as one pack (gradients are a single float32 group)
            out: list[Any] = [None] * len(wire)
            for dtype in sorted({t.dtype for t in wire}, key=lambda d: d.name):
                group = [i for i, t in enumerate(wire) if t.dtype == dtype]
                reduced = ctx.all_reduce(op, [wire[i] for i in group])
                for i, r in zip(group, reduced, strict=True):
                    out[i] = tf.cast(r, tensors[i].dtype)
            return out

        out = strategy.run(replica_fn, args=tuple(tensors))
        return [strategy.experimental_local_results(o)[0] for o in out]

    def _collective(self, tensors: Sequence[Any], op_name: str, cast_fp16: bool) -> Any:
        """A tf.function that all-reduces tensors shaped like ``tensors`` (one per signature,
        so each is traced once: a step's gradients always have the same signature)."""
        key = (op_name, cast_fp16, tuple((tuple(t.shape), t.dtype.name) for t in tensors))
        if key not in self._functions:
            self._functions[key] = self._tf.function(
                lambda tensors: self._all_reduce(tensors, op_name, cast_fp16)
            )
        return self._functions[key]

    def allreduce_gradients(self, grads: Sequence[Any], compression: str = "none") -> list[Any]:
        check_compression(compression)
        grads = list(grads)
        present = [i for i, g in enumerate(grads) if g is not None]
        if not present or self.size == 1:
            return grads
        tf = self._tf
        tensors = [tf.convert_to_tensor(grads[i]) for i in present]
        reduced = self._collective(tensors, "mean", compression == "fp16")(tensors)
        out = list(grads)
        for i, r in zip(present, reduced, strict=True):
            out[i] = r
        return out

    def allreduce_gradients_in_graph(
        self, grads: Sequence[Any], compression: str = "none"
    ) -> list[Any]:
        check_compression(compression)
        out = list(grads)
        present = [i for i, g in enumerate(out) if g is not None]
        if not present or self.size == 1:
            return out
        # Gradients in groups of about BUCKET_BYTES, last variable first: each group is one
        # packed collective that starts once the backward pass has made all of its
        # gradients. The strategy orders its collectives in program order (every worker must
        # launch them alike), so they are issued in the order the backward pass makes them.
        # Per-gradient collectives would each pay the ring's fixed cost; one group would wait
        # for the whole backward pass.
        buckets: list[list[int]] = [[]]
        filled = 0
        for i in reversed(present):
            nbytes = out[i].shape.num_elements() * out[i].dtype.size
            if buckets[-1] and filled + nbytes > BUCKET_BYTES:
                buckets.append([])
                filled = 0
            buckets[-1].append(i)
            filled += nbytes
        for bucket in buckets:
            reduced = self._all_reduce([out[i] for i in bucket], "mean", compression == "fp16")
            for i, r in zip(bucket, reduced, strict=True):
                out[i] = r
        return out

    def allreduce_sum(self, values: Sequence[Any]) -> list[Any]:
        tf = self._tf
        values = [tf.convert_to_tensor(v) for v in values]
        if not values or self.size == 1:
            return values
        return list(self._collective(values, "sum", False)(values))

    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        variables = unwrap_variables(variables)
        if not variables or self.size == 1:
            return
        tf = self._tf
        # A broadcast as a SUM in which every rank but the root contributes zeros: exact
        # (x + 0 == x in floating point) and it reuses the strategy's ring collective.
        is_root = self.rank == root_rank
        contributions = [
            tf.convert_to_tensor(v) if is_root else tf.zeros(v.shape, v.dtype) for v in variables
        ]
        for v, value in zip(variables, self.allreduce_sum(contributions), strict=True):
            v.assign(value)

    def barrier(self) -> None:
        if self.size > 1:
            self.allreduce_sum([self._tf.zeros([1], self._tf.float32)])
