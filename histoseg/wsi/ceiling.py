"""The Bayes ceiling of a synthetic task: the best score a P x P field of view allows.

A synthetic slide's generator knows which pixels carry evidence of tumour (their texture
is not normal tissue's: :meth:`TileRenderer.evidence_mask`). A model that sees one patch
at a time can label every pixel of a patch that holds some evidence (on the "context"
task the margin's two bands also say which side is the lesion), but a patch with none
looks like normal tissue wherever it lies, so all such patches must get one answer: the
Bayes rule gives them the class most of their pixels have. The ceiling is the pixel
accuracy and mIoU of that rule over a set of patches, computed exactly from the geometry
at full level-0 resolution. On "local" the tumour is its own evidence and the ceiling is
1 at every patch size; on "context" it rises with the patch size.

Example:
    python -m histoseg.wsi.ceiling --task context --sizes 256 512 1024 2048
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np

from histoseg.errors import ConfigError
from histoseg.wsi.design import SlideDesign
from histoseg.wsi.render import TileRenderer

#: Tile size the renderer is built with; only its mask methods are used here.
_RENDER_TILE_PX = 512


@dataclass(frozen=True)
class Ceiling:
    """The best pixel metrics any model seeing ``patch_size_px`` squares can reach.

    ``decidable_fraction`` is the share of pixels in patches that hold evidence;
    ``undecided_as_tumour`` says which answer the Bayes rule gives the other patches.
    """

    patch_size_px: int
    accuracy: float
    miou: float
    iou_tumour: float
    decidable_fraction: float
    tumour_fraction: float
    pixels: int
    undecided_as_tumour: bool


def grid_origins(design: SlideDesign, patch_size_px: int) -> list[tuple[int, int]]:
    """Level-0 corners of the non-overlapping P x P patches wholly inside the slide."""
    return [
        (x, y)
        for y in range(0, design.height_px - patch_size_px + 1, patch_size_px)
        for x in range(0, design.width_px - patch_size_px + 1, patch_size_px)
    ]


def patch_counts(
    design: SlideDesign,
    patch_size_px: int,
    origins: Iterable[tuple[int, int]] | None = None,
    min_tissue: float = 0.0,
) -> np.ndarray:
    """Per patch: (pixels, tumour pixels, holds evidence 0/1), shape (n, 3) int64.

    ``origins`` are level-0 corners (default :func:`grid_origins`); patches are level-0
    squares of ``patch_size_px``; patches with less than ``min_tissue`` tissue are left out.
    """
    if patch_size_px < 1:
        raise ConfigError(f"patch_size_px must be >= 1, got {patch_size_px}")
    renderer = TileRenderer(design, _RENDER_TILE_PX)
    if origins is None:
        origins = grid_origins(design, patch_size_px)
    rows = []
    for x, y in origins:
        if min_tissue > 0:
            tissue = renderer.tissue_mask(int(x), int(y), patch_size_px, patch_size_px)
            if tissue.mean() < min_tissue:
                continue
        tumour = renderer.tumor_mask(int(x), int(y), patch_size_px, patch_size_px)
        evidence = renderer.evidence_mask(int(x), int(y), patch_size_px, patch_size_px)
        rows.append((tumour.size, int(tumour.sum()), int(evidence.any())))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def ceiling_from_counts(patch_size_px: int, counts: np.ndarray) -> Ceiling:
    """The Bayes ceiling from :func:`patch_counts` rows (of one or many slides)."""
    counts = np.asarray(counts, dtype=np.int64).reshape(-1, 3)
    pixels, tumour, decided = counts[:, 0], counts[:, 1], counts[:, 2].astype(bool)
    total = int(pixels.sum())
    if total == 0:
        raise ConfigError("the Bayes ceiling needs at least one patch; got none")
    undecided_tumour = int(tumour[~decided].sum())
    undecided_normal = int(pixels[~decided].sum()) - undecided_tumour
    as_tumour = undecided_tumour > undecided_normal
    all_tumour = int(tumour.sum())
    # Confusion of the Bayes rule: decided pixels right, undecided ones all one class.
    true_pos = all_tumour - (0 if as_tumour else undecided_tumour)
    false_pos = undecided_normal if as_tumour else 0
    false_neg = 0 if as_tumour else undecided_tumour
    true_neg = total - true_pos - false_pos - false_neg
    # As histoseg.train.metrics: a class absent from truth and prediction has no IoU.
    wrong = false_pos + false_neg
    iou_background = true_neg / (true_neg + wrong) if true_neg + wrong else math.nan
    iou_tumour = true_pos / (true_pos + wrong) if true_pos + wrong else math.nan
    ious = [v for v in (iou_background, iou_tumour) if not math.isnan(v)]
    return Ceiling(
        patch_size_px=int(patch_size_px),
        accuracy=(true_pos + true_neg) / total,
        miou=float(np.mean(ious)),
        iou_tumour=float(iou_tumour),
        decidable_fraction=float(pixels[decided].sum()) / total,
        tumour_fraction=all_tumour / total,
        pixels=total,
        undecided_as_tumour=as_tumour,
    )


def bayes_ceiling(
    designs: SlideDesign | Sequence[SlideDesign],
    patch_size_px: int,
    origins: Sequence[Iterable[tuple[int, int]] | None] | None = None,
    min_tissue: float = 0.0,
) -> Ceiling:
    """The Bayes ceiling of P x P patches over one or many slides.

    Args:
        designs: the slides (their :class:`SlideDesign`).
        patch_size_px: P, the model's field of view in level-0 pixels.
        origins: per design, the level-0 patch corners to score (e.g. a validation set's);
            None scores every design's whole grid.
        min_tissue: leave out patches with less tissue than this share (as the validation
            grid of ``histoseg.train`` does).

    Example:
        >>> from histoseg.wsi.design import make_design
        >>> design = make_design(1024, 768, seed=1, task="local")
        >>> bayes_ceiling(design, 128).accuracy
        1.0
    """
    if isinstance(designs, SlideDesign):
        designs = [designs]
    if origins is None:
        origins = [None] * len(designs)
    if len(origins) != len(designs):
        raise ConfigError(f"origins for {len(origins)} slides given, {len(designs)} slides")
    counts = [
        patch_counts(design, patch_size_px, where, min_tissue)
        for design, where in zip(designs, origins, strict=True)
    ]
    return ceiling_from_counts(patch_size_px, np.concatenate(counts))


# --- CLI -------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> int:
    from histoseg.cli import ArgumentParser
    from histoseg.wsi.synth import DEFAULT_TASK, TASKS, dataset_designs, parse_size

    parser = ArgumentParser(
        prog="python -m histoseg.wsi.ceiling",
        description=__doc__.splitlines()[0],
        epilog="Examples:\n"
        "  python -m histoseg.wsi.ceiling --task context --sizes 256 512 1024 2048\n"
        "  python -m histoseg.wsi.ceiling --task local --slides 3 --size 4000x3000",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--task", choices=TASKS, default=DEFAULT_TASK, help="synthetic task (default local)"
    )
    parser.add_argument(
        "--sizes",
        type=int,
        nargs="+",
        default=[256, 512, 1024, 2048],
        metavar="PX",
        help="patch sizes, level-0 px (default 256 512 1024 2048)",
    )
    parser.add_argument("--slides", type=int, default=6, help="slides of the dataset (default 6)")
    parser.add_argument("--size", default="8000x6000", help="level-0 WIDTHxHEIGHT px per slide")
    parser.add_argument("--seed", type=int, default=0, help="dataset seed (as histoseg.wsi.synth)")
    parser.add_argument(
        "--min-tissue", type=float, default=0.5, help="least tissue per scored patch (default 0.5)"
    )
    args = parser.parse_args(argv)
    if args.slides < 1:
        raise ConfigError(f"--slides must be >= 1, got {args.slides}")
    width_px, height_px = parse_size(args.size)
    designs = list(
        dataset_designs(args.slides, (width_px, height_px), args.seed, args.task).values()
    )
    print(f"{'patch px':>8}  {'accuracy':>8}  {'mIoU':>6}  {'tumour IoU':>10}  {'decidable':>9}")
    for size in args.sizes:
        if size < 1 or size > min(width_px, height_px):
            raise ConfigError(f"--sizes: {size} px must be between 1 and the slide's short side")
        c = bayes_ceiling(designs, size, min_tissue=args.min_tissue)
        print(
            f"{size:>8}  {c.accuracy:>8.4f}  {c.miou:>6.4f}  {c.iou_tumour:>10.4f}  "
            f"{c.decidable_fraction:>9.4f}"
        )
    return 0


if __name__ == "__main__":
    from histoseg.cli import run_main

    raise SystemExit(run_main(main))
