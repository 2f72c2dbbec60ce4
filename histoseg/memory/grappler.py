"""The gradient accumulators that TensorFlow's graph optimizer (Grappler) adds to a CPU step.

Grappler's memory optimizer estimates the step's memory statically and, when that estimate
exceeds 80% of the device's memory limit (TensorFlow's CPU device reports 256 MiB to it,
whatever the RAM), rewrites every sum of more than two gradients (``AddN``) with a term
alive at the estimated peak into an accumulator started from ``zeros_like(first term)``.
Constant folding turns those zeros into a constant that lives as long as the step function,
so each rewritten sum costs the step a buffer of its size for good (the ``.../tmp_var_zeros``
allocations of the allocator's trace).

The estimate is Grappler's own, not the executor's: every tensor lives from the op that
makes it to its last reader (nothing in place), and the ops run first ready first, so
parallel branches advance together. :func:`accumulator_sizes` replays the backward pass
that way over the layer graph (:mod:`histoseg.memory.graph`) and returns the sums alive at
its peak. Read off the allocator traces (docs/memory-harness.md): at output stride 16 the
peak is at the start of the backward pass, in the batch norm nearest the loss (its input
gradient sums three terms); at output stride 8 it moves into ASPP, whose three atrous
batch norms and whose input's five-term gradient sum are all in flight there (and, in
resnet50, the low-level feature's three-term sum, one of whose terms, the decoder's, waits
there for the backbone's).
"""

from __future__ import annotations

import collections
import dataclasses
from collections.abc import Sequence

from histoseg.memory.graph import MemoryGraph, Op, remat_blocks

#: The estimate must exceed this fraction of the device's memory limit for the rewrite.
GRAPPLER_REWRITE_FRACTION = 0.8
#: The memory limit TensorFlow's CPU device reports to Grappler (not the machine's RAM).
CPU_DEVICE_MEMORY_LIMIT_BYTES = 256 * 1024 * 1024
#: An ``AddN`` with at most this many terms is left alone.
_MAX_TERMS_LEFT_ALONE = 2


def accumulator_sizes(graph: MemoryGraph, batch_size: int, step_peak_bytes: int) -> list[int]:
    """Bytes of each accumulator Grappler adds to a CPU step of ``batch_size`` patches.

    Empty when the estimate's peak stays under the rewrite's threshold (small steps: e.g.
    xception65 256 px float32 ``blocks`` makes none at batch 1, one at batch 2).

    Under ``full`` remat (the norm nearest the loss recomputed too) the estimate is not
    replayed, as the replay misses there (it puts resnet50 480 px bfloat16 under the
    threshold, and mobilenetv2's small steps over it): the traces show one accumulator,
    the float32 input of the largest norm (xception65 512 px bfloat16: the 256 x 256 x 128
    entry-flow norm's, not the decoder's), made when the step's own predicted peak,
    ``step_peak_bytes``, is over the threshold.
    """
    threshold = GRAPPLER_REWRITE_FRACTION * CPU_DEVICE_MEMORY_LIMIT_BYTES
    norms = [op for op in graph.ops if op.kind == "batchnorm" and op.needs_backward]
    if norms and norms[-1].block is not None:
        largest = max(op.temp_bytes[0] for op in norms) * batch_size
        return [largest] if step_peak_bytes > threshold else []
    peak, at_peak = _estimate(graph, batch_size)
    return at_peak if peak > threshold else []


def _estimate(graph: MemoryGraph, batch_size: int) -> tuple[int, list[int]]:
    """The peak of Grappler's estimate over the backward pass, and the bytes of each sum of
    more than two terms under way there.

    A gradient sum's terms stay alive until the backward pass of the tensor's maker runs:
    first ready first, the ``AddN`` waits behind the ops made ready before it, and
    parallel branches make their terms side by side (the three atrous norms of ASPP).
    """
    ops = graph.ops
    producer = {t: i for i, op in enumerate(ops) for t in op.outputs if op.needs_backward}
    readers = _gradient_readers(ops, producer)
    order = _first_ready_backward(ops, producer)
    live = _Live(graph.tensor_bytes, batch_size)
    for t in _kept_for_backward(ops):
        live.add(("saved", t), t)
    for t in graph.outputs:
        live.add(("grad", t), t)
    last_read = _last_saved_read(ops, order)
    recomputed: set[str] = set()
    sums: dict[tuple, _Sum] = {}  # the sums under way; their terms are in ``live``
    peak, at_peak = 0, []
    for position, i in enumerate(order):
        op = ops[i]
        if op.block is not None and op.block not in recomputed:
            recomputed.add(op.block)
            for t in (t for m in ops if m.block == op.block for t in m.saved):
                live.add(("saved", t), t)
        # The sums this op reads give way to the gradient they add up to.
        for key in [k for k, s in sums.items() if s.reader == i]:
            done = sums.pop(key)
            for k in range(done.made):
                live.drop((key, k))
            for t in done.outputs:
                live.drop(("grad", t))
            live.add(("grad", done.tensor), done.tensor)
        for key, new in _terms_made(op, i, graph, producer, readers):
            sum_ = sums.setdefault(key, new)
            for _ in range(sum_.terms if key[0] == "norm" else 1):
                live.add_bytes((key, sum_.made), sum_.term_bytes * batch_size)
                sum_.made += 1
        if live.bytes > peak:
            peak = live.bytes
            at_peak = [
                s.term_bytes * batch_size for s in sums.values() if s.terms > _MAX_TERMS_LEFT_ALONE
            ]
        if ("norm", i) not in sums:  # a norm's output gradient lives as long as its terms
            for t in op.outputs:
                live.drop(("grad", t))
        for t in _reads(op):
            if last_read.get(t, -1) <= position:
                live.drop(("saved", t))
    return peak, at_peak


