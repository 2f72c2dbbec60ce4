"""A model of TensorFlow's BFC allocator: which chunk each request gets, and what it counts.

TensorFlow's allocator statistics (``get_memory_info``: current and peak bytes) count the
*chunks* handed out, not the bytes asked for. The BFC ("best-fit with coalescing")
allocator gives a request the smallest free chunk that fits (the lowest address among
equal sizes) and splits off the rest only when the chunk is at least twice the rounded
request (or the rest is at least 128 MiB); otherwise the request gets the whole chunk. Freed
chunks merge with free neighbours of the same region. When nothing fits it reserves a new
region from the system, each one twice the last (TensorFlow's ``allow_growth``), starting
at 2 MiB. So the bytes counted depend on the order of every allocation and free before, not
only on what is alive.

:class:`BFCAllocator` replays a sequence of allocations and frees through those rules
(``tensorflow/core/common_runtime/bfc_allocator.cc``, TF 2.21). The memory model runs its
simulated step through it to predict the statistics rather than the requests;
``tests/memory/test_bfc.py`` checks it against the allocator's own trace of a real step.
"""

from __future__ import annotations

import bisect
import dataclasses

#: Requests are rounded up to a multiple of this (also the smallest chunk).
MIN_ALLOCATION_BYTES = 256
#: The first region reserved under ``allow_growth`` (``min(memory limit, 2 MiB)``).
FIRST_REGION_BYTES = 2 << 20
#: A chunk is also split when the rest would be at least this big, however the sizes compare.
MAX_INTERNAL_FRAGMENTATION_BYTES = 128 << 20


def rounded_bytes(nbytes: int) -> int:
    """The chunk size a request of ``nbytes`` asks for (a multiple of 256, at least 256)."""
    n = max(int(nbytes), MIN_ALLOCATION_BYTES)
    return (n + MIN_ALLOCATION_BYTES - 1) // MIN_ALLOCATION_BYTES * MIN_ALLOCATION_BYTES


@dataclasses.dataclass
class _Chunk:
    addr: int
    size: int
    free: bool = True
    prev: _Chunk | None = None
    next: _Chunk | None = None


