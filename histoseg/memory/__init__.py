"""Memory: what a train step (or a forward pass alone) needs, measured (allocator, RSS,
NVML) and predicted (estimate).

Public API: :class:`MemoryProbe` and the allocator / RSS readers in ``probe``;
:func:`estimate`, :func:`estimate_model`, :func:`estimate_inference`, :func:`largest_patch`
(``mode="infer"``: the largest inference tile) and :class:`MemoryEstimate` in ``estimate``;
:func:`estimate_inference_model` and :class:`InferenceEstimate` in ``inference`` (the
forward pass alone, docs/memory-harness.md "Inference memory"); :func:`parse_size`,
:func:`format_bytes` and :func:`available_bytes` in ``devices``.
"""

from histoseg.memory.devices import available_bytes, format_bytes, parse_size
from histoseg.memory.probe import MemoryProbe, MemorySnapshot, rss_peak_bytes

__all__ = [
    "MemoryProbe",
    "MemorySnapshot",
    "available_bytes",
    "format_bytes",
    "parse_size",
    "rss_peak_bytes",
]
