"""The blended probability map on disk, written band by band, and the state a resume needs.

Tile predictions are pooled to map cells (``cell_px`` px of the inference level) and added,
window-weighted, into a band of map rows as tall as one tile. Once a tile row is done, the
band's top ``step`` rows are final: they are appended to ``map.npy`` (float32, rows in
order, plain writes and no memory map, so written pages never count as this process's
memory) and the band moves down. Memory is one band, whatever the slide's height; its width
is the slide's width over the cell size.

After each tile row the store records how many rows are final and the band rows carried
into the next tile row (``state.json`` and ``carry-<row>.npy``, both written before the
state names them). A run stopped anywhere resumes from the last finished tile row and
writes the same bytes an uninterrupted run would: additions happen in the same order.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ConfigError
from histoseg.files import atomic_output
from histoseg.infer.tiling import TileGrid
from histoseg.results import atomic_write_text

MAP_NAME = "map.npy"
STATE_NAME = "state.json"
STATE_SCHEMA = "histoseg.infer.state/1"
_DTYPE = np.dtype("<f4")


class MapStore:
    """Accumulates one slide's tiles into ``folder/map.npy``; see the module docstring."""

    def __init__(self, folder: str | Path, grid: TileGrid, cell_px: int, fingerprint: dict):
        if grid.tile_size_px % cell_px or grid.margin_px % cell_px:
            raise ConfigError(f"map cell {cell_px} px must divide the tile size and margin")
        self.folder = Path(folder)
        self.grid = grid
        self.cell_px = cell_px
        self.fingerprint = dict(fingerprint)
        self.map_shape = (math.ceil(grid.height_px / cell_px), math.ceil(grid.width_px / cell_px))
        tile_cells = grid.tile_size_px // cell_px
        band_width_px = (grid.columns - 1) * grid.step_px + grid.tile_size_px
        self._band = np.zeros((tile_cells, band_width_px // cell_px), dtype=np.float32)
        self.rows_done = 0
        self._rows_written = 0
        self._header_bytes = 0
        self._fd: int | None = None

    # --- lifetime -----------------------------------------------------------------------
    def open(self, *, resume: bool) -> int:
        """Start (or, with ``resume``, continue) the map; returns the first tile row to run.

        Raises:
            ConfigError: the folder holds a run made with other settings.
        """
        self.folder.mkdir(parents=True, exist_ok=True)
        state = self._read_state() if resume else None
        path = self.folder / MAP_NAME
        flags = os.O_RDWR | os.O_CREAT | (0 if state else os.O_TRUNC)
        self._fd = os.open(path, flags, 0o666)
        if state is None:
            self._write_header()
            return 0
        self._header_bytes = int(state["header_bytes"])
        self._rows_written = int(state["map_rows_written"])
        self.rows_done = int(state["tile_rows_done"])
        os.ftruncate(self._fd, self._header_bytes + self._rows_written * self._row_bytes)
        carry = np.load(self.folder / state["carry"])
        self._band[: carry.shape[0]] = carry
        return self.rows_done

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def _read_state(self) -> dict[str, Any] | None:
        path = self.folder / STATE_NAME
        if not path.exists():
            return None
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if state.get("schema") != STATE_SCHEMA:
            return None
        if state.get("fingerprint") != self.fingerprint:
            raise ConfigError(
                f"{self.folder}: an unfinished run with other settings (checkpoint, level, "
                "tile size or margin) is there; pass --force to start over"
            )
        return state

    # --- accumulation -------------------------------------------------------------------
    @property
    def _row_bytes(self) -> int:
        return self.map_shape[1] * _DTYPE.itemsize

    def _write_header(self) -> None:
        header = {"descr": _DTYPE.str, "fortran_order": False, "shape": self.map_shape}
        buffer = io.BytesIO()
        np.lib.format.write_array_header_1_0(buffer, header)
        os.pwrite(self._fd, buffer.getvalue(), 0)
        self._header_bytes = len(buffer.getvalue())

    def add(self, column: int, row: int, probability: np.ndarray) -> None:
        """Add tile (column, row)'s probability (tile x tile), window-weighted, to the band."""
        c = self.cell_px
        weighted = probability * self.grid.weights(column, row)
        n = self.grid.tile_size_px // c
        pooled = weighted.reshape(n, c, n, c).mean(axis=(1, 3), dtype=np.float32)
        x0 = column * self.grid.step_px // c
        self._band[:, x0 : x0 + n] += pooled

    def finish_row(self, row: int) -> None:
        """Write the band rows tile row ``row`` completed, move the band, record the state."""
        c = self.cell_px
        step_cells = self.grid.step_px // c
        last = row == self.grid.rows - 1
        top = (row * self.grid.step_px - self.grid.margin_px) // c
        final = self._band if last else self._band[:step_cells]
        self._append_rows(top, final)
        if not last:
            keep = self._band.shape[0] - step_cells
            self._band[:keep] = self._band[step_cells:]
            self._band[keep:] = 0.0
        self.rows_done = row + 1
        self._save_state(keep_rows=0 if last else self._band.shape[0] - step_cells)

    def _append_rows(self, top: int, rows: np.ndarray) -> None:
        left = self.grid.margin_px // self.cell_px
        height, width = self.map_shape
        start = max(top, self._rows_written)
        stop = min(top + rows.shape[0], height)
        if stop <= start:
            return
        block = np.ascontiguousarray(rows[start - top : stop - top, left : left + width])
        data = memoryview(block.astype(_DTYPE, copy=False).tobytes())
        offset = self._header_bytes + start * self._row_bytes
        while data:
            written = os.pwrite(self._fd, data, offset)
            data, offset = data[written:], offset + written
        self._rows_written = stop

    def _save_state(self, keep_rows: int) -> None:
        os.fsync(self._fd)
        carry_name = f"carry-{self.rows_done:06d}.npy"
        with atomic_output(self.folder / carry_name) as tmp, open(tmp, "wb") as f:
            np.save(f, self._band[:keep_rows])
        state = {
            "schema": STATE_SCHEMA,
            "fingerprint": self.fingerprint,
            "tile_rows_done": self.rows_done,
            "map_rows_written": self._rows_written,
            "header_bytes": self._header_bytes,
            "carry": carry_name,
        }
        atomic_write_text(self.folder / STATE_NAME, json.dumps(state, indent=1) + "\n")
        for old in self.folder.glob("carry-*.npy"):
            if old.name != carry_name:
                old.unlink(missing_ok=True)

    @property
    def complete(self) -> bool:
        return self.rows_done == self.grid.rows


class MapReader:
    """Reads row ranges of a finished ``map.npy`` without mapping it into memory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        with self.path.open("rb") as f:
            np.lib.format.read_magic(f)  # version 1.0: written by MapStore
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
            self.header_bytes = f.tell()
        self.shape: tuple[int, int] = tuple(shape)
        self.dtype = np.dtype(dtype)
        self._fd = os.open(self.path, os.O_RDONLY)

    def rows(self, start: int, stop: int) -> np.ndarray:
        """float32 (stop - start, width) rows of the map, clipped to its height."""
        start, stop = max(0, start), min(stop, self.shape[0])
        if stop <= start:
            return np.zeros((0, self.shape[1]), dtype=self.dtype)
        row_bytes = self.shape[1] * self.dtype.itemsize
        data = os.pread(self._fd, (stop - start) * row_bytes, self.header_bytes + start * row_bytes)
        return np.frombuffer(data, dtype=self.dtype).reshape(stop - start, self.shape[1])

    def close(self) -> None:
        os.close(self._fd)