@dataclasses.dataclass
class _Sum:
    """A gradient sum under way in Grappler's estimate."""

    reader: int  # the op whose backward pass reads it (the maker of ``tensor``)
    terms: int  # terms in all
    term_bytes: int  # per sample
    tensor: int  # whose gradient it is
    outputs: tuple[int, ...] = ()  # output gradients that live until it is done
    made: int = 0  # terms made so far


def _terms_made(
    op: Op, i: int, graph: MemoryGraph, producer: dict[int, int], readers: dict[int, int]
) -> list[tuple[tuple, _Sum]]:
    """The gradient sums ``op``'s backward pass adds a term to: one per input that gets a
    gradient (the input's sum over its readers). The unfused batch norm's input gradient is
    itself a sum of three float32 terms, made by a chain of ops that all read the norm's
    output gradient, so that gradient lives until the three are added up."""
    made = []
    for t in dict.fromkeys(op.inputs):
        if t not in producer:
            continue
        norm = op.kind == "batchnorm" and op.temp_bytes[0]
        if norm:
            made.append((("norm", i), _Sum(producer[t], 3, op.temp_bytes[0], t, tuple(op.outputs))))
        if readers[t] > 1 or not norm:
            made.append((("sum", t), _Sum(producer[t], readers[t], graph.tensor_bytes[t], t)))
    return made


class _Live:
    """Named buffers alive in Grappler's estimate, and their total."""

    def __init__(self, tensor_bytes: dict[int, int], batch_size: int) -> None:
        self.tensor_bytes = tensor_bytes
        self.batch_size = batch_size
        self.sizes: dict[tuple, int] = {}
        self.bytes = 0

    def add(self, key: tuple, tensor: int) -> None:
        """Tensor ``tensor`` of the batch, under ``key``."""
        self.add_bytes(key, self.tensor_bytes[tensor] * self.batch_size)

    def add_bytes(self, key: tuple, nbytes: int) -> None:
        if key not in self.sizes:
            self.sizes[key] = nbytes
            self.bytes += nbytes

    def drop(self, key: tuple) -> None:
        self.bytes -= self.sizes.pop(key, 0)


def _gradient_readers(ops: Sequence[Op], producer: dict[int, int]) -> dict[int, int]:
    """How many ops read each tensor that gets a gradient (``producer``: the makers that
    need a backward pass): its gradient sums that many terms."""
    readers: dict[int, int] = collections.Counter()
    for op in ops:
        if op.needs_backward:
            for t in set(op.inputs):
                if t in producer:
                    readers[t] += 1
    return readers


def _kept_for_backward(ops: Sequence[Op]) -> set[int]:
    """What the forward pass leaves for the backward pass: the saved tensors of ops outside
    remat blocks and each block's inputs."""
    kept = {t for op in ops if op.block is None and op.needs_backward for t in op.saved}
    _, block_inputs = remat_blocks(ops)
    return kept.union(*block_inputs.values())


def _last_saved_read(ops: Sequence[Op], order: Sequence[int]) -> dict[int, int]:
    """Where in ``order`` each saved tensor or remat block input is read for the last time."""
    last: dict[int, int] = {}
    for position, i in enumerate(order):
        for t in _reads(ops[i]):
            last[t] = position
    return last


def _reads(op: Op) -> list[int]:
    """What an op's backward pass reads of the forward pass: what it saved, and in a remat
    block its inputs too (the recomputation reads them)."""
    return list(op.saved) + (list(op.inputs) if op.block is not None else [])


def _first_ready_backward(ops: Sequence[Op], producer: dict[int, int]) -> list[int]:
    """The backward pass first ready first: an op's gradient is ready once all its
    readers' are; parallel branches advance a step each in turn."""
    needs = [i for i, op in enumerate(ops) if op.needs_backward]
    waiting = {i: 0 for i in needs}
    feeds: dict[int, list[int]] = collections.defaultdict(list)
    for i in needs:
        for p in dict.fromkeys(producer[t] for t in ops[i].inputs if t in producer):
            if p in waiting:
                waiting[p] += 1
                feeds[i].append(p)
    ready = collections.deque(sorted((i for i in needs if waiting[i] == 0), reverse=True))
    order = []
    while ready:
        i = ready.popleft()
        order.append(i)
        for p in feeds[i]:
            waiting[p] -= 1
            if waiting[p] == 0:
                ready.append(p)
    return order
