"""Run ONE benchmark config in this (fresh) process and print its results row as JSON.

``python -m bench.worker --config '{"patch_size": 256, ...}'`` prints one line of JSON on
stdout (a ``histoseg.result/1`` row of kind "memory"); everything else goes to stderr.
The harness starts one such process per config, because allocator peaks and RSS are
per process and an out-of-memory config must not take the sweep down with it.

What a row measures (after one warm-up step, on the config's device):

- ``weights_bytes`` / ``optimizer_bytes``: bytes of the model's and the optimizer's
  variables (they live in the allocator for the whole run);
- ``activation_bytes``: allocator bytes after the forward pass minus before the step;
- ``gradient_bytes``: allocator bytes after the gradients minus before the step;
- ``peak_bytes``: the allocator's peak over one whole step (stats reset before it);
- ``constant_bytes``: allocator bytes the warm-up step left allocated for good (the
  constants TensorFlow's graph optimizer folded into the compiled step);
- ``rss_peak_bytes``: the process's peak RSS; ``gpu_used_bytes``: NVML, on a GPU;
- ``step_s``: median wall time of ``steps`` steps; ``patches_per_s``, ``megapixels_per_s``;
- per-patch and per-megapixel figures of the activation and peak bytes.

An inference config (``"mode": "infer"``) runs no train step: the same model, a warm-up
forward pass and ``steps`` measured ones (``training=False``, in a compiled function, the
softmax's tumour channel as ``histoseg.infer`` takes it), no optimizer. Its row has
``weights_bytes``, ``before_step_bytes`` (allocator bytes before a pass: weights and the
uint8 input batch), ``peak_bytes`` (the allocator's peak over the measured passes,
everything held included), ``activation_bytes`` (``peak_bytes`` less
``before_step_bytes``: the most the pass itself holds at once), ``constant_bytes``, RSS,
times and throughput; no optimizer or gradient figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import step_rates
from histoseg.cli import ArgumentParser, run_main
from histoseg.config import StepConfig, thread_env
from histoseg.errors import ConfigError

#: Environment variable read by :func:`widen_for_demo`: a test-only knob that widens the
#: model (see docs/memory-harness.md, "Showing that the regression check bites").
WIDEN_ENV = "HISTOSEG_BENCH_WIDEN"


def variable_bytes(variables) -> int:
    return int(sum(v.numpy().nbytes for v in variables))


def synthetic_batch(config: StepConfig, num_classes: int | None, rows: slice = slice(None)):
    """A uint8 image batch and uint8 label masks, as the data pipeline delivers them (no
    masks, None, for ``num_classes`` None: an inference pass reads images only). ``rows``:
    only these rows of every patch (a spatial rank's slab; the same patch on every rank)."""
    import numpy as np
    import tensorflow as tf

    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.patch_size, config.patch_size)
    images = rng.integers(0, 256, size=(*shape, 3), dtype=np.uint8)[:, rows]
    with tf.device(config.tf_device):
        if num_classes is None:
            return tf.constant(images), None
        masks = rng.integers(0, num_classes, size=shape, dtype=np.uint8)[:, rows]
        return tf.constant(images), tf.constant(masks)


def allocator_events(logdir: str) -> list[tuple[str, dict[str, Any]]]:
    """Every allocation and free TensorFlow's profiler recorded in ``logdir``, in order.

    Returns:
        ``(kind, stats)`` pairs: kind ``"MemoryAllocation"`` or ``"MemoryDeallocation"``;
        stats as the profiler names them (``addr``, ``requested_bytes``,
        ``allocation_bytes`` (the chunk given), ``bytes_allocated`` (the allocator's
        running total after the event), ``tf_op``, ``allocator_name``, ...). Empty when
        the profiler wrote nothing.
    """
    import glob

    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    files = sorted(glob.glob(os.path.join(logdir, "plugins", "profile", "*", "*.xplane.pb")))
    if not files:
        return []
    space = xplane_pb2.XSpace()
    with open(files[-1], "rb") as f:
        space.ParseFromString(f.read())
    events = []
    for plane in space.planes:
        meta, stat_meta = plane.event_metadata, plane.stat_metadata
        for line in plane.lines:
            for ev in line.events:
                kind = meta[ev.metadata_id].name
                if kind not in ("MemoryAllocation", "MemoryDeallocation"):
                    continue
                stats = {}
                for st in ev.stats:
                    field = st.WhichOneof("value") or "int64_value"
                    value = getattr(st, field)
                    if field == "ref_value":  # an interned string (the allocator's name)
                        value = stat_meta[value].name
                    stats[stat_meta[st.metadata_id].name] = value
                events.append((line.timestamp_ns * 1000 + ev.offset_ps, kind, stats))
    events.sort(key=lambda e: e[0])
    return [(kind, stats) for _, kind, stats in events]


