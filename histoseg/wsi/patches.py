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
import sys
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
from tqdm import tqdm

from histoseg.cli import (
    check_output,
    finite_float,
    int_in_range,
    positive_int,
    printable,
    run_main,
)
from histoseg.errors import ConfigError
from histoseg.files import atomic_output
from histoseg.wsi.annotations import (
    MAX_FILE_BYTES,
    MAX_POLYGONS,
    MAX_VERTICES,
    MAX_VERTICES_PER_POLYGON,
    Annotations,
)
from histoseg.wsi.grid_work import (
    MAX_UNFORCED_S,
    MIN_PATCH_SIZE_PX,
    TUMOR_CELLS_PER_PATCH,
    count_grid,
    estimate_grid_work,
)
from histoseg.wsi.preview import draw_preview, preview_format
from histoseg.wsi.slide import Slide, open_slide
from histoseg.wsi.tissue import (
    CoverageGrid,
    annotation_grid,
    detect_tissue,
)


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
    progress: bool = False,
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
        progress: show a progress bar over the grid positions on stderr.

    Returns:
        PatchRefs in row-major order; only whole patches inside the slide.
    """
    index = _index(slide, patch_size, level, min_tissue, annotations, tissue)
    refs: list[PatchRef] = []
    chunks = _grid_xy(index, stride)
    total = count_grid(index.slide, index.patch_size, index.level, stride)
    with tqdm(total=total, unit="patch", disable=not progress, file=sys.stderr, leave=False) as bar:
        for xs, ys in chunks:
            refs.extend(_refs(index, xs, ys, min_tissue))
            bar.update(len(xs))
    return refs


# Grid positions whose tissue and tumour fractions are computed at once: bounds the
# float64 scratch (~40 arrays of this length) on fine grids over whole slides.
POSITIONS_PER_CHUNK = 1 << 16


def _grid_xy(index: _SlideIndex, stride: int | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Level-0 (xs, ys) of the grid in row-major order, a band of grid rows at a time."""
    stride = index.patch_size if stride is None else stride
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ConfigError(f"stride must be a positive integer (px), got {stride!r}")
    return _grid_bands(index, stride)


def _grid_bands(index: _SlideIndex, stride: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    width, height = index.slide.level_dimensions[index.level]
    cols = np.arange(0, width - index.patch_size + 1, stride)
    rows = np.arange(0, height - index.patch_size + 1, stride)
    band = max(1, POSITIONS_PER_CHUNK // max(len(cols), 1))
    xs_row = np.round(cols * index.downsample).astype(np.int64)
    for first in range(0, len(rows), band):
        ys_band = np.round(rows[first : first + band] * index.downsample).astype(np.int64)
        ys, xs = np.meshgrid(ys_band, xs_row, indexing="ij")
        yield xs.ravel(), ys.ravel()


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
    # surrogateescape: a path holding non-UTF-8 bytes is written as those bytes.
    with (
        atomic_output(path) as tmp,
        tmp.open("w", newline="", encoding="utf-8", errors="surrogateescape") as fh,
    ):
        writer = csv.DictWriter(fh, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for ref in refs:
            row = asdict(ref)
            row["annotations_path"] = row["annotations_path"] or ""
            writer.writerow(row)
    return path


def load_patches(path: str | Path) -> list[PatchRef]:
    """Read a patch list written by :func:`save_patches` (or by hand, same columns)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"patch list not found: {path}")
    refs = []
    try:
        with path.open(newline="", encoding="utf-8", errors="surrogateescape") as fh:
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


def build_parser() -> argparse.ArgumentParser:
    from histoseg.cli import ArgumentParser

    parser = ArgumentParser(
        prog="python -m histoseg.wsi.patches",
        description="List the patches a slide yields (grid over the tissue) as CSV.",
        epilog="Examples:\n"
        "  python -m histoseg.wsi.patches --slide data/synthetic/slide_000.tif \\\n"
        "      --annotations data/synthetic/slide_000.xml --patch-size 1024 --out p.csv\n"
        "  python -m histoseg.wsi.patches --slide S.tif --patch-size 256 --level 1 \\\n"
        "      --min-tissue 0.8 --out p.csv --preview p.png\n\n"
        f"A grid predicted to take more than {MAX_UNFORCED_S:g} s or more memory than is\n"
        "free is refused with its estimate unless --force. Annotation files are refused\n"
        f"past {MAX_FILE_BYTES // 2**20} MiB, {MAX_POLYGONS:,} polygons, "
        f"{MAX_VERTICES_PER_POLYGON:,} vertices per polygon\n"
        f"or {MAX_VERTICES:,} vertices in all.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--slide", required=True, type=Path, help="whole-slide image")
    add("--annotations", type=Path, help="ASAP XML (none: tumour-free slide)")
    add(
        "--patch-size",
        required=True,
        type=int_in_range(MIN_PATCH_SIZE_PX),
        help=f"side in px at --level (>= {MIN_PATCH_SIZE_PX})",
    )
    add("--level", type=int_in_range(0, 64), default=0, help="pyramid level (default 0)")
    add("--min-tissue", type=finite_float(0, 1), default=0.5, help="tissue fraction to keep")
    add("--stride", type=positive_int, help="grid step in px at --level (default: patch size)")
    add(
        "--label-map",
        help="ASAP group labels, e.g. 'metastases=1,normal=0,other=ignore' "
        "(1 tumour, 0 exclusion; default: CAMELYON16 and CAMELYON17 names)",
    )
    add("--out", required=True, type=Path, help="CSV patch list to write")
    add("--preview", type=Path, help="also draw the patches on a thumbnail PNG")
    add("--force", action="store_true", help="overwrite existing outputs; run a long grid")
    add("--no-progress", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    inputs = {"--slide": args.slide, "--annotations": args.annotations}
    check_output(args.out, inputs=inputs, force=args.force)
    if args.preview is not None:
        inputs["--out"] = args.out
        check_output(args.preview, inputs=inputs, force=args.force, option="--preview")
        preview_format(args.preview)  # fail on an unwritable format before any work
    if args.annotations is not None and not args.annotations.is_file():
        raise ConfigError(f"annotation file not found: {printable(args.annotations)}")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        slide = open_slide(args.slide)
        level = slide.check_level(args.level)
        label_map = parse_label_map(args.label_map) if args.label_map else None
        annotations = Annotations.from_xml(args.annotations, label_map)
        work = estimate_grid_work(slide, args.patch_size, level, args.stride, annotations)
        print(f"{printable(args.slide)}: {work}", flush=True)
        work.check(printable(args.slide), force=args.force)
        refs = grid_patches(
            slide,
            args.patch_size,
            level,
            args.min_tissue,
            annotations,
            args.stride,
            progress=not args.no_progress and sys.stderr.isatty(),
        )
    for warning in caught:  # suspicious but usable input: one line each, and go on
        print(f"warning: {printable(str(warning.message))}", file=sys.stderr)
    save_patches(args.out, refs)
    if args.preview is not None:
        try:
            draw_preview(slide, refs, annotations, args.preview)
        except BaseException:
            # The command failed: do not leave its CSV behind as if it had succeeded.
            args.out.unlink(missing_ok=True)
            raise
    n_tumor = sum(r.is_tumor for r in refs)
    preview = f", preview {printable(args.preview)}" if args.preview else ""
    print(
        f"{printable(args.slide)}: kept {len(refs)} patches ({n_tumor} with tumour), dropped "
        f"{work.positions - len(refs)} with tissue < {args.min_tissue:g}, of {work.positions} "
        f"on the {args.patch_size} px grid at level {level} -> {printable(args.out)}{preview}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
