"""What a train step holds, read off the model graph: every layer as an op with the tensors
its forward and backward passes allocate, keep and free.

The model is built symbolically (Keras functional graph, no tensors allocated) and walked
layer by layer. Each layer type has a rule saying which tensors its backward pass needs (a
convolution keeps its input, a ReLU its output, batch norm a float32 copy of its input, an
addition nothing, ...), read off TensorFlow 2.21's gradient functions, its optimised step
graph and the allocator's trace of whole steps. Tensor sizes come straight from the graph's
shapes and dtypes, so patch size, batch size and precision enter exactly.
"""

from __future__ import annotations

import collections
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError

#: Optimizer slots per trainable weight (Keras 3: Adam keeps m and v; SGD with momentum
#: keeps one velocity; plain SGD none).
OPTIMIZER_SLOTS: dict[str, int] = {"adam": 2, "adamw": 2, "sgd": 1, "sgd_nomomentum": 0}

#: Weight-sized float32 buffers per trainable weight that the optimizer's update computes
#: from its own state alone, so that the executor runs them at the step's start and holds
#: them until the gradient arrives. Keras 3's SGD with momentum updates
#: ``m = m * momentum - g * lr``: ``m * momentum`` reads only the slot. Adam's terms all
#: read the gradient (its ``sqrt(v)`` reads ``v`` after the gradient's update of it).
#: Under loss scaling (float16) the update runs in a conditional and none starts early.
OPTIMIZER_EARLY_BUFFERS: dict[str, int] = {"adam": 0, "adamw": 0, "sgd": 1, "sgd_nomomentum": 0}