def allocator_chunk_waste(logdir: str, reads: dict[str, int]) -> dict[str, int] | None:
    """Chunk waste of TF's allocator in one profiled step, from the profiler's trace.

    TensorFlow's BFC allocator hands a request a whole free chunk when the chunk is less
    than twice the request (it splits only larger ones), and its statistics count the
    whole chunk. The trace records, for every allocation of the step, the bytes requested
    and the chunk given; the waste is their difference summed over the step's buffers
    alive at a point. Points: the step's first read (``bytes_before_step``), its read
    after the forward pass, and the step's peak (matched by the allocator's running total,
    which the trace records after each event).

    Returns:
        ``activation_chunk_waste_bytes`` (waste alive after the forward pass less that at
        the first read), ``peak_chunk_waste_bytes`` (waste alive at the peak),
        ``traced_peak_bytes`` and ``phase_peak_bytes`` (the allocator's highest total in
        the forward pass, the backward pass and the update: :func:`phase_peaks`); None
        when the reads cannot be found in the trace.
    """
    events = allocator_events(logdir)
    live: dict[int, int] = {}
    waste_after: list[int] = []
    for kind, stats in events:
        if kind == "MemoryAllocation":
            live[stats["addr"]] = stats["allocation_bytes"] - stats["requested_bytes"]
        else:
            live.pop(stats["addr"], None)
        waste_after.append(sum(live.values()))
    totals = [stats["bytes_allocated"] for _, stats in events]
    try:
        first = totals.index(reads["bytes_before_step"])
        forward = totals.index(reads["bytes_after_forward"], first)
        gradients = totals.index(reads["bytes_after_gradients"], forward)
    except (KeyError, ValueError):
        return None
    peak = max(range(len(totals)), key=totals.__getitem__)
    return {
        "activation_chunk_waste_bytes": waste_after[forward] - waste_after[first],
        "peak_chunk_waste_bytes": waste_after[peak],
        "traced_peak_bytes": totals[peak],
        "phase_peak_bytes": phase_peaks(totals, first, forward, gradients),
    }


def phase_peaks(totals: list[int], first: int, forward: int, gradients: int) -> dict[str, int]:
    """The allocator's highest running total in each phase of a traced train step.

    ``totals`` is the total after each event; ``first``, ``forward`` and ``gradients`` are
    the events at the step's reads before the step, after the forward pass and after the
    gradients. A step's peak is the largest of the three; which phase holds it changes
    with the patch (xception65 bfloat16 ``full``: the forward pass at 256 px, the backward
    pass from 384 px), so the measured route extrapolates each phase on its own.
    """
    return {
        "forward": max(totals[first : forward + 1]),
        "backward": max(totals[forward : gradients + 1]),
        "update": max(totals[gradients:]),
    }


def _traced_step(step, images, masks) -> dict[str, int] | None:
    """Run one more step under TensorFlow's profiler; see :func:`allocator_chunk_waste`."""

    def reads() -> dict[str, int]:
        # read inside the profiled window: the step has finished when its reads are numbers
        return {k: int(v) for k, v in step(images, masks).items() if k.startswith("bytes_")}

    return _profiled(reads, allocator_chunk_waste)


