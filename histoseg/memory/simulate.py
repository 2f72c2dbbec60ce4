"""A train step simulated op by op over the graph (:mod:`histoseg.memory.graph`): outputs
allocated and freed as the executor would, recomputed blocks run again before their backward
pass, and the buffers replayed through a model of TensorFlow's BFC allocator
(:mod:`histoseg.memory.bfc`), which counts whole chunks, not the bytes requested.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from histoseg.memory.bfc import BFCAllocator
from histoseg.memory.graph import (
    IN_PLACE_FORWARD,
    IN_PLACE_GRAD,
    TRANSIENT_FACTORS,
    MemoryGraph,
    Op,
    backward_executor_order,
    remat_blocks,
)

#: The backward orders TensorFlow's executor was seen to run (``simulate_step``'s
#: ``backward_order``); the estimate plans for the one that peaks higher.
BACKWARD_ORDERS: tuple[str, ...] = ("ops", "executor")


def simulate_step(
    graph: MemoryGraph,
    batch_size: int = 1,
    untracked_below_bytes: int = 0,
    allocator: BFCAllocator | None = None,
    cast_order: Sequence[int] | None = None,
    early_update_sizes: Sequence[int] = (),
    backward_order: str = "ops",
) -> dict[str, int]:
    """Walk a train step through ``graph`` and return the bytes it keeps and peaks at.

    Every buffer of the step is allocated and freed on its own, in the order the step
    makes and drops it, so that an allocator model can be fed the same sequence.

    Args:
        graph: From :func:`trace_model`.
        batch_size: Patches per step (every tensor scales with it).
        untracked_below_bytes: Buffers smaller than this are not counted, as the
            allocator being predicted does not count them (see :func:`untracked_below`).
        allocator: Also replay every buffer through this allocator model; the step leaves
            it as it found it (all its buffers freed) and the result gains its figures
            (``allocator_*``, the chunk bytes its statistics would count).
        cast_order: Under mixed precision, the order in which the step's weight casts
            run, as indices into ``graph.ops`` (default: the ops' order); see
            :func:`cast_orders`.
        early_update_sizes: Bytes of the buffers the optimizer's update makes at the
            step's start and holds until the update (:data:`OPTIMIZER_EARLY_BUFFERS`).
        backward_order: One of :data:`BACKWARD_ORDERS` (see :func:`_backward_order`).

    Returns:
        ``activation_bytes`` (alive after the forward pass, beyond the step's inputs) and
        ``peak_delta_bytes`` (the most bytes alive at once during the step beyond what
        existed before it, i.e. beyond weights, optimizer state and the input batch), both
        as requested by the step's tensors; with ``allocator``, also
        ``allocator_activation_bytes`` and ``allocator_peak_bytes`` (its peak since its
        last ``reset_peak``, everything it held before the step included).
    """

    # The step makes the float32 model input from the uint8 batch, so the input tensor is
    # an activation like any other; only its gradient is never computed.
    size = _Sizing(batch_size, untracked_below_bytes)
    sizes = {t: size.tracked(b * batch_size) for t, b in graph.tensor_bytes.items()}
    sim = _Timeline(sizes, graph.inputs, allocator)
    ops = graph.ops
    labels, early = _before_first_read(sim, graph, size, cast_order, early_update_sizes)
    start = sim.live
    first_read = sim.allocator_bytes()
    sim.alloc(graph.inputs)
    blocks, block_inputs = remat_blocks(ops)
    # What the backward pass reads after the forward pass: the tensors saved by ops outside
    # remat blocks, and each remat block's inputs.
    kept = {t for op in ops if op.block is None for t in op.saved}
    kept.update(t for name in blocks for t in block_inputs[name])
    _forward_and_loss(sim, graph, size, kept)
    # The step's first allocator read comes after the copies and the labels, the read
    # after the forward pass after the labels died: the activation figure is net of both.
    activation = sim.live - start
    allocator_activation = sim.allocator_bytes() - first_read
    _backward(sim, graph, size, blocks, block_inputs, kept, _backward_order(ops, backward_order))
    result = {
        "activation_bytes": int(activation),
        "peak_delta_bytes": int(sim.peak),
        "weight_copy_bytes": int(start - labels - sum(early)),
        "labels_bytes": int(labels),
        "weight_gradient_bytes": sum(size.tracked(b) for op in ops for b in op.grad_sizes),
    }
    if allocator is not None:
        # The update consumes the weight gradients; nothing of the step outlives it.
        sim.release_all()
        result["allocator_activation_bytes"] = int(allocator_activation)
        result["allocator_peak_bytes"] = int(allocator.peak_bytes)
    return result


def _backward_order(ops: Sequence[Op], name: str) -> list[int]:
    """Indices of ``ops`` in backward order ``name``: ``"ops"``, last op first (breadth
    first: sibling branches interleaved), or ``"executor"``, each chain of gradients back
    to its start before a sibling's (:func:`~histoseg.memory.graph.backward_executor_order`).
    Allocator traces show TensorFlow running either, from config to config
    (docs/memory-harness.md, "The backward pass: two orders, ...")."""
    if name not in BACKWARD_ORDERS:
        raise ValueError(f"backward_order {name!r}: one of {BACKWARD_ORDERS}")
    if name == "executor":
        return backward_executor_order(ops)
    return list(range(len(ops) - 1, -1, -1))


@dataclasses.dataclass(frozen=True)
class _Sizing:
    """Buffer sizes as the predicted allocator counts them, at one batch size."""

    batch_size: int
    untracked_below_bytes: int

    def tracked(self, nbytes: float) -> int:
        return int(nbytes) if nbytes >= self.untracked_below_bytes else 0

    def buffers(self, nbytes: float, count: float) -> list[int]:
        """``count`` buffers of ``nbytes`` per patch. A fraction stands for a difference of
        two real buffers (batch norm's float32 cast of a bfloat16 gradient, which then
        dies): one smaller buffer, counted when the full-size buffer would be."""
        whole = int(count)
        size = self.tracked(nbytes * self.batch_size)
        out = [size] * whole
        if count > whole and size:
            out.append(int((count - whole) * size))
        return out

    def forward_temp(self, op: Op) -> list[int]:
        nbytes, count, _ = op.temp_bytes
        return self.buffers(nbytes, count)

    def unsaved_forward_temp(self, op: Op) -> list[int]:
        """A remat block's first forward pass, which saves nothing (see ``forward``)."""
        if op.block is not None and op.kind == "batchnorm":
            nbytes, _, _ = op.temp_bytes
            return self.buffers(nbytes, TRANSIENT_FACTORS["batchnorm_unsaved"])
        return self.forward_temp(op)

    def backward_temp(self, op: Op) -> list[int]:
        nbytes, _, count = op.temp_bytes
        return self.buffers(nbytes, count)

    def copies(self, op: Op) -> list[int]:
        return [self.tracked(b) for b in op.weight_copy_sizes]


def _before_first_read(
    sim: _Timeline,
    graph: MemoryGraph,
    size: _Sizing,
    cast_order: Sequence[int] | None,
    early_update_sizes: Sequence[int],
) -> tuple[int, list[int]]:
    """What the step makes before its first allocator read: weight casts, the optimizer's
    early terms and the labels. Returns the labels' bytes and the early buffers."""
    ops = graph.ops
    # Mixed precision: each conv reads its float32 kernel through a cast. The casts depend
    # on nothing but the weights, so the executor runs them at the very start of the step,
    # before its first allocator read (seen with TF 2.21). A remat block's layers are cast
    # twice, back to back (once for the forward pass, once for the recomputation); the
    # forward copy dies when the layer has run, the other when its backward pass has, so
    # the forward pass leaves holes the size of one copy between live copies.
    for i in range(len(ops)) if cast_order is None else cast_order:
        op = ops[i]
        sim.take(("copy", i), size.copies(op))
        if op.block is not None:
            sim.take(("copy again", i), size.copies(op))
    # The optimizer's terms that read only its state run at the start too; the update,
    # at the step's end, consumes them.
    early = [size.tracked(b) for b in early_update_sizes]
    sim.take("early update", early)
    # The int32 labels are cast from the uint8 masks: that depends on nothing else, so it
    # also runs first, and the labels live until the loss has read them.
    labels = size.tracked(graph.output_pixels * 4 * size.batch_size)
    sim.take("labels", [labels])
    return labels, early


def _forward_and_loss(sim: _Timeline, graph: MemoryGraph, size: _Sizing, kept: set[int]) -> None:
    """The forward pass in the executor's order, then the loss; the logits and the
    labels die."""
    ops = graph.ops
    index = {id(op): i for i, op in enumerate(ops)}

    def forward_copy_dies(op: Op) -> None:
        if op.block is not None:
            sim.give_back(("copy", index[id(op)]))

    forward = [ops[i] for i in graph.forward_order] if graph.forward_order else ops
    sim.forward(
        forward,
        keep=kept | set(graph.outputs),
        temp=size.unsaved_forward_temp,
        after=forward_copy_dies,
    )
    # The loss: softmax cross-entropy keeps a float32 backprop tensor per logit, and the
    # logits themselves die once the loss is computed.
    sim.take("loss backprop", [size.tracked(graph.output_elements * 4 * size.batch_size)])
    # While the loss runs: its float32 per-pixel losses; then the labels die.
    sim.spike(size.buffers(graph.output_pixels * 4, TRANSIENT_FACTORS["loss"]))
    sim.give_back("labels")
    sim.free(graph.outputs)


def _backward(
    sim: _Timeline,
    graph: MemoryGraph,
    size: _Sizing,
    blocks: dict[str, list[Op]],
    block_inputs: dict[str, set[int]],
    kept: set[int],
    order: Sequence[int],
) -> None:
    """The backward pass over the ops in ``order`` (the reverse of a forward order). An op
    reads the gradients of its outputs and what it saved, makes the gradients of its inputs
    and of its weights, then frees both. A remat block is run forward again just before
    the backward pass of its first op in ``order``."""
    ops = graph.ops
    # What a member saves of its own block's outputs is made again by the recomputation:
    # the first pass's copy dies with its last reader outside the block.
    own = {name: {t for m in members for t in m.outputs} for name, members in blocks.items()}
    # Where in ``order`` each saved tensor is read for the last time.
    last_reader: dict[int, int] = {}
    for position, i in enumerate(order):
        op = ops[i]
        reads = list(op.saved)
        if op.block is not None:
            reads = [t for t in reads if t not in own[op.block]] + list(block_inputs[op.block])
        for t in reads:
            last_reader[t] = position
    sim.grad(graph.outputs)
    sim.give_back("loss backprop")
    recomputed: set[str] = set()
    sliced_until = _last_slice_positions(graph, order)
    still_sliced: dict[int, list[int]] = {}  # position -> concatenations' gradients
    for position, i in enumerate(order):
        op = ops[i]
        if not op.needs_backward:
            continue
        if op.block is not None and op.block not in recomputed:
            recomputed.add(op.block)
            members = blocks[op.block]
            # Keep what the block's backward reads and what other ops still need, but not
            # the block's own outputs again (their forward copies died long ago).
            produced = {t for m in members for t in m.outputs}
            keep = {t for m in members for t in m.saved} | (kept - produced)
            sim.forward(members, keep=keep, temp=size.forward_temp, recomputing=True)
        # The weight gradient reads the saved tensors first, which then die; the input
        # gradient follows. Element-wise gradients (ReLU, addition) reuse the buffer of
        # the output gradient, so they allocate nothing. A weight gradient replaces the
        # weight's compute-dtype copy and lives until the update.
        sim.spike(size.backward_temp(op))
        sim.take(("weight gradient", i), [size.tracked(b) for b in op.grad_sizes])
        if graph.loss_scaled:
            # The loss-scale check: a bool per element of each gradient (``IsFinite``),
            # all held until the one reduction before the update reads them.
            sim.take(("finite", i), [size.tracked(b // 4) for b in op.param_sizes])
        last = [t for t in op.saved if last_reader.get(t, -1) <= position]
        if op.block is not None:
            last += [t for t in block_inputs[op.block] if last_reader.get(t, -1) <= position]
        if i in sliced_until:
            sim.free(last)
            sim.grad(op.inputs)
            still_sliced.setdefault(sliced_until[i], []).extend(op.outputs)
        elif op.kind in IN_PLACE_GRAD:
            sim.pass_grad(op.outputs, op.inputs)
            sim.free(last)
        else:
            sim.free(last)
            sim.grad(op.inputs)
            sim.ungrad(op.outputs)
        # The input gradient reads the weight's compute-dtype copy: it dies after it.
        sim.give_back(("copy again", i) if op.block is not None else ("copy", i))
        sim.ungrad(still_sliced.pop(position, []))


def _last_slice_positions(graph: MemoryGraph, order: Sequence[int]) -> dict[int, int]:
    """Where in ``order`` each concatenation's gradient is last read.

    The executor slices a concatenation's gradient for one input as that input's branch
    starts its backward pass, and runs the branch to its end before the next slice, so the
    gradient lives until the backward pass of the last input's maker has run (allocator
    trace of resnet50 480 px at output stride 8: ASPP's 17.6 MiB concatenation gradient
    alive through all four branches). Keyed by the concatenation's index in ``graph.ops``;
    only concatenations whose last slice comes after themselves, and none that reads a
    recomputed block: a block's gradient function waits for its slice and orders its own
    backward pass, and the trace of mobilenetv2 384 px ``full`` shows ASPP's concatenation
    gradient dead before the last branch's backward pass.
    """
    position = {i: p for p, i in enumerate(order)}
    maker = {t: i for i, op in enumerate(graph.ops) for t in op.outputs}
    sizes = graph.tensor_bytes
    last = {}
    for i, op in enumerate(graph.ops):
        inputs = list(dict.fromkeys(op.inputs))
        if op.kind != "free" or len(inputs) < 2 or len(op.outputs) != 1:
            continue
        if sum(sizes[t] for t in inputs) != sizes[op.outputs[0]]:
            continue  # not a concatenation (an addition's inputs are each the output's size)
        made_by = [maker[t] for t in inputs if t in maker]
        if op.block is not None or any(graph.ops[m].block is not None for m in made_by):
            continue
        runs = [position[m] for m in made_by if m in position and graph.ops[m].needs_backward]
        if runs and max(runs) > position.get(i, -1):
            last[i] = max(runs)
    return last


class _Timeline:
    """Buffers alive during a simulated step: activations, their gradients, other buffers.

    Counts the bytes requested (``live``, ``grad_bytes``, ``peak``) and, given an
    allocator model, replays every allocation and free through it in the same order.
    """

    def __init__(
        self, size: dict[int, int], no_grad: Iterable[int], allocator: BFCAllocator | None
    ):
        self.size = size
        self.no_grad = set(no_grad)
        self.alive: set[int] = set()
        self.grads: set[int] = set()
        self.buffers: dict[Any, list[int]] = {}  # named buffers (copies, labels, ...)
        self.live = 0  # everything but activation gradients (weight gradients included)
        self.grad_bytes = 0
        self.peak = 0
        self.allocator = allocator

    def _bump(self) -> None:
        self.peak = max(self.peak, self.live + self.grad_bytes)

    def _allocate(self, key: Any, nbytes: int) -> None:
        if self.allocator is not None and nbytes > 0:
            self.allocator.allocate(key, nbytes)

    def _free(self, key: Any, nbytes: int) -> None:
        if self.allocator is not None and nbytes > 0:
            self.allocator.free(key)

    def allocator_bytes(self) -> int:
        """Bytes the allocator model counts as in use now (0 without one)."""
        return self.allocator.in_use_bytes if self.allocator is not None else 0

    def alloc(self, tids: Iterable[int]) -> None:
        for t in tids:
            if t not in self.alive:
                self.alive.add(t)
                self.live += self.size[t]
                self._allocate(("tensor", t), self.size[t])
        self._bump()

    def free(self, tids: Iterable[int]) -> None:
        for t in tids:
            if t in self.alive:
                self.alive.remove(t)
                self.live -= self.size[t]
                self._free(("tensor", t), self.size[t])

    def take(self, key: Any, sizes: list[int]) -> None:
        """Allocate the buffers ``sizes`` under ``key`` (freed by :meth:`give_back`)."""
        self.buffers[key] = sizes
        for j, nbytes in enumerate(sizes):
            self.live += nbytes
            self._allocate((key, j), nbytes)
        self._bump()

    def give_back(self, key: Any) -> None:
        for j, nbytes in enumerate(self.buffers.pop(key, [])):
            self.live -= nbytes
            self._free((key, j), nbytes)

    def spike(self, sizes: list[int]) -> None:
        """Working buffers alive only while an op runs."""
        self.take("temporary", sizes)
        self.give_back("temporary")

    def grad(self, tids: Iterable[int]) -> None:
        for t in tids:
            if t not in self.grads and t not in self.no_grad:
                self.grads.add(t)
                self.grad_bytes += self.size[t]
                self._allocate(("gradient", t), self.size[t])
        self._bump()

    def ungrad(self, tids: Iterable[int]) -> None:
        for t in tids:
            if t in self.grads:
                self.grads.remove(t)
                self.grad_bytes -= self.size[t]
                self._free(("gradient", t), self.size[t])

    def pass_grad(self, outputs: list[int], inputs: list[int]) -> None:
        """An element-wise gradient: the first input that has no gradient yet takes over
        the buffer of the output's gradient when they are the same size; the other inputs'
        gradients are new buffers."""
        out = next((t for t in outputs if t in self.grads), None)
        new = [t for t in inputs if t not in self.grads and t not in self.no_grad]
        if out is not None and new and self.size[new[0]] == self.size[out]:
            self.grads.remove(out)
            self.grads.add(new[0])
            if self.allocator is not None and self.size[out] > 0:
                self.allocator.rename(("gradient", out), ("gradient", new[0]))
            self.grad(new[1:])
            self.ungrad(outputs)
        else:
            self.ungrad(outputs)
            self.grad(inputs)

    def _rename(self, old: int, new: int) -> None:
        self.alive.remove(old)
        self.alive.add(new)
        self.live += self.size[new] - self.size[old]
        if self.allocator is not None and self.size[old] > 0:
            self.allocator.rename(("tensor", old), ("tensor", new))

    def release_all(self) -> None:
        """Free everything the step still holds (its end: the update has run)."""
        for key in list(self.buffers):
            self.give_back(key)
        self.free(list(self.alive))
        self.ungrad(list(self.grads))

    def forward(
        self,
        ops: list[Op],
        keep: set[int],
        temp: Any,
        after: Any = None,
        recomputing: bool = False,
    ) -> None:
        """Run ``ops`` forward: allocate outputs and saved copies, free what dies.

        The first forward pass of a remat block saves nothing for its backward pass (its
        recomputation, ``recomputing=True``, does), so there its ops forward their dying
        inputs in place as any element-wise op does.
        """
        last_use: dict[int, int] = {}
        for i, op in enumerate(ops):
            for t in op.inputs:
                last_use[t] = i
        for i, op in enumerate(ops):
            saved = op.saved if recomputing or op.block is None else []
            if op.kind in IN_PLACE_FORWARD and len(op.outputs) == 1:
                # TensorFlow's element-wise kernels write into an input that dies with
                # them (buffer forwarding): the output takes over that input's buffer.
                out = op.outputs[0]
                dying = [
                    t
                    for t in op.inputs
                    if t in self.alive
                    and last_use.get(t, -1) <= i
                    and t not in keep
                    and t not in saved
                    and self.size[t] == self.size[out]
                ]
                if dying and out not in self.alive:
                    self._rename(dying[0], out)
            self.alloc(op.outputs + saved)
            self.spike(temp(op))
            touched = set(op.inputs) | set(op.outputs) | set(saved)
            self.free([t for t in touched if last_use.get(t, -1) <= i and t not in keep])
            if after is not None:
                after(op)
