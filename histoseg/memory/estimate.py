"""The analytic memory model: what a train step will need, predicted from the model graph.

No training run is needed. The model is built symbolically (Keras functional graph, no
tensors allocated) and walked layer by layer. Each layer type has a rule saying which
tensors its backward pass needs (a convolution keeps its input, a ReLU its output, batch
norm a float32 copy of its input, an addition nothing, ...). A simulated step then runs the
layers in order, allocating outputs and freeing what no later layer or backward pass
needs, then walks back through them allocating gradients and freeing what was kept.
Recomputed (remat) blocks keep only their inputs in the forward pass and are simulated
forward again, one block at a time, just before their backward pass. The simulation gives:

- ``activation_bytes``: allocator bytes after the forward pass beyond those at the
  step's first allocator read (what the harness measures as allocator bytes after forward
  minus before);
- ``peak_bytes``: the allocator's peak over the step: weights, optimizer state, input
  batch, the constants the compiled step holds (``constant_bytes``, see
  :func:`_step_constants`) and the most the simulated step has alive at once;
- ``weights_bytes``, ``optimizer_bytes`` (Adam two slots per trainable weight, SGD with
  momentum one), ``gradient_bytes`` (what the harness measures: bytes after all gradients
  less those at the step's first read, i.e. the weight gradients less the mixed-precision
  weight copies and labels that have died by then; negative under ``mixed_bfloat16``).

Tensor sizes come straight from the graph's shapes and dtypes, so patch size, batch size
and precision enter exactly. The rules were read off TensorFlow 2.21's gradient functions,
its optimised step graph (run metadata) and the allocator's trace of whole xception65
steps (TensorFlow's profiler records every allocation with the bytes requested): for the
configurations traced the simulation matches the bytes the step *requests* to within a
few MB (``requested_activation_bytes``, ``requested_peak_bytes``).

TensorFlow's statistics count more than that: its BFC allocator hands a request a whole
free chunk when the chunk is under twice the request. So the simulated step's buffers,
each allocated and freed on its own in the step's order, are replayed through a model of
that allocator (:mod:`histoseg.memory.bfc`), after the process's weights, optimizer slots,
input batch and a warm-up step, as the harness runs it; ``activation_bytes`` and
``peak_bytes`` are what that allocator counts. Element-wise layers write into an input
that dies with them (TensorFlow's buffer forwarding), which decides which chunks come
free. Under mixed precision the executor runs the weight casts in an order that differs
from process to process, so the allocator figures are medians over many such orders
(:func:`cast_orders`). The only calibrated constants are the batch-norm working buffers in
:data:`TRANSIENT_FACTORS` and the CPU allocator's untracked-size floor
:data:`CPU_UNTRACKED_BELOW_BYTES`.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import math
import random
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.memory.bfc import BFCAllocator
from histoseg.memory.devices import planned_bytes

#: Optimizer slots per trainable weight (Keras 3: Adam keeps m and v; SGD with momentum
#: keeps one velocity; plain SGD none).
OPTIMIZER_SLOTS: dict[str, int] = {"adam": 2, "adamw": 2, "sgd": 1, "sgd_nomomentum": 0}

#: Weight-sized float32 buffers per trainable weight that the optimizer's update computes
#: from its own state alone, so that the executor runs them at the step's start and holds
#: them until the gradient arrives. Keras 3's SGD with momentum updates
#: ``m = m * momentum - g * lr``: ``m * momentum`` reads only the slot. Adam's terms all
#: read the gradient (its ``sqrt(v)`` reads ``v`` after the gradient's update of it).
OPTIMIZER_EARLY_BUFFERS: dict[str, int] = {"adam": 0, "adamw": 0, "sgd": 1, "sgd_nomomentum": 0}

#: Transient working buffers per layer type, as multiples of the layer's float32 output
#: size, alive only while the layer (or its gradient) runs. Calibrated on this machine
#: (TF 2.21, oneDNN on); see the module docstring and docs/memory-harness.md.
TRANSIENT_FACTORS: dict[str, float] = {
    "batchnorm": 2.0,  # unfused Keras BN: x - mean and x * inv are full-size float32
    # Its gradient: two full-size float32 buffers at a time beside the output gradient and
    # the kept input (the broadcast moment terms, then the products with the scale),
    # read off the allocator's trace of xception65 steps (TensorFlow's profiler). Below
    # float32 the output gradient is first cast to float32 (see _make_op).
    "batchnorm_backward": 2.0,
    "loss": 1.0,  # float32 per-pixel losses (4 bytes per pixel) while the loss runs
}

_DTYPE_BYTES = {
    "float16": 2,
    "bfloat16": 2,
    "float32": 4,
    "float64": 8,
    "int8": 1,
    "uint8": 1,
    "bool": 1,
    "int32": 4,
    "int64": 8,
}


def dtype_bytes(dtype: Any) -> int:
    """Bytes per element of a dtype given by name or object (``"bfloat16" -> 2``)."""
    name = getattr(dtype, "name", None) or str(dtype)
    name = name.replace("tf.", "")
    if name not in _DTYPE_BYTES:
        raise ConfigError(f"unknown dtype {dtype!r}; known: {', '.join(_DTYPE_BYTES)}")
    return _DTYPE_BYTES[name]


@dataclasses.dataclass
class _Op:
    """One layer application in the flattened forward graph."""

    name: str
    kind: str
    inputs: list[int]
    outputs: list[int]
    saved: list[int]  # tensors the backward pass of this op reads
    # (buffer bytes, how many in the forward pass, how many in the backward pass): working
    # buffers alive only while the op (or its gradient) runs.
    temp_bytes: tuple[int, float, float]
    block: str | None  # remat block this op belongs to (recomputed in the backward pass)
    param_sizes: tuple[int, ...] = ()  # bytes of each trainable weight
    weight_copy_sizes: tuple[int, ...] = ()  # mixed precision: weights cast to compute dtype
    # Bytes of each weight's gradient as it waits for the update: a weight read through a
    # cast gets its gradient in the compute dtype (Grappler's arithmetic optimizer moves
    # the cast back to float32 past the step's identities, into the update).
    grad_sizes: tuple[int, ...] = ()
    # Bytes of constants that Grappler folds out of this op's gradient: they are made when
    # the step function is first run and stay allocated for as long as it exists.
    constant_bytes: int = 0
    needs_backward: bool = True


@dataclasses.dataclass
class MemoryGraph:
    """A model flattened into ops over tensors of known size (per sample, batch 1).

    Attributes:
        tensor_bytes: bytes of each tensor for one sample, by tensor id.
        ops: layer applications in forward execution order (see :func:`_ready_first`).
        inputs: ids of the model's input tensors (made inside the step from the uint8
            batch; they get no gradient).
        outputs: ids of the model's output tensors (the logits).
        constants: ``(what, bytes per sample)`` of the constants the compiled step holds
            for its whole life (see :func:`_step_constants`).
        loss_scaled: some layer computes in float16, so the step scales the loss (its
            gradient seed is then a variable, not a constant).
        notes: layer types the rules do not know (handled conservatively).
    """

    tensor_bytes: dict[int, int]
    ops: list[_Op]
    inputs: list[int]
    outputs: list[int]
    output_elements: int = 0
    output_pixels: int = 0
    constants: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    loss_scaled: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class MemoryEstimate:
    """Predicted memory of one train step, in bytes (the ``predicted`` section of a row)."""

    weights_bytes: int
    optimizer_bytes: int
    gradient_bytes: int
    activation_bytes: int
    peak_bytes: int
    input_bytes: int
    #: Constants the compiled step holds for its life (in ``peak_bytes``, in no activation).
    constant_bytes: int = 0
    #: What the step's tensors ask for (``activation_bytes`` and ``peak_bytes`` are what the
    #: allocator counts: whole chunks, see :mod:`histoseg.memory.bfc`).
    requested_activation_bytes: int = 0
    requested_peak_bytes: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The estimate as the ``predicted`` section of a results row (``method``: the
        route that made it, "analytic"; see :mod:`histoseg.memory.calibrate`)."""
        return {**dataclasses.asdict(self), "method": "analytic"}


