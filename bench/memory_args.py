"""The ``python -m bench.memory`` command line: its options, and the sweep they ask for as
:class:`~histoseg.config.StepConfig` points. Every value is checked as it is parsed, so a
bad one is refused before any work."""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import expand_sweep
from histoseg.cli import ArgumentParser, finite_float, int_in_range
from histoseg.config import (
    BACKBONES,
    BACKENDS,
    MODES,
    NORMS,
    OPTIMIZERS,
    PRECISIONS,
    REMAT_MODES,
    StepConfig,
    default_threads,
)
from histoseg.errors import ConfigError

DEFAULT_OUT = Path("results/memory.json")
BASELINE_OUT = Path("results/baseline/memory_baseline.json")

EPILOG = """\
Examples:
  python -m bench.memory --sizes 256 704 1024 2048
  python -m bench.memory --sizes 256 512 --batch-sizes 1 2 --precision float32 mixed_bfloat16 \\
      --remat none blocks --steps 2
  python -m bench.memory --sizes 1024 2048 4096 --predict-only --device-memory 24GB
  python -m bench.memory --mode infer --sizes 256 512 1024 --batch-sizes 1 2 \\
      --out results/memory_infer.json                 # forward passes (inference) only
  python -m bench.memory --mode infer --sizes 4096 --predict-only --device-memory 24GB
  python -m bench.memory --sizes 256 --precision mixed_bfloat16 --remat blocks --repeats 3
  python -m bench.memory --baseline       # refresh results/baseline/memory_baseline.json
  python -m bench.memory --sample 48 --seed 0 --steps 1 --repeats 3 \\
      --precision float32 mixed_bfloat16 --out results/memory_model_grid.json
  python -m bench.memory --sizes 2048 --precision mixed_bfloat16 --remat full \\
      --calibrate 256 384 512 --predict-only     # extrapolate 2048 px from measured small patches
  python -m bench.memory --backend torch --sizes 256 512 --remat none full \\
      --out results/memory_torch_cpu.json        # Keras on PyTorch, measured and replayed
  python -m bench.memory --backend torch --device gpu --sizes 512 1024 2048 \\
      --precision float32 mixed_bfloat16 --remat none blocks full --out results/memory_torch_gpu.json
  python -m bench.memory --refresh-predictions --out results/memory_torch_gpu.json
  python -m bench.memory --backbone xception65 --sizes 768 1024 --spatial-workers 2 4 \\
      --calibrate 384 512 --out results/memory_spatial.json   # one patch over 2 and 4 ranks
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.memory",
        description=(
            "Measure (and predict) the memory and speed of a DeepLabV3+ train step (or, with "
            "--mode infer, of a forward pass) per patch size; each list-valued option takes "
            "several values and the sweep is their product."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _sweep_options(parser)
    _run_options(parser)
    return parser


PRECISION_HELP = (
    "(default float32); with --sample, keep only the drawn configs of these precisions "
    "(float16 steps take minutes each on a CPU)"
)


def _sweep_options(parser: argparse.ArgumentParser) -> None:
    """The sweep: each list-valued option multiplies the configs."""
    add = parser.add_argument
    add(
        "--sizes",
        type=int_in_range(16, 65536),
        nargs="+",
        default=[256, 704, 1024, 2048],
        help="patch sizes, px",
    )
    add("--batch-sizes", type=int_in_range(1), nargs="+", default=[1], help="patches per step")
    add("--backbone", nargs="+", default=["xception65"], choices=BACKBONES)
    add(
        "--backbone-option",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="extra backbone argument, e.g. alpha=0.35 (repeatable)",
    )
    add(
        "--norm",
        nargs="+",
        default=["batch"],
        choices=NORMS,
        help="normalisation of every conv block (a model option, norm=...; default batch); "
        "with --sample, the ones drawn",
    )
    add("--output-stride", type=int, nargs="+", default=[16], choices=(8, 16))
    add("--precision", nargs="+", choices=PRECISIONS, help=PRECISION_HELP)
    add(
        "--mode",
        nargs="+",
        default=["train"],
        choices=MODES,
        help="train (a train step, the default) and/or infer (a forward pass alone, "
        "training=False: no optimizer, no recomputation)",
    )
    add(
        "--remat",
        nargs="+",
        default=None,
        choices=REMAT_MODES,
        help="recomputation mode of a train step (default none)",
    )
    add("--device", nargs="+", default=["cpu"], choices=("cpu", "gpu"))
    add(
        "--threads",
        type=int_in_range(1),
        nargs="+",
        default=[default_threads()],
        help="intra-op threads",
    )
    add(
        "--spatial-workers",
        type=int_in_range(1, 64),
        nargs="+",
        default=[1],
        metavar="N",
        help="ranks one patch is cut across (horizontal slabs with halo exchange, started "
        "under horovodrun; float32, remat none); a row's figures are the largest rank's. "
        "Default 1: the whole patch in one process",
    )
    add(
        "--optimizer",
        nargs="+",
        default=None,
        choices=OPTIMIZERS,
        help="optimizer of a train step (default adam)",
    )
    add(
        "--steps",
        type=int_in_range(1),
        default=3,
        help="timed steps after the warm-up step (default 3)",
    )
    _draw_options(parser)


def _draw_options(parser: argparse.ArgumentParser) -> None:
    """Configs that are not a product: a random draw, and the measured route's sizes."""
    add = parser.add_argument
    add(
        "--sample",
        type=int_in_range(1),
        metavar="N",
        help="instead of the product sweep, N configs drawn at random from the whole config "
        "space (every backbone, stride, optimizer, precision, remat mode; 128-512 px, "
        "batch 1-4): the memory model's out-of-sample check",
    )
    add(
        "--seed", type=int_in_range(0), default=0, help="with --sample: the draw's seed (default 0)"
    )
    add(
        "--calibrate",
        type=int_in_range(16, 65536),
        nargs="+",
        metavar="PX",
        help="the measured route: measure each config at these (small) patch sizes too and "
        "predict it by extrapolating in patch area (predicted.method 'calibrated'; the "
        "analytic prediction is kept in extra.analytic), e.g. --calibrate 256 384 512; with "
        "--refresh-predictions, from the rows --out already holds at those sizes",
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    """Where rows go, what is measured or only predicted, how, and what is shown."""
    add = parser.add_argument
    add("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    add("--predict-only", action="store_true", help="predict every config; train none")
    add(
        "--backend",
        default="tensorflow",
        choices=BACKENDS,
        help="Keras backend of the steps (default tensorflow); torch: PyTorch's allocators, "
        "predicted by replaying the step on fake tensors (train steps only; one backend per "
        "sweep, as one process loads Keras once)",
    )
    add(
        "--force",
        action="store_true",
        help="re-measure configs already in --out, and run configs predicted not to fit",
    )
    add(
        "--device-memory",
        metavar="SIZE",
        help="also report the largest patch that fits a device of SIZE (e.g. 24GB, 80GiB): "
        "a train step's, and with --mode infer the largest inference tile",
    )
    add(
        "--timeout-s",
        type=finite_float(0, None, lo_open=True),
        default=None,
        help="kill a config's worker after this long",
    )
    add(
        "--lock-file",
        type=Path,
        default=None,
        help="hold an exclusive flock on this file while each worker runs (shared machines)",
    )
    add(
        "--repeats",
        type=int_in_range(1),
        default=1,
        help="fresh worker processes per config (default 1): the row is the process with the "
        "median activation bytes, every process's allocator figures in extra.repeats "
        "(bfloat16 figures vary from process to process)",
    )
    add(
        "--allocator-trace",
        action="store_true",
        help="profile one more step per config and record the allocator's chunk waste",
    )
    add(
        "--refresh-predictions",
        action="store_true",
        help="recompute the predicted section of rows already in --out, measuring nothing new",
    )
    add(
        "--baseline",
        action="store_true",
        help=f"measure the CI baseline configs into --out (default {BASELINE_OUT}), replacing "
        "their rows; other sweep options are ignored",
    )
    add(
        "--note",
        default=None,
        help="a note stored in each new row's extra.note (e.g. why its timings are not clean)",
    )
    add("--show", action="store_true", help="print the summary table of --out; run nothing")
    add("--markdown", action="store_true", help="with --show: a Markdown table instead")
    add("--quiet", action="store_true", help="no progress bar")


def parse_backbone_options(items: Sequence[str]) -> tuple[tuple[str, Any], ...]:
    """``--backbone-option NAME=VALUE`` items as sorted pairs (values parsed as JSON if they can)."""
    options = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ConfigError(f"--backbone-option {item!r} is not NAME=VALUE (e.g. alpha=0.35)")
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            options[name] = value
    return tuple(sorted(options.items()))


def configs_from_args(args: argparse.Namespace) -> list[StepConfig]:
    """The sweep the command line asks for, one :class:`StepConfig` per point: for each
    ``--mode`` in turn, train steps then forward passes.

    A forward pass takes no ``--remat`` and no ``--optimizer``: with both modes they apply
    to the train steps; with ``--mode infer`` alone, asking for either (but remat none)
    is refused by :class:`StepConfig`.
    """
    modes = list(dict.fromkeys(getattr(args, "mode", None) or ["train"]))
    configs: list[StepConfig] = []
    for mode, norm in ((m, n) for m in modes for n in dict.fromkeys(args.norm)):
        options = parse_backbone_options(args.backbone_option)
        if norm != "batch":
            options = tuple(sorted({**dict(options), "norm": norm}.items()))
        train, alone = mode == "train", modes == [mode]
        configs += expand_sweep(
            StepConfig(steps=args.steps, backbone_options=options, mode=mode, backend=args.backend),
            backbone=args.backbone,
            output_stride=args.output_stride,
            precision=args.precision or ["float32"],
            remat=(args.remat or ["none"]) if train else args.remat if alone else None,
            optimizer=(args.optimizer or ["adam"]) if train else args.optimizer if alone else None,
            device=args.device,
            threads=args.threads,
            batch_size=args.batch_sizes,
            patch_size=args.sizes,
            spatial_workers=getattr(args, "spatial_workers", None) if train else None,
        )
    return configs


def as_forward_passes(configs: Sequence[StepConfig]) -> list[StepConfig]:
    """Train-step configs as forward passes (no optimizer, remat none), duplicates once."""
    passes = [c.replace(mode="infer", optimizer=None, remat="none") for c in configs]
    return list(dict.fromkeys(passes))