def _profiled(run: Any, read: Any) -> Any:
    """``run()`` under TensorFlow's profiler (host ops and allocator events); returns
    ``read(logdir, run's result)``, called once the profiler has written its trace."""
    import tempfile

    import tensorflow as tf

    options = tf.profiler.experimental.ProfilerOptions(
        host_tracer_level=3, python_tracer_level=0, device_tracer_level=0
    )
    with tempfile.TemporaryDirectory(prefix="histoseg-profile-") as logdir:
        tf.profiler.experimental.start(logdir, options=options)
        try:
            result = run()
        finally:
            tf.profiler.experimental.stop()
        return read(logdir, result)


def configure_tensorflow(config: StepConfig) -> None:
    """Threads (inter-op 1: one op at a time) and the device the config runs on."""
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(config.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    if config.device == "cpu":
        tf.config.set_visible_devices([], "GPU")
    else:
        # Without memory growth TF reserves nearly the whole card up front, and NVML's
        # "used" would say nothing about this config.
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)


def measure(config: StepConfig, num_classes: int = 2, trace: bool = False) -> dict[str, Any]:
    """Train ``config`` for 1 + ``steps`` steps here and return the ``measured`` section.

    One warm-up step (tracing, optimizer state, first allocations), then ``steps`` timed
    steps over which the allocator peak is taken; with ``trace``, one more step under the
    profiler for :func:`allocator_chunk_waste` (key ``"_trace"``).

    Also returns the model (for the estimate) under the key ``"_model"``.
    """
    import tensorflow as tf

    from histoseg.memory.probe import MemoryProbe
    from histoseg.models import build_for_step
    from histoseg.train.step import make_optimizer, make_train_step

    configure_tensorflow(config)
    device = config.tf_device
    probe = MemoryProbe(device)
    with tf.device(device):
        model = build_for_step(config, num_classes)
        optimizer = make_optimizer(config.optimizer, 1e-3)
        step = make_train_step(model, optimizer, num_classes=num_classes, memory_device=device)
        images, masks = synthetic_batch(config, num_classes)
        before_warmup = probe.snapshot().allocator_current_bytes
        step(images, masks)["loss"].numpy()  # warm-up: trace, build, first allocations
        # What the first step leaves allocated for good: the constants Grappler folded
        # into the compiled step (the estimate's ``constant_bytes``).
        after_warmup = probe.snapshot().allocator_current_bytes
        times, figures = timed_steps(step, images, masks, config.steps, probe)
        traced = _traced_step(step, images, masks) if trace else None
    final = probe.snapshot()
    return {
        "weights_bytes": variable_bytes(model.weights),
        "optimizer_bytes": variable_bytes(step.optimizer.variables),
        **figures,
        "constant_bytes": (
            None if before_warmup is None or after_warmup is None else after_warmup - before_warmup
        ),
        "rss_peak_bytes": final.rss_peak_bytes,
        "gpu_used_bytes": final.gpu_used_bytes,
        **step_rates(config, times, figures["activation_bytes"], figures["peak_bytes"]),
        "_model": model,
        "_trace": traced,
    }


def timed_steps(step, images, masks, steps: int, probe) -> tuple[list[float], dict[str, int]]:
    """Run a compiled train step (one whose result carries the in-step allocator reads)
    ``steps`` times after resetting the allocator's peak.

    Returns:
        Each step's wall time, and the step's figures: ``activation_bytes`` and
        ``gradient_bytes`` (the reads after the forward pass and after the gradients, less
        the one before the step), ``before_step_bytes`` and ``peak_bytes`` (the
        allocator's peak over the steps). Memory is the same in each step, so the reads
        are the first step's.
    """
    probe.reset_peak()
    times, reads = [], []
    for _ in range(steps):
        start = time.perf_counter()
        result = step(images, masks)
        result["loss"].numpy()
        times.append(time.perf_counter() - start)
        reads.append({k: int(v) for k, v in result.items() if k.startswith("bytes_")})
    before = reads[0]["bytes_before_step"]
    return times, {
        "activation_bytes": reads[0]["bytes_after_forward"] - before,
        "gradient_bytes": reads[0]["bytes_after_gradients"] - before,
        "peak_bytes": int(probe.snapshot().allocator_peak_bytes),
        "before_step_bytes": before,
    }


