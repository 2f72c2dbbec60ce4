"""Which squares to train on: patch grids and random samplers over tissue, shards, patch lists.

A :class:`PatchRef` names one patch (slide, level-0 top-left corner, level, size) with its
tissue and tumour fractions; lists of them are what the data pipeline reads, what workers
shard, and what ``python -m histoseg.wsi.patches`` writes as CSV.

Example:
    python -m histoseg.wsi.patches --slide data/synthetic/slide_000.tif \\
        --annotations data/synthetic/slide_000.xml --patch-size 1024 --out patches.csv
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from histoseg.cli import run_main
from histoseg.errors import ConfigError
from histoseg.wsi.annotations import Annotations
from histoseg.wsi.slide import Slide, open_slide
from histoseg.wsi.tissue import CoverageGrid, annotation_grid, detect_tissue

# Tumour fractions are counted on a grid this many cells across a patch: fine enough for
# small metastases, coarse enough to stay cheap on a whole slide.
TUMOR_CELLS_PER_PATCH = 32


@dataclass(frozen=True)
class PatchRef:
    """One square patch of a slide.

    Attributes:
        slide_path: the slide file.
        x, y: level-0 pixel coordinates of the top-left corner.
        level: pyramid level the patch is read at.
        patch_size: side in pixels at ``level``.
        tissue_fraction: share of the patch covered by tissue (0..1).
        tumor_fraction: share covered by tumour (0..1), from the annotations.
        annotations_path: the ASAP XML, or None for a slide without tumour.
    """

    slide_path: str
    x: int
    y: int
    level: int
    patch_size: int
    tissue_fraction: float = 1.0
    tumor_fraction: float = 0.0
    annotations_path: str | None = None

    @property
    def is_tumor(self) -> bool:
        return self.tumor_fraction > 0

    def region_level0(self, downsample: float) -> tuple[int, int, int, int]:
        """(x, y, width, height) in level-0 px given the level's downsample."""
        side = round(self.patch_size * downsample)
        return self.x, self.y, side, side


# --- per-slide context ---------------------------------------------------------------
@dataclass
class _SlideIndex:
    slide: Slide
    annotations: Annotations
    annotations_path: str | None
    tissue: CoverageGrid
    tumor: CoverageGrid | None
    level: int
    patch_size: int
    downsample: float
    extent_level0: float


def _index(
    slide: Slide | str | Path,
    patch_size: int,
    level: int,
    min_tissue: float,
    annotations: Annotations | str | Path | None,
    tissue: CoverageGrid | None,
) -> _SlideIndex:
    if not isinstance(slide, Slide):
        slide = open_slide(slide)
    if not isinstance(patch_size, (int, np.integer)) or patch_size < 1:
        raise ConfigError(f"patch_size must be a positive integer (px), got {patch_size!r}")
    level = slide.check_level(level)
    if not 0.0 <= min_tissue <= 1.0:
        raise ConfigError(f"min_tissue must be in [0, 1], got {min_tissue}")
    width, height = slide.level_dimensions[level]
    if patch_size > width or patch_size > height:
        raise ConfigError(
            f"{slide.path}: patch of {patch_size} px is larger than the slide at level {level} "
            f"({width}x{height} px)"
        )
    if annotations is None or isinstance(annotations, (str, Path)):
        annotations = Annotations.from_xml(annotations)
    annotations.check_bounds(slide.dimensions)
    source = annotations.source
    annotations_path = source if source and Path(source).is_file() else None
    downsample = slide.level_downsamples[level]
    extent = patch_size * downsample
    if tissue is None:
        tissue = detect_tissue(slide)
    tumor = None
    if annotations.has_tumor:
        tumor = annotation_grid(
            annotations,
            slide.dimensions,
            min(tissue.downsample, extent / TUMOR_CELLS_PER_PATCH),
        )
    return _SlideIndex(
        slide,
        annotations,
        annotations_path,
        tissue,
        tumor,
        level,
        int(patch_size),
        downsample,
        extent,
    )


