"""`python -m histoseg.train`: train DeepLabV3+ on slides, on one process or many, and validate.

Flags map one to one onto :class:`histoseg.train.options.TrainOptions`. With no slides folder
the run uses synthetic slides made on first use under data/synthetic. With ``--engine
horovod`` or ``--engine tf`` start one process per worker (``horovodrun``, or
``python -m histoseg.train.launch``); every rank runs this same command.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from histoseg.cli import ArgumentParser, command_line, int_in_range, run_main
from histoseg.config import HEAD_FILTERS, MAX_ALPHA, NORMS, parse_alpha
from histoseg.errors import ConfigError
from histoseg.train.launch import WORLD_VARIABLES
from histoseg.train.split import SPLITS

# Kept here (not imported from the modules that validate them, which import TensorFlow) so
# that --help does not start it; tests/train/test_cli.py checks that they agree.
SCHEDULES = ("constant", "poly", "cosine")
SYNTHETIC_TASKS = ("local", "context")
NORM_CHOICES = ("auto", *NORMS)

EPILOG = """\
Examples:
  # quick run on synthetic slides (made on first use under data/synthetic)
  python -m histoseg.train --backbone mobilenetv2 --alpha 0.35 --patch-size 128 --steps 50

  # the context task (lesions marked only by their margin) at batch 1 (group norm by default)
  python -m histoseg.train --synthetic-task context --backbone mobilenetv2 --patch-size 512 \
      --batch-size 1 --steps 400

  # the study's setup on the CAMELYON16 release (training/, testing/ as published)
  python -m histoseg.train --data camelyon16=/data/camelyon16 --backbone xception65 \
      --patch-size 1024 --batch-size 1 --steps 20000

  # the study's setup on your own slides (ASAP XML beside each slide or in --annotations)
  python -m histoseg.train --slides /data/camelyon16/images --annotations /data/camelyon16/xml \\
      --backbone xception65 --patch-size 1024 --batch-size 1 --optimizer adam --steps 20000

  # two Horovod workers on this machine, fp16 allreduce
  horovodrun -np 2 -H localhost:2 --gloo python -m histoseg.train --engine horovod \\
      --fp16-allreduce --threads 1 --steps 50

  # one 512 px patch cut across two ranks (halo exchange), batch 1
  horovodrun -np 2 -H localhost:2 --gloo python -m histoseg.train --engine horovod \\
      --spatial-workers 2 --backbone mobilenetv2 --alpha 0.35 --patch-size 512 \\
      --batch-size 1 --threads 1 --steps 50

  # two tf.distribute workers on this machine
  python -m histoseg.train.launch --engine tf -n 2 -- python -m histoseg.train --engine tf

  # resume the newest checkpoint of a run
  python -m histoseg.train --run-dir runs/exp1 --resume auto --steps 200