#: Transient working buffers per layer type, as multiples of the layer's float32 output
#: size, alive only while the layer (or its gradient) runs. Calibrated on this machine
#: (TF 2.21, oneDNN on); see the module docstring and docs/memory-harness.md.
TRANSIENT_FACTORS: dict[str, float] = {
    # Unfused Keras BN, forward: the variance's squared difference (float32), and below
    # float32 also x * inv, a float32 map before the cast back (in float32 x * inv is the
    # output itself: allocator traces of resnet50 and mobilenetv2 float32 steps).
    "batchnorm": 1.0,
    "batchnorm_below_float32": 2.0,
    # Its gradient: two full-size float32 buffers at a time beside the output gradient and
    # the kept input (the broadcast moment terms, then the products with the scale),
    # read off the allocator's trace of xception65 steps (TensorFlow's profiler). Below
    # float32 the output gradient is first cast to float32 (see _make_op).
    "batchnorm_backward": 2.0,
    # The first forward pass of a remat block saves nothing for the backward pass: batch
    # norm then makes only the variance's squared difference and writes x * inv into its
    # dying input (allocator trace of an xception65 step with remat "full").
    "batchnorm_unsaved": 1.0,
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
class Op:
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
        ops: layer applications, each after its inputs' makers, the first made ready
            first (:func:`_ready_first`); the backward pass runs them last first.
        forward_order: indices into ``ops`` in the order the executor runs the forward
            pass (:func:`executor_order`): each chain to its end before a sibling.
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
    ops: list[Op]
    inputs: list[int]
    outputs: list[int]
    forward_order: list[int] = dataclasses.field(default_factory=list)
    output_elements: int = 0
    output_pixels: int = 0
    constants: list[tuple[str, int]] = dataclasses.field(default_factory=list)
    loss_scaled: bool = False
    notes: list[str] = dataclasses.field(default_factory=list)


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
        # Keras' group norm runs batch norm's composite ops (cast up, moments,
        # x * inv + offset, cast back): docs/memory-harness.md, "Normalisation"
        ((L.BatchNormalization, L.GroupNormalization), "batchnorm"),
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
    graph.forward_order = executor_order(graph.ops, graph.inputs)
    _mark_backward(graph)
    graph.loss_scaled = any(
        getattr(layer, "compute_dtype", None) == "float16" for layer in model._flatten_layers()
    )
    graph.constants = _step_constants(graph)
    return graph


def _ready_first(ops: list[Op], inputs: Iterable[int]) -> list[Op]:
    """``ops`` each after the makers of its inputs, the first to become ready first.

    Keras lists a functional model's layers by depth (distance from the outputs), so a
    branch that joins late would run late: DeepLabV3+'s low-level decoder branch after ASPP.
    This breadth-first order is the list the backward pass walks, last op first. The
    forward pass runs in :func:`executor_order` (each chain to its end, then a sibling),
    which the allocator's traces of the forward pass follow; for the backward pass the
    reverse of this list matched the measured peaks better than the reverse of that one
    (docs/memory-harness.md, "Which order the step runs in").
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


def executor_order(
    ops: Sequence[Op], inputs: Iterable[int], runs_first: Callable[[int], bool] | None = None
) -> list[int]:
    """Indices of ``ops`` in the order TensorFlow's executor runs a forward pass.

    With one inter-op thread the executor runs an op that became ready inline and
    schedules the other newly ready ones on its thread pool, whose queue the running
    thread takes from the front: a stack. So a chain runs to its end, then the sibling
    made ready last (seen in the allocator traces: xception65's shortcut convolution runs
    before its block's first separable convolution, and the decoder's low-level branch
    right after the entry flow's block that feeds it). Newly ready ops are pushed in
    ``ops``' order, those for which ``runs_first`` holds last (so they run first: in every
    trace the ASPP's 1x1 convolution ran before its atrous and pooling branches). An op
    fed by something no op makes keeps ``ops``' order.
    """
    producer = {t: i for i, op in enumerate(ops) for t in op.outputs}
    available = set(inputs)
    waits_on = [
        # a tensor neither given nor made by an op (None) is never ready
        list(dict.fromkeys(producer.get(t) for t in op.inputs if t not in available))
        for op in ops
    ]
    order = _stack_order(
        waits_on, key=lambda j: (bool(runs_first and runs_first(j)), j), first_ready_first=True
    )
    return list(range(len(ops))) if order is None else order


def backward_executor_order(ops: Sequence[Op]) -> list[int]:
    """Indices of ``ops`` in an order the executor runs their backward pass in.

    The same stack as :func:`executor_order`, over the reversed graph: an op's backward
    pass is ready once the backward passes of all its consumers have run, and a chain of
    gradients runs back to its start before a sibling's; of the ops made ready together,
    the one latest in ``ops`` runs first. (In the trace of resnet50 at output stride 8,
    ASPP's rate-36 branch ran its whole backward pass while the other branches still held
    their saved tensors.)
    """
    producer = {t: i for i, op in enumerate(ops) for t in op.outputs}
    consumers: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        for p in dict.fromkeys(producer[t] for t in op.inputs if t in producer):
            consumers[p].append(i)
    order = _stack_order(consumers, key=lambda j: j, first_ready_first=False)
    return list(range(len(ops) - 1, -1, -1)) if order is None else order


def _stack_order(
    waits_on: Sequence[Sequence[int | None]], key: Callable[[int], Any], first_ready_first: bool
) -> list[int] | None:
    """The executor's stack over a dependency graph: node ``i`` is ready once every node in
    ``waits_on[i]`` has run (``None`` never runs). A running node's newly ready successors
    are pushed sorted by ``key``, so the last pushed runs next. The nodes ready at the start
    run lowest index first with ``first_ready_first``, else highest first. None when some
    node never becomes ready."""
    waiting = [len(w) for w in waits_on]
    successors: list[list[int]] = [[] for _ in waits_on]
    for i, deps in enumerate(waits_on):
        for d in deps:
            if d is not None:
                successors[d].append(i)
    stack = [i for i, n in enumerate(waiting) if n == 0]
    if first_ready_first:
        stack.reverse()
    order: list[int] = []
    while stack:
        i = stack.pop()
        order.append(i)
        ready = []
        for j in successors[i]:
            waiting[j] -= 1
            if waiting[j] == 0:
                ready.append(j)
        stack.extend(sorted(ready, key=key))
    return order if len(order) == len(waits_on) else None


def remat_blocks(ops: Sequence[Op]) -> tuple[dict[str, list[Op]], dict[str, set[int]]]:
    """Each remat block's ops, and the tensors it reads from outside itself."""
    blocks: dict[str, list[Op]] = {}
    for op in ops:
        if op.block is not None:
            blocks.setdefault(op.block, []).append(op)
    block_inputs: dict[str, set[int]] = {}
    for name, members in blocks.items():
        produced = {t for op in members for t in op.outputs}
        block_inputs[name] = {t for op in members for t in op.inputs if t not in produced}
    return blocks, block_inputs


def _nbytes(shape: Iterable[Any], dtype: Any) -> int:
    """Bytes of one sample of a (batch, ...) tensor."""
    dims = list(shape)[1:]
    if any(d is None for d in dims):
        raise ConfigError(
            f"cannot size a tensor of shape {tuple(shape)}: build the model with a fixed "
            "patch size to estimate its memory"
        )
    return math.prod(int(d) for d in dims) * dtype_bytes(dtype)


def _make_op(layer, kind, ins, outs, tensor_of, new_tensor, block) -> Op:
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
    if kind == "conv" and _atrous(layer):
        space_to_batch, temp = _atrous_buffers(layer, ins[0].shape, outs[0].shape, compute)
        saved = [new_tensor(space_to_batch)]
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
        forward = "batchnorm" if dtype_bytes(outs[0].dtype) == 4 else "batchnorm_below_float32"
        temp = (f32, TRANSIENT_FACTORS[forward], backward)
    elif kind == "relu" or (
        kind == "activation" and getattr(layer.activation, "__name__", "") in KEEP_OUTPUT
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
    params, grads = _param_and_grad_sizes(layer, kind, compute)
    return Op(
        name=layer.name,
        kind=kind,
        inputs=in_ids,
        outputs=out_ids,
        saved=saved,
        temp_bytes=temp,
        block=block,
        param_sizes=params,
        weight_copy_sizes=_weight_copies(layer, kind, compute),
        grad_sizes=grads,
        constant_bytes=constant,
    )


def _param_and_grad_sizes(layer: Any, kind: str, compute: Any) -> tuple[tuple, tuple]:
    """Bytes of each trainable weight, and of its gradient (a conv's is in compute dtype)."""
    weights = layer.trainable_weights
    params = tuple(math.prod(v.shape) * dtype_bytes(v.dtype) for v in weights)
    grads = tuple(
        math.prod(v.shape) * dtype_bytes(compute if kind in ("conv", "separable") else v.dtype)
        for v in weights
    )
    return params, grads


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


def _atrous(layer: Any) -> bool:
    import keras

    rate = getattr(layer, "dilation_rate", (1, 1))
    kinds = (keras.layers.DepthwiseConv2D, keras.layers.Conv2D)
    return isinstance(layer, kinds) and any(r > 1 for r in rate)


def _atrous_buffers(layer: Any, in_shape: Any, out_shape: Any, compute: Any) -> tuple:
    """The saved copy and the backward buffers of an atrous (dilated) convolution.

    TensorFlow runs an atrous Conv2D or DepthwiseConv2D on a space-to-batch copy of its
    input, padded to a multiple of the rate; that copy is what its filter gradient reads.
    The backward pass moves the output gradient into that layout too, computes the input
    gradient there (as large as the copy) and brings it back with BatchToSpaceND while
    both are still alive: three buffers at once, the last of which becomes the input
    gradient (allocator trace of resnet50 at output stride 8).

    Returns:
        The copy's bytes and the op's ``temp_bytes``.
    """
    space_to_batch = _space_to_batch_bytes(layer, in_shape, compute)
    grad_layout = _space_to_batch_bytes(layer, out_shape, compute, kernel=False)
    input_grad = _nbytes(in_shape, compute)
    return space_to_batch, (space_to_batch, 0.0, 1.0 + (grad_layout + input_grad) / space_to_batch)


def _space_to_batch_bytes(layer: Any, shape: Any, dtype: Any, kernel: bool = True) -> int:
    """Bytes of the padded space-to-batch copy of an atrous convolution's input (of its
    output, with ``kernel=False``: padded to a multiple of the rate only)."""
    _, height, width, channels = (int(d) if d is not None else None for d in shape)
    (kh, kw), (rh, rw) = layer.kernel_size, layer.dilation_rate
    if kernel and layer.padding == "same":
        height += (kh - 1) * rh
        width += (kw - 1) * rw
    height = -(-height // rh) * rh
    width = -(-width // rw) * rw
    return height * width * channels * dtype_bytes(dtype)


IN_PLACE_GRAD = frozenset({"relu", "free", "activation"})
IN_PLACE_FORWARD = frozenset({"batchnorm", "relu", "activation", "free"})
KEEP_OUTPUT = frozenset({"relu", "relu6", "sigmoid", "tanh", "softmax", "elu"})


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

    The accumulators Grappler may add are :func:`histoseg.memory.grappler.accumulator_sizes`.
    """
    constants = [
        (f"{op.name}: zeros of the float32 clip gradient", op.constant_bytes)
        for op in graph.ops
        if op.constant_bytes
    ]
    if not graph.loss_scaled:
        constants.append(("loss: per-pixel gradient of the mean", graph.output_pixels * 4))
    return constants