# --------------------------------------------------------------------------- graph walk


def _kind(layer: Any) -> str:
    """The rule a layer follows, from its class (subclasses inherit the parent's rule)."""
    import keras

    from histoseg.models.remat import RematBlock

    L = keras.layers
    table: list[tuple[tuple[type, ...], str]] = [
        ((RematBlock,), "remat"),
        ((keras.Model,), "model"),
        ((L.InputLayer,), "input"),
        ((L.SeparableConv2D,), "separable"),
        ((L.DepthwiseConv2D, L.Conv2D, L.Conv1D, L.Conv3D, L.Dense, L.Conv2DTranspose), "conv"),
        ((L.BatchNormalization,), "batchnorm"),
        ((L.ReLU,), "relu"),
        ((L.Activation,), "activation"),
        ((L.MaxPooling2D,), "maxpool"),
        ((L.Dropout, L.SpatialDropout2D), "dropout"),
        ((L.UpSampling2D, L.Resizing), "resize"),
        ((L.Multiply,), "multiply"),
        (
            (
                L.Add,
                L.Subtract,
                L.Average,
                L.Concatenate,
                L.ZeroPadding2D,
                L.Cropping2D,
                L.Reshape,
                L.Flatten,
                L.GlobalAveragePooling2D,
                L.AveragePooling2D,
                L.Rescaling,
                L.Identity,
            ),
            "free",
        ),
    ]
    for classes, kind in table:
        if isinstance(layer, classes):
            return kind
    if type(layer).__name__ == "ResizeBilinear":  # histoseg.models.layers.ResizeBilinear
        return "resize"
    return "unknown"


def _keras_nodes(model: Any) -> list[Any]:
    """A functional model's nodes in the order Keras runs them (deepest first)."""
    by_depth = model._nodes_by_depth
    return [node for depth in sorted(by_depth, reverse=True) for node in by_depth[depth]]


def _flat(x: Any) -> list[Any]:
    if isinstance(x, (list, tuple)):
        return [t for item in x for t in _flat(item)]
    if isinstance(x, Mapping):
        return [t for item in x.values() for t in _flat(item)]
    return [x]