"""


def build_parser() -> argparse.ArgumentParser:
    # histoseg's ArgumentParser: a bad flag is one ConfigError line, not argparse's usage block
    p = ArgumentParser(
        prog="python -m histoseg.train",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    _data_options(p)
    _model_options(p)
    _optimisation_options(p)
    _distribution_options(p)
    _output_options(p)
    return p


def _data_options(p: argparse.ArgumentParser) -> None:
    """Slides, patches and batches."""
    data = p.add_argument_group("data")
    data.add_argument(
        "--data",
        metavar="NAME=DIR",
        help="a challenge's published folder: camelyon16=DIR or camelyon17=DIR",
    )
    data.add_argument("--slides", help="folder of slides (default: synthetic slides)")
    data.add_argument("--annotations", help="folder of ASAP XML files (default: --slides)")
    data.add_argument(
        "--synthetic-task",
        choices=SYNTHETIC_TASKS,
        default="local",
        help="local: tumour has its own texture; context: lesions look like normal tissue "
        "inside, only their margin marks them (default local)",
    )
    data.add_argument(
        "--synthetic-dir",
        help="where synthetic slides go (default data/synthetic, data/synthetic-context)",
    )
    data.add_argument("--synthetic-slides", type=int, default=6, help="how many (default 6)")
    data.add_argument(
        "--synthetic-size", default="8000x6000", help="WIDTHxHEIGHT of each synthetic slide"
    )
    data.add_argument(
        "--synthetic-seed", type=int, default=0, help="seed of the synthetic slides (default 0)"
    )
    data.add_argument(
        "--split", choices=SPLITS, default="auto", help="by slide or CAMELYON17 centre"
    )
    data.add_argument("--val-fraction", type=float, default=1 / 3, help="slides to validate on")
    data.add_argument(
        "--val-centres", type=int, nargs="*", default=(), help="centres to validate on"
    )
    data.add_argument("--patch-size", type=int, default=256, help="px (default 256)")
    data.add_argument("--level", type=int, default=0, help="pyramid level (default 0)")
    data.add_argument("--min-tissue", type=float, default=0.5, help="least tissue per patch")
    data.add_argument(
        "--tumor-ratio", type=float, default=0.5, help="share of tumour patches per batch"
    )
    data.add_argument(
        "--tumour-weight",
        type=float,
        default=1.0,
        help="loss weight of tumour pixels against background ones (default 1: plain mean)",
    )
    data.add_argument("--batch-size", type=int, default=2, help="patches per worker per step")
    data.add_argument(
        "--max-val-patches",
        type=int,
        default=64,
        help="validation subset of the grid, up to half tumour (0: the whole grid)",
    )


def _model_options(p: argparse.ArgumentParser) -> None:
    """The network and its memory-saving modes."""
    model = p.add_argument_group("model")
    model.add_argument("--backbone", default="xception65", help="xception65, mobilenetv2, resnet50")
    model.add_argument(
        "--alpha",
        type=parse_alpha,
        help=f"mobilenetv2 width multiplier, in (0, {MAX_ALPHA:g}], e.g. 0.35",
    )
    model.add_argument("--output-stride", type=int, default=16, choices=(8, 16))
    model.add_argument(
        "--precision", default="float32", help="float32, mixed_bfloat16, mixed_float16"
    )
    model.add_argument("--remat", default="none", help="what to recompute in the backward pass")
    model.add_argument(
        "--norm",
        choices=NORM_CHOICES,
        default="auto",
        help="normalisation in every conv block: batch, frozen (batch norm with fixed "
        "statistics), group (per patch), or auto: group at --batch-size 1, where batch "
        "norm's inference statistics never match training's, else batch (default auto)",
    )
    model.add_argument(
        "--head-filters",
        type=int_in_range(1, 4096),
        default=HEAD_FILTERS,
        help=f"channels of ASPP and the decoder (default {HEAD_FILTERS}, the paper's); 64 "
        "trains a narrow backbone about twice as fast",
    )


def _optimisation_options(p: argparse.ArgumentParser) -> None:
    """Optimizer, schedule, run length, batch-norm recalibration."""
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    opt.add_argument("--learning-rate", type=float, default=1e-3, help="per worker (default 1e-3)")
    opt.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    opt.add_argument("--schedule", choices=SCHEDULES, default="poly", help="decay after warm-up")
    opt.add_argument("--warmup-steps", type=int, help="linear warm-up (default: 10%% of steps)")
    opt.add_argument(
        "--no-lr-scaling",
        action="store_true",
        help="do not multiply the learning rate by the number of workers",
    )
    length = opt.add_mutually_exclusive_group()
    length.add_argument("--steps", type=int, help="train steps (default 100)")
    length.add_argument("--epochs", type=float, help="passes over the training slides' tissue grid")

    opt.add_argument(
        "--bn-recalibration-batches",
        type=int,
        default=20,
        help="training batches that re-estimate batch-norm statistics before validation (0: off)",
    )
    opt.add_argument(
        "--prior-correction",
        action="store_true",
        help="validate and infer on the probability corrected for the tumour prior the "
        "sampler and --tumour-weight put into the model (histoseg.train.prior); the row "
        "keeps both scorings either way",
    )


def _distribution_options(p: argparse.ArgumentParser) -> None:
    """Engine, step mode, threads."""
    from histoseg.train.engines import DEFAULT_STEP_MODE, ENGINE_NAMES, STEP_MODES

    dist = p.add_argument_group("distribution")
    dist.add_argument("--engine", choices=ENGINE_NAMES, default="none")
    dist.add_argument(
        "--spatial-workers",
        type=int_in_range(1, 4096),
        default=1,
        metavar="N",
        help="cut every patch into N slabs of rows, one per rank, with halo exchange "
        "(--engine horovod; the ranks are blocks of N, one data-parallel worker each; "
        "default 1)",
    )
    dist.add_argument("--fp16-allreduce", action="store_true", help="gradients travel as float16")
    dist.add_argument(
        "--step",
        choices=STEP_MODES,
        default=DEFAULT_STEP_MODE,
        help="overlap: one compiled step, each gradient's allreduce overlapping the rest of "
        "the backward pass; separate: gradients, allreduce, update as three calls, the "
        f"allreduce timed on its own (default {DEFAULT_STEP_MODE})",
    )
    dist.add_argument("--threads", type=int, help="compute threads of this process")
    dist.add_argument(
        "--pin-cores",
        action="store_true",
        help="pin this process to its own block of cores (by local rank)",
    )


def _output_options(p: argparse.ArgumentParser) -> None:
    """Run folder, checkpoints, results, logging."""
    out = p.add_argument_group("output")
    out.add_argument("--run-dir", default="runs/train", help="checkpoints, TensorBoard, options")
    out.add_argument("--checkpoint-every", type=int, default=50, help="steps (0: only at the end)")
    out.add_argument("--resume", help="checkpoint file or folder, or 'auto' (newest in --run-dir)")
    out.add_argument("--results", help="results JSON to add the validation row to")
    out.add_argument("--log-every", type=int, default=10, help="steps between summaries")
    out.add_argument("--seed", type=int, default=0)
    out.add_argument("--no-progress", action="store_true", help="no progress bar")


def options_from_args(args: argparse.Namespace) -> object:
    """TrainOptions from parsed flags (validated: bad values raise ConfigError)."""
    from histoseg.train.options import TrainOptions
    from histoseg.wsi.synth import parse_size

    check_flags(args)
    check_output_paths(args.run_dir, args.results)
    steps = args.steps if args.steps is not None else (None if args.epochs else 100)
    return TrainOptions(
        slides=args.slides,
        annotations=args.annotations,
        data=args.data,
        synthetic_task=args.synthetic_task,
        synthetic_dir=args.synthetic_dir or default_synthetic_dir(args.synthetic_task),
        synthetic_slides=args.synthetic_slides,
        synthetic_size_px=parse_size(args.synthetic_size),
        synthetic_seed=args.synthetic_seed,
        split=args.split,
        val_fraction=args.val_fraction,
        val_centres=tuple(args.val_centres),
        patch_size=args.patch_size,
        level=args.level,
        min_tissue=args.min_tissue,
        tumor_ratio=args.tumor_ratio,
        tumour_weight=args.tumour_weight,
        batch_size=args.batch_size,
        max_val_patches=args.max_val_patches or None,
        backbone=args.backbone,
        alpha=args.alpha,
        output_stride=args.output_stride,
        precision=args.precision,
        remat=args.remat,
        norm=resolve_norm(args.norm, args.batch_size),
        head_filters=args.head_filters,
        optimizer=args.optimizer,
        learning_rate=args.learning_rate,
        momentum=args.momentum,
        schedule=args.schedule,
        warmup_steps=args.warmup_steps,
        scale_lr=not args.no_lr_scaling,
        steps=steps,
        epochs=args.epochs,
        fp16_allreduce=args.fp16_allreduce,
        spatial_workers=args.spatial_workers,
        step_mode=args.step,
        run_dir=args.run_dir,
        checkpoint_every=args.checkpoint_every,
        resume=args.resume,
        results=args.results,
        log_every=args.log_every,
        seed=args.seed,
        threads=args.threads,
        progress=not args.no_progress,
        bn_recalibration_batches=args.bn_recalibration_batches,
        prior_correction=args.prior_correction,
    )


def check_flags(args: argparse.Namespace) -> None:
    """Refuse flag values no run can use (ConfigError naming the flag), before any work."""
    if args.patch_size < 16 or args.patch_size % args.output_stride:
        raise ConfigError(
            f"--patch-size {args.patch_size} must be a multiple of the output stride "
            f"{args.output_stride} (and >= 16)"
        )
    for name in ("batch_size", "steps", "checkpoint_every", "log_every"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "checkpoint_every" else 1):
            raise ConfigError(f"--{name.replace('_', '-')} must be positive, got {value}")
    if not args.tumour_weight > 0:
        raise ConfigError(f"--tumour-weight must be > 0, got {args.tumour_weight}")
    if not 0 <= args.tumor_ratio <= 1:
        raise ConfigError(f"--tumor-ratio must be in [0, 1], got {args.tumor_ratio}")
    if args.epochs is not None and args.epochs <= 0:
        raise ConfigError(f"--epochs must be > 0, got {args.epochs}")
    # 0 would otherwise read as "unset" in configure_threads and silently use the default
    if args.threads is not None and args.threads < 1:
        raise ConfigError(f"--threads must be >= 1, got {args.threads}")
    if args.spatial_workers > 1 and args.engine != "horovod":
        raise ConfigError(
            f"--spatial-workers {args.spatial_workers} needs --engine horovod (started by "
            f"horovodrun -np {args.spatial_workers} or a multiple of it), not --engine {args.engine}"
        )
    if args.data is not None:
        from histoseg.wsi.camelyon import parse_data_spec

        parse_data_spec(args.data)
        if args.slides or args.annotations:
            raise ConfigError("give --data or --slides/--annotations, not both")


def resolve_norm(norm: str, batch_size: int) -> str:
    """The normalisation ``--norm`` names; "auto" is group norm at one patch per worker.

    At batch 1, batch norm trains with each patch's own moments (and normalises the ASPP
    image-pooling branch, a 1x1 map, to a constant) but infers with averages over many
    patches, so a model that fits its training patches can predict one class everywhere at
    validation; group norm is the same in training and inference.
    """
    if norm not in NORM_CHOICES:
        raise ConfigError(f"--norm {norm!r} is not one of {', '.join(NORM_CHOICES)}")
    if norm == "auto":
        return "group" if batch_size == 1 else "batch"
    return norm


def default_synthetic_dir(task: str) -> str:
    """Where a task's synthetic slides go by default: one folder per task, so switching
    tasks never regenerates the other task's slides."""
    return "data/synthetic" if task == "local" else f"data/synthetic-{task}"


