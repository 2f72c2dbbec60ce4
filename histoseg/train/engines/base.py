"""The engine interface: what a train step needs from a distributed runtime, and nothing more.

A train step computes gradients on its own shard of the batch, asks the engine to average
them across workers, and applies them. Everything else (who is chief, who logs, which shard a
rank reads) follows from ``rank`` and ``size``. Implementations wrap an existing runtime
(Horovod, tf.distribute); none is home-made.
"""

from __future__ import annotations

import abc
import contextlib
from collections.abc import Sequence
from typing import Any

from histoseg.errors import ConfigError

COMPRESSIONS = ("none", "fp16")
#: How a train step runs (histoseg.train.distributed.DistributedStep). "overlap": one compiled
#: function (gradients, the engine's per-gradient allreduce inside the graph, update), so a
#: gradient's collective starts as soon as the backward pass has made it and runs while the
#: rest of the backward pass computes. "separate": three calls (compiled gradients, the
#: engine's allreduce of all gradients, compiled update): the collective is timed on its own
#: but never overlaps the backward pass.
STEP_MODES = ("overlap", "separate")
#: Chosen by measurement: see docs/cluster.md, "What two cores can show".
DEFAULT_STEP_MODE = "overlap"


def check_compression(compression: str) -> str:
    """Return ``compression`` if allowed, else raise ConfigError naming the allowed values."""
    if compression not in COMPRESSIONS:
        raise ConfigError(
            f"gradient compression {compression!r} is not one of {', '.join(COMPRESSIONS)}"
        )
    return compression


def check_step_mode(step_mode: str) -> str:
    """Return ``step_mode`` if allowed, else raise ConfigError naming the allowed values."""
    if step_mode not in STEP_MODES:
        raise ConfigError(f"step mode {step_mode!r} is not one of {', '.join(STEP_MODES)}")
    return step_mode


def unwrap_variables(variables: Sequence[Any]) -> list[Any]:
    """The backend ``tf.Variable`` behind each Keras 3 variable (plain tf.Variables pass).

    Horovod and tf.distribute act on ``tf.Variable``; Keras 3 wraps them, and the wrapper has
    none of the methods (``ref()``, ``experimental_ref``) those runtimes call.
    """
    out = []
    for v in variables:
        inner = getattr(v, "value", None)
        out.append(inner if inner is not None and hasattr(inner, "assign") else v)
    return out


class Engine(abc.ABC):
    """One distributed runtime seen through the few calls a data-parallel step needs.

    Call :meth:`init` first, before TensorFlow runs any op: some runtimes
    (tf.distribute's collectives) must be configured at program start.

    Example:
        >>> engine = get_engine("none")
        >>> engine.init()
        >>> grads = engine.allreduce_gradients(grads, compression="fp16")
    """

    name = "base"

    def __init__(self) -> None:
        self._initialised = False

    @abc.abstractmethod
    def init(self) -> Engine:
        """Start the runtime (idempotent); returns ``self``."""

    @property
    @abc.abstractmethod
    def rank(self) -> int:
        """This worker's index among all workers, 0 .. size-1."""

    @property
    @abc.abstractmethod
    def size(self) -> int:
        """Number of workers taking part."""

    @property
    @abc.abstractmethod
    def local_rank(self) -> int:
        """This worker's index among the workers on its own host (for pinning)."""

    @property
    def is_chief(self) -> bool:
        """True on rank 0, the one worker that logs, writes summaries and checkpoints."""
        return self.rank == 0

    @abc.abstractmethod
    def allreduce_gradients(self, grads: Sequence[Any], compression: str = "none") -> list[Any]:
        """Average ``grads`` (a list of tensors) over all workers.

        Args:
            grads: one tensor per trainable variable, as returned by a GradientTape.
            compression: "none" or "fp16" (tensors travel as float16 and come back in
                their own dtype; halves the bytes on the wire, costs fp16 rounding).

        Returns:
            The averaged gradients, same order, shapes and dtypes.
        """

    def allreduce_gradients_in_graph(
        self, grads: Sequence[Any], compression: str = "none"
    ) -> list[Any]:
        """Average ``grads`` over all workers from inside a ``tf.function`` (while tracing).

        Called by the overlapped train step between the backward pass and the update, in the
        same compiled function. Implementations issue one collective per gradient (or per
        small group of gradients), last variable first, so that each starts as soon as the
        backward pass (which produces gradients in reverse variable order) has made it, and
        runs while the rest of the backward pass computes.

        Args:
            grads: one symbolic tensor (or None) per trainable variable.
            compression: as in :meth:`allreduce_gradients`.

        Returns:
            The averaged gradients, same order, shapes and dtypes.

        Raises:
            ConfigError: this engine cannot communicate inside a compiled step.
        """
        raise ConfigError(
            f"engine {self.name!r} cannot allreduce inside a compiled step; "
            "use step mode 'separate' (--step separate)"
        )

    @abc.abstractmethod
    def allreduce_sum(self, values: Sequence[Any]) -> list[Any]:
        """Sum tensors over all workers exactly (float64 counts, e.g. confusion matrices)."""

    @abc.abstractmethod
    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        """Overwrite ``variables`` on every worker with their values on ``root_rank``.

        Accepts Keras 3 variables or tf.Variables (model weights, optimizer state).
        """

    @abc.abstractmethod
    def barrier(self) -> None:
        """Block until every worker has reached this call."""

    def scope(self) -> contextlib.AbstractContextManager[Any]:
        """Context to build the model and optimizer in (a no-op for most engines)."""
        return contextlib.nullcontext()

    def shutdown(self) -> None:
        """Release the runtime; call :meth:`init` again before further use."""
        self._initialised = False

    def describe(self) -> str:
        """One line for logs: engine name, rank and size."""
        return f"engine {self.name}: rank {self.rank} of {self.size} (local rank {self.local_rank})"
