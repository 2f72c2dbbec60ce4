"""Streaming writer of pyramidal tiled TIFFs that OpenSlide reads ("generic tiled TIFF").

Level 0 is rendered tile by tile (in threads) and written as it comes; the pyramid is built
on the way: each finished tile is halved into its parent tile, and a parent is JPEG-encoded
the moment its last child arrives and kept as bytes. Memory stays at about one row of tiles
per level plus the compressed lower levels, whatever the slide size. The file is level 0
first, then reduced-resolution directories (NewSubfileType 1, not SubIFDs), with
X/YResolution in pixels per centimetre so OpenSlide reports the mpp. Tiles are JPEG RGB
(slides) or lossless deflate, RGB or single-channel (maps such as a tumour probability).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
import tifffile

from histoseg.errors import ConfigError
from histoseg.files import atomic_output

MIN_TOP_LEVEL_PX = 1000  # keep halving until the top level is smaller than this
JPEG_QUALITY = 85
COMPRESSIONS = ("jpeg", "deflate")
DEFLATE_LEVEL = 6


def pyramid_dimensions(width_px: int, height_px: int) -> list[tuple[int, int]]:
    """Level sizes: halving (rounding up) until the larger side is below 1000 px."""
    dims = [(width_px, height_px)]
    while max(dims[-1]) >= MIN_TOP_LEVEL_PX:
        w, h = dims[-1]
        dims.append(((w + 1) // 2, (h + 1) // 2))
    return dims


def _encode(tile: np.ndarray, compression: str = "jpeg") -> bytes:
    if compression == "deflate":
        return imagecodecs.zlib_encode(np.ascontiguousarray(tile), level=DEFLATE_LEVEL)
    return imagecodecs.jpeg_encode(
        tile, level=JPEG_QUALITY, colorspace="RGB", outcolorspace="YCBCR", subsampling=(2, 2)
    )


def _halve(tile: np.ndarray) -> np.ndarray:
    a = tile.astype(np.uint16)
    s = a[0::2, 0::2] + a[1::2, 0::2] + a[0::2, 1::2] + a[1::2, 1::2]
    return ((s + 2) >> 2).astype(np.uint8)


class _PyramidBuilder:
    """Collects halved level-k tiles into level-(k+1) tiles and encodes finished ones."""

    def __init__(
        self,
        dims: list[tuple[int, int]],
        tile_px: int,
        background: tuple[int, ...],
        compression: str = "jpeg",
    ):
        self.dims = dims
        self.tile_px = tile_px
        self.compression = compression
        self.grid = [(math.ceil(w / tile_px), math.ceil(h / tile_px)) for w, h in dims]
        self.pending: list[dict[tuple[int, int], np.ndarray]] = [{} for _ in dims]
        self.encoded: list[dict[tuple[int, int], bytes]] = [{} for _ in dims]
        shape = (tile_px, tile_px, len(background)) if len(background) > 1 else (tile_px, tile_px)
        self._white = np.full(
            shape, background[0] if len(background) == 1 else background, np.uint8
        )
        self._white_half = _halve(self._white)
        self._white_bytes = self.encode(self._white)

    def encode(self, tile: np.ndarray) -> bytes:
        return _encode(tile, self.compression)

    def white_bytes(self) -> bytes:
        return self._white_bytes

    def add(self, level: int, tx: int, ty: int, half: np.ndarray | None) -> None:
        """Paste the halved tile (tx, ty) of ``level`` into its parent on ``level + 1``."""
        parent_level = level + 1
        if parent_level >= len(self.dims):
            return
        t = self.tile_px
        px, py = tx // 2, ty // 2
        key = (px, py)
        parent = self.pending[parent_level].get(key)
        if parent is None:
            parent = self._white.copy()
            self.pending[parent_level][key] = parent
        h = t // 2
        ox, oy = (tx % 2) * h, (ty % 2) * h
        parent[oy : oy + h, ox : ox + h] = self._white_half if half is None else half
        n_tx, n_ty = self.grid[level]
        last_child = (min(2 * px + 1, n_tx - 1), min(2 * py + 1, n_ty - 1))
        if (tx, ty) == last_child:
            del self.pending[parent_level][key]
            self.encoded[parent_level][key] = self.encode(parent)
            self.add(parent_level, px, py, _halve(parent))

    def level_tiles(self, level: int) -> Iterator[bytes]:
        n_tx, n_ty = self.grid[level]
        tiles = self.encoded[level]
        for ty in range(n_ty):
            for tx in range(n_tx):
                yield tiles[(tx, ty)]


def write_pyramid_tiff(
    path: str | Path,
    render_tile: Callable[[int, int], np.ndarray | None],
    size_px: tuple[int, int],
    *,
    tile_px: int = 512,
    mpp: float = 0.25,
    background_rgb: tuple[int, int, int] | tuple[int] = (255, 255, 255),
    threads: int | None = None,
    progress: bool = True,
    software: str = "histoseg",
    compression: str = "jpeg",
) -> Path:
    """Write a pyramidal tiled TIFF from a level-0 tile function.

    Args:
        path: output file (whole or not at all: :func:`histoseg.files.atomic_output`).
        render_tile: ``(tile column, tile row) -> uint8 (tile_px, tile_px, 3)`` RGB (or
            ``(tile_px, tile_px)`` when ``background_rgb`` has one value), or None for a
            background tile. Called from ``threads`` threads; must be thread-safe.
        size_px: level-0 (width, height).
        tile_px: tile side, a multiple of 16 (JPEG 4:2:0 blocks).
        mpp: micrometres per level-0 pixel.
        background_rgb: colour of None tiles and of the padding beyond the slide; one value
            makes a single-channel (grey) image.
        threads: render threads (default: CPU count, at most 4).
        progress: show a tqdm bar on stderr.
        software: the Software tag.
        compression: "jpeg" (lossy, RGB only) or "deflate" (lossless).

    Returns:
        ``path``.
    """
    from tqdm import tqdm

    width_px, height_px = (int(v) for v in size_px)
    channels = len(background_rgb)
    _check_pyramid_args(width_px, height_px, tile_px, mpp, channels, compression)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dims = pyramid_dimensions(width_px, height_px)
    builder = _PyramidBuilder(dims, tile_px, tuple(background_rgb), compression)
    n_tx, n_ty = builder.grid[0]
    threads = threads or min(4, os.cpu_count() or 1)
    bar = tqdm(total=n_tx * n_ty, desc=path.name, unit="tile", disable=not progress, leave=False)
    level0 = _level0_tiles(builder, render_tile, threads, bar)
    resolution_per_cm = 1e4 / mpp
    common = _tiff_options(tile_px, compression, channels)
    pixel_shape = (3,) if channels == 3 else ()
    bigtiff = width_px * height_px * 3 // 4 > 2**31  # JPEG is far smaller; stay safe
    try:
        with (
            atomic_output(path) as tmp,
            tifffile.TiffWriter(tmp, bigtiff=bigtiff) as tif,
        ):
            tif.write(
                level0,
                shape=(height_px, width_px, *pixel_shape),
                resolution=(resolution_per_cm, resolution_per_cm),
                subfiletype=0,
                software=software,
                **common,
            )
            for level in range(1, len(dims)):
                w, h = dims[level]
                scale = width_px / w
                tif.write(
                    builder.level_tiles(level),
                    shape=(h, w, *pixel_shape),
                    resolution=(resolution_per_cm / scale, resolution_per_cm / scale),
                    subfiletype=1,
                    **common,
                )
    finally:
        bar.close()
    return path


def _check_pyramid_args(
    width_px: int, height_px: int, tile_px: int, mpp: float, channels: int, compression: str
) -> None:
    if width_px < 1 or height_px < 1:
        raise ConfigError(f"image size must be positive, got {width_px}x{height_px}")
    if tile_px <= 0 or tile_px % 16:
        raise ConfigError(f"tile_px must be a positive multiple of 16, got {tile_px}")
    if not (mpp > 0 and math.isfinite(mpp)):
        raise ConfigError(f"mpp must be a positive number, got {mpp}")
    if compression not in COMPRESSIONS or channels not in (1, 3):
        raise ConfigError(
            f"compression {compression!r} with {channels} channel(s): allowed are "
            f"{', '.join(COMPRESSIONS)} with 3 channels, or deflate with 1"
        )
    if compression == "jpeg" and channels != 3:
        raise ConfigError("jpeg tiles are RGB here; use compression='deflate' for one channel")


def _level0_tiles(
    builder: _PyramidBuilder,
    render_tile: Callable[[int, int], np.ndarray | None],
    threads: int,
    bar: Any,
) -> Iterator[bytes]:
    """Level 0's encoded tiles in order, rendered by ``threads`` threads with a bounded
    read-ahead (memory stays flat), each tile's halved copy handed to the builder."""
    n_tx, n_ty = builder.grid[0]

    def work(index: int) -> tuple[bytes, np.ndarray | None]:
        tile = render_tile(index % n_tx, index // n_tx)
        if tile is None:
            return builder.white_bytes(), None
        return builder.encode(tile), _halve(tile)

    with ThreadPoolExecutor(threads) as pool:
        window = 4 * threads
        indices = iter(range(n_tx * n_ty))
        futures = [pool.submit(work, i) for _, i in zip(range(window), indices, strict=False)]
        index = 0
        while futures:
            data, half = futures.pop(0).result()
            nxt = next(indices, None)
            if nxt is not None:
                futures.append(pool.submit(work, nxt))
            builder.add(0, index % n_tx, index // n_tx, half)
            index += 1
            bar.update()
            yield data


def _tiff_options(tile_px: int, compression: str, channels: int) -> dict[str, Any]:
    """tifffile's write options shared by every level."""
    options: dict[str, Any] = {
        "dtype": np.uint8,
        "tile": (tile_px, tile_px),
        "compression": "jpeg" if compression == "jpeg" else "zlib",
        "photometric": "rgb" if channels == 3 else "minisblack",
        "resolutionunit": "CENTIMETER",
        "metadata": None,
    }
    if compression == "jpeg":
        options["subsampling"] = (2, 2)
    return options
