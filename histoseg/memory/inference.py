"""What a forward pass alone (inference, ``training=False``) holds, simulated op by op.

The same traced ops as the train step's (:func:`histoseg.memory.graph.trace_model`), run
forward only and replayed through the same allocator model (:mod:`histoseg.memory.bfc`,
through :class:`histoseg.memory.simulate._Timeline`). Nothing is kept for a backward pass,
so an op's outputs die with their last consumer and the peak is the most the pass has
alive at one op. What each op holds was read off TensorFlow 2.21's allocator trace of
whole inference passes (``python -m bench.worker --allocator-events``) of xception65,
MobileNetV2 and ResNet-50 in float32 and ``mixed_bfloat16``:

- the weights and the uint8 input batch are held before the pass; the pass makes the
  float32 image (the cast of the batch; its scaling runs in place);
- element-wise layers (batch norm in inference mode is ``x * inv + (beta - mean * inv)``
  per channel, ReLU, addition) write into an input that dies with them (TensorFlow's
  buffer forwarding), so in float32 they allocate nothing; a convolution, concatenation,
  padding, pooling or resize allocates its output;
- below float32, batch norm upcasts its input to float32 (a new buffer, after which the
  input dies), computes there in place and casts back (the output); a bilinear resize
  returns float32 and casts back; a global average pooling averages a float32 copy;
- an atrous (dilated) convolution, depthwise or not, runs on a space-to-batch copy of its
  input (padded to a multiple of the rate), writes its output in that layout, and
  batch-to-space brings it back: three buffers, one after the other
  (:func:`atrous_buffers`);
- max pooling keeps a workspace of one byte per output element while it runs;
- under mixed precision every convolution's float32 weights are cast to the compute dtype
  at the start of the pass, all at once in an order that changes from process to process
  (as in the train step, :func:`histoseg.memory.estimate.cast_orders`), and each copy dies
  when its convolution has run (some processes make part of the casts later, just before
  their layers: ``late_casts_peak_bytes`` is that end of the range); a layer whose input
  is in another dtype reads a cast copy;
- after the model, the softmax of the float32 logits runs in place and the tumour channel
  is sliced out (``histoseg.infer``'s tile function, for a batch): the pass's output.

The executor's order (one inter-op thread, as the harness runs it) is depth first: an op
that makes its consumers ready hands on to one of them, and the others wait on a stack,
the last made ready first (:func:`executor_order`). Not modelled: oneDNN's scratch
buffers of some convolutions below float32 (strided and 3x3 ones: up to one float32 copy
of the strided input, freed at once; docs/memory-harness.md, "Inference memory").
"""

from __future__ import annotations

import dataclasses
import functools
import statistics
from collections.abc import Iterable, Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.memory.bfc import BFCAllocator
from histoseg.memory.graph import (
    IN_PLACE_FORWARD,
    MemoryGraph,
    Op,
    dtype_bytes,
    executor_order,
    trace_model,
)
from histoseg.memory.simulate import _Timeline

#: Bytes per element of the float32 working copies below float32.
_F32 = 4


@dataclasses.dataclass(frozen=True)
class ForwardOp:
    """One op of the forward pass and the buffers it makes beyond its outputs (per sample).

    Attributes:
        index: The op's index in ``graph.ops`` (the key of its weight copies).
        casts: ``(input tensor id, bytes)`` of the inputs the layer casts to its compute
            dtype before it runs (Keras's autocast).
        rule: How the op allocates: "plain" (its outputs, in place where an element-wise
            op's input dies), "atrous" (space-to-batch copy, output in that layout, output),
            "float32" (a float32 working copy, then the output), "maxpool" (output and a
            workspace) or "separable" (depthwise output, then the output).
        work: Bytes of the rule's working buffers, in the order the rule makes them.
    """

    index: int
    casts: tuple[tuple[int, int], ...] = ()
    rule: str = "plain"
    work: tuple[int, ...] = ()


