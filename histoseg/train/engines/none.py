"""The single-process engine: one worker, no communication; averaging over one is identity."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from histoseg.train.engines.base import Engine, check_compression


class NoneEngine(Engine):
    """One worker (rank 0 of 1). Every collective returns its input unchanged."""

    name = "none"

    def init(self) -> NoneEngine:
        self._initialised = True
        return self

    @property
    def rank(self) -> int:
        return 0

    @property
    def size(self) -> int:
        return 1

    @property
    def local_rank(self) -> int:
        return 0

    def allreduce_gradients(self, grads: Sequence[Any], compression: str = "none") -> list[Any]:
        # No wire, so no compression: fp16 would only add rounding a single worker never pays.
        check_compression(compression)
        return list(grads)

    def allreduce_gradients_in_graph(
        self, grads: Sequence[Any], compression: str = "none"
    ) -> list[Any]:
        check_compression(compression)
        return list(grads)

    def allreduce_sum(self, values: Sequence[Any]) -> list[Any]:
        return list(values)

    def broadcast_variables(self, variables: Sequence[Any], root_rank: int = 0) -> None:
        pass

    def barrier(self) -> None:
        pass