def _refs(index: _SlideIndex, xs: np.ndarray, ys: np.ndarray, min_tissue: float) -> list[PatchRef]:
    tissue = index.tissue.fractions(xs, ys, index.extent_level0, index.extent_level0)
    if index.tumor is not None:
        tumor = index.tumor.fractions(xs, ys, index.extent_level0, index.extent_level0)
    else:
        tumor = np.zeros_like(tissue)
    keep = tissue >= min_tissue if min_tissue > 0 else np.ones_like(tissue, dtype=bool)
    path = str(index.slide.path)
    return [
        PatchRef(
            path,
            int(x),
            int(y),
            index.level,
            index.patch_size,
            round(float(t), 4),
            round(float(u), 4),
            index.annotations_path,
        )
        for x, y, t, u in zip(xs[keep], ys[keep], tissue[keep], tumor[keep], strict=True)
    ]


# --- grid ----------------------------------------------------------------------------
def grid_patches(
    slide: Slide | str | Path,
    patch_size: int,
    level: int = 0,
    min_tissue: float = 0.5,
    annotations: Annotations | str | Path | None = None,
    stride: int | None = None,
    *,
    tissue: CoverageGrid | None = None,
) -> list[PatchRef]:
    """All patches of a regular grid that hold at least ``min_tissue`` tissue.

    Args:
        slide: an open Slide or a path.
        patch_size: side in pixels at ``level``.
        level: pyramid level.
        min_tissue: drop patches whose tissue fraction is below this (0 keeps all).
        annotations: Annotations, an XML path, or None (no tumour).
        stride: grid step in pixels at ``level`` (default: ``patch_size``, no overlap).
        tissue: a precomputed tissue grid (default: :func:`detect_tissue`).

    Returns:
        PatchRefs in row-major order; only whole patches inside the slide.
    """
    index = _index(slide, patch_size, level, min_tissue, annotations, tissue)
    return _refs(index, *_grid_xy(index, stride), min_tissue)


def _grid_xy(index: _SlideIndex, stride: int | None) -> tuple[np.ndarray, np.ndarray]:
    stride = index.patch_size if stride is None else stride
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ConfigError(f"stride must be a positive integer (px), got {stride!r}")
    width, height = index.slide.level_dimensions[index.level]
    cols = np.arange(0, width - index.patch_size + 1, stride)
    rows = np.arange(0, height - index.patch_size + 1, stride)
    ys, xs = np.meshgrid(rows, cols, indexing="ij")
    xs = np.round(xs.ravel() * index.downsample).astype(np.int64)
    ys = np.round(ys.ravel() * index.downsample).astype(np.int64)
    return xs, ys


