"""Memory: what a train step needs, measured (allocator, RSS, NVML) and predicted (estimate).

Public API: :class:`MemoryProbe` and the allocator / RSS readers in ``probe``;
:func:`estimate`, :func:`estimate_model`, :func:`largest_patch` and :class:`MemoryEstimate`
in ``estimate``; :func:`parse_size`, :func:`format_bytes` and :func:`available_bytes` in
``devices``.
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
