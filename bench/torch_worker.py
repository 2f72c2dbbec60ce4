"""``bench.worker``'s torch half: measure one config's train step under Keras's PyTorch backend.

The step is :func:`histoseg.memory.torch_replay.train_step`, the one the replay predicts.
What a row measures, after one warm-up step (optimizer state, first allocations), on the
config's device:

- on a GPU, PyTorch's CUDA caching allocator: ``memory_allocated`` before the step, once
  the loss exists (``activation_bytes``: after minus before) and once every gradient does
  (``gradient_bytes``); ``max_memory_allocated`` over the timed steps (``peak_bytes``,
  weights and optimizer state included), ``max_memory_reserved`` and NVML's "used";
- on the CPU, PyTorch keeps no allocator statistics, so one more step runs under its
  profiler with memory profiling on, which records every allocation and free of the CPU
  allocator with the running total of bytes allocated since profiling began; the same
  three reads and the peak come from that total (``before_step_bytes``: the storages of
  the weights, optimizer state and batch, which are all the step starts with);
- ``step_s``, the median over the timed steps (the profiled step is not timed).

The row carries no prediction: ``bench.memory`` replays the step on fake tensors before it
starts the worker (the fit check needs it) and puts that beside the measurement
(``predicted.method`` "replay").
"""

from __future__ import annotations

import gc
import re
import time
from typing import Any

from bench.config import step_rates
from histoseg.config import StepConfig
from histoseg.memory.kernel_scratch import allocated_totals
from histoseg.memory.torch_replay import (
    build_training,
    storage_bytes,
    torch_backend,
    train_step,
)
from histoseg.results import make_row

#: Terminal colour codes Keras puts into the messages of errors it re-raises.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _profiled_cpu_step(torch, model, optimizer, images, masks) -> dict[str, int]:
    """One step under PyTorch's profiler: the CPU allocator's bytes above the level before
    the step, after the forward pass, after the gradients, and at the peak."""
    from torch.profiler import ProfilerActivity, profile, record_function

    def mark(at: str) -> None:
        with record_function(f"histoseg::{at}"):
            pass

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        train_step(model, optimizer, images, masks, mark)
    totals = allocated_totals(prof)
    reads = {name: total for name, total in totals if name}
    peak = max((total for _, total in totals), default=0)
    return {"forward": reads["forward"], "gradients": reads["gradients"], "peak": peak}


def measure(config: StepConfig, num_classes: int = 2) -> dict[str, Any]:
    """Train ``config`` for 1 + ``steps`` steps here; the row's ``measured`` section."""
    torch = torch_backend(config.device)
    cuda = config.device == "gpu"
    torch.set_num_threads(config.threads)
    model, optimizer, images, masks = build_training(config, num_classes)
    held = [v.value for v in (*model.variables, *optimizer.variables)] + [images, masks]
    reads: dict[str, int] = {}

    def mark(at: str) -> None:
        if cuda:
            reads[at] = int(torch.cuda.memory_allocated())

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    train_step(model, optimizer, images, masks)  # warm-up
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for i in range(config.steps):
        start = time.perf_counter()
        before = int(torch.cuda.memory_allocated()) if cuda else storage_bytes(held)
        train_step(model, optimizer, images, masks, mark if i == 0 else lambda _: None)
        sync()
        times.append(time.perf_counter() - start)
        reads.setdefault("before", before)
    before = reads["before"]
    if cuda:
        peak = int(torch.cuda.max_memory_allocated())
        forward, gradients = reads["forward"] - before, reads["gradients"] - before
    else:
        cpu = _profiled_cpu_step(torch, model, optimizer, images, masks)
        forward, gradients, peak = cpu["forward"], cpu["gradients"], before + cpu["peak"]
    return _measured_section(
        config, torch, model, optimizer, before, forward, gradients, peak, times
    )


def _measured_section(config, torch, model, optimizer, before, forward, gradients, peak, times):
    from histoseg.memory.devices import nvml_memory

    cuda = config.device == "gpu"
    nvml = nvml_memory(0) if cuda else None
    return {
        "weights_bytes": storage_bytes(v.value for v in model.weights),
        "optimizer_bytes": storage_bytes(v.value for v in optimizer.variables),
        "activation_bytes": forward,
        "gradient_bytes": gradients,
        "peak_bytes": peak,
        "reserved_peak_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None,
        "before_step_bytes": before,
        "gpu_used_bytes": None if nvml is None else nvml["used"],
        **step_rates(config, times, forward, peak),
    }


def run_config(config: StepConfig) -> dict[str, Any]:
    """Measure ``config`` here and return its results row (an "oom" row instead of raising)."""
    torch = torch_backend(config.device)
    row_config = config.as_dict()
    if config.device == "gpu" and not torch.cuda.is_available():
        return make_row("memory", row_config, status="skipped", reason="no GPU visible to PyTorch")
    extra: dict[str, Any] = {
        "steps": config.steps,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_name": torch.cuda.get_device_name(0) if config.device == "gpu" else None,
        "image_dtype": "uint8",
        "mask_dtype": "uint8",
    }
    try:
        measured = measure(config)
    except torch.OutOfMemoryError as exc:
        # Keras wraps the error and puts "Exception encountered when calling ..." first.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        found = [line for line in lines if "out of memory" in line.lower()]
        reason = _ANSI.sub("", (found or lines or ["out of memory"])[0])[:200]
        return make_row("memory", row_config, status="oom", reason=reason, extra=extra)
    finally:
        gc.collect()
        if config.device == "gpu":
            torch.cuda.empty_cache()
    return make_row("memory", row_config, measured=measured, extra=extra)