def count_grid(slide: Slide, patch_size: int, level: int = 0, stride: int | None = None) -> int:
    """How many grid positions there are before tissue filtering."""
    stride = stride or patch_size
    width, height = slide.level_dimensions[level]
    return max(0, (width - patch_size) // stride + 1) * max(0, (height - patch_size) // stride + 1)


# --- random sampler ---------------------------------------------------------------------
def sample_patches(
    slide: Slide | str | Path,
    patch_size: int,
    n: int,
    *,
    seed: int = 0,
    level: int = 0,
    min_tissue: float = 0.5,
    annotations: Annotations | str | Path | None = None,
    tumor_ratio: float | None = None,
    batch_size: int = 1,
    tissue: CoverageGrid | None = None,
) -> list[PatchRef]:
    """``n`` patches at random positions over the tissue, deterministic for a seed.

    Args:
        slide, patch_size, level, min_tissue, annotations, tissue: as in :func:`grid_patches`.
        n: number of patches wanted.
        seed: random seed.
        tumor_ratio: share of tumour patches per batch (the study's ``batch_tumor_ratio``);
            None draws uniformly over the tissue whatever the label.
        batch_size: the batch the ratio holds for; the list is ordered batch by batch.

    Returns:
        Up to ``n`` PatchRefs (fewer, with a warning, when the slide has too little tissue).
    """
    if not isinstance(n, (int, np.integer)) or n < 0:
        raise ConfigError(f"n must be a non-negative integer, got {n!r}")
    index = _index(slide, patch_size, level, min_tissue, annotations, tissue)
    rng = np.random.default_rng(seed)
    width, height = index.slide.level_dimensions[index.level]
    max_x = (width - index.patch_size) * index.downsample
    max_y = (height - index.patch_size) * index.downsample

    def snap(values: np.ndarray) -> np.ndarray:
        # Corners on the level's pixel grid, so the level's pixels and the mask line up.
        d = index.downsample
        return np.round(np.round(values / d) * d).astype(np.int64)

    def uniform(count: int) -> list[PatchRef]:
        xs = snap(rng.uniform(0, max_x, count))
        ys = snap(rng.uniform(0, max_y, count))
        return _refs(index, xs, ys, min_tissue)

    def around_tumor(count: int) -> list[PatchRef]:
        cells = np.argwhere(index.tumor.mask) if index.tumor is not None else np.empty((0, 2))
        if len(cells) == 0:
            return []
        pick = cells[rng.integers(len(cells), size=count)]
        d = index.tumor.downsample
        cx = (pick[:, 1] + rng.uniform(0, 1, count)) * d
        cy = (pick[:, 0] + rng.uniform(0, 1, count)) * d
        xs = snap(np.clip(cx - index.extent_level0 / 2, 0, max_x))
        ys = snap(np.clip(cy - index.extent_level0 / 2, 0, max_y))
        return [r for r in _refs(index, xs, ys, min_tissue) if r.is_tumor]

    if tumor_ratio is None:
        refs = _draw(uniform, n)
    else:
        tumor = _draw(around_tumor, n)
        normal = _draw(lambda c: [r for r in uniform(c) if not r.is_tumor], n)
        refs = arrange_by_tumor_ratio(tumor, normal, n, tumor_ratio, batch_size, seed=seed)
    if len(refs) < n:
        warnings.warn(
            f"{index.slide.path}: only {len(refs)} of {n} patches of {index.patch_size} px "
            f"hold >= {min_tissue} tissue",
            stacklevel=2,
        )
    return refs


def _draw(draw, n: int, rounds: int = 20) -> list[PatchRef]:
    out: list[PatchRef] = []
    for _ in range(rounds):
        if len(out) >= n:
            break
        out.extend(draw(max(64, 4 * (n - len(out)))))
    return out[:n]


def arrange_by_tumor_ratio(
    tumor: Sequence[PatchRef],
    normal: Sequence[PatchRef],
    n: int,
    tumor_ratio: float,
    batch_size: int = 1,
    *,
    seed: int = 0,
) -> list[PatchRef]:
    """Interleave tumour and normal patches so each batch holds ``tumor_ratio`` tumour.

    Works on pools from many slides. Each batch of ``batch_size`` gets
    floor(ratio * batch_size) tumour patches, plus one more with the probability of the
    remainder, so the ratio holds on average even at batch size 1. Pools are used
    without replacement while they last, then reused; an empty pool gives its share to
    the other (with a warning).
    """
    if not 0.0 <= tumor_ratio <= 1.0:
        raise ConfigError(f"tumor_ratio must be in [0, 1], got {tumor_ratio}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be >= 1, got {batch_size}")
    rng = np.random.default_rng([seed, 1])
    pools = [list(tumor), list(normal)]
    if not pools[0] and tumor_ratio > 0 and pools[1]:
        warnings.warn(
            "no tumour patches to draw from; batches hold normal tissue only", stacklevel=2
        )
    if not pools[0] and not pools[1]:
        return []
    orders = [rng.permutation(len(p)) for p in pools]
    used = [0, 0]

    def take(which: int) -> PatchRef:
        if not pools[which]:
            which = 1 - which
        pool, order = pools[which], orders[which]
        ref = pool[order[used[which] % len(pool)]]
        used[which] += 1
        return ref

    out: list[PatchRef] = []
    while len(out) < n:
        size = min(batch_size, n - len(out))
        exact = tumor_ratio * size
        k = math.floor(exact) + int(rng.random() < exact - math.floor(exact))
        batch = [take(0) for _ in range(k)] + [take(1) for _ in range(size - k)]
        out.extend(batch[i] for i in rng.permutation(len(batch)))
    return out


# --- shards and files -------------------------------------------------------------------
def shard(
    patch_refs: Sequence[PatchRef], rank: int, size: int, *, equal: bool = False
) -> list[PatchRef]:
    """The share of worker ``rank`` of ``size``: disjoint, and together they cover the list.

    Args:
        equal: drop the remainder so every rank gets the same count (collective ops
            such as allreduce hang if one rank runs out of batches first).
    """
    if not isinstance(size, (int, np.integer)) or size < 1:
        raise ConfigError(f"shard size must be >= 1, got {size!r}")
    if not isinstance(rank, (int, np.integer)) or not 0 <= rank < size:
        raise ConfigError(f"rank must be in 0..{size - 1}, got {rank!r}")
    refs = list(patch_refs)
    if equal:
        refs = refs[: len(refs) // size * size]
    return refs[rank::size]


CSV_FIELDS = [f.name for f in fields(PatchRef)]


def save_patches(path: str | Path, refs: Sequence[PatchRef]) -> Path:
    """Write a patch list as CSV (one row per patch, header = PatchRef fields)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    try:
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for ref in refs:
                row = asdict(ref)
                row["annotations_path"] = row["annotations_path"] or ""
                writer.writerow(row)
        os.replace(tmp, path)
    except BaseException:
        # Nothing half-written: a failed write or rename must not leave the .part behind.
        tmp.unlink(missing_ok=True)
        raise
    return path


def load_patches(path: str | Path) -> list[PatchRef]:
    """Read a patch list written by :func:`save_patches` (or by hand, same columns)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"patch list not found: {path}")
    refs = []
    try:
        with path.open(newline="") as fh:
            reader = csv.DictReader(fh)
            missing = [f for f in CSV_FIELDS[:5] if f not in (reader.fieldnames or [])]
            if missing:
                raise ConfigError(f"{path}: missing column(s) {missing}; expected {CSV_FIELDS}")
            for line, row in enumerate(reader, start=2):
                try:
                    ref = PatchRef(
                        slide_path=row["slide_path"],
                        x=int(row["x"]),
                        y=int(row["y"]),
                        level=int(row["level"]),
                        patch_size=int(row["patch_size"]),
                        tissue_fraction=float(row.get("tissue_fraction") or 1.0),
                        tumor_fraction=float(row.get("tumor_fraction") or 0.0),
                        annotations_path=row.get("annotations_path") or None,
                    )
                except (TypeError, ValueError) as exc:
                    raise ConfigError(f"{path}:{line}: bad patch row ({exc})") from None
                if ref.patch_size < 1 or ref.level < 0 or not ref.slide_path:
                    raise ConfigError(f"{path}:{line}: bad patch row {row}")
                refs.append(ref)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ConfigError(f"{path}: not a readable CSV patch list ({exc})") from None
    return refs


# --- preview -------------------------------------------------------------------------
def draw_preview(
    slide: Slide,
    refs: Sequence[PatchRef],
    annotations: Annotations,
    path: str | Path,
    max_size_px: int = 1600,
) -> Path:
    """PNG of the slide thumbnail with kept patches (green, tumour ones orange) and the
    tumour outline (blue; exclusions dashed-free cyan)."""
    from PIL import Image, ImageDraw

    thumb = slide.thumbnail(max_size_px)
    scale = thumb.shape[1] / slide.dimensions[0]
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    for ref in refs:
        x, y, w, h = ref.region_level0(slide.level_downsamples[ref.level])
        colour = (255, 140, 0) if ref.is_tumor else (0, 170, 0)
        draw.rectangle(
            [x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=colour
        )
    for a in annotations.annotations:
        points = [(float(px) * scale, float(py) * scale) for px, py in a.vertices]
        colour = (0, 200, 255) if a.label == 0 else (0, 60, 255)
        draw.line([*points, points[0]], fill=colour, width=2)
    path = Path(path)
    fmt = preview_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Atomic: draw into a sibling temporary file, rename when complete, remove on failure.
    tmp = path.with_name(path.name + ".part")
    try:
        image.save(tmp, format=fmt)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


# Formats PIL writes an RGB image to with no extra options (others need a mode or plugin).
PREVIEW_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".bmp": "BMP",
}


def preview_format(path: str | Path) -> str:
    """The PIL format a preview at ``path`` is written in, from its extension.

    Raises:
        ConfigError: ``path`` is a directory, or its extension is not one of
            :data:`PREVIEW_FORMATS` that this PIL can write.
    """
    from PIL import Image, features

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"preview {path} is a directory; give a file such as p.png")
    fmt = PREVIEW_FORMATS.get(path.suffix.lower())
    Image.init()
    # WEBP needs PIL built with libwebp; check so the failure comes before any work.
    if fmt is None or fmt not in Image.SAVE or (fmt == "WEBP" and not features.check("webp")):
        allowed = ", ".join(e for e, f in PREVIEW_FORMATS.items() if f in Image.SAVE)
        raise ConfigError(f"preview {path}: unsupported image extension (use one of {allowed})")
    return fmt