@dataclasses.dataclass(frozen=True)
class InferenceFacts:
    """What the inference estimate needs from a built model (it is not kept)."""

    graph: MemoryGraph
    order: tuple[ForwardOp, ...]  # the ops in the executor's order
    weight_sizes: tuple[int, ...]
    height_px: int
    width_px: int
    #: Bytes per sample of the float32 cast of the logits (0 when they are float32).
    logits_cast_bytes: int = 0
    #: Outputs of the batch norms computed in place (float32): an addition writes into
    #: one of them only when no other input of its size dies with it.
    norm_outputs: frozenset[int] = frozenset()


@dataclasses.dataclass(frozen=True)
class InferenceEstimate:
    """Predicted memory of one forward pass, in bytes (the ``predicted`` section of a row).

    ``peak_bytes`` is the allocator's peak over the pass, everything held included
    (weights, input batch); ``activation_bytes`` that peak less what was held before the
    pass (its activations, weight casts and working buffers at their most), as the
    harness measures them: whole chunks (:mod:`histoseg.memory.bfc`). ``requested_*`` are
    the same figures counting the bytes the tensors ask for.

    Under mixed precision ``peak_bytes`` has every weight cast made at the pass's start
    (as the traces show it most often); ``late_casts_peak_bytes`` is the peak with each
    cast made just before its layer, the other end of what processes measure (the
    executor's order of the casts varies from process to process). Without weight casts
    the two are the same.
    """

    weights_bytes: int
    activation_bytes: int
    peak_bytes: int
    input_bytes: int
    output_bytes: int
    weight_copy_bytes: int = 0
    requested_activation_bytes: int = 0
    requested_peak_bytes: int = 0
    late_casts_peak_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The estimate as a row's ``predicted`` section (``method`` "analytic")."""
        return {**dataclasses.asdict(self), "method": "analytic"}