def forward_function(model):
    """The compiled inference pass: uint8 images in, the tumour probability per pixel out
    (``histoseg.infer.model.tumour_probability_fn``, for a whole batch)."""
    import tensorflow as tf

    from histoseg.models.layers import prepare_images

    @tf.function
    def forward(images):
        logits = model(prepare_images(images), training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[..., 1]

    return forward


def forward_chunk_waste(logdir: str, _result: Any = None) -> dict[str, int] | None:
    """Chunk waste of TF's allocator at the peak of one profiled forward pass: the chunk
    bytes less the bytes requested, over the pass's buffers alive at its peak (see
    :func:`allocator_chunk_waste`); None when the profiler recorded nothing."""
    events = allocator_events(logdir)
    if not events:
        return None
    live: dict[int, int] = {}
    best, waste_at_best = -1, 0
    for kind, stats in events:
        if kind == "MemoryAllocation":
            live[stats["addr"]] = stats["allocation_bytes"] - stats["requested_bytes"]
        else:
            live.pop(stats["addr"], None)
        if stats["bytes_allocated"] > best:
            best, waste_at_best = stats["bytes_allocated"], sum(live.values())
    return {
        "activation_chunk_waste_bytes": waste_at_best,
        "peak_chunk_waste_bytes": waste_at_best,
        "traced_peak_bytes": best,
    }


def measure_infer(config: StepConfig, trace: bool = False) -> dict[str, Any]:
    """Run ``config``'s model forward 1 + ``steps`` times here; return the ``measured``
    section (the module docstring's inference figures), with the model under ``"_model"``
    and, with ``trace``, :func:`forward_chunk_waste` of one more pass under ``"_trace"``."""
    import tensorflow as tf

    from histoseg.memory.probe import MemoryProbe
    from histoseg.models import build_for_step

    configure_tensorflow(config)
    probe = MemoryProbe(config.tf_device)
    with tf.device(config.tf_device):
        model = build_for_step(config)
        forward = forward_function(model)
        images, _ = synthetic_batch(config, None)
        before_warmup = probe.snapshot().allocator_current_bytes
        forward(images).numpy()  # warm-up: trace, compile, first allocations
        before = probe.snapshot().allocator_current_bytes
        probe.reset_peak()
        times = []
        for _ in range(config.steps):
            start = time.perf_counter()
            forward(images).numpy()  # the output is dropped before the next pass
            times.append(time.perf_counter() - start)
        after = probe.snapshot()
        traced = _profiled(lambda: forward(images).numpy(), forward_chunk_waste) if trace else None
    peak = int(after.allocator_peak_bytes)
    activation = peak - int(before)
    return {
        "weights_bytes": variable_bytes(model.weights),
        "activation_bytes": activation,
        "peak_bytes": peak,
        "before_step_bytes": int(before),
        "constant_bytes": None if before_warmup is None else int(before) - before_warmup,
        "rss_peak_bytes": after.rss_peak_bytes,
        "gpu_used_bytes": after.gpu_used_bytes,
        **step_rates(config, times, activation, peak),
        "_model": model,
        "_trace": traced,
    }


def widen_for_demo(config: StepConfig) -> StepConfig:
    """Test-only: with ``HISTOSEG_BENCH_WIDEN=<factor>`` set, run a wider model.

    The regression demo needs a model ~10% bigger without shipping a hack in the model:
    this multiplies the MobileNetV2 width multiplier ``alpha`` of the config (other
    backbones are left alone). Never set in normal runs.
    """
    factor = os.environ.get(WIDEN_ENV)
    if not factor:
        return config
    options = dict(config.backbone_options)
    if config.backbone == "mobilenetv2":
        options["alpha"] = round(float(options.get("alpha", 1.0)) * float(factor), 4)
    return config.replace(backbone_options=tuple(options.items()))


def run_config(config: StepConfig, trace: bool = False) -> dict[str, Any]:
    """Measure ``config`` in this process and return its results row (never raises on OOM)."""
    from histoseg.memory.devices import tensorflow_sees_gpu
    from histoseg.results import make_row

    if config.backend == "torch":
        from bench.torch_worker import run_config as run_torch_config

        return run_torch_config(config)
    row_config = config.as_dict()
    if config.device == "gpu" and not tensorflow_sees_gpu():
        return make_row(
            "memory", row_config, status="skipped", reason="no GPU visible to TensorFlow"
        )
    import tensorflow as tf

    run = widen_for_demo(config)
    infer = config.mode == "infer"
    try:
        measured = measure_infer(run, trace=trace) if infer else measure(run, trace=trace)
    except tf.errors.ResourceExhaustedError as exc:
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else "OOM"
        return make_row("memory", row_config, status="oom", reason=f"out of memory: {first}")
    model = measured.pop("_model")
    traced = measured.pop("_trace")
    extra: dict[str, Any] = {"steps": config.steps, "image_dtype": "uint8"}
    if not infer:
        extra["mask_dtype"] = "uint8"
    if traced is not None:
        extra["allocator_trace"] = traced
    elif trace:
        # Seen at the smallest configs (mobilenetv2 alpha 0.35 at 64 and 128 px).
        extra["allocator_trace_note"] = (
            "not recorded: the step's allocator reads are not among the running totals "
            "of the profiler's trace, so its events cannot be placed in the step"
        )
    try:
        predicted = _predict_model(model, config)
    except Exception as exc:  # a measurement must never be lost to the estimate
        predicted = None
        extra["predict_error"] = f"{type(exc).__name__}: {exc}"
    if run != config:
        extra["widened"] = run.as_dict()
    return make_row(
        "memory",
        row_config,
        measured=measured,
        predicted=predicted,
        extra=extra,
    )


def _predict_model(model: Any, config: StepConfig) -> dict[str, Any]:
    """The analytic estimate of the model this worker built (train step or forward pass)."""
    if config.mode == "infer":
        from histoseg.memory.inference import estimate_inference_model

        estimate = estimate_inference_model(
            model, batch_size=config.batch_size, device=config.device
        )
    else:
        from histoseg.memory.estimate import estimate_model

        estimate = estimate_model(
            model, batch_size=config.batch_size, optimizer=config.optimizer, device=config.device
        )
    return estimate.as_dict()


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m bench.worker",
        description="Measure one benchmark config in this process; print its row as JSON.",
        epilog=(
            "Examples:\n"
            "  python -m bench.worker --config "
            '\'{"patch_size": 128, "backbone": "mobilenetv2", "backbone_options": {"alpha": 0.35}}\''
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the config as JSON (StepConfig keys)")
    parser.add_argument(
        "--allocator-trace",
        action="store_true",
        help="profile one more step (forward pass, mode infer) and record the allocator's "
        "chunk waste in extra",
    )
    parser.add_argument(
        "--allocator-events",
        type=Path,
        metavar="JSON",
        help="profile the whole run (model build, warm-up and measured steps) and write every "
        "allocation and free of TensorFlow's allocators to JSON, in order: compare two "
        "processes' allocation order",
    )
    args = parser.parse_args(argv)
    if args.allocator_events and args.allocator_trace:
        raise ConfigError("--allocator-events and --allocator-trace: one profiler at a time")
    if args.allocator_events and not args.allocator_events.parent.is_dir():
        # checked before the run, not after minutes of training
        raise ConfigError(f"--allocator-events {args.allocator_events}: no such folder")
    config = StepConfig.from_json(args.config)
    os.environ.update(thread_env(config.threads))  # before TensorFlow starts
    if args.allocator_events:
        from histoseg.results import atomic_write_text

        def write_events(logdir: str, row: dict[str, Any]) -> dict[str, Any]:
            atomic_write_text(args.allocator_events, json.dumps(allocator_events(logdir)))
            return row

        row = _profiled(lambda: run_config(config), write_events)
    else:
        row = run_config(config, trace=args.allocator_trace)
    sys.stdout.write(json.dumps(row, default=str) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
