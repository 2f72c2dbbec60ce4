"""`python -m histoseg.infer`: run a trained checkpoint over whole slides.

For each slide: a tumour-probability pyramid (tiled TIFF at the slide's geometry and mpp),
a heatmap overlay PNG and a JSON summary, in ``--out``. Only tissue tiles run; tiles
overlap by a margin from the model's receptive field and are cross-faded. Started by a
launcher (``horovodrun``, ``mpirun``, ``srun``), the ranks share the slides.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from histoseg.cli import ArgumentParser, int_in_range, non_negative_int, printable, run_main
from histoseg.errors import ConfigError

EPILOG = """\
Examples:
  # train a small model, then run it over a synthetic slide
  python -m histoseg.train --backbone mobilenetv2 --alpha 0.35 --patch-size 128 --steps 300 \\
      --run-dir runs/small
  python -m histoseg.wsi.synth --out data/infer --slides 1 --size 20000x16000
  python -m histoseg.infer --checkpoint runs/small --slide data/infer/slide_000.tif --out out/

  # several slides at pyramid level 1, 2048 px tiles; an interrupted run resumes by rerunning
  python -m histoseg.infer --checkpoint runs/small/checkpoints/ckpt-00000300.npz \\
      --slide data/synthetic/*.tif --level 1 --tile-size 2048 --out out/

  # two ranks share a folder's slides (each slide's outputs written by one rank)
  horovodrun -np 2 -H localhost:2 --gloo python -m histoseg.infer --checkpoint runs/small \\
      --slide data/synthetic/*.tif --out out/

  # score the outputs against the slides' annotations (CAMELYON16 FROC and slide AUC)
  python -m histoseg.infer.evaluate --summaries out/ --annotations data/synthetic
"""


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m histoseg.infer",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="ckpt-*.npz, or a histoseg.train run dir")
    p.add_argument("--slide", required=True, nargs="+", type=Path, help="slide file(s)")
    p.add_argument("--out", required=True, type=Path, help="output folder")
    p.add_argument("--level", type=non_negative_int, default=0, help="pyramid level (default 0)")
    p.add_argument(
        "--tile-size",
        type=int_in_range(64, 8192),
        default=1024,
        help="model input px, a multiple of 32 (default 1024)",
    )
    p.add_argument(
        "--margin",
        type=int_in_range(0, 4096),
        help="overlap each side in px, a multiple of 32 (default: the model's receptive-field "
        "radius, at most an eighth of the tile)",
    )
    p.add_argument("--threads", type=int_in_range(1, 1024), help="compute threads")
    p.add_argument("--force", action="store_true", help="overwrite outputs; restart, not resume")
    p.add_argument("--no-progress", action="store_true", help="no progress bar or estimate")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.exists() and not args.out.is_dir():
        raise ConfigError(f"--out {printable(args.out)} is a file; give a folder")
    from histoseg.infer.model import find_checkpoint, stale_batch_norm_warning, tile_size_warning
    from histoseg.infer.run import check_outputs
    from histoseg.infer.tiling import ALIGN_PX

    for option, value in (("--tile-size", args.tile_size), ("--margin", args.margin or 0)):
        if value % ALIGN_PX:
            raise ConfigError(f"{option} {value} must be a multiple of {ALIGN_PX} px")

    info = find_checkpoint(args.checkpoint)
    for slide in args.slide:
        if not slide.is_file():
            raise ConfigError(f"--slide {printable(slide)}: no such file")
    if len({s.stem for s in args.slide}) != len(args.slide):
        raise ConfigError("--slide: two slides share a name; their outputs would collide")
    args.slide, args.threads, lead = _this_ranks_share(args.slide, args.level, args.threads)
    # this rank's outputs only: a rank that starts late must not find another rank's
    for slide in args.slide:
        check_outputs(args.out, slide, args.force)
    if not args.slide:
        return 0
    args.no_progress = args.no_progress or not lead
    if args.threads:
        from histoseg.train.cli import configure_threads

        configure_threads(args.threads, pin=False)
    for warning in (stale_batch_norm_warning(info), tile_size_warning(info, args.tile_size)):
        if warning:
            print(warning, file=sys.stderr)
    return _run(args, info)


def _this_ranks_share(
    slides: list[Path], level: int, threads: int | None
) -> tuple[list[Path], int | None, bool]:
    """The slides this rank runs, its compute threads, and whether it is the rank that
    shows progress.

    In a process no launcher started: every slide, ``threads``, True. Under ``horovodrun``,
    ``mpirun`` or ``srun``: its share of the slides (:mod:`histoseg.infer.share`), and, unless
    ``--threads`` or the environment (``HISTOSEG_THREADS``, ``OMP_NUM_THREADS``,
    ``TF_NUM_INTRAOP_THREADS``) says otherwise, its cores: those the launcher bound it to,
    else its share of the host's; only rank 0 shows progress.
    """
    from histoseg.config import default_threads
    from histoseg.infer.share import level_pixels, share_of_slides
    from histoseg.train.launch import THREAD_VARIABLES, world_from_env

    rank, world, on_host = world_from_env()
    if world == 1:
        return slides, threads, True
    mine = [
        slides[i] for i in share_of_slides([level_pixels(s, level) for s in slides], rank, world)
    ]
    print(f"rank {rank} of {world}: {len(mine)} of {len(slides)} slides", file=sys.stderr)
    told = {"HISTOSEG_THREADS", *THREAD_VARIABLES} & set(os.environ)
    if threads is None and not told:
        cores = default_threads()
        bound = cores < (os.cpu_count() or cores)  # the launcher pinned this rank already
        threads = cores if bound else max(1, cores // on_host)
    return mine, threads, rank == 0


def _run(args, info) -> int:
    from histoseg.infer.model import build_tile_model, tumour_probability_fn
    from histoseg.infer.receptive import receptive_field_radius_px
    from histoseg.infer.run import InferSettings, infer_slide
    from histoseg.infer.tiling import default_margin_px

    model = build_tile_model(info, args.tile_size)
    radius = receptive_field_radius_px(model)
    margin = args.margin if args.margin is not None else default_margin_px(radius, args.tile_size)
    settings = InferSettings(args.level, args.tile_size, margin, radius)
    if info.tumour_logit_shift:
        print(
            f"{info.path.name}: its run's prior correction applies (tumour logit "
            f"- {info.tumour_logit_shift:.3f}, histoseg.train --prior-correction)",
            file=sys.stderr,
        )
    predict = tumour_probability_fn(model, info.tumour_logit_shift)
    args.out.mkdir(parents=True, exist_ok=True)
    for slide in args.slide:
        s = infer_slide(
            slide,
            args.out,
            predict,
            info,
            settings,
            force=args.force,
            progress=not args.no_progress,
        )
        print(
            f"{printable(slide.name)}: slide score {s['slide_score']:.3f}, tumour "
            f"{s['tumour_area_mm2']:.2f} mm2 of {s['tissue_mm2']:.1f} mm2 tissue, "
            f"{len(s['detections'])} candidate lesions, "
            f"{s['tissue_mp_per_s_median']:.2f} MP/s of tissue (median over tiles) -> "
            f"{printable(s['outputs']['pyramid'])}",
            file=sys.stdout,
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
