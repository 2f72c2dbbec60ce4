"""One slide through a trained model: plan, run (or resume), then write the outputs.

Outputs, beside each other in the output folder: ``<slide>.tif`` (tumour-probability
pyramid at the slide's level-0 geometry and mpp), ``<slide>.png`` (heatmap over the
thumbnail) and ``<slide>.json`` (summary: tumour area, slide score, lesion candidates,
throughput). Work in progress lives in ``<slide>.infer-work/``, removed once the outputs
are written; a run stopped before then resumes there.
"""

from __future__ import annotations

import json
import resource
import shutil
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from histoseg.cli import check_output, printable
from histoseg.infer.outputs import (
    OVERLAY_MAX_PX,
    detections,
    summarise_map,
    write_overlay_png,
    write_probability_pyramid,
)
from histoseg.infer.pipeline import plan_tiles, run_tiles
from histoseg.infer.store import MAP_NAME, MapReader, MapStore
from histoseg.infer.tiling import TileGrid
from histoseg.results import atomic_write_text
from histoseg.wsi.slide import open_slide
from histoseg.wsi.tissue import detect_tissue

SUMMARY_SCHEMA = "histoseg.infer/1"
MAP_CELL_PX = 4  # inference-level px per map cell: the decoder's own output stride
COARSE_CELL_PX0 = 32  # level-0 px per cell of the summary map (CAMELYON16's level 5)


@dataclass(frozen=True)
class InferSettings:
    """How a slide is tiled; the same settings resume the same run."""

    level: int = 0
    tile_size_px: int = 1024
    margin_px: int = 128
    receptive_field_px: float = float("inf")


def output_paths(out_dir: Path, slide_path: Path) -> dict[str, Path]:
    stem = slide_path.stem
    return {
        "pyramid": out_dir / f"{stem}.tif",
        "overlay": out_dir / f"{stem}.png",
        "summary": out_dir / f"{stem}.json",
        "work": out_dir / f"{stem}.infer-work",
    }


def check_outputs(out_dir: Path, slide_path: Path, force: bool) -> None:
    """Refuse, before any work, outputs that exist (without ``force``) or are the slide."""
    paths = output_paths(out_dir, slide_path)
    for key in ("pyramid", "overlay", "summary"):
        check_output(paths[key], inputs={"--slide": slide_path}, force=force, option="--out")


def infer_slide(
    slide_path: Path,
    out_dir: Path,
    predict: Callable,
    checkpoint: Any,
    settings: InferSettings,
    *,
    force: bool = False,
    progress: bool = True,
    on_tile: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """Run one slide; returns the summary written to ``<slide>.json``."""
    paths = output_paths(out_dir, slide_path)
    with open_slide(slide_path) as slide:
        level = slide.check_level(settings.level)
        mpp = slide.mpp
        downsample = slide.level_downsamples[level]
        width_px, height_px = slide.level_dimensions[level]
        grid = TileGrid(width_px, height_px, settings.tile_size_px, settings.margin_px)
        plan = plan_tiles(grid, detect_tissue(slide), downsample)
        fingerprint = {
            "checkpoint_sha256": checkpoint.sha256,
            "level": level,
            "tile_size_px": settings.tile_size_px,
            "margin_px": settings.margin_px,
            "map_cell_px": MAP_CELL_PX,
        }
        store = MapStore(paths["work"], grid, MAP_CELL_PX, fingerprint)
        first_row = store.open(resume=not force)
        _announce(slide_path, plan, first_row, progress)
        try:
            stats = _run_with_bar(slide, level, plan, predict, store, first_row, progress, on_tile)
        finally:
            store.close()
        thumbnail = slide.thumbnail(OVERLAY_MAX_PX)
        dimensions = slide.dimensions
    cell_px0 = MAP_CELL_PX * downsample
    reader = MapReader(paths["work"] / MAP_NAME)
    try:
        factor = max(1, round(COARSE_CELL_PX0 / cell_px0))
        summary_map = summarise_map(reader, factor)
        write_probability_pyramid(
            paths["pyramid"], reader, dimensions, cell_px0, mpp, progress=progress
        )
    finally:
        reader.close()
    write_overlay_png(paths["overlay"], thumbnail, summary_map.coarse)
    summary = {
        "schema": SUMMARY_SCHEMA,
        "slide": str(slide_path),
        "dimensions_px": list(dimensions),
        "mpp": mpp,
        "checkpoint": str(checkpoint.path),
        "checkpoint_step": checkpoint.step,
        "model": checkpoint.model_config,
        "level": level,
        "tile_size_px": settings.tile_size_px,
        "margin_px": settings.margin_px,
        "receptive_field_radius_px": settings.receptive_field_px,
        "tiles": grid.rows * grid.columns,
        "tissue_tiles": plan.tissue_tiles,
        "tissue_mm2": float(plan.tissue_mp.sum()) * 1e6 * (downsample * mpp) ** 2 / 1e6,
        "tumour_area_mm2": summary_map.tumour_cells * (cell_px0 * mpp) ** 2 / 1e6,
        "slide_score": float(summary_map.coarse.max(initial=0.0)),
        "max_probability": summary_map.max_probability,
        "detections": [list(d) for d in detections(summary_map, cell_px0)],
        "resumed_from_tile_row": first_row,
        "tiles_run_now": stats.tiles_run,
        "tissue_mp_per_s_median": stats.median_mp_per_s,
        "run_s": stats.wall_s,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "outputs": {k: str(v) for k, v in paths.items() if k != "work"},
    }
    atomic_write_text(paths["summary"], json.dumps(summary, indent=1, default=str) + "\n")
    shutil.rmtree(paths["work"], ignore_errors=True)
    return summary


def _announce(slide_path: Path, plan, first_row: int, progress: bool) -> None:
    """The up-front estimate: tiles and tissue megapixels still to run."""
    if not progress:
        return
    left = plan.runs[first_row:]
    mp = float(plan.tissue_mp[first_row:].sum())
    resumed = f", resuming at tile row {first_row}" if first_row else ""
    print(
        f"{printable(slide_path.name)}: {int(left.sum())} tissue tiles of "
        f"{plan.runs.size} ({mp:.0f} MP of tissue){resumed}",
        file=sys.stderr,
    )


def _run_with_bar(slide, level, plan, predict, store, first_row, progress, on_tile):
    from tqdm import tqdm

    total = int(plan.runs[first_row:].size)
    with tqdm(total=total, unit="tile", disable=not progress, leave=False, desc="infer") as bar:

        def tick(column: int, row: int) -> None:
            bar.update()
            if on_tile is not None:
                on_tile(column, row)

        return run_tiles(slide, level, plan, predict, store, first_row=first_row, on_tile=tick)