# --- CLI -------------------------------------------------------------------------------
def parse_label_map(text: str) -> dict[str, int | None]:
    """'metastases=1,normal=0,x=ignore' -> {'metastases': 1, 'normal': 0, 'x': None}."""
    out: dict[str, int | None] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        group, sep, value = item.rpartition("=")
        if not sep or not group or value not in {"0", "1", "ignore"}:
            raise ConfigError(
                f"label map entry {item!r} must be GROUP=1 (tumour), GROUP=0 (exclusion) "
                "or GROUP=ignore"
            )
        out[group] = None if value == "ignore" else int(value)
    if not out:
        raise ConfigError(f"empty label map {text!r}")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    from histoseg.cli import ArgumentParser

    parser = ArgumentParser(
        prog="python -m histoseg.wsi.patches",
        description="List the patches a slide yields (grid over the tissue) as CSV.",
        epilog="Examples:\n"
        "  python -m histoseg.wsi.patches --slide data/synthetic/slide_000.tif \\\n"
        "      --annotations data/synthetic/slide_000.xml --patch-size 1024 --out p.csv\n"
        "  python -m histoseg.wsi.patches --slide S.tif --patch-size 256 --level 1 \\\n"
        "      --min-tissue 0.8 --out p.csv --preview p.png",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--slide", required=True, type=Path, help="whole-slide image")
    parser.add_argument("--annotations", type=Path, help="ASAP XML (none: tumour-free slide)")
    parser.add_argument("--patch-size", required=True, type=int, help="side in px at --level")
    parser.add_argument("--level", type=int, default=0, help="pyramid level (default 0)")
    parser.add_argument("--min-tissue", type=float, default=0.5, help="tissue fraction to keep")
    parser.add_argument(
        "--stride", type=int, help="grid step in px at --level (default: patch size)"
    )
    parser.add_argument(
        "--label-map",
        help="ASAP group labels, e.g. 'metastases=1,normal=0,other=ignore' "
        "(1 tumour, 0 exclusion; default: CAMELYON16 and CAMELYON17 names)",
    )
    parser.add_argument("--out", required=True, type=Path, help="CSV patch list to write")
    parser.add_argument("--preview", type=Path, help="also draw the patches on a thumbnail PNG")
    parser.add_argument("--force", action="store_true", help="overwrite existing outputs")
    args = parser.parse_args(argv)

    for out in (args.out, args.preview):
        # A directory can never be overwritten by a file, --force or not.
        if out is not None and out.is_dir():
            raise ConfigError(f"{out} is a directory; give a file path")
        if out is not None and out.exists() and not args.force:
            raise ConfigError(f"{out} exists; pass --force to overwrite")
    if args.preview is not None:
        preview_format(args.preview)  # fail on an unwritable format before any work
    if args.annotations is not None and not args.annotations.is_file():
        raise ConfigError(f"annotation file not found: {args.annotations}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slide = open_slide(args.slide)
        label_map = parse_label_map(args.label_map) if args.label_map else None
        annotations = Annotations.from_xml(args.annotations, label_map)
        refs = grid_patches(
            slide, args.patch_size, args.level, args.min_tissue, annotations, args.stride
        )
    for warning in caught:  # suspicious but usable input: one line each, and go on
        print(f"warning: {warning.message}", file=sys.stderr)
    total = count_grid(slide, args.patch_size, args.level, args.stride)
    save_patches(args.out, refs)
    if args.preview is not None:
        try:
            draw_preview(slide, refs, annotations, args.preview)
        except BaseException:
            # The command failed: do not leave its CSV behind as if it had succeeded.
            args.out.unlink(missing_ok=True)
            raise
    n_tumor = sum(r.is_tumor for r in refs)
    print(
        f"{args.slide}: kept {len(refs)} patches ({n_tumor} with tumour), dropped "
        f"{total - len(refs)} with tissue < {args.min_tissue:g}, of {total} on the "
        f"{args.patch_size} px grid at level {args.level} -> {args.out}"
        + (f", preview {args.preview}" if args.preview else "")
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
