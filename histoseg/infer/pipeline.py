"""Run a model over a slide's tissue tiles with reading, the model and writing overlapped.

Reader threads fetch tiles ahead (OpenSlide releases the GIL while it decodes), the
calling thread runs the model, and one writer thread blends predictions into the
:class:`~histoseg.infer.store.MapStore`; bounded queues between them keep memory at a few
tiles. Only tiles whose weighted area touches tissue run; the others add nothing (their
probability is 0).
"""

from __future__ import annotations

import contextlib
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from histoseg.infer.store import MapStore
from histoseg.infer.tiling import TileGrid
from histoseg.wsi.slide import Slide
from histoseg.wsi.tissue import CoverageGrid

READ_AHEAD_TILES = 4
WRITE_QUEUE_TILES = 4


@dataclass
class TilePlan:
    """Which tiles run, and the tissue each one answers for (megapixels of the level)."""

    grid: TileGrid
    downsample: float
    runs: np.ndarray  # bool (rows, columns)
    tissue_mp: np.ndarray  # float (rows, columns): tissue in the tile's owned square

    @property
    def tissue_tiles(self) -> int:
        return int(self.runs.sum())


@dataclass
class RunStats:
    """What a run did: tiles, tissue and the pipeline's time per tile."""

    tiles_run: int = 0
    tissue_mp: float = 0.0
    wall_s: float = 0.0
    tile_mp_per_s: list[float] = field(default_factory=list)

    @property
    def median_mp_per_s(self) -> float:
        return float(np.median(self.tile_mp_per_s)) if self.tile_mp_per_s else float("nan")


def plan_tiles(grid: TileGrid, tissue: CoverageGrid, downsample: float) -> TilePlan:
    """Mark the tiles whose non-zero window overlaps tissue (tissue mask in level-0 px)."""
    runs = np.zeros((grid.rows, grid.columns), dtype=bool)
    tissue_mp = np.zeros((grid.rows, grid.columns), dtype=np.float64)
    half = grid.margin_px // 2
    reach_px = grid.tile_size_px - 2 * half
    for column, row in grid.tiles():
        x, y = grid.origin_px(column, row)
        weighted = tissue.fraction(
            (x + half) * downsample,
            (y + half) * downsample,
            reach_px * downsample,
            reach_px * downsample,
        )
        runs[row, column] = weighted > 0
        x0, y0, x1, y1 = grid.owned_box_px(column, row)
        owned = tissue.fraction(
            x0 * downsample, y0 * downsample, (x1 - x0) * downsample, (y1 - y0) * downsample
        )
        tissue_mp[row, column] = owned * (x1 - x0) * (y1 - y0) / 1e6
    return TilePlan(grid, downsample, runs, tissue_mp)


def run_tiles(
    slide: Slide,
    level: int,
    plan: TilePlan,
    predict: Callable[[np.ndarray], np.ndarray],
    store: MapStore,
    *,
    first_row: int = 0,
    on_tile: Callable[[int, int], None] | None = None,
    reader_threads: int = 2,
) -> RunStats:
    """Predict every planned tile from ``first_row`` on and blend it into ``store``.

    ``predict`` maps a uint8 (1, tile, tile, 3) batch to a float32 (tile, tile) probability.
    ``on_tile(column, row)`` is called after each tile row's tile is handed to the writer.
    """
    grid = plan.grid
    order = [(c, r) for c, r in grid.tiles() if r >= first_row]
    stats = RunStats()
    writer = _Writer(store)
    writer.start()
    started = time.perf_counter()
    last = started
    try:
        with ThreadPoolExecutor(reader_threads) as pool:
            pending = _read_ahead(pool, slide, level, plan, order)
            for index, (column, row) in enumerate(order):
                future = pending.pop(0)
                pending.extend(
                    _read_ahead(pool, slide, level, plan, order, index + READ_AHEAD_TILES, 1)
                )
                if future is not None:
                    probability = np.asarray(predict(future.result()[None]))
                    writer.put(("tile", column, row, probability))
                    now = time.perf_counter()
                    if stats.tiles_run and plan.tissue_mp[row, column] > 0:
                        stats.tile_mp_per_s.append(plan.tissue_mp[row, column] / (now - last))
                    last = now
                    stats.tiles_run += 1
                    stats.tissue_mp += float(plan.tissue_mp[row, column])
                if column == grid.columns - 1:
                    writer.put(("row", row))
                if on_tile is not None:
                    on_tile(column, row)
        writer.finish()
    except BaseException:
        writer.abort()
        raise
    stats.wall_s = time.perf_counter() - started
    return stats


def _read_ahead(pool, slide, level, plan, order, start=0, count=READ_AHEAD_TILES):
    """Futures (None for a tile that does not run) for ``order[start:start + count]``."""
    out = []
    for column, row in order[start : start + count]:
        if not plan.runs[row, column]:
            out.append(None)
            continue
        x, y = plan.grid.origin_px(column, row)
        location = (round(x * plan.downsample), round(y * plan.downsample))
        size = (plan.grid.tile_size_px, plan.grid.tile_size_px)
        out.append(pool.submit(slide.read_region, location, level, size))
    return out


class _Writer(threading.Thread):
    """Blends tiles and finishes rows in order, off the model's thread."""

    def __init__(self, store: MapStore):
        super().__init__(name="histoseg-infer-writer", daemon=True)
        self.store = store
        self.items: queue.Queue = queue.Queue(WRITE_QUEUE_TILES)
        self.error: BaseException | None = None
        self._stop_now = threading.Event()

    def run(self) -> None:
        try:
            while not self._stop_now.is_set():
                item = self.items.get()
                if item is None:
                    return
                if item[0] == "tile":
                    self.store.add(*item[1:])
                else:
                    self.store.finish_row(item[1])
        except BaseException as exc:  # handed to the model's thread, which raises it
            self.error = exc

    def put(self, item) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self.items.put(item, timeout=0.5)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop after the item in hand; the store keeps its last finished row."""
        self._stop_now.set()
        with contextlib.suppress(queue.Full):
            self.items.put_nowait(None)
        self.join()
