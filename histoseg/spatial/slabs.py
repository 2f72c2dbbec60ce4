"""Row arithmetic of spatial parallelism: which rows each rank owns, needs and shares.

A feature map of global height ``H`` is cut into ``workers`` equal horizontal slabs; rank
``r`` owns rows ``[r * H / workers, (r + 1) * H / workers)`` (full width). A layer that
looks at neighbours needs, for the output rows its rank owns, a range of input rows that
reaches past its own slab: the *halo*. This module says which rows (:func:`conv_rows`,
:func:`resize_rows`) and how to assemble them from the rows every rank shares
(:func:`exchange_plan`). It is pure Python, so it is tested without TensorFlow or Horovod.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from histoseg.errors import ConfigError


def slab_rows(height: int, workers: int, rank: int) -> tuple[int, int]:
    """Global rows ``[start, stop)`` of rank ``rank``'s slab of a map ``height`` rows high."""
    if height % workers:
        raise ConfigError(
            f"a feature map {height} rows high cannot be cut into {workers} equal slabs; "
            f"use an input size that is a multiple of {workers} x the model's output stride"
        )
    rows = height // workers
    return rank * rows, (rank + 1) * rows


def same_padding(size: int, kernel: int, stride: int, dilation: int) -> tuple[int, int, int]:
    """TensorFlow's "same" padding: ``(output size, pad before, pad after)``."""
    out = math.ceil(size / stride)
    effective = (kernel - 1) * dilation + 1
    total = max((out - 1) * stride + effective - size, 0)
    return out, total // 2, total - total // 2


def conv_rows(
    height: int,
    workers: int,
    *,
    kernel: int,
    stride: int,
    dilation: int,
    padding: str,
) -> tuple[int, list[tuple[int, int]]]:
    """Output height and, per rank, the input rows ``[start, stop)`` its output rows read.

    Rows outside ``[0, height)`` are the padding ("same": zeros for a convolution).
    """
    effective = (kernel - 1) * dilation + 1
    if padding == "same":
        out, before, _ = same_padding(height, kernel, stride, dilation)
    elif padding == "valid":
        out, before = (height - effective) // stride + 1, 0
    else:
        raise ConfigError(f"padding={padding!r} is not supported by spatial parallelism")
    needs = []
    for rank in range(workers):
        first, stop = slab_rows(out, workers, rank)
        needs.append((first * stride - before, (stop - 1) * stride - before + effective))
    return out, needs


def resize_coordinates(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """TensorFlow's bilinear resize (half-pixel centres, no corner alignment) along one axis.

    Returns ``(lower, upper, lerp)`` for every output index, computed in float32 as
    ``tf.image.resize`` (the ``ResizeBilinear`` kernel) does: output ``i`` reads input
    ``(i + 0.5) * in / out - 0.5``, clamped to the map.
    """
    scale = np.float32(in_size) / np.float32(out_size)
    coords = (np.arange(out_size, dtype=np.float32) + np.float32(0.5)) * scale - np.float32(0.5)
    floor = np.floor(coords)
    lower = np.maximum(floor.astype(np.int64), 0)
    upper = np.minimum(np.ceil(coords).astype(np.int64), in_size - 1)
    return lower, upper, (coords - floor).astype(np.float32)


def resize_rows(in_height: int, out_height: int, workers: int) -> list[tuple[int, int]]:
    """Per rank, the input rows ``[start, stop)`` a bilinear resize of its output rows reads."""
    lower, upper, _ = resize_coordinates(in_height, out_height)
    needs = []
    for rank in range(workers):
        first, stop = slab_rows(out_height, workers, rank)
        needs.append((int(lower[first:stop].min()), int(upper[first:stop].max()) + 1))
    return needs


@dataclass(frozen=True)
class Piece:
    """A run of consecutive rows of a rank's extended slab.

    ``source`` is "fill" (outside the map: zeros, or -inf for max pooling), "local" (this
    rank's own rows ``[start, stop)``), "top" or "bottom" (rows ``[start, stop)`` of
    the first ``top`` / last ``bottom`` rows that rank ``rank`` shares).
    """

    source: str
    start: int
    stop: int
    rank: int = -1

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class Exchange:
    """What every rank shares (its first ``top`` and last ``bottom`` rows) and, per rank,
    the pieces that make up the global rows ``needs[rank]`` it asked for."""

    top: int
    bottom: int
    pieces: tuple[tuple[Piece, ...], ...]


def exchange_plan(height: int, workers: int, needs: Sequence[tuple[int, int]]) -> Exchange:
    """Plan one halo exchange of a map ``height`` rows high cut into ``workers`` slabs.

    Every rank shares its first ``top`` and last ``bottom`` rows (the same counts on every
    rank, so one allgather of equal shapes serves all): ``top`` is the most rows any rank
    needs below its slab (at most a slab), ``bottom`` the most above. A halo deeper than
    one slab then comes from several neighbours, each contributing a prefix of its top
    rows (below) or a suffix of its bottom rows (above).
    """
    rows = slab_rows(height, workers, 0)[1]
    above = below = 0
    for rank, (start, stop) in enumerate(needs):
        own_start, own_stop = slab_rows(height, workers, rank)
        above = max(above, own_start - max(start, 0))
        below = max(below, min(stop, height) - own_stop)
    top, bottom = min(below, rows), min(above, rows)
    return Exchange(
        top,
        bottom,
        tuple(_pieces(height, workers, r, needs[r], top, bottom) for r in range(workers)),
    )


def _pieces(height, workers, rank, need, top, bottom) -> tuple[Piece, ...]:
    start, stop = need
    rows = height // workers
    pieces = []
    if start < 0:
        pieces.append(Piece("fill", start, min(0, stop)))
    for owner in range(workers):
        first, last = max(start, owner * rows), min(stop, (owner + 1) * rows)
        if first >= last:
            continue
        local_first, local_last = first - owner * rows, last - owner * rows
        if owner == rank:
            pieces.append(Piece("local", local_first, local_last))
        elif owner > rank:  # below this slab: a prefix of the owner's top rows
            if local_last > top:
                raise AssertionError("exchange plan: halo below exceeds the shared rows")
            pieces.append(Piece("top", local_first, local_last, owner))
        else:  # above: a suffix of the owner's bottom rows
            offset = rows - bottom
            if local_first < offset:
                raise AssertionError("exchange plan: halo above exceeds the shared rows")
            pieces.append(Piece("bottom", local_first - offset, local_last - offset, owner))
    if stop > height:
        pieces.append(Piece("fill", max(start, height), stop))
    return tuple(pieces)