def atrous_buffers(layer: Any, input_shape: Sequence[Any], dtype_size: int) -> tuple[int, int]:
    """Bytes per sample of an atrous (dilated) convolution's space-to-batch copy of its
    input and of its output in that layout: TensorFlow runs a dilated ``Conv2D`` or
    ``DepthwiseConv2D`` on the input padded to a multiple of the rate and cut into
    rate x rate blocks (``tf.nn.convolution``'s space-to-batch), then batch-to-space
    brings the output back."""
    height, width, channels = (int(d) for d in list(input_shape)[1:])
    (kh, kw), (rh, rw) = layer.kernel_size, layer.dilation_rate
    if layer.padding == "same":
        height += (kh - 1) * rh
        width += (kw - 1) * rw
    blocks_h, blocks_w = -(-height // rh), -(-width // rw)
    copy = blocks_h * rh * blocks_w * rw * channels * dtype_size
    out_h, out_w = blocks_h - (kh - 1), blocks_w - (kw - 1)
    filters = getattr(layer, "filters", None) or channels * getattr(layer, "depth_multiplier", 1)
    out = rh * rw * max(out_h, 0) * max(out_w, 0) * filters * dtype_size
    return copy, out


def creation_order(variables: Sequence[Any]) -> list[Any]:
    """``variables`` in the order they were made, which is the order their buffers were
    allocated: a model lists its weights by layer, and ResNet-50 makes a block's shortcut
    before the layers listed ahead of it (its weights' chunks then differ, 2 MB at
    256 px). TensorFlow names each variable's handle with a process-wide counter; without
    one (another backend) the list's order is kept."""

    def made(v: Any) -> int:
        return int(str(v.value._unique_id).rsplit("_", 1)[1])

    try:
        return sorted(variables, key=made)
    except (AttributeError, ValueError, IndexError):
        return list(variables)


def _layers_by_name(model: Any) -> dict[str, Any]:
    layers: dict[str, Any] = {}
    for layer in model._flatten_layers(include_self=False, recursive=True):
        layers.setdefault(layer.name, layer)
    return layers


def _forward_op(index: int, op: Op, layer: Any, width: dict[int, int], graph: MemoryGraph):
    """The rule of one op, from its layer (compute dtype, type, strides)."""
    import keras

    compute = dtype_bytes(getattr(layer, "compute_dtype", None) or "float32")

    def elements(t: int) -> int:
        return graph.tensor_bytes[t] // width.get(t, compute)

    casts = tuple(
        (t, elements(t) * compute)
        for t in dict.fromkeys(op.inputs)
        if width.get(t, compute) != compute and getattr(layer, "autocast", True)
    )
    out_elements = sum(elements(t) for t in op.outputs)
    in_elements = sum(elements(t) for t in op.inputs[:1])
    rate = getattr(layer, "dilation_rate", (1, 1))
    convs = (keras.layers.Conv2D, keras.layers.DepthwiseConv2D)
    if isinstance(layer, convs) and any(r > 1 for r in rate):
        return ForwardOp(index, casts, "atrous", atrous_buffers(layer, layer.input.shape, compute))
    if op.kind == "separable":
        return ForwardOp(index, casts, "separable", (graph.tensor_bytes[op.saved[-1]],))
    if op.kind == "maxpool":
        return ForwardOp(index, casts, "maxpool", (out_elements,))
    if compute < _F32 and op.kind == "batchnorm":
        return ForwardOp(index, casts, "float32", (in_elements * _F32,))
    if compute < _F32 and op.kind == "resize":
        return ForwardOp(index, casts, "float32", (out_elements * _F32,))
    if compute < _F32 and isinstance(layer, keras.layers.GlobalAveragePooling2D):
        return ForwardOp(index, casts, "float32", (in_elements * _F32,))
    return ForwardOp(index, casts)


def inference_facts(model: Any) -> InferenceFacts:
    """Trace a built functional model (:func:`trace_model`) and read each op's rule off
    its layer; refuses a model with recomputed blocks (an inference pass has no backward
    pass to recompute for: build it with ``remat="none"``)."""
    from histoseg.memory.estimate import _variable_sizes

    graph = trace_model(model)
    if any(op.block is not None for op in graph.ops):
        raise ConfigError("an inference estimate takes a model built with remat none")
    layers = _layers_by_name(model)
    width = {t: dtype_bytes(kt.dtype) for t, kt in zip(graph.inputs, model.inputs, strict=True)}
    for op in graph.ops:
        layer = layers.get(op.name)
        outs = [layer.output] if layer is not None and hasattr(layer, "output") else []
        for t, kt in zip(op.outputs, outs, strict=False):
            width[t] = dtype_bytes(kt.dtype)
    rules = {
        i: _forward_op(i, op, layers.get(op.name), width, graph) for i, op in enumerate(graph.ops)
    }

    def plain_conv(i: int) -> bool:
        return graph.ops[i].kind == "conv" and rules[i].rule == "plain"

    order = tuple(rules[i] for i in executor_order(graph.ops, graph.inputs, plain_conv))
    norms = frozenset(
        t
        for i, op in enumerate(graph.ops)
        if op.kind == "batchnorm" and rules[i].rule == "plain"
        for t in op.outputs
    )
    logits_cast = sum(
        graph.tensor_bytes[t] // width[t] * _F32 for t in graph.outputs if width[t] != _F32
    )
    height, width_px = model.inputs[0].shape[1:3]
    return InferenceFacts(
        graph=graph,
        order=order,
        weight_sizes=tuple(_variable_sizes(creation_order(model.weights))),
        height_px=int(height),
        width_px=int(width_px),
        logits_cast_bytes=logits_cast,
        norm_outputs=norms,
    )


class _Pass:
    """One forward pass over an :class:`InferenceFacts`, on a :class:`_Timeline`."""

    def __init__(self, facts: InferenceFacts, batch_size: int, floor: int, timeline: _Timeline):
        self.facts = facts
        self.batch = batch_size
        self.floor = floor
        self.sim = timeline
        graph = facts.graph
        self.last_use: dict[int, int] = {}
        for position, fop in enumerate(facts.order):
            for t in graph.ops[fop.index].inputs:
                self.last_use[t] = position
        self.outputs = set(graph.outputs)

    def tracked(self, nbytes: float) -> int:
        return int(nbytes) if nbytes >= self.floor else 0

    def scaled(self, per_sample: int) -> int:
        return self.tracked(per_sample * self.batch)

    def dying(self, tids: Iterable[int], position: int) -> list[int]:
        return [
            t
            for t in dict.fromkeys(tids)
            if self.last_use.get(t, -1) <= position and t not in self.outputs
        ]

    def run(self, cast_order: Sequence[int] | None, late_casts: bool = False) -> None:
        """The pass: weight casts, the float32 image, every op, the softmax and slice; what
        it returns (the probabilities) stays allocated under "probabilities"."""
        graph, sim = self.facts.graph, self.sim
        self.late_casts = late_casts
        for i in () if late_casts else range(len(graph.ops)) if cast_order is None else cast_order:
            self.cast_weights(i)
        sim.alloc(graph.inputs)
        for position, fop in enumerate(self.facts.order):
            self.op(position, fop)
        # the head: logits to float32 (when they are not), softmax in place, the slice
        sim.take("logits float32", [self.scaled(self.facts.logits_cast_bytes)])
        if self.facts.logits_cast_bytes:
            sim.free(graph.outputs)
        sim.take("probabilities", [self.scaled(graph.output_pixels * _F32)])
        sim.give_back("logits float32")
        sim.free(graph.outputs)

    def cast_weights(self, i: int) -> None:
        sizes = self.facts.graph.ops[i].weight_copy_sizes
        self.sim.take(("copy", i), [self.tracked(b) for b in sizes])

    def op(self, position: int, fop: ForwardOp) -> None:
        sim, op = self.sim, self.facts.graph.ops[fop.index]
        if self.late_casts:
            self.cast_weights(fop.index)
        cast_of = {t: ("cast", fop.index, t) for t, _ in fop.casts}
        for t, nbytes in fop.casts:
            sim.take(cast_of[t], [self.scaled(nbytes)])
        sim.free(t for t in self.dying(cast_of, position))
        dying = [t for t in self.dying(op.inputs, position) if t not in cast_of]
        work = [self.scaled(b) for b in fop.work]
        if fop.rule == "atrous":
            sim.take("copy in", work[:1])
            sim.free(dying)
            sim.take("copy out", work[1:])
            sim.give_back("copy in")
            sim.alloc(op.outputs)
            sim.give_back("copy out")
        elif fop.rule in ("float32", "separable"):
            sim.take("working", work)
            if fop.rule == "float32":
                sim.free(dying)
            sim.alloc(op.outputs)
            sim.give_back("working")
        elif fop.rule == "maxpool":
            sim.alloc(op.outputs)
            sim.take("working", work)
            sim.free(dying)
            sim.give_back("working")
        else:
            self.in_place(op, dying)
        sim.free(dying)
        for t in cast_of.values():
            sim.give_back(t)
        sim.give_back(("copy", fop.index))

    def in_place(self, op: Op, dying: list[int]) -> None:
        """Allocate ``op``'s outputs; an element-wise op writes into a dying input of its
        output's size (TensorFlow's buffer forwarding): the first, but an addition takes
        one that is not a float32 batch norm's output when it can (the norm's ``+ beta``
        and the addition are summed together, seen in ResNet-50's trace: ``y_bn + x``
        wrote into ``x``, ``y_bn + shortcut_bn`` into ``y_bn``)."""
        sizes = self.facts.graph.tensor_bytes
        if op.kind in IN_PLACE_FORWARD and len(op.outputs) == 1:
            out = op.outputs[0]
            same = [t for t in dying if t in self.sim.alive and sizes[t] == sizes[out]]
            same.sort(key=lambda t: t in self.facts.norm_outputs)
            if same and out not in self.sim.alive:
                self.sim._rename(same[0], out)
        self.sim.alloc(op.outputs)


def _hold_weights(bfc: BFCAllocator, sizes: Sequence[int]) -> None:
    """The weights as the process makes them: a random draw, scaled and shifted, the last
    of the three buffers kept (as :func:`histoseg.memory.estimate._allocator_figures`)."""
    for i, nbytes in enumerate(sizes):
        bfc.allocate(("draw", i), nbytes)
        bfc.allocate(("scale", i), nbytes)
        bfc.allocate(("weight", i), nbytes)
        bfc.free(("scale", i))
        bfc.free(("draw", i))


def simulate_inference(
    facts: InferenceFacts,
    batch_size: int,
    untracked_below_bytes: int = 0,
    cast_order: Sequence[int] | None = None,
    late_casts: bool = False,
) -> dict[str, int]:
    """Replay the harness's process: weights, the uint8 input batch, a warm-up pass (its
    output dropped), then the measured pass after a peak reset.

    Returns:
        ``allocator_peak_bytes`` (the measured pass's peak, everything held included),
        ``allocator_before_bytes`` (held before it), ``requested_pass_peak_bytes`` (the
        most the pass's tensors ask for at once) and ``held_bytes`` (the requested bytes
        of the weights and input batch).
    """
    floor = untracked_below_bytes
    graph = facts.graph
    sizes = {
        t: (b * batch_size if b * batch_size >= floor else 0) for t, b in graph.tensor_bytes.items()
    }
    bfc = BFCAllocator()
    weights = [b for b in facts.weight_sizes if b >= floor and b > 0]
    _hold_weights(bfc, weights)
    images = batch_size * facts.height_px * facts.width_px * 3
    held = weights + ([images] if images >= floor else [])
    if images >= floor:
        bfc.allocate("input batch", images)
    for measured in (False, True):
        if measured:
            bfc.reset_peak()
            before = bfc.in_use_bytes
        sim = _Timeline(sizes, (), bfc)
        _Pass(facts, batch_size, floor, sim).run(cast_order, late_casts)
        requested = sim.peak
        sim.release_all()  # the caller drops the probabilities
    return {
        "allocator_peak_bytes": int(bfc.peak_bytes),
        "allocator_before_bytes": int(before),
        "requested_pass_peak_bytes": int(requested),
        "held_bytes": int(sum(held)),
    }


def estimate_inference_model(
    model: Any | InferenceFacts, *, batch_size: int, device: str = "cpu"
) -> InferenceEstimate:
    """Predict one forward pass's memory for a built Keras model at its input size.

    Under mixed precision the allocator figures are the medians over the cast orders of
    :func:`histoseg.memory.estimate.cast_orders`, as for the train step.
    """
    from histoseg.memory.estimate import cast_orders, untracked_below

    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    facts = model if isinstance(model, InferenceFacts) else inference_facts(model)
    floor = untracked_below(device)
    runs = [
        simulate_inference(facts, batch_size, floor, order) for order in cast_orders(facts.graph)
    ]
    peak = statistics.median_low(r["allocator_peak_bytes"] for r in runs)
    activation = statistics.median_low(
        r["allocator_peak_bytes"] - r["allocator_before_bytes"] for r in runs
    )
    requested = runs[0]["requested_pass_peak_bytes"]
    copies = sum(b for op in facts.graph.ops for b in op.weight_copy_sizes)
    late = simulate_inference(facts, batch_size, floor, late_casts=True) if copies else runs[0]
    pixels = batch_size * facts.height_px * facts.width_px
    return InferenceEstimate(
        weights_bytes=sum(facts.weight_sizes),
        activation_bytes=int(activation),
        peak_bytes=int(peak),
        input_bytes=pixels * 3,
        output_bytes=pixels * _F32,
        weight_copy_bytes=copies,
        requested_activation_bytes=int(requested),
        requested_peak_bytes=int(runs[0]["held_bytes"] + requested),
        late_casts_peak_bytes=int(late["allocator_peak_bytes"] if copies else peak),
    )


@functools.lru_cache(maxsize=64)
def inference_facts_for(
    backbone: str,
    patch_size: int,
    output_stride: int,
    precision: str,
    options: tuple[tuple[str, Any], ...],
    num_classes: int,
) -> InferenceFacts:
    """Build the config's model symbolically (remat none), read its facts, let it go."""
    from histoseg.memory.estimate import read_symbolic_model

    return read_symbolic_model(
        inference_facts,
        backbone,
        patch_size,
        output_stride,
        precision,
        "none",
        options,
        num_classes,
    )