def _existing_non_folder(path: Path) -> Path | None:
    """The nearest existing one of ``path`` and its parents when it is not a folder."""
    for p in (path, *path.parents):
        if p.exists():
            return None if p.is_dir() else p
    return None


def check_output_paths(run_dir: str, results: str | None) -> None:
    """Reject a run folder or results file that cannot be written, before any training.

    Raises:
        ConfigError: ``run_dir`` (or a parent) is an existing file; ``results`` is a folder,
            does not end in .json, or has a file where its folder should be.
        ResultsError: the results file (``results``, else ``run_dir``/results.json) exists
            but is not a readable results file.
    """
    blocker = _existing_non_folder(Path(run_dir))
    if blocker is not None:
        raise ConfigError(f"--run-dir {run_dir} must be a folder, but {blocker} is a file")
    path = Path(results) if results is not None else Path(run_dir) / "results.json"
    if results is not None:
        if path.is_dir():
            raise ConfigError(f"--results {results} is a folder; it must be a .json file path")
        if path.suffix != ".json":
            raise ConfigError(f"--results {results} must be a .json file path")
        blocker = _existing_non_folder(path.parent)
        if blocker is not None:
            raise ConfigError(f"--results {results}: {blocker} is a file, not a folder")
    if path.is_file():
        from histoseg.results import load_rows

        load_rows(path)  # the new row is merged in after training: a bad file must fail now