def trace_model(model: Any) -> MemoryGraph:
    """Flatten a built Keras functional model into a :class:`MemoryGraph`.

    Nested functional blocks are inlined; blocks wrapped in
    :class:`histoseg.models.remat.RematBlock` mark their ops as recomputed.

    Args:
        model: A functional ``keras.Model`` with fully known input shapes (batch aside).
    """
    graph = MemoryGraph(tensor_bytes={}, ops=[], inputs=[], outputs=[])
    ids: dict[int, int] = {}  # id(KerasTensor) -> tensor id
    counter = iter(range(1, 1 << 62))

    def new_tensor(nbytes: int) -> int:
        tid = next(counter)
        graph.tensor_bytes[tid] = int(nbytes)
        return tid

    def tensor_of(kt: Any) -> int:
        key = id(kt)
        if key not in ids:
            ids[key] = new_tensor(_nbytes(kt.shape, kt.dtype))
        return ids[key]

    def walk(fmodel: Any, block: str | None) -> None:
        for node in _keras_nodes(fmodel):
            layer = node.operation
            kind = _kind(layer)
            ins = [t for t in _flat(node.input_tensors) if hasattr(t, "shape")]
            outs = [t for t in _flat(node.output_tensors) if hasattr(t, "shape")]
            if kind == "input":
                continue
            if kind in ("model", "remat"):
                inner = layer.block if kind == "remat" else layer
                inner_block = layer.name if kind == "remat" else block
                for outer, inner_in in zip(ins, _flat(inner.inputs), strict=True):
                    ids[id(inner_in)] = tensor_of(outer)
                walk(inner, inner_block)
                for outer, inner_out in zip(outs, _flat(inner.outputs), strict=True):
                    ids[id(outer)] = tensor_of(inner_out)
                continue
            graph.ops.append(_make_op(layer, kind, ins, outs, tensor_of, new_tensor, block))
            if kind == "unknown":
                graph.notes.append(f"{layer.name}: {type(layer).__name__} (kept its inputs)")

    graph.inputs = [tensor_of(t) for t in _flat(model.inputs)]
    walk(model, None)
    graph.outputs = [tensor_of(t) for t in _flat(model.outputs)]
    graph.output_elements = sum(math.prod(t.shape[1:]) for t in _flat(model.outputs))
    graph.output_pixels = sum(math.prod(t.shape[1:-1]) for t in _flat(model.outputs))
    graph.ops = _ready_first(graph.ops, graph.inputs)
    _mark_backward(graph)
    graph.loss_scaled = any(
        getattr(layer, "compute_dtype", None) == "float16" for layer in model._flatten_layers()
    )
    graph.constants = _step_constants(graph)
    return graph


def _ready_first(ops: list[_Op], inputs: Iterable[int]) -> list[_Op]:
    """``ops`` in the order TensorFlow's executor runs them: each once its inputs exist,
    the first to become ready first.

    Keras lists a functional model's layers by depth (distance from the outputs), so a
    branch that joins late runs late: DeepLabV3+'s low-level decoder branch after ASPP.
    TensorFlow's executor, with one inter-op thread as the harness runs it, runs an op as
    soon as its inputs are there, in the order they became ready: that branch right after
    the entry flow (seen in the allocator's trace). Which tensors are alive together, and
    so which free chunks a request finds, follows this order.
    """
    consumers: dict[int, list[int]] = {}
    for i, op in enumerate(ops):
        for t in op.inputs:
            consumers.setdefault(t, []).append(i)
    produced = set(inputs)
    ready = collections.deque(i for i, op in enumerate(ops) if set(op.inputs) <= produced)
    queued = set(ready)
    order: list[int] = []
    while ready:
        i = ready.popleft()
        order.append(i)
        produced.update(ops[i].outputs)
        for t in ops[i].outputs:
            for j in consumers.get(t, []):
                if j not in queued and set(ops[j].inputs) <= produced:
                    ready.append(j)
                    queued.add(j)
    if len(order) != len(ops):  # an op fed by something no op makes: keep Keras's order
        return ops
    return [ops[i] for i in order]


def _nbytes(shape: Iterable[Any], dtype: Any) -> int:
    """Bytes of one sample of a (batch, ...) tensor."""
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        raise ConfigError(
            f"cannot size a tensor of shape {tuple(shape)}: build the model with a fixed "
            "patch size to estimate its memory"
        )
    return math.prod(int(d) for d in dims) * dtype_bytes(dtype)


def _make_op(layer, kind, ins, outs, tensor_of, new_tensor, block) -> _Op:
    """Apply the layer-type rule: which tensors the backward pass keeps, which buffers pass."""
    in_ids = [tensor_of(t) for t in ins]
    out_ids = [tensor_of(t) for t in outs]
    compute = getattr(layer, "compute_dtype", None) or "float32"

    def as_compute(kt: Any, tid: int) -> int:
        # Keras casts a layer's input to its compute dtype; the cast is what the op keeps.
        if dtype_bytes(kt.dtype) == dtype_bytes(compute):
            return tid
        return new_tensor(_nbytes(kt.shape, compute))

    saved: list[int] = []
    temp = (0, 0.0, 0.0)
    constant = 0
    if kind == "conv" and _atrous_depthwise(layer):
        # tf.nn.depthwise_conv2d runs an atrous depthwise conv on a space-to-batch copy of
        # its input, padded to a multiple of the rate; that copy is what its gradient reads.
        # The gradient of the input comes out in that layout too (as large as the copy)
        # before BatchToSpaceND brings it back.
        space_to_batch = _space_to_batch_bytes(layer, ins[0].shape, compute)
        saved = [new_tensor(space_to_batch)]
        temp = (space_to_batch, 0.0, 1.0)
    elif kind == "conv":
        saved = [as_compute(kt, tid) for kt, tid in zip(ins, in_ids, strict=True)]
    elif kind == "separable":
        saved = [as_compute(ins[0], in_ids[0])]
        depth_multiplier = getattr(layer, "depth_multiplier", 1)
        mid = _nbytes(outs[0].shape, compute) // outs[0].shape[-1] * ins[0].shape[-1]
        saved.append(new_tensor(mid * depth_multiplier))
    elif kind == "batchnorm":
        # Keras BN upcasts to float32 and its gradient reads that copy of the input.
        f32 = _nbytes(ins[0].shape, "float32")
        saved = [in_ids[0] if dtype_bytes(ins[0].dtype) == 4 else new_tensor(f32)]
        # Below float32 the output gradient is cast to float32 and the original dies: one
        # more float32 map, less the output gradient's own bytes.
        cast_grad = 1.0 - dtype_bytes(outs[0].dtype) / 4
        backward = TRANSIENT_FACTORS["batchnorm_backward"] + cast_grad
        temp = (f32, TRANSIENT_FACTORS["batchnorm"], backward)
    elif kind == "relu" or (
        kind == "activation" and getattr(layer.activation, "__name__", "") in _KEEP_OUTPUT
    ):
        saved = list(out_ids)
    elif kind == "activation":
        if getattr(layer.activation, "__name__", "") not in ("linear",):
            saved = list(in_ids)
    elif kind == "maxpool":
        saved = list(in_ids) + list(out_ids)
    elif kind == "dropout":
        saved = [new_tensor(_nbytes(ins[0].shape, "bool"))]
    elif kind == "resize":
        # ResizeBilinearGrad reads the resize's input (in the compute dtype).
        saved = [as_compute(ins[0], in_ids[0])]
        if dtype_bytes(compute) != 4:
            # Below float32, Keras resizes in float32 (tf.image.resize returns float32) and
            # casts back through clip_by_value: the clip's Minimum and Maximum gradients
            # read the float32 resize output and the Minimum's output; the clip's output
            # is a float32 buffer alive until the cast. The gradient's zeros_like of the
            # float32 output has a static shape, so Grappler folds it into a constant.
            f32 = _nbytes(outs[0].shape, "float32")
            saved += [new_tensor(f32), new_tensor(f32)]
            # Backward: the cast's float32 gradient and one clip gradient at a time.
            temp = (f32, 1.0, 2.0)
            constant = f32
    elif kind in ("multiply", "unknown"):
        saved = list(in_ids)
    return _Op(
        name=layer.name,
        kind=kind,
        inputs=in_ids,
        outputs=out_ids,
        saved=saved,
        temp_bytes=temp,
        block=block,
        param_sizes=tuple(
            math.prod(v.shape) * dtype_bytes(v.dtype) for v in layer.trainable_weights
        ),
        weight_copy_sizes=_weight_copies(layer, kind, compute),
        grad_sizes=tuple(
            math.prod(v.shape) * dtype_bytes(compute if kind in ("conv", "separable") else v.dtype)
            for v in layer.trainable_weights
        ),
        constant_bytes=constant,
    )


