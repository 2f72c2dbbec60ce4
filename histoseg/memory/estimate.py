"""The analytic memory model: what a train step will need, predicted from the model graph.

Three modules, one way: :mod:`histoseg.memory.graph` reads the ops and what each keeps off
the model, :mod:`histoseg.memory.simulate` runs the step over them and through the
allocator model, and this module turns that into a :class:`MemoryEstimate` per config (with
the mixed-precision median over cast orders) and answers the largest patch that fits.

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
  :func:`histoseg.memory.graph._step_constants`) and the most the simulated step has alive at once;
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

import dataclasses
import functools
import math
import random
import statistics
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.memory.bfc import BFCAllocator
from histoseg.memory.devices import planned_bytes
from histoseg.memory.graph import (
    OPTIMIZER_EARLY_BUFFERS,
    OPTIMIZER_SLOTS,
    MemoryGraph,
    dtype_bytes,
    trace_model,
)
from histoseg.memory.grappler import accumulator_sizes
from histoseg.memory.simulate import BACKWARD_ORDERS, simulate_step

#: Mixed precision: the allocator figures are the median over this many orders of the
#: step's weight casts (:func:`cast_orders`). Odd, so the median is one of them; enough
#: that another set of seeds moves the median by little (docs/memory-harness.md).
CAST_ORDERS = 51


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
    """
    _check_step(optimizer, batch_size)
    facts = model if isinstance(model, ModelFacts) else model_facts(model)
    floor = untracked_below(device)

    def tracked(sizes: Iterable[int]) -> int:
        return sum(b for b in sizes if b >= floor)

    slots = OPTIMIZER_SLOTS[optimizer]
    early = _early_update_sizes(facts, optimizer)
    sim = _higher_peak_order(facts.graph, batch_size, floor, early)
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
    accumulators = accumulator_sizes(facts.graph, batch_size, peak) if device == "cpu" else []
    constants += tracked(accumulators)
    peak += tracked(accumulators)
    allocator_activation, allocator_peak = _allocator_figures(
        facts,
        batch_size=batch_size,
        slots=slots,
        early=early,
        batch=batch,
        constants=[b * batch_size for _, b in facts.graph.constants] + accumulators,
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


def _early_update_sizes(facts: ModelFacts, optimizer: str) -> tuple[int, ...]:
    """Bytes of the update's terms that the step makes at its start (they read only the
    optimizer's state) and holds until the update. Under loss scaling the update runs in a
    conditional (finite gradients only), so none starts early: the allocator trace of a
    float16 SGD step shows its momentum products made after the backward pass."""
    if facts.graph.loss_scaled:
        return ()
    return OPTIMIZER_EARLY_BUFFERS[optimizer] * facts.trainable_sizes


def _higher_peak_order(
    graph: MemoryGraph, batch_size: int, floor: int, early: Sequence[int]
) -> dict[str, int]:
    """The simulated step (bytes requested) in the backward order that peaks higher: the
    executor runs either (:data:`~histoseg.memory.simulate.BACKWARD_ORDERS`)."""
    return max(
        (
            simulate_step(
                graph,
                batch_size,
                untracked_below_bytes=floor,
                early_update_sizes=early,
                backward_order=order,
            )
            for order in BACKWARD_ORDERS
        ),
        key=lambda result: result["peak_delta_bytes"],
    )


def _check_step(optimizer: str, batch_size: int) -> None:
    if optimizer not in OPTIMIZER_SLOTS:
        raise ConfigError(
            f"optimizer {optimizer!r} is not one of {', '.join(sorted(OPTIMIZER_SLOTS))}"
        )
    if batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")


def cast_orders(graph: MemoryGraph) -> list[list[int] | None]:
    """The orders of the weight casts the allocator figures are taken over.

    Under mixed precision the casts of the weights to the compute dtype depend on nothing
    but the weights, so TensorFlow's executor starts them all at once, in its compiled
    graph's node order, and that order differs from process to process. Which chunks the
    copies take, and so what the forward pass wastes around them, differs with it: small
    bfloat16 steps measure different activation figures in fresh processes
    (docs/memory-harness.md has the traces and figures). So the
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

    def replay(cast_order: Sequence[int] | None, backward_order: str) -> tuple[int, int]:
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

        # The warm-up step and the measured one run the same compiled graph: one cast
        # order, one backward order.
        def step() -> dict[str, int]:
            return simulate_step(
                facts.graph,
                batch_size,
                untracked_below_bytes,
                bfc,
                cast_order,
                early,
                backward_order=backward_order,
            )

        step()
        bfc.reset_peak()
        sim = step()
        return sim["allocator_activation_bytes"], sim["allocator_peak_bytes"]

    # The step's backward order is the executor's choice: plan for the one that peaks higher.
    figures = [
        max(
            (replay(cast, backward) for backward in BACKWARD_ORDERS),
            key=lambda figure: figure[1],
        )
        for cast in cast_orders(facts.graph)
    ]
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
    return read_symbolic_model(
        model_facts, backbone, patch_size, output_stride, precision, remat, options, num_classes
    )


def read_symbolic_model(
    read: Callable[[Any], Any],
    backbone: str,
    patch_size: int,
    output_stride: int,
    precision: str,
    remat: str,
    options: tuple[tuple[str, Any], ...],
    num_classes: int,
) -> Any:
    """``read(model)`` of the config's model, built symbolically (Keras only propagates
    shapes; no activation is allocated); the model is let go afterwards."""
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
    facts = read(model)
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
    facts = _facts_for(
        backbone,
        int(patch_size),
        int(output_stride),
        precision,
        remat,
        _options_key(backbone_options),
        int(num_classes),
    )
    return estimate_model(facts, batch_size=batch_size, optimizer=optimizer, device=device)


def _options_key(
    backbone_options: Mapping[str, Any] | Iterable[tuple[str, Any]],
) -> tuple[tuple[str, Any], ...]:
    """Backbone options as a cache key: the same options in any order, one key."""
    items = backbone_options.items() if isinstance(backbone_options, Mapping) else backbone_options
    return tuple(sorted(dict(items).items()))


def estimate_inference(
    *,
    patch_size: int,
    batch_size: int = 1,
    backbone: str = "xception65",
    output_stride: int = 16,
    precision: str = "float32",
    device: str = "cpu",
    backbone_options: Mapping[str, Any] | Iterable[tuple[str, Any]] = (),
    num_classes: int = 2,
) -> Any:
    """Predict a config's forward-pass (inference) memory: the same model built
    symbolically, its ops run forward only (:mod:`histoseg.memory.inference`).

    Returns:
        An :class:`histoseg.memory.inference.InferenceEstimate`.

    Example:
        >>> estimate_inference(patch_size=2048, backbone="xception65").peak_bytes / 1e9
    """
    from histoseg.memory.inference import estimate_inference_model, inference_facts_for

    facts = inference_facts_for(
        backbone,
        int(patch_size),
        int(output_stride),
        precision,
        _options_key(backbone_options),
        int(num_classes),
    )
    return estimate_inference_model(facts, batch_size=batch_size, device=device)


def largest_patch(
    memory_bytes: int,
    *,
    step_px: int | None = None,
    max_patch_size: int = 16384,
    mode: str = "train",
    predict: Callable[..., Any] | None = None,
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
        mode: "train" (the train step's peak, :func:`estimate`) or "infer" (a forward
            pass's, :func:`estimate_inference`: the largest inference tile).
        predict: Instead of those, ``predict(patch_size=P, **config)`` with a
            ``peak_bytes`` (e.g. the torch backend's replay).
        **config: The other arguments of that estimate (backbone, batch_size, ...).

    Returns:
        The patch size in pixels, or None when not even ``step_px`` fits.
    """
    step = int(step_px or config.get("output_stride", 16))

    peaks: dict[int, int] = {}

    predict = predict or (estimate_inference if mode == "infer" else estimate)

    def peak(p: int) -> int:
        if p not in peaks:
            peaks[p] = predict(patch_size=p, **config).peak_bytes
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