class BFCAllocator:
    """Replay allocations and frees through TensorFlow's BFC rules; count like its statistics.

    Args:
        memory_limit_bytes: the allocator's limit (a region is never reserved past it).

    Attributes:
        in_use_bytes: bytes of the chunks handed out now (``get_memory_info()["current"]``).
        peak_bytes: the most ``in_use_bytes`` has been since the last :meth:`reset_peak`.
        requested_bytes: bytes asked for by the allocations alive now.
        peak_requested_bytes: the most ``requested_bytes`` has been since the last reset.
        reserved_bytes: bytes of all regions reserved so far.

    The model allocator has room to grow (as TensorFlow's with memory growth, the way the
    harness runs it, far from its limit): a region that would pass ``memory_limit_bytes``
    raises ``MemoryError``; TensorFlow's freeing of empty regions to retry near its limit is
    not modelled.

    Example:
        >>> bfc = BFCAllocator()
        >>> bfc.allocate("a", 1 << 20)  # the first 2 MiB region, split in two
        1048576
        >>> bfc.allocate("b", 768 << 10)  # the free 1 MiB rest is under twice 768 KiB
        1048576
    """

    def __init__(self, memory_limit_bytes: int = 1 << 46) -> None:
        self.memory_limit_bytes = int(memory_limit_bytes)
        self._next_region_bytes = FIRST_REGION_BYTES
        self._next_addr = 1 << 62
        self._free: list[tuple[int, int]] = []  # (size, addr), sorted: best fit is a bisect
        self._chunks: dict[int, _Chunk] = {}  # by address
        self._live: dict[object, tuple[_Chunk, int]] = {}  # key -> (chunk, requested bytes)
        self.in_use_bytes = 0
        self.peak_bytes = 0
        self.requested_bytes = 0
        self.peak_requested_bytes = 0
        self.reserved_bytes = 0

    # ---------------------------------------------------------------- free-chunk index
    def _insert_free(self, chunk: _Chunk) -> None:
        chunk.free = True
        bisect.insort(self._free, (chunk.size, chunk.addr))

    def _remove_free(self, chunk: _Chunk) -> None:
        i = bisect.bisect_left(self._free, (chunk.size, chunk.addr))
        del self._free[i]

    # ---------------------------------------------------------------- allocation
    def _extend(self, nbytes: int) -> None:
        """Reserve a new region big enough for ``nbytes`` (``BFCAllocator::Extend``)."""
        available = self.memory_limit_bytes - self.reserved_bytes
        available -= available % MIN_ALLOCATION_BYTES
        if nbytes > available:
            raise MemoryError(f"{nbytes} bytes requested, {available} left under the limit")
        grew = False
        while nbytes > self._next_region_bytes:
            self._next_region_bytes *= 2
            grew = True
        size = min(self._next_region_bytes, available)
        if not grew:
            self._next_region_bytes *= 2
        # Regions are separate system allocations (a gap keeps their chunks from merging),
        # each below the last, as mmap hands out large blocks top-down on Linux (checked
        # against the CPU allocator's trace; a GPU's driver may order them otherwise): the
        # address decides which of two equal free chunks a request gets.
        self._next_addr -= size + MIN_ALLOCATION_BYTES
        chunk = _Chunk(addr=self._next_addr, size=size)
        self._chunks[chunk.addr] = chunk
        self._insert_free(chunk)
        self.reserved_bytes += size

    def allocate(self, key: object, nbytes: int) -> int:
        """Allocate ``nbytes`` under ``key``; return the size of the chunk it got.

        Zero bytes get no chunk (TensorFlow returns null for them) and are not remembered.
        """
        if nbytes <= 0:
            return 0
        if key in self._live:
            raise KeyError(f"allocation {key!r} is already alive")
        need = rounded_bytes(nbytes)
        i = bisect.bisect_left(self._free, (need, -1))
        if i == len(self._free):
            self._extend(need)
            i = bisect.bisect_left(self._free, (need, -1))
        size, addr = self._free.pop(i)
        chunk = self._chunks[addr]
        if size >= 2 * need or size - need >= MAX_INTERNAL_FRAGMENTATION_BYTES:
            rest = _Chunk(addr=addr + need, size=size - need)
            rest.prev, rest.next = chunk, chunk.next
            if chunk.next is not None:
                chunk.next.prev = rest
            chunk.next = rest
            chunk.size = need
            self._chunks[rest.addr] = rest
            self._insert_free(rest)
        chunk.free = False
        self._live[key] = (chunk, int(nbytes))
        self.in_use_bytes += chunk.size
        self.requested_bytes += int(nbytes)
        self.peak_bytes = max(self.peak_bytes, self.in_use_bytes)
        self.peak_requested_bytes = max(self.peak_requested_bytes, self.requested_bytes)
        return chunk.size

    def free(self, key: object) -> int:
        """Free the allocation made under ``key``; return the size of its chunk."""
        chunk, requested = self._live.pop(key)
        size = chunk.size
        self.in_use_bytes -= size
        self.requested_bytes -= requested
        # Merge with free neighbours of the same region (``FreeAndMaybeCoalesce``).
        for neighbour in (chunk.next, chunk.prev):
            if neighbour is not None and neighbour.free:
                self._remove_free(neighbour)
                first, second = (
                    (chunk, neighbour) if neighbour is chunk.next else (neighbour, chunk)
                )
                first.size += second.size
                first.next = second.next
                if second.next is not None:
                    second.next.prev = first
                del self._chunks[second.addr]
                chunk = first
        self._insert_free(chunk)
        return size

    def rename(self, key: object, new_key: object) -> None:
        """Hand the allocation under ``key`` to ``new_key`` (a buffer reused in place)."""
        if new_key in self._live:
            raise KeyError(f"allocation {new_key!r} is already alive")
        self._live[new_key] = self._live.pop(key)

    def reset_peak(self) -> None:
        """Start new peaks from the bytes in use now (``reset_memory_stats``)."""
        self.peak_bytes = self.in_use_bytes
        self.peak_requested_bytes = self.requested_bytes

    def __contains__(self, key: object) -> bool:
        return key in self._live
