"""What listing a patch grid will cost, predicted before any pixel is read: positions, CSV
bytes, memory and seconds, and the refusal of work past a minute or the free memory."""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

from histoseg.errors import ConfigError
from histoseg.wsi.annotations import Annotations
from histoseg.wsi.slide import Slide
from histoseg.wsi.tissue import DEFAULT_TISSUE_DOWNSAMPLE, MAX_MASK_PX

# Tumour fractions are counted on a grid this many cells across a patch: fine enough for
# small metastases, coarse enough to stay cheap on a whole slide.
TUMOR_CELLS_PER_PATCH = 32


def count_grid(slide: Slide, patch_size: int, level: int = 0, stride: int | None = None) -> int:
    """How many grid positions there are before tissue filtering."""
    stride = stride or patch_size
    width, height = slide.level_dimensions[level]
    return max(0, (width - patch_size) // stride + 1) * max(0, (height - patch_size) // stride + 1)


# The smallest patch the CLI lists: below it DeepLabV3+'s stride-32 features vanish, and a
# whole-slide grid grows past hundreds of millions of rows.
MIN_PATCH_SIZE_PX = 32
# A grid predicted to take longer than this, or more memory than is free, needs --force.
MAX_UNFORCED_S = 60.0
# Costs measured on a 20000x16000 px synthetic slide at 32 px (312,500 positions, all
# kept) on a 2-core machine: ~15 us and ~270 bytes per kept patch (a PatchRef, CSV write
# included), ~18 bytes per cell of the whole-slide tumour grid (mask, summed-area table
# and its scratch), and ~80 MB for the interpreter, OpenSlide and the tissue mask.
SECONDS_PER_POSITION = 2e-5
BYTES_PER_POSITION = 400
BYTES_PER_TUMOR_CELL = 18
BASE_BYTES = 100 * 2**20
CSV_BYTES_PER_ROW = 40  # numbers and commas, beside the two paths


@dataclass(frozen=True)
class GridWork:
    """What listing a grid will cost, predicted before any pixel is read.

    Upper bounds: every position is counted as kept, as the tissue filter is not known yet.
    """

    positions: int
    csv_bytes: int
    memory_bytes: int
    seconds: float
    free_bytes: int

    def __str__(self) -> str:
        return (
            f"{self.positions:,} grid positions; up to {_megabytes(self.csv_bytes)} of CSV, "
            f"~{_megabytes(self.memory_bytes)} of memory, ~{self.seconds:,.0f} s"
        )

    def check(self, where: str, *, force: bool) -> None:
        """Refuse work over :data:`MAX_UNFORCED_S` or over the free memory, unless ``force``."""
        if force:
            return
        if self.seconds > MAX_UNFORCED_S or self.memory_bytes > self.free_bytes:
            raise ConfigError(
                f"{where}: {self} ({_megabytes(self.free_bytes)} free): more than "
                f"{MAX_UNFORCED_S:g} s or the free memory; raise --patch-size or --stride, "
                "or pass --force to run it anyway"
            )


def _megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:,.0f} MB" if n_bytes >= 1e6 else f"{n_bytes / 1e3:,.0f} kB"


def estimate_grid_work(
    slide: Slide,
    patch_size: int,
    level: int,
    stride: int | None,
    annotations: Annotations,
) -> GridWork:
    """Predict the count, CSV size, memory and time of :func:`grid_patches`."""
    import psutil

    positions = count_grid(slide, patch_size, level, stride)
    width0, height0 = slide.dimensions
    cells = 0
    if annotations.has_tumor:  # the grid annotation_grid will allocate
        extent = patch_size * slide.level_downsamples[level]
        d = max(
            min(DEFAULT_TISSUE_DOWNSAMPLE, extent / TUMOR_CELLS_PER_PATCH),
            math.sqrt(width0 * height0 / MAX_MASK_PX),
            1.0,
        )
        cells = math.ceil(width0 / d) * math.ceil(height0 / d)
    paths = len(os.fsencode(slide.path)) + len(os.fsencode(annotations.source or ""))
    return GridWork(
        positions=positions,
        csv_bytes=positions * (paths + CSV_BYTES_PER_ROW),
        memory_bytes=BASE_BYTES + positions * BYTES_PER_POSITION + cells * BYTES_PER_TUMOR_CELL,
        seconds=positions * SECONDS_PER_POSITION,
        free_bytes=psutil.virtual_memory().available,
    )