def _weight_copies(layer: Any, kind: str, compute: Any) -> tuple[int, ...]:
    """Under mixed precision a conv reads its float32 kernel through a cast to the compute
    dtype; the input gradient needs that copy, so it lives until the layer's backward.
    (Batch norm computes in float32 and casts nothing.)"""
    if kind not in ("conv", "separable"):
        return ()
    return tuple(
        math.prod(v.shape) * dtype_bytes(compute)
        for v in layer.trainable_weights
        if dtype_bytes(v.dtype) != dtype_bytes(compute)
    )


def _atrous_depthwise(layer: Any) -> bool:
    import keras

    rate = getattr(layer, "dilation_rate", (1, 1))
    return isinstance(layer, keras.layers.DepthwiseConv2D) and any(r > 1 for r in rate)


def _space_to_batch_bytes(layer: Any, shape: Any, dtype: Any) -> int:
    """Bytes of the padded space-to-batch copy of an atrous depthwise conv's input."""
    _, height, width, channels = (int(d) if d is not None else None for d in shape)
    (kh, kw), (rh, rw) = layer.kernel_size, layer.dilation_rate
    if layer.padding == "same":
        height += (kh - 1) * rh
        width += (kw - 1) * rw
    height = -(-height // rh) * rh
    width = -(-width // rw) * rw
    return height * width * channels * dtype_bytes(dtype)


_IN_PLACE_GRAD = frozenset({"relu", "free", "activation"})
_IN_PLACE_FORWARD = frozenset({"batchnorm", "relu", "activation", "free"})
_KEEP_OUTPUT = frozenset({"relu", "relu6", "sigmoid", "tanh", "softmax", "elu"})


def _mark_backward(graph: MemoryGraph) -> None:
    """Ops whose inputs depend on no weight and that have no weights need no backward pass.

    Only ops with weights (convolutions, batch norm) start a gradient path; an op fed only
    by the input image and without weights (a rescaling, a cast) keeps nothing.
    """
    trainable_kinds = {"conv", "separable", "batchnorm"}
    depends: set[int] = set()
    for op in graph.ops:
        has_weights = op.kind in trainable_kinds
        op.needs_backward = has_weights or any(t in depends for t in op.inputs)
        if not op.needs_backward:
            op.saved = []
            op.constant_bytes = 0
        if op.needs_backward:
            depends.update(op.outputs)


def _step_constants(graph: MemoryGraph) -> list[tuple[str, int]]:
    """Constants the compiled step holds for its whole life, as ``(what, bytes per sample)``.

    TensorFlow's graph optimizer (Grappler) turns some gradient ops into constants when
    their shapes are static; the executor allocates a constant when the step function is
    first run and keeps it until the function is deleted, so it sits in the allocator
    before, during and after every step (in ``before_step_bytes`` and ``peak_bytes``, in
    no activation figure). Read off the optimised step graph (TensorFlow 2.21's run
    metadata) and the allocations that outlive the first step (its profiler):

    - the gradient of the mean loss: the seed is a constant 1 (without loss scaling) and
      the mean's gradient broadcasts 1/N to every pixel, so the whole per-pixel float32
      gradient folds into a constant (``.../SparseSoftmaxCrossEntropyWithLogits/
      ExpandDims/_0__cf__0``): 4 bytes per output pixel;
    - the ``zeros_like`` of each mixed-precision resize's clip gradient (see
      :func:`_make_op`).

    The accumulator Grappler may add is :func:`_accumulator_bytes`.
    """
    constants = [
        (f"{op.name}: zeros of the float32 clip gradient", op.constant_bytes)
        for op in graph.ops
        if op.constant_bytes
    ]
    if not graph.loss_scaled:
        constants.append(("loss: per-pixel gradient of the mean", graph.output_pixels * 4))
    return constants


def _accumulator_bytes(graph: MemoryGraph) -> int:
    """Bytes per sample of the zeros constant of Grappler's gradient accumulator, if made.

    Grappler's memory optimizer rewrites a sum of more than two gradients whose terms are
    alive at its static estimate of the step's memory peak into a temporary variable
    started from ``zeros_like(first term)`` (constant folding then makes that a
    constant), but only when that estimate exceeds 80% of the device's memory limit. The
    unfused batch norm's input gradient sums three terms. When no tensor between the batch
    norm nearest the loss and the loss is larger than that norm's float32 input (as in
    DeepLabV3+, whose head ends in a 1x1 conv to two classes), the start of the backward
    pass, where that sum runs, is the peak: one float32 constant the size of its input.
    Seen for xception65 at every config measured but the smallest step (256 px, batch 1,
    remat blocks), where Grappler's own peak estimate stays under the threshold (a 4 MB
    constant); a model that widens after its last batch norm (a toy stack with an
    upsampling there) has its peak elsewhere and gets no such constant.
    """
    norms = [i for i, op in enumerate(graph.ops) if op.kind == "batchnorm" and op.needs_backward]
    if not norms:
        return 0
    norm = graph.ops[norms[-1]]
    accumulator = int(norm.temp_bytes[0])
    later = [t for op in graph.ops[norms[-1] + 1 :] for t in op.outputs]
    if any(graph.tensor_bytes[t] > accumulator for t in later):
        return 0
    return accumulator


#: Mixed precision: the allocator figures are the median over this many orders of the
#: step's weight casts (:func:`cast_orders`). Odd, so the median is one of them. With 51,
#: xception65's medians (256 and 1024 px, remat blocks) moved by under 0.5% from one set
#: of seeds to the next.
CAST_ORDERS = 51

#: Grappler's memory optimizer rewrites gradient sums only when its estimate of the peak
#: exceeds this fraction of the device's memory limit (``SchedulingPass``, TF 2.21).
GRAPPLER_REWRITE_FRACTION = 0.8

#: The memory limit TensorFlow's CPU device reports to Grappler: 256 MiB, whatever the RAM
#: (``device_lib.list_local_devices()``), so every step bigger than a toy's is rewritten.
CPU_DEVICE_MEMORY_LIMIT_BYTES = 256 * 1024 * 1024


# --------------------------------------------------------------------------- simulation


def simulate_step(
    graph: MemoryGraph,
    batch_size: int = 1,
    untracked_below_bytes: int = 0,
    allocator: BFCAllocator | None = None,
    cast_order: Sequence[int] | None = None,
    early_update_sizes: Sequence[int] = (),
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
    def tracked(nbytes: float) -> int:
        return int(nbytes) if nbytes >= untracked_below_bytes else 0

    sizes = {t: tracked(b * batch_size) for t, b in graph.tensor_bytes.items()}
    sim = _Timeline(sizes, graph.inputs, allocator)
    ops = graph.ops

    # Mixed precision: each conv reads its float32 kernel through a cast. The casts depend
    # on nothing but the weights, so the executor runs them at the very start of the step,
    # before its first allocator read (seen with TF 2.21). A remat block's layers are cast
    # twice, back to back (once for the forward pass, once for the recomputation); the
    # forward copy dies when the layer has run, the other when its backward pass has, so
    # the forward pass leaves holes the size of one copy between live copies.
    def copies(op: _Op) -> list[int]:
        return [tracked(b) for b in op.weight_copy_sizes]

    for i in range(len(ops)) if cast_order is None else cast_order:
        op = ops[i]
        sim.take(("copy", i), copies(op))
        if op.block is not None:
            sim.take(("copy again", i), copies(op))
    # The optimizer's terms that read only its state run at the start too; the update,
    # at the step's end, consumes them.
    early = [tracked(b) for b in early_update_sizes]
    sim.take("early update", early)
    # The int32 labels are cast from the uint8 masks: that depends on nothing else, so it
    # also runs first, and the labels live until the loss has read them.
    labels = tracked(graph.output_pixels * 4 * batch_size)
    sim.take("labels", [labels])
    start = sim.live
    first_read = sim.allocator_bytes()
    sim.alloc(graph.inputs)
    blocks: dict[str, list[_Op]] = {}
    for op in ops:
        if op.block is not None:
            blocks.setdefault(op.block, []).append(op)
    block_inputs: dict[str, set[int]] = {}
    for name, members in blocks.items():
        produced = {t for op in members for t in op.outputs}
        block_inputs[name] = {t for op in members for t in op.inputs if t not in produced}

    # What the backward pass reads after the forward pass: the tensors saved by ops outside
    # remat blocks, and each remat block's inputs.
    kept = {t for op in ops if op.block is None for t in op.saved}
    kept.update(t for name in blocks for t in block_inputs[name])
    final = set(graph.outputs)

    def buffers(nbytes: float, count: float) -> list[int]:
        # ``count`` buffers of ``nbytes``. A fraction stands for a difference of two real
        # buffers (batch norm's float32 cast of a bfloat16 gradient, which then dies): one
        # smaller buffer, counted when the full-size buffer would be.
        whole = int(count)
        size = tracked(nbytes * batch_size)
        out = [size] * whole
        if count > whole and size:
            out.append(int((count - whole) * size))
        return out

    def op_temp(op: _Op) -> list[int]:
        nbytes, count, _ = op.temp_bytes
        return buffers(nbytes, count)

    def op_temp_backward(op: _Op) -> list[int]:
        nbytes, _, count = op.temp_bytes
        return buffers(nbytes, count)

    index = {id(op): i for i, op in enumerate(ops)}

    def forward_copy_dies(op: _Op) -> None:
        if op.block is not None:
            sim.give_back(("copy", index[id(op)]))

    sim.forward(ops, keep=kept | final, temp=op_temp, after=forward_copy_dies)

    # The loss: softmax cross-entropy keeps a float32 backprop tensor per logit, and the
    # logits themselves die once the loss is computed.
    sim.take("loss backprop", [tracked(graph.output_elements * 4 * batch_size)])
    # While the loss runs: its float32 per-pixel losses; then the labels die.
    sim.spike(buffers(graph.output_pixels * 4, TRANSIENT_FACTORS["loss"]))
    sim.give_back("labels")
    sim.free(graph.outputs)
    # The step's first allocator read comes after the copies and the labels, the read
    # after the forward pass after the labels died: the activation figure is net of both.
    activation = sim.live - start
    allocator_activation = sim.allocator_bytes() - first_read

    # Backward: an op reads the gradients of its outputs and what it saved, makes the
    # gradients of its inputs and of its weights, then frees both. A remat block is run
    # forward again just before the backward pass of its last op.
    first_saver: dict[int, int] = {}
    for i, op in enumerate(ops):
        for t in op.saved:
            first_saver.setdefault(t, i)
        if op.block is not None:
            for t in block_inputs[op.block]:
                first_saver[t] = min(first_saver.get(t, i), i)
    sim.grad(graph.outputs)
    sim.give_back("loss backprop")
    recomputed: set[str] = set()
    for i in range(len(ops) - 1, -1, -1):
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
            sim.forward(members, keep=keep, temp=op_temp)
        # The weight gradient reads the saved tensors first, which then die; the input
        # gradient follows. Element-wise gradients (ReLU, addition) reuse the buffer of
        # the output gradient, so they allocate nothing. A weight gradient replaces the
        # weight's compute-dtype copy and lives until the update.
        sim.spike(op_temp_backward(op))
        sim.take(("weight gradient", i), [tracked(b) for b in op.grad_sizes])
        last = [t for t in op.saved if first_saver.get(t, -1) >= i]
        if op.block is not None:
            last += [t for t in block_inputs[op.block] if first_saver.get(t, -1) >= i]
        if op.kind in _IN_PLACE_GRAD:
            sim.pass_grad(op.outputs, op.inputs)
            sim.free(last)
        else:
            sim.free(last)
            sim.grad(op.inputs)
            sim.ungrad(op.outputs)
        # The input gradient reads the weight's compute-dtype copy: it dies after it.
        sim.give_back(("copy again", i) if op.block is not None else ("copy", i))
    result = {
        "activation_bytes": int(activation),
        "peak_delta_bytes": int(sim.peak),
        "weight_copy_bytes": int(start - labels - sum(early)),
        "labels_bytes": int(labels),
        "weight_gradient_bytes": sum(tracked(b) for op in ops for b in op.grad_sizes),
    }
    if allocator is not None:
        # The update consumes the weight gradients; nothing of the step outlives it.
        sim.release_all()
        result["allocator_activation_bytes"] = int(allocator_activation)
        result["allocator_peak_bytes"] = int(allocator.peak_bytes)
    return result


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

    def forward(self, ops: list[_Op], keep: set[int], temp: Any, after: Any = None) -> None:
        """Run ``ops`` forward: allocate outputs and saved copies, free what dies."""
        last_use: dict[int, int] = {}
        for i, op in enumerate(ops):
            for t in op.inputs:
                last_use[t] = i
        for i, op in enumerate(ops):
            if op.kind in _IN_PLACE_FORWARD and len(op.outputs) == 1:
                # TensorFlow's element-wise kernels write into an input that dies with
                # them (buffer forwarding): the output takes over that input's buffer.
                out = op.outputs[0]
                dying = [
                    t
                    for t in op.inputs
                    if t in self.alive
                    and last_use.get(t, -1) <= i
                    and t not in keep
                    and t not in op.saved
                    and self.size[t] == self.size[out]
                ]
                if dying and out not in self.alive:
                    self._rename(dying[0], out)
            self.alloc(op.outputs + op.saved)
            self.spike(temp(op))
            touched = set(op.inputs) | set(op.outputs) | set(op.saved)
            self.free([t for t in touched if last_use.get(t, -1) <= i and t not in keep])
            if after is not None:
                after(op)


# --------------------------------------------------------------------------- estimates


#: TF's oneDNN CPU allocator serves requests under 256 KiB from a small-size allocator
#: that its statistics do not count (seen with TF 2.21: a 240,000-byte tensor adds 0 to
#: ``get_memory_info('CPU:0')['current']``, a 262,144-byte one adds 262,144). The GPU's BFC
#: allocator counts every request.
CPU_UNTRACKED_BELOW_BYTES = 256 * 1024


def untracked_below(device: str) -> int:
    """Smallest buffer the device's allocator statistics count ("cpu" or "gpu")."""
    return CPU_UNTRACKED_BELOW_BYTES if device == "cpu" else 0


def _variable_sizes(variables: Iterable[Any]) -> list[int]:
    return [math.prod(v.shape) * dtype_bytes(v.dtype) for v in variables]


def weight_bytes(model: Any) -> tuple[int, int]:
    """(all weight bytes, trainable weight bytes) of a built model."""
    return sum(_variable_sizes(model.weights)), sum(_variable_sizes(model.trainable_weights))


@dataclasses.dataclass(frozen=True)
class ModelFacts:
    """What the estimate needs from a built model: its graph and its variables' sizes."""

    graph: MemoryGraph
    weight_sizes: tuple[int, ...]
    trainable_sizes: tuple[int, ...]
    height_px: int
    width_px: int


def model_facts(model: Any) -> ModelFacts:
    """Trace a built functional model once (see :func:`trace_model`)."""
    height, width = model.inputs[0].shape[1:3]
    return ModelFacts(
        graph=trace_model(model),
        weight_sizes=tuple(_variable_sizes(model.weights)),
        trainable_sizes=tuple(_variable_sizes(model.trainable_weights)),
        height_px=int(height),
        width_px=int(width),
    )


def estimate_model(
    model: Any | ModelFacts,
    *,
    batch_size: int,
    optimizer: str = "adam",
    device: str = "cpu",
    batch_bytes_per_pixel: int = 4,
) -> MemoryEstimate:
    """Predict one train step's memory for a built Keras model at its input size.

    ``weights_bytes`` and ``optimizer_bytes`` are the full sizes of the variables; the
    activation and peak figures are what the device's allocator statistics will show
    (whole chunks, replayed through :mod:`histoseg.memory.bfc`), the gradient and constant
    figures the bytes requested; on the CPU, buffers under
    :data:`CPU_UNTRACKED_BELOW_BYTES` are not counted.

    Args:
        model: Functional model with a fixed input shape (batch aside), or its
            :class:`ModelFacts`.
        batch_size: Patches per step.
        optimizer: "adam" or "sgd" (momentum), for the optimizer state.
        device: "cpu" or "gpu": whose allocator statistics are predicted.
        batch_bytes_per_pixel: Bytes of the step's input batch per pixel: uint8 RGB image
            plus uint8 label mask (4), as the data pipeline delivers them.

    Returns:
        A :class:`MemoryEstimate`.
    """
    if optimizer not in OPTIMIZER_SLOTS:
        raise ConfigError(
            f"optimizer {optimizer!r} is not one of {', '.join(sorted(OPTIMIZER_SLOTS))}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    floor = untracked_below(device)

    def tracked(sizes: Iterable[int]) -> int:
        return sum(b for b in sizes if b >= floor)

    slots = OPTIMIZER_SLOTS[optimizer]
    early = OPTIMIZER_EARLY_BUFFERS[optimizer] * facts.trainable_sizes
    sim = simulate_step(
        facts.graph, batch_size, untracked_below_bytes=floor, early_update_sizes=early
    )
    pixels = batch_size * facts.height_px * facts.width_px
    # uint8 image (3 bytes per pixel) and uint8 mask (1) are separate buffers.
    batch = [pixels * 3, pixels * (batch_bytes_per_pixel - 3)]
    # Mixed-precision weight copies and the labels are inside the simulated step's peak;
    # they exist before the step's first read and are gone by the time gradients are read.
    copies = sim["weight_copy_bytes"] + sim["labels_bytes"]
    constants = tracked(b * batch_size for _, b in facts.graph.constants)
    peak = (
        tracked(facts.weight_sizes)
        + slots * tracked(facts.trainable_sizes)
        + tracked(batch)
        + constants
        + sim["peak_delta_bytes"]
    )
    # A GPU's limit is its memory: the rewrite only comes near the card's capacity, where
    # the estimate cannot know the card, so it is left out there.
    accumulator = 0
    if device == "cpu" and peak > GRAPPLER_REWRITE_FRACTION * CPU_DEVICE_MEMORY_LIMIT_BYTES:
        accumulator = tracked([_accumulator_bytes(facts.graph) * batch_size])
        constants += accumulator
        peak += accumulator
    allocator_activation, allocator_peak = _allocator_figures(
        facts,
        batch_size=batch_size,
        slots=slots,
        early=early,
        batch=batch,
        constants=[b * batch_size for _, b in facts.graph.constants] + [accumulator],
        untracked_below_bytes=floor,
    )
    return MemoryEstimate(
        weights_bytes=sum(facts.weight_sizes),
        optimizer_bytes=slots * sum(facts.trainable_sizes),
        gradient_bytes=sim["weight_gradient_bytes"] - copies,
        activation_bytes=allocator_activation,
        peak_bytes=allocator_peak,
        requested_activation_bytes=sim["activation_bytes"],
        requested_peak_bytes=int(peak),
        input_bytes=pixels * batch_bytes_per_pixel,
        constant_bytes=constants,
    )


def cast_orders(graph: MemoryGraph) -> list[list[int] | None]:
    """The orders of the weight casts the allocator figures are taken over.

    Under mixed precision the casts of the weights to the compute dtype depend on nothing
    but the weights, so TensorFlow's executor starts them all at once, in its compiled
    graph's node order, and that order differs from process to process (two allocator
    traces of xception65, 256 px, remat blocks: the same 124 casts in two different
    orders). Which chunks the copies take, and so what the forward pass wastes around
    them, differs with it: fresh processes of xception65 at 256 px, batch 1, bfloat16,
    remat blocks measured 19.2 to 26.7 MB of activations (docs/memory-harness.md). So the
    prediction is the median over :data:`CAST_ORDERS` orders, shuffled with fixed seeds
    (the same every run), as the harness reports the median over its repeats. Without
    weight copies (float32) the order changes nothing and the ops' order is the one order.
    """
    if not any(op.weight_copy_sizes for op in graph.ops):
        return [None]
    orders: list[list[int] | None] = []
    for seed in range(CAST_ORDERS):
        order = list(range(len(graph.ops)))
        random.Random(seed).shuffle(order)
        orders.append(order)
    return orders


def _allocator_figures(
    facts: ModelFacts,
    *,
    batch_size: int,
    slots: int,
    early: Sequence[int],
    batch: list[int],
    constants: list[int],
    untracked_below_bytes: int,
) -> tuple[int, int]:
    """Replay the process through TensorFlow's allocator rules (:mod:`histoseg.memory.bfc`).

    What the process holds before its first step goes in as it is made: each weight (a
    random initial value is drawn, scaled and shifted: three buffers, the last kept), the
    optimizer's slots (one of each kind per weight, in turn), the input batch and the
    step's constants (buffers under ``untracked_below_bytes`` left out). Then one warm-up
    step, and the measured step: the allocator's peak is reset between them, as the
    harness does.

    Under mixed precision this is done once per cast order (:func:`cast_orders`), and the
    figures are the medians.

    Returns:
        The activation bytes and the step peak the allocator's statistics would show.
    """

    def tracked(sizes: Iterable[int]) -> list[int]:
        return [b for b in sizes if b >= untracked_below_bytes and b > 0]

    weights = tracked(facts.weight_sizes)
    trainable = tracked(facts.trainable_sizes)
    held = tracked(batch + constants)

    def replay(cast_order: Sequence[int] | None) -> tuple[int, int]:
        bfc = BFCAllocator()
        for i, nbytes in enumerate(weights):
            bfc.allocate(("draw", i), nbytes)
            bfc.allocate(("scale", i), nbytes)
            bfc.allocate(("weight", i), nbytes)
            bfc.free(("scale", i))
            bfc.free(("draw", i))
        for i, nbytes in enumerate(trainable):
            for slot in range(slots):
                bfc.allocate(("slot", slot, i), nbytes)
        for i, nbytes in enumerate(held):
            bfc.allocate(("held", i), nbytes)

        # The warm-up step and the measured one run the same compiled graph: one cast order.
        def step() -> dict[str, int]:
            return simulate_step(
                facts.graph, batch_size, untracked_below_bytes, bfc, cast_order, early
            )

        step()
        bfc.reset_peak()
        sim = step()
        return sim["allocator_activation_bytes"], sim["allocator_peak_bytes"]

    figures = [replay(order) for order in cast_orders(facts.graph)]
    activation = statistics.median_low(a for a, _ in figures)
    peak = statistics.median_low(p for _, p in figures)
    return activation, peak


@functools.lru_cache(maxsize=64)
def _facts_for(
    backbone: str,
    patch_size: int,
    output_stride: int,
    precision: str,
    remat: str,
    options: tuple[tuple[str, Any], ...],
    num_classes: int,
) -> ModelFacts:
    """Build the config's model symbolically, trace it, and let the model go."""
    import keras

    from histoseg.models import build_deeplabv3plus

    model = build_deeplabv3plus(
        backbone,
        (patch_size, patch_size, 3),
        num_classes=num_classes,
        output_stride=output_stride,
        precision=precision,
        remat=remat,
        **dict(options),
    )
    facts = model_facts(model)
    del model
    keras.backend.clear_session()  # the weights of a symbolic build are not needed again
    return facts


def estimate(
    *,
    patch_size: int,
    batch_size: int = 1,
    backbone: str = "xception65",
    output_stride: int = 16,
    precision: str = "float32",
    remat: str = "none",
    optimizer: str = "adam",
    device: str = "cpu",
    backbone_options: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    num_classes: int = 2,
) -> MemoryEstimate:
    """Predict a config's train-step memory by building its model symbolically.

    The functional model is built at the config's patch size (Keras only propagates
    shapes; no activation is allocated, and the weights are dropped after tracing) and
    walked by :func:`estimate_model`. Batch size, optimizer and device need no rebuild.

    Example:
        >>> estimate(patch_size=2048, backbone="xception65").peak_bytes / 1e9
    """
    options = dict(
        backbone_options.items() if isinstance(backbone_options, Mapping) else backbone_options
    )
    facts = _facts_for(
        backbone,
        int(patch_size),
        int(output_stride),
        precision,
        remat,
        tuple(sorted(options.items())),
        int(num_classes),
    )
    return estimate_model(facts, batch_size=batch_size, optimizer=optimizer, device=device)


def largest_patch(
    memory_bytes: int,
    *,
    step_px: int | None = None,
    max_patch_size: int = 16384,
    **config: Any,
) -> int | None:
    """The largest square patch (a multiple of ``step_px``) whose predicted peak, plus the
    predictions' error band (:func:`histoseg.memory.devices.planned_bytes`), fits.

    Peaks grow with the patch area, so the search fits ``peak = a + b * P^2`` from two
    symbolic builds and jumps to the predicted answer; from there it brackets the answer
    with exact builds, doubling its stride, and bisects the bracket (each build takes
    seconds for xception65: a few dozen builds at most, rather than one per ``step_px``).

    Args:
        memory_bytes: Memory of the device (e.g. 24e9 for a 24 GB card).
        step_px: Patch sizes searched are multiples of this (default: the output stride).
        max_patch_size: Upper end of the search.
        **config: The other :func:`estimate` arguments (backbone, batch_size, ...).

    Returns:
        The patch size in pixels, or None when not even ``step_px`` fits.
    """
    step = int(step_px or config.get("output_stride", 16))

    peaks: dict[int, int] = {}

    def peak(p: int) -> int:
        if p not in peaks:
            peaks[p] = estimate(patch_size=p, **config).peak_bytes
        return peaks[p]

    def fits(p: int) -> bool:
        return planned_bytes(peak(p)) <= memory_bytes

    if not fits(step):
        return None
    p1, p2 = step * 8, step * 16
    y1, y2 = peak(p1), peak(p2)
    b = (y2 - y1) / (p2**2 - p1**2)
    a = y1 - b * p1**2
    guess = int(math.sqrt(max(memory_bytes - a, 0) / b)) // step * step if b > 0 else step
    top = max_patch_size // step * step
    guess = min(max(guess, step), top)
    # Bracket: ``fits`` holds at ``lo`` and not at ``hi`` (None: nothing above lo to try).
    stride = step
    if fits(guess):
        lo, hi = guess, None
        while lo < top:
            probe = min(lo + stride, top)
            if not fits(probe):
                hi = probe
                break
            lo, stride = probe, stride * 2
        if hi is None:
            return lo
    else:
        hi = guess
        while True:  # ends: fits(step) holds
            probe = max(hi - stride, step)
            if fits(probe):
                lo = probe
                break
            hi, stride = probe, stride * 2
    while hi - lo > step:
        mid = (lo + hi) // 2 // step * step
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo
