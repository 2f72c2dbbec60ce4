"""Synthetic whole-slide images: the embedded default data of histoseg.

A slide is an analytic description (tissue islands, tumour polygons, stain fields;
:mod:`histoseg.wsi.design`) that is evaluated tile by tile with vectorised numpy
(:mod:`histoseg.wsi.render`), so a gigapixel level 0 is never in memory.
Two tasks share the tissue and stain model: ``local``, whose tumour has its own texture
everywhere, and ``context`` (:mod:`histoseg.wsi.context`), whose lesions look like normal
tissue inside and are marked only by their margin.
:mod:`histoseg.wsi.pyramid` streams the tiles into a pyramidal TIFF OpenSlide reads, and
the tumour polygons are written as ASAP XML with CAMELYON16 group names.

Example:
    python -m histoseg.wsi.synth --out data/synthetic --slides 6 --size 20000x16000
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from histoseg.cli import printable, run_main
from histoseg.errors import ConfigError, SlideError
from histoseg.files import atomic_output
from histoseg.wsi.annotations import write_asap_xml
from histoseg.wsi.context import (
    CONTEXT_GENERATOR,
)
from histoseg.wsi.design import (
    BACKGROUND_RGB,
    DEFAULT_TASK,
    TASKS,
    SlideDesign,
    check_task,
    make_design,
)
from histoseg.wsi.pyramid import write_pyramid_tiff
from histoseg.wsi.render import TileRenderer
from histoseg.wsi.slide import open_slide
from histoseg.wsi.synth_work import (
    MANIFEST,
    check_own_files,
    check_recipe,
    estimate_synth_work,
    read_manifest,
)


def write_synthetic_slide(
    path_tif: str | Path,
    size_px: tuple[int, int] = (8000, 6000),
    seed: int = 0,
    tile_px: int = 512,
    mpp: float = 0.25,
    *,
    tumor: bool = True,
    progress: bool = True,
    threads: int | None = None,
    task: str = DEFAULT_TASK,
) -> tuple[Path, Path | None]:
    """Write one synthetic pyramidal JPEG-tiled TIFF and its ASAP XML.

    Args:
        path_tif: output TIFF; the XML goes beside it with the suffix ``.xml``.
        size_px: level-0 (width, height) in pixels.
        seed: the same seed gives byte-identical files.
        tile_px: TIFF tile size (a multiple of 32, e.g. 256 or 512).
        mpp: micrometres per level-0 pixel written to the resolution tags.
        tumor: False makes a "normal" slide: no tumour and no XML.
        progress: show a progress bar on stderr.
        threads: render threads (default: CPU count, at most 4).
        task: "local" (textured tumour) or "context" (lesions marked only by a margin).

    Returns:
        (tif_path, xml_path), xml_path None for a normal slide.
    """
    width_px, height_px = (int(v) for v in size_px)
    if width_px < 64 or height_px < 64:
        raise ConfigError(f"slide size must be at least 64x64 px, got {width_px}x{height_px}")
    if tile_px <= 0 or tile_px % 32:
        raise ConfigError(f"tile_px must be a positive multiple of 32, got {tile_px}")
    path_tif = Path(path_tif)
    design = make_design(width_px, height_px, seed, tumor=tumor, task=task)
    renderer = TileRenderer(design, tile_px)
    write_pyramid_tiff(
        path_tif,
        renderer.render,
        (width_px, height_px),
        tile_px=tile_px,
        mpp=mpp,
        background_rgb=tuple(int(v) for v in BACKGROUND_RGB),
        threads=threads,
        progress=progress,
        software="histoseg.wsi.synth",
    )

    xml_path = path_tif.with_suffix(".xml")
    if design.groups:
        write_asap_xml(xml_path, design.groups)
        return path_tif, xml_path
    if xml_path.exists():
        xml_path.unlink()
    return path_tif, None


def slide_seed(dataset_seed: int, index: int) -> int:
    """The design seed of slide ``index`` of a synthetic dataset made with ``dataset_seed``."""
    return dataset_seed * 1000 + index


def dataset_designs(
    n_slides: int, size_px: tuple[int, int], seed: int = 0, task: str = DEFAULT_TASK
) -> dict[str, SlideDesign]:
    """File name -> design of each slide :func:`ensure_synthetic_dataset` makes (no pixels)."""
    width_px, height_px = (int(v) for v in size_px)
    return {
        name: make_design(width_px, height_px, slide_seed(seed, i), tumor=tumor, task=task)
        for i, (name, tumor) in enumerate(synthetic_slide_names(n_slides))
    }


def synthetic_slide_names(n_slides: int) -> list[tuple[str, bool]]:
    """(file name, has tumour) for a synthetic dataset: every third slide is normal."""
    return [(f"slide_{i:03d}.tif", i % 3 != 2) for i in range(n_slides)]


def ensure_synthetic_dataset(
    folder: str | Path,
    n_slides: int = 6,
    size_px: tuple[int, int] = (8000, 6000),
    seed: int = 0,
    *,
    tile_px: int = 512,
    mpp: float = 0.25,
    progress: bool = True,
    task: str = DEFAULT_TASK,
    force: bool = False,
) -> list[tuple[Path, Path | None]]:
    """Make (or reuse) a folder of synthetic slides; returns [(tif, xml or None)].

    Idempotent: slides already written with the same size, seed and tile size are kept
    (a small manifest records how they were made), so the training CLI may call it on every
    start. Slide ``i`` uses seed ``seed * 1000 + i`` (:func:`slide_seed`); every third
    slide is a normal one. ``task`` is "local" or "context" (see :func:`make_design`).

    The recipe is checked before the folder is made, and a ``slide_NNN.tif``/``.xml`` or a
    manifest of the user's in the way is refused unless ``force``
    (:func:`~histoseg.wsi.synth_work.check_own_files`): a bad call leaves nothing behind.
    """
    import json

    check_recipe(n_slides, size_px, tile_px, mpp)
    check_task(task)
    folder = Path(folder)
    check_own_files(folder, [name for name, _ in synthetic_slide_names(n_slides)], force=force)
    folder.mkdir(parents=True, exist_ok=True)
    manifest_path = folder / MANIFEST
    recipe = {
        "size_px": [int(size_px[0]), int(size_px[1])],
        "seed": int(seed),
        "tile_px": int(tile_px),
        "mpp": float(mpp),
        "generator": "histoseg.wsi.synth/1",
    }
    if task != DEFAULT_TASK:  # "local" manifests stay as they were before tasks existed
        recipe["task"] = task
        # slides of an older lesion geometry are redrawn, not reused
        recipe["task_generator"] = CONTEXT_GENERATOR
    done = read_manifest(folder) or {}  # a manifest that does not parse: start afresh
    out: list[tuple[Path, Path | None]] = []
    for i, (name, has_tumor) in enumerate(synthetic_slide_names(n_slides)):
        tif = folder / name
        xml = tif.with_suffix(".xml")
        entry = dict(done[name]) if isinstance(done.get(name), dict) else {}
        recorded_bytes = entry.pop("bytes", None)
        if entry == recipe and tif.exists() and (xml.exists() or not has_tumor):
            if _slide_is_sound(tif, recorded_bytes, size_px):
                out.append((tif, xml if has_tumor else None))
                continue
            # Say so: a silent rewrite of a multi-GB slide would look like a hang.
            print(
                f"warning: {printable(tif)} is damaged (truncated or unreadable); regenerating it",
                file=sys.stderr,
            )
        out.append(
            write_synthetic_slide(
                tif,
                size_px,
                slide_seed(seed, i),
                tile_px,
                mpp,
                tumor=has_tumor,
                progress=progress,
                task=task,
            )
        )
        # The byte count lets the next run spot a truncated slide without decoding it.
        done[name] = {**recipe, "bytes": tif.stat().st_size}
        with atomic_output(manifest_path) as tmp:
            tmp.write_text(json.dumps({"slides": done}, indent=1, sort_keys=True))
    return out


def _slide_is_sound(tif: Path, recorded_bytes: object, size_px: tuple[int, int]) -> bool:
    """Cheap check that a slide on disk is whole: the size the manifest recorded, and
    OpenSlide opens it at the expected size and decodes a tile at its far corner.

    Reading one small level-0 region costs milliseconds, so reuse stays cheap.
    """
    if recorded_bytes is not None and tif.stat().st_size != recorded_bytes:
        return False
    width_px, height_px = (int(v) for v in size_px)
    try:
        with open_slide(tif) as slide:
            if slide.dimensions != (width_px, height_px):
                return False
            corner = min(32, width_px, height_px)
            slide.read_region((width_px - corner, height_px - corner), 0, (corner, corner))
    except SlideError:
        return False
    return True


# --- CLI -------------------------------------------------------------------------------
def parse_size(text: str) -> tuple[int, int]:
    """'20000x16000' -> (20000, 16000)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ConfigError(
            f"size must look like WIDTHxHEIGHT (e.g. 20000x16000), got {text!r}"
        ) from None
    if w < 64 or h < 64:
        raise ConfigError(f"size must be at least 64x64 px, got {text!r}")
    return w, h


def tile_size(text: str) -> int:
    """An argparse type: a TIFF tile side, a multiple of 32 in [32, 8192]."""
    allowed = "must be a multiple of 32 in [32, 8192]"
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}") from None
    if not 32 <= value <= 8192 or value % 32:
        raise argparse.ArgumentTypeError(f"{allowed}, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from histoseg.cli import ArgumentParser, finite_float, non_negative_int

    parser = ArgumentParser(
        prog="python -m histoseg.wsi.synth",
        description="Write synthetic pyramidal whole-slide TIFFs with ASAP XML tumour annotations.",
        epilog="Examples:\n"
        "  python -m histoseg.wsi.synth --out data/synthetic --slides 6 --size 20000x16000\n"
        "  python -m histoseg.wsi.synth --out /tmp/s --slides 1 --size 8000x6000 --seed 3\n"
        "  python -m histoseg.wsi.synth --out data/synthetic-context --task context\n\n"
        "The work is estimated first (disk, memory, time): a slide predicted to take more than\n"
        "a minute, or a dataset over the free memory or disk, is refused unless --force. Files\n"
        "in --out that histoseg did not write (a slide_000.tif of your own) are never replaced\n"
        "without --force.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--out", required=True, type=Path, help="output folder")
    parser.add_argument("--slides", type=int, default=6, help="number of slides (default 6)")
    parser.add_argument("--size", default="8000x6000", help="level-0 WIDTHxHEIGHT px")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument(
        "--tile", type=tile_size, default=512, help="TIFF tile size in px (multiple of 32)"
    )
    parser.add_argument(
        "--mpp",
        type=finite_float(0, 1000, lo_open=True),
        default=0.25,
        help="micrometres per pixel, in (0, 1000]",
    )
    parser.add_argument(
        "--task",
        choices=TASKS,
        default=DEFAULT_TASK,
        help="local: tumour has its own texture; context: lesions look like normal tissue "
        "inside and only their margin marks them (default local)",
    )
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace files in --out that histoseg did not write; run a long or large job",
    )
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from histoseg.cli import check_output_folder

    args = build_parser().parse_args(argv)
    size = parse_size(args.size)
    check_recipe(args.slides, size, args.tile, args.mpp)
    check_output_folder(args.out)
    names = [name for name, _ in synthetic_slide_names(args.slides)]
    check_own_files(args.out, names, force=args.force)
    work = estimate_synth_work(args.out, args.slides, size, args.tile)
    print(f"{printable(args.out)}: {work}", flush=True)
    work.check(f"--size {args.size}", force=args.force)
    pairs = ensure_synthetic_dataset(
        args.out,
        args.slides,
        size,
        args.seed,
        tile_px=args.tile,
        mpp=args.mpp,
        progress=not args.no_progress,
        task=args.task,
        force=args.force,
    )
    for tif, xml in pairs:
        size_mb = tif.stat().st_size / 1e6
        shown = printable(xml) if xml else "(normal slide, no XML)"
        print(f"{printable(tif)}  {size_mb:7.1f} MB  {shown}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
