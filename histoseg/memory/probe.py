"""Measured memory: TF allocator bytes (CPU:0 / GPU:0), process RSS, and NVML on a GPU.

The allocator figures repeat from run to run (float32 activations to the byte, peaks
within 0.5%; docs/memory-harness.md says where bfloat16 differs) and are what histoseg
compares with its estimate; RSS and NVML sit beside them because they are what the
operating system and the card see (libraries, graph, allocator caching on top of live
tensors).
"""

from __future__ import annotations

import dataclasses
import resource
import sys
from typing import Any

from histoseg.errors import ConfigError
from histoseg.memory.devices import nvml_memory


def allocator_info(device: str = "CPU:0") -> dict[str, int]:
    """{"current", "peak"} bytes of TensorFlow's allocator on ``device`` ("CPU:0", "GPU:0").

    Raises:
        ConfigError: the allocator keeps no statistics; on the CPU they exist only with
            oneDNN on, which :mod:`histoseg.startup` asks for unless the user turned it off.
    """
    import tensorflow as tf

    try:
        info = tf.config.experimental.get_memory_info(device)
    except ValueError as err:
        raise ConfigError(
            f"TensorFlow keeps no allocator statistics for {device}, so memory cannot be "
            "measured; on the CPU they need oneDNN (unset TF_ENABLE_ONEDNN_OPTS or set it to 1)"
        ) from err
    return {"current": int(info["current"]), "peak": int(info["peak"])}


def reset_allocator_peak(device: str = "CPU:0") -> None:
    """Start a new peak on ``device``'s allocator (the peak becomes the current bytes)."""
    import tensorflow as tf

    tf.config.experimental.reset_memory_stats(device)


def allocator_bytes_op(device: str = "CPU:0"):
    """A graph op returning TF's allocator bytes in use on ``device`` when it runs.

    Inside a compiled step, pin it with control dependencies to read the allocator between
    two ops (e.g. after the loss and before the first gradient op).
    """
    import numpy as np
    import tensorflow as tf

    def read():
        return np.int64(tf.config.experimental.get_memory_info(device)["current"])

    return tf.reshape(tf.py_function(read, [], tf.int64), [])


def rss_bytes() -> int:
    """The process's resident set size now (psutil)."""
    import psutil

    return int(psutil.Process().memory_info().rss)


def rss_peak_bytes() -> int:
    """The process's peak resident set size since it started (getrusage ``ru_maxrss``).

    psutil has no portable peak; ``ru_maxrss`` is kilobytes on Linux and bytes on macOS.
    Linux counts RSS per thread and folds the counts in lazily, so ``ru_maxrss`` can trail
    psutil's current RSS by a few hundred KB; the peak is at least the current RSS.
    """
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return max(int(peak if sys.platform == "darwin" else peak * 1024), rss_bytes())


@dataclasses.dataclass(frozen=True)
class MemorySnapshot:
    """Memory figures at one moment; ``None`` where a source does not apply."""

    allocator_current_bytes: int | None
    allocator_peak_bytes: int | None
    rss_bytes: int
    rss_peak_bytes: int
    gpu_used_bytes: int | None

    def as_dict(self) -> dict[str, Any]:
        """The snapshot as a plain dict."""
        return dataclasses.asdict(self)


class MemoryProbe:
    """Reads one device's allocator plus process RSS and (on a GPU) NVML in one call.

    Args:
        device: TensorFlow device name whose allocator is read, "CPU:0" or "GPU:0".

    Example:
        >>> probe = MemoryProbe("CPU:0")
        >>> probe.reset_peak()
        >>> run_one_step()
        >>> probe.snapshot().allocator_peak_bytes
    """

    def __init__(self, device: str = "CPU:0"):
        self.device = device
        self.gpu_index = int(device.split(":")[1]) if device.upper().startswith("GPU") else None

    def reset_peak(self) -> None:
        """Start a new allocator peak."""
        reset_allocator_peak(self.device)

    def snapshot(self) -> MemorySnapshot:
        """Current and peak allocator bytes, RSS and peak RSS, and NVML used bytes."""
        try:
            alloc: dict[str, int | None] = dict(allocator_info(self.device))
        except (ValueError, RuntimeError):
            # No allocator stats (oneDNN off on CPU, or no tensor allocated yet on GPU).
            alloc = {"current": None, "peak": None}
        gpu_used = None
        if self.gpu_index is not None:
            info = nvml_memory(self.gpu_index)
            gpu_used = None if info is None else info["used"]
        return MemorySnapshot(
            allocator_current_bytes=alloc["current"],
            allocator_peak_bytes=alloc["peak"],
            rss_bytes=rss_bytes(),
            rss_peak_bytes=rss_peak_bytes(),
            gpu_used_bytes=gpu_used,
        )
