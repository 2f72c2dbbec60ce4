"""What writing synthetic slides will cost, predicted before any pixel is drawn, and which
files in the output folder are histoseg's own (the only ones it may replace).

The estimate refuses a slide predicted to take more than a minute, or a dataset that would
not fit the free memory or the free disk, unless ``--force``: ``--size 1000000x1000000``
is one line naming its ~33 h, ~150 GB of disk and ~79 GB of memory, not a silent hang.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from histoseg.cli import printable
from histoseg.errors import ConfigError

#: The manifest a synthetic dataset folder keeps (which slides it made, and how).
MANIFEST = "synthetic.json"
#: A slide predicted to take longer than this, or a dataset over the free memory or the free
#: disk, needs --force.
MAX_UNFORCED_S = 60.0
#: TIFF's ImageWidth/ImageLength are 32-bit.
MAX_SIDE_PX = 2**32 - 1
# Costs measured on 8000x6000, 16000x12000 and 32000x8000 px slides (the local task) on a
# shared 2-core machine, rounded up: ~1e-7 s and ~0.12 bytes of JPEG TIFF per level-0
# pixel; make_design peaks at ~100 bytes per 64 px cell of its coarse fields (the context
# task, the local one ~60); the pyramid keeps levels 1.. as JPEG bytes (a third of the
# file) and about one row of tiles per level until the file is written.
SECONDS_PER_PX = 1.2e-7
DISK_BYTES_PER_PX = 0.15
LOWER_LEVEL_BYTES_PER_PX = 0.05
DESIGN_BYTES_PER_CELL = 110
DESIGN_CELL_PX = 64
BASE_BYTES = 130 * 2**20


@dataclass(frozen=True)
class SynthWork:
    """What a synthetic dataset will cost, predicted from its recipe alone (upper bounds:
    slides that would be reused are counted as written)."""

    slides: int
    size_px: tuple[int, int]
    seconds_per_slide: float
    memory_bytes: int
    disk_bytes: int
    free_bytes: int
    free_disk_bytes: int

    def __str__(self) -> str:
        w, h = self.size_px
        plural = "s" if self.slides != 1 else ""
        return (
            f"{self.slides} slide{plural} of {w:,}x{h:,} px; ~{_bytes(self.disk_bytes)} on "
            f"disk, ~{_bytes(self.memory_bytes)} of memory, ~{_duration(self.seconds_per_slide)}"
            " a slide"
        )

    def check(self, where: str, *, force: bool) -> None:
        """Refuse a slide over :data:`MAX_UNFORCED_S`, or the free memory or disk, unless
        ``force``."""
        if force:
            return
        too_long = self.seconds_per_slide > MAX_UNFORCED_S
        if (
            too_long
            or self.memory_bytes > self.free_bytes
            or self.disk_bytes > self.free_disk_bytes
        ):
            raise ConfigError(
                f"{where}: {self} ({_bytes(self.free_bytes)} memory and "
                f"{_bytes(self.free_disk_bytes)} disk free): more than {MAX_UNFORCED_S:g} s a "
                "slide, the free memory or the free disk; make --size smaller, or pass --force "
                "to run it anyway"
            )


def estimate_synth_work(
    folder: str | os.PathLike, n_slides: int, size_px: tuple[int, int], tile_px: int
) -> SynthWork:
    """Predict the time, memory and disk of writing ``n_slides`` slides of ``size_px``."""
    import psutil

    width, height = (int(v) for v in size_px)
    pixels = width * height
    cells = (math.ceil(width / DESIGN_CELL_PX) + 2) * (math.ceil(height / DESIGN_CELL_PX) + 2)
    memory = (
        BASE_BYTES
        + cells * DESIGN_BYTES_PER_CELL
        + int(pixels * LOWER_LEVEL_BYTES_PER_PX)
        + 3 * width * tile_px  # a row of half-filled RGB parent tiles, over all levels
    )
    return SynthWork(
        slides=n_slides,
        size_px=(width, height),
        seconds_per_slide=pixels * SECONDS_PER_PX,
        memory_bytes=memory,
        disk_bytes=int(n_slides * pixels * DISK_BYTES_PER_PX),
        free_bytes=psutil.virtual_memory().available,
        free_disk_bytes=shutil.disk_usage(_nearest_existing(Path(folder))).free,
    )


def _nearest_existing(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _bytes(n: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6)):
        if n >= size:
            return f"{n / size:,.1f} {unit}" if n < 10 * size else f"{n / size:,.0f} {unit}"
    return f"{n / 1e3:,.0f} kB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 2 * 3600:
        return f"{seconds / 60:,.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:,.0f} h"
    return f"{seconds / 86400:,.1f} days"


# --- whose files ----------------------------------------------------------------------------
def read_manifest(folder: Path) -> dict[str, dict] | None:
    """The slides the folder's manifest lists (name -> recipe); None when it has none, or
    when the file there is not a manifest histoseg wrote."""
    try:
        data = json.loads((folder / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    slides = data.get("slides") if isinstance(data, dict) else None
    if not isinstance(slides, dict):
        return None
    return {k: v for k, v in slides.items() if isinstance(v, dict)}


def check_own_files(folder: str | os.PathLike, names: Iterable[str], *, force: bool) -> None:
    """Refuse, before any work, a dataset folder holding files of the user's that writing
    the slides ``names`` would replace or remove, unless ``force``.

    A slide (``.tif``) and its ``.xml`` are histoseg's when the folder's manifest lists the
    slide; the manifest is histoseg's when it parses as one. Any other file in the way is the
    user's: the refusal names it and the way out (move it, another --out, or --force).
    """
    folder = Path(folder)
    if force or not folder.is_dir():
        return
    manifest = folder / MANIFEST
    listed = read_manifest(folder)
    if manifest.exists() and listed is None:
        _refuse(manifest, "is not a histoseg.wsi.synth manifest")
    listed = listed or {}
    for name in names:
        tif = folder / name
        for path in (tif, tif.with_suffix(".xml")):
            if os.path.lexists(path) and name not in listed:
                _refuse(path, f"was not written by histoseg.wsi.synth (not in {MANIFEST})")


def _refuse(path: Path, why: str) -> None:
    raise ConfigError(
        f"{printable(path)} exists and {why}; refusing to replace it (move it away, give "
        "another --out, or pass --force)"
    )


def check_recipe(n_slides: int, size_px: tuple[int, int], tile_px: int, mpp: float) -> None:
    """Refuse a dataset recipe no slide can be written from, before any folder is made."""
    if isinstance(n_slides, bool) or not isinstance(n_slides, int) or n_slides < 1:
        raise ConfigError(f"n_slides must be >= 1, got {n_slides}")
    width, height = (int(v) for v in size_px)
    if width < 64 or height < 64:
        raise ConfigError(f"slide size must be at least 64x64 px, got {width}x{height}")
    if max(width, height) > MAX_SIDE_PX:
        raise ConfigError(
            f"slide size {width}x{height}: a side is over {MAX_SIDE_PX:,} px (the TIFF limit)"
        )
    if isinstance(tile_px, bool) or not isinstance(tile_px, int) or tile_px <= 0 or tile_px % 32:
        raise ConfigError(f"tile_px must be a positive multiple of 32, got {tile_px}")
    if not (isinstance(mpp, (int, float)) and math.isfinite(mpp) and mpp > 0):
        raise ConfigError(f"mpp must be a positive number, got {mpp}")