def configure_threads(threads: int | None, pin: bool) -> int | None:
    """Fix this process's threads (and optionally its cores) before TensorFlow starts."""
    from histoseg.config import thread_env
    from histoseg.train.launch import local_rank_from_env, pin_to_cores

    if threads is None and "HISTOSEG_THREADS" in os.environ:
        text = os.environ["HISTOSEG_THREADS"]
        try:
            threads = int(text)
        except ValueError:
            threads = 0
        if threads < 1:
            raise ConfigError(f"HISTOSEG_THREADS must be an integer >= 1, got {text!r}")
    if threads is not None:
        os.environ.update(thread_env(threads))
        if pin:
            pin_to_cores(local_rank_from_env(), threads)
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    return threads


#: A rank variable of each launcher (:data:`histoseg.train.launch.WORLD_VARIABLES`), and
#: PMIx's, whose world size has no variable of its own: any one of them set means a
#: launcher started this process.
RANK_VARIABLES = (*(rank for rank, _, _ in WORLD_VARIABLES), "PMIX_RANK")


def check_launcher(engine: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse ``--engine horovod`` in a process no launcher started, before any work.

    Started by hand, Horovod is a valid world of one rank: the run would train alone,
    silently, while the user meant several workers.

    Raises:
        ConfigError: naming the launchers to use, or --engine none for one process.
    """
    environ = os.environ if environ is None else environ
    if engine == "horovod" and not any(name in environ for name in RANK_VARIABLES):
        raise ConfigError(
            "--engine horovod: this process was not started by horovodrun or mpirun (no "
            "HOROVOD_RANK or OMPI_COMM_WORLD_RANK), so it would train alone as one rank; run "
            "horovodrun -np 2 -H localhost:2 --gloo python -m histoseg.train --engine horovod "
            "..., or use --engine none for one process"
        )


def main(argv: Sequence[str] | None = None) -> int:
    """Parse flags, start the engine (before any TensorFlow op), train, validate, report."""
    args = build_parser().parse_args(argv)
    check_launcher(args.engine)
    options = options_from_args(args)
    from histoseg.train.engines import get_engine
    from histoseg.train.launch import world_from_env

    spatial = options.spatial_workers
    world = world_from_env()[1]
    # the step as its results row will state it, made (and so checked) before any work
    options.step_config(device="cpu", engine=args.engine, workers=max(1, world // spatial))
    options.threads = configure_threads(args.threads, args.pin_cores)
    options.command = command_line("histoseg.train", argv)
    comm = None
    if spatial > 1:
        from histoseg.spatial import HorovodComm

        comm = HorovodComm(spatial, world)  # first: Horovod takes its blocks at its first init
    engine = get_engine(args.engine).init()
    from histoseg.train.loop import run

    row = run(options, engine, comm)
    if engine.is_chief:
        m = row["metrics"]
        ranks = f"{engine.size} worker(s)"
        if spatial > 1:
            ranks = f"{engine.size // spatial} worker(s) x {spatial} spatial ranks"
        print(
            f"validation ({m['val_patches']} patches of {options.patch_size} px, "
            f"{ranks}, {row['config']['steps']} steps): "
            f"accuracy {m['accuracy']:.4f}  mIoU {m['miou']:.4f}  AUC {m['auc']:.4f}  "
            f"(all-background baseline: accuracy {m['baseline_accuracy']:.4f}, "
            f"mIoU {m['baseline_miou']:.4f}, AUC 0.5)",
            file=sys.stdout,
        )
        c = row["extra"]["prior_correction"]
        print(
            f"prior correction ({'applied' if c['applied'] else 'not applied'}): tumour logit "
            f"- {c['logit_shift']:.3f} (tumour {c['train_tumour_share']:.3f} of the training "
            f"pixels, {c['slide_tumour_share']:.3f} of the slides'): mIoU "
            f"{c['corrected']['miou']:.4f} corrected, {c['uncorrected']['miou']:.4f} not",
            file=sys.stdout,
        )
        print(f"results: {row['extra']['results_path']}", file=sys.stdout)
    # leave together: a tf.distribute worker that exits while the chief still writes its
    # results stops heart-beating, and the chief's coordination service reports a crash
    engine.barrier()
    engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
