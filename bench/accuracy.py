"""The accuracy sweep: what a larger patch buys, at the same budget of pixels seen.

Every patch size is trained once per seed (``--seeds``, default 0 1 2) and per synthetic
task (``--synthetic-task``, default both), seeds outermost. For each patch size P the
sweep trains a fresh DeepLabV3+ through ``histoseg.train`` for
``steps = pixel_budget / (batch_size * P^2)`` steps (so every size sees about the same number
of training pixels), then evaluates it on held-out slides with the study's metrics: pixel
accuracy, mIoU and ROC AUC over every validation pixel, and the number of validation patches.
Each size runs in a fresh process (its memory peak is its own; a crash or an out-of-memory
kill becomes a row, the sweep goes on) and its row (kind "accuracy") is written atomically
as soon as it finishes, so an interrupted sweep resumes where it stopped.

Before a size is trained, the analytic memory model (``histoseg.memory.estimate``) predicts
its step peak; a size whose peak plus the planning band (the prediction + 5% + 96 MiB, as
``bench.memory``'s fit check plans) would not fit the memory budget is trained with block
recomputation (``--allow-remat``) and/or mixed bfloat16 (``--allow-bf16``) when allowed,
else recorded as skipped with the reason.

Examples:
    python -m bench.accuracy --sizes 256 512 1024
    python -m bench.accuracy --sizes 256 704 1024 2048 --allow-remat --pixel-budget 5e8
    python -m bench.accuracy --backbone xception65 --slides data/c16/images --annotations data/c16/xml
    python -m bench.accuracy --synthetic-task context --batch-size 1 --sizes 256 512 1024
    python -m bench.accuracy --synthetic-task local context --seeds 0 1 2 --batch-size 1 \
        --alpha 0.35 --head-filters 64 --sizes 256 512 1024 --tumour-weight 3 --markdown
    python -m bench.accuracy --data camelyon16=/data/camelyon16 --batch-size 1
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from bench.accuracy_plan import (
    LR_REFERENCE_PX,
    LR_RULES,
    SizePlan,
    estimate_predictor,
    format_bytes,
    learning_rate_at,
    plan_size,
    steps_for_budget,
)
from bench.accuracy_rows import finished_row, rows_lock, save_row
from bench.accuracy_table import seed_summary, summary_table
from bench.accuracy_worker import run_worker, worker_main
from histoseg.cli import ArgumentParser, command_line, finite_float, int_in_range, run_main
from histoseg.config import HEAD_FILTERS, MAX_ALPHA, StepConfig, default_threads, parse_alpha
from histoseg.errors import ConfigError
from histoseg.files import locked
from histoseg.results import load_rows_if_exists
from histoseg.train.cli import (
    NORM_CHOICES,
    SYNTHETIC_TASKS,
    default_synthetic_dir,
    resolve_norm,
)

DEFAULT_SIZES = (256, 704, 1024, 2048)
DEFAULT_SEEDS = (0, 1, 2)
DEFAULT_PIXEL_BUDGET = 1e8  # ~10 min per size for mobilenetv2 on 2 CPU cores (0.24 Mpx/s)
DEFAULT_OUT = Path("results/accuracy.json")
#: Share of the device's free memory a size may plan to use by default (the rest is the
#: process's own overhead: libraries, graph, data pipeline, which on the CPU put RSS above
#: the allocator peak; docs/memory-harness.md, field ``rss``).
DEFAULT_BUDGET_FRACTION = 0.8

# ----------------------------------------------------------------------------- the sweep


def memory_budget(args: argparse.Namespace) -> tuple[int | None, str]:
    """The bytes a step may plan to use, and where that number came from (for the rows)."""
    from histoseg.memory.devices import available_bytes, parse_size

    if args.memory_budget:
        return parse_size(args.memory_budget), f"--memory-budget {args.memory_budget}"
    free = available_bytes(args.device)
    if free is None:
        return None, f"no {args.device} memory figure available"
    return int(
        free * DEFAULT_BUDGET_FRACTION
    ), f"{DEFAULT_BUDGET_FRACTION:.0%} of {format_bytes(free)} free {args.device} memory"


def base_config(args: argparse.Namespace, patch_size: int, steps: int) -> dict[str, Any]:
    """The config section of a size's row (docs/architecture.md's keys plus the sweep's own)."""
    step = StepConfig(
        patch_size=patch_size,
        batch_size=args.batch_size,
        backbone=args.backbone,
        output_stride=args.output_stride,
        precision=args.precision,
        remat=args.remat,
        device=args.device,
        threads=args.threads,
        optimizer=args.optimizer,
        backbone_options=() if args.alpha is None else (("alpha", args.alpha),),
    )
    config: dict[str, Any] = {
        **step.as_dict(),
        "learning_rate": learning_rate_at(args, patch_size),
        "data": args.data
        or (
            f"synthetic {args.synthetic_slides}x{args.synthetic_size}"
            if args.slides is None
            else str(args.slides)
        ),
        "pixel_budget": float(args.pixel_budget),
        "steps": steps,
        "seed": args.seed,
        "requested_precision": args.precision,
        "requested_remat": args.remat,
        # always there: points measured before the correction were scored uncorrected
        "prior_correction": args.prior_correction,
    }
    # only when not the default, so the points already measured keep their keys
    if args.slides is None and args.data is None and args.synthetic_task != "local":
        config["synthetic_task"] = args.synthetic_task
    norm = resolve_norm(args.norm, args.batch_size)
    if norm != "batch":
        config["norm"] = norm
    # likewise only when not the default
    for key, default in (
        ("head_filters", HEAD_FILTERS),
        ("tumour_weight", 1.0),
        ("tumor_ratio", 0.5),
        ("warmup_steps", None),
    ):
        if getattr(args, key) != default:
            config[key] = getattr(args, key)
    return config


def data_spec(args: argparse.Namespace) -> dict[str, Any]:
    """What the worker reads: real folders, or the synthetic slides (made on first use)."""
    from histoseg.wsi.synth import parse_size

    return {
        "slides": None if args.slides is None else str(args.slides),
        "annotations": None if args.annotations is None else str(args.annotations),
        "data": args.data,
        "synthetic_task": args.synthetic_task,
        "synthetic_dir": str(args.synthetic_dir or default_synthetic_dir(args.synthetic_task)),
        "synthetic_slides": args.synthetic_slides,
        "synthetic_size_px": list(parse_size(args.synthetic_size)),
        "val_fraction": args.val_fraction,
        "max_val_patches": args.max_val_patches,
        "run_dir": str(args.run_dir),
    }


def size_row(config: dict, plan: SizePlan, result: dict, extra: dict) -> dict:
    """One accuracy row from the plan and what the worker returned."""
    from histoseg.results import make_row

    predicted = {"peak_bytes": plan.predicted_peak_bytes} if plan.predicted_peak_bytes else None
    status = result.get("status", "error")
    return make_row(
        "accuracy",
        config,
        status=status,
        reason=result.get("reason") if status != "ok" else None,
        measured=result.get("measured"),
        predicted=predicted,
        metrics=result.get("metrics") if status == "ok" else None,
        extra={**extra, **(result.get("extra") or {})},
    )


def _analytic_predictor(args: argparse.Namespace) -> Callable[[int, str, str], int | None]:
    """The analytic step-peak predictor of the sweep's model: its options (width, head
    channels, normalisation) are the estimate's model options."""
    options = {"alpha": args.alpha} if args.alpha is not None else {}
    if args.head_filters != HEAD_FILTERS:
        options["head_filters"] = args.head_filters
    norm = resolve_norm(args.norm, args.batch_size)
    if norm != "batch":
        options["norm"] = norm
    return estimate_predictor(
        args.backbone, args.batch_size, args.output_stride, args.optimizer, options
    )


def run_sweep(
    args: argparse.Namespace,
    *,
    runner: Callable[[dict], dict] = run_worker,
    predict: Callable[[int, str, str], int | None] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Plan, run (or resume, or skip) every size and write the rows after each; returns the rows."""
    out = Path(args.out)
    with locked(rows_lock(out)):
        rows = load_rows_if_exists(out)
    budget, budget_source = memory_budget(args)
    if predict is None:
        predict = _analytic_predictor(args)
    n_points = len(sweep_points(args))
    log(
        f"accuracy sweep: sizes {' '.join(map(str, args.sizes))} px, pixel budget {args.pixel_budget:.3g} px "
        f"per run, batch {args.batch_size}, {args.backbone}, seeds {' '.join(map(str, args.seeds))}, "
        f"{n_points} runs ({n_points * args.pixel_budget:.3g} px in all), memory budget "
        f"{format_bytes(budget) if budget else 'none'} ({budget_source})"
    )
    command = getattr(args, "command", None) or command_line(
        "bench.accuracy", getattr(args, "argv", None)
    )
    results: list[dict] = []
    points = sweep_points(args)
    started_sweep = time.monotonic()
    trained = 0
    for index, (point_args, size) in enumerate(points, start=1):
        steps = steps_for_budget(args.pixel_budget, args.batch_size, size)
        config = base_config(point_args, size, steps)
        head = f"[{index}/{len(points)}] {_point_name(point_args, size)}"
        done = finished_row(rows, config)
        if done is not None and not args.force:
            log(f"{head}: already measured ({done.get('created', '?')}), kept; --force re-runs it")
            results.append(done)
            continue
        plan = plan_size(
            size,
            steps=steps,
            precision=args.precision,
            remat=args.remat,
            memory_budget_bytes=budget,
            allow_remat=args.allow_remat,
            allow_bf16=args.allow_bf16,
            predict=predict,
        )
        config.update(precision=plan.precision, remat=plan.remat)
        extra = {
            "command": command,
            "pixels_seen": steps * args.batch_size * size**2,
            "memory_budget_bytes": budget,
            "memory_budget_source": budget_source,
        }
        if args.lr_rule != "fixed":  # the config's learning_rate says what ran; this, why
            extra["lr_rule"] = f"{args.lr_rule}: {args.learning_rate:g} x px / {LR_REFERENCE_PX}"
        if not plan.run:
            log(f"{head}: skipped — {plan.reason}")
            row = size_row(config, plan, {"status": "skipped", "reason": plan.reason}, extra)
        else:
            predicted = (
                format_bytes(plan.predicted_peak_bytes) if plan.predicted_peak_bytes else "?"
            )
            log(
                f"{head}: training {steps} steps x batch {args.batch_size} "
                f"({extra['pixels_seen'] / 1e6:.0f} Mpx), {plan.precision}/remat {plan.remat}, "
                f"predicted peak {predicted}"
            )
            started = time.monotonic()
            result = runner({"config": config, "data": data_spec(point_args)})
            extra["wall_s"] = round(time.monotonic() - started, 1)
            row = size_row(config, plan, result, extra)
            trained += 1
            log(f"{head}: {_row_summary(row)}; {_eta(started_sweep, trained, points, index)}")
        save_row(out, row)
        results.append(row)
    return results


def sweep_points(args: argparse.Namespace) -> list[tuple[argparse.Namespace, int]]:
    """Every (per-point arguments, patch size) of the sweep, seed by seed.

    Seeds form the outer loop, so a sweep stopped part way holds whole curves (every task
    and size) for its first seeds rather than every seed of its first sizes.
    """
    tasks = args.synthetic_task if isinstance(args.synthetic_task, list) else [args.synthetic_task]
    if args.slides is not None or args.data is not None:
        tasks = tasks[:1]  # real slides have no synthetic task
    return [
        (argparse.Namespace(**{**vars(args), "synthetic_task": task, "seed": seed}), size)
        for seed in args.seeds
        for task in tasks
        for size in args.sizes
    ]


def _point_name(args: argparse.Namespace, size: int) -> str:
    task = "" if args.slides is not None or args.data is not None else f"{args.synthetic_task}, "
    return f"{task}{size} px, seed {args.seed}"


def _eta(started: float, trained: int, points: Sequence[Any], index: int) -> str:
    """Elapsed time and a naive estimate of what is left (points still to train, at the
    mean wall time of those trained so far)."""
    elapsed_s = time.monotonic() - started
    left_s = elapsed_s / max(1, trained) * (len(points) - index)
    return f"{elapsed_s / 60:.0f} min so far, about {left_s / 60:.0f} min left"


def _row_summary(row: dict) -> str:
    if row["status"] != "ok":
        return f"{row['status']} — {row.get('reason')}"
    m = row.get("metrics", {})
    return f"accuracy {m.get('accuracy', math.nan):.4f}, mIoU {m.get('miou', math.nan):.4f}, AUC {m.get('auc', math.nan):.4f}"


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.accuracy",
        description="Train each patch size on the same budget of pixels seen and evaluate it on "
        "held-out slides (pixel accuracy, mIoU, ROC AUC); rows of kind 'accuracy'.",
        epilog="Examples:\n"
        "  python -m bench.accuracy --sizes 256 512 1024\n"
        "  python -m bench.accuracy --sizes 256 704 1024 2048 --allow-remat --pixel-budget 5e8\n"
        "  python -m bench.accuracy --backbone xception65 --slides c16/images --annotations c16/xml\n"
        "  python -m bench.accuracy --synthetic-task context --seeds 0 1 2 --batch-size 1 "
        "--alpha 0.35 --head-filters 64 --sizes 256 512 1024 --tumour-weight 3 --markdown\n\n"
        "Re-running keeps sizes already measured (--force re-runs them).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _training_options(parser)
    _tumour_prior_options(parser)
    _data_options(parser)
    _run_options(parser)
    return parser


def _training_options(parser: argparse.ArgumentParser) -> None:
    """Patch sizes, the pixel budget and how each size trains."""
    parser.add_argument("--sizes", type=int, nargs="+", default=list(DEFAULT_SIZES), metavar="PX")
    parser.add_argument(
        "--pixel-budget",
        type=finite_float(0, None, lo_open=True),
        default=DEFAULT_PIXEL_BUDGET,
        help=f"training pixels per size (default {DEFAULT_PIXEL_BUDGET:.0e}); "
        "steps = budget / (batch * P^2)",
    )
    # Batch 2, not the study's 1, by default: at batch 1 batch norm's moving statistics
    # never match the per-patch ones the model trained with, and every size collapsed to
    # all-background (results/accuracy.json); batch 2 learned (accuracy_batch2.json). At
    # --batch-size 1, --norm auto picks group norm, which learns.
    parser.add_argument("--batch-size", type=int, default=2, help="patches per step (default 2)")
    parser.add_argument(
        "--backbone", default="mobilenetv2", help="mobilenetv2 (default), xception65, resnet50"
    )
    parser.add_argument(
        "--alpha",
        type=parse_alpha,
        default=None,
        help=f"mobilenetv2 width multiplier, in (0, {MAX_ALPHA:g}]",
    )
    parser.add_argument("--output-stride", type=int, default=16)
    parser.add_argument(
        "--precision", default="float32", choices=("float32", "mixed_bfloat16", "mixed_float16")
    )
    parser.add_argument("--remat", default="none", choices=("none", "blocks", "full"))
    parser.add_argument(
        "--norm",
        default="auto",
        choices=NORM_CHOICES,
        help="normalisation: batch, frozen, group, or auto: group at --batch-size 1, "
        "else batch (default auto)",
    )
    parser.add_argument(
        "--head-filters",
        type=int_in_range(1, 4096),
        default=HEAD_FILTERS,
        help=f"channels of ASPP and the decoder (default {HEAD_FILTERS}, the paper's)",
    )
    parser.add_argument(
        "--warmup-steps", type=int, default=None, help="(default: 10%% of steps, at most 100)"
    )
    parser.add_argument("--optimizer", default="adam", choices=("adam", "sgd"))
    parser.add_argument(
        "--learning-rate", type=float, default=1e-3, help="(at 256 px with --lr-rule side)"
    )
    parser.add_argument(
        "--lr-rule",
        choices=LR_RULES,
        default="fixed",
        help="fixed: --learning-rate at every size; side: --learning-rate x patch px / "
        f"{LR_REFERENCE_PX}, for a fixed pixel budget's fewer, larger steps (default fixed)",
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "gpu"))
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(DEFAULT_SEEDS),
        metavar="SEED",
        help="training seeds; each point is trained once per seed "
        f"(default {' '.join(map(str, DEFAULT_SEEDS))})",
    )


def _tumour_prior_options(parser: argparse.ArgumentParser) -> None:
    """How much tumour the model sees and weighs, and whether scoring undoes it."""
    parser.add_argument(
        "--tumour-weight",
        type=float,
        default=1.0,
        help="loss weight of tumour pixels (default 1: plain mean)",
    )
    parser.add_argument(
        "--tumor-ratio", type=float, default=0.5, help="share of tumour patches (default 0.5)"
    )
    parser.add_argument(
        "--prior-correction",
        action="store_true",
        help="score the probability corrected for the sampler's and --tumour-weight's "
        "tumour prior (histoseg.train.prior); each row keeps both scorings either way",
    )


def _data_options(parser: argparse.ArgumentParser) -> None:
    """Slides: a challenge folder, a folder of slides, or synthetic ones."""
    parser.add_argument(
        "--data", metavar="NAME=DIR", help="camelyon16=DIR or camelyon17=DIR (published layout)"
    )
    parser.add_argument(
        "--slides", type=Path, default=None, help="folder of slides (default: synthetic)"
    )
    parser.add_argument(
        "--annotations", type=Path, default=None, help="folder of ASAP XML annotations"
    )
    parser.add_argument(
        "--synthetic-task",
        nargs="+",
        default=list(SYNTHETIC_TASKS),
        choices=SYNTHETIC_TASKS,
        help="local: tumour has its own texture; context: only a lesion's margin marks it "
        "(default: both)",
    )
    parser.add_argument(
        "--synthetic-dir",
        type=Path,
        default=None,
        help="(default data/synthetic, or data/synthetic-context for --synthetic-task context)",
    )
    parser.add_argument(
        "--synthetic-slides", type=int_in_range(2), default=6, help="at least 2 (default 6)"
    )
    parser.add_argument("--synthetic-size", default="8000x6000", help="WIDTHxHEIGHT px per slide")
    parser.add_argument(
        "--val-fraction",
        type=finite_float(0, 1, lo_open=True, hi_open=True),
        default=1 / 3,
        help="share of the slides held out, in (0, 1) (default 1/3)",
    )
    parser.add_argument(
        "--max-val-patches",
        type=int,
        default=0,
        help="cap on validation patches (default 0: every tissue patch of the held-out slides)",
    )


def _run_options(parser: argparse.ArgumentParser) -> None:
    """Per-size runs, the memory plan, the results file."""
    parser.add_argument("--run-dir", type=Path, default=Path("runs/accuracy"), help="per-size runs")
    parser.add_argument(
        "--memory-budget",
        default=None,
        help="memory a step may use, e.g. 8GB (default: 80%% of the device's free memory)",
    )
    parser.add_argument(
        "--allow-remat", action="store_true", help="use block recomputation where needed"
    )
    parser.add_argument("--allow-bf16", action="store_true", help="use mixed bfloat16 where needed")
    parser.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help=f"results file (default {DEFAULT_OUT})"
    )
    parser.add_argument("--force", action="store_true", help="re-run sizes already measured")
    parser.add_argument("--no-plots", action="store_true", help="skip bench.plots at the end")
    parser.add_argument(
        "--markdown",
        action="store_true",
        help="print the end-of-sweep summary over seeds as a Markdown table",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)


def check_args(args: argparse.Namespace) -> None:
    """Reject what cannot run, naming the value and what is allowed."""
    for size in args.sizes:
        if size < args.output_stride or size % args.output_stride:
            raise ConfigError(
                f"patch size {size} px is not a positive multiple of output stride {args.output_stride}"
            )
    if args.batch_size < 1 or args.threads < 1:
        raise ConfigError(
            f"--batch-size and --threads must be >= 1, got {args.batch_size}, {args.threads}"
        )
    if (args.slides is None) != (args.annotations is None):
        raise ConfigError(
            "give both --slides and --annotations (real data), or neither (synthetic slides)"
        )
    if args.data is not None:
        from histoseg.wsi.camelyon import parse_data_spec

        parse_data_spec(args.data)
        if args.slides is not None:
            raise ConfigError("give --data or --slides/--annotations, not both")
    for folder in (args.slides, args.annotations):
        if folder is not None and not folder.is_dir():
            raise ConfigError(f"{folder} is not a folder")
    if args.synthetic_dir is not None and len(set(args.synthetic_task)) > 1:
        raise ConfigError(
            "--synthetic-dir holds one task's slides: give it with one --synthetic-task"
        )
    if len(set(args.seeds)) != len(args.seeds):
        raise ConfigError(f"--seeds must differ, got {' '.join(map(str, args.seeds))}")
    if args.out.suffix != ".json":
        raise ConfigError(f"--out {args.out} must end in .json (a .csv is written beside it)")
    steps_for_budget(args.pixel_budget, args.batch_size, min(args.sizes))
    # The files the sweep will write, refused now rather than after hours of training: a
    # results JSON or CSV, or (with plots) a README or figure, that histoseg did not write.
    from histoseg.results import check_results_path

    check_results_path(args.out)
    if not args.no_plots:
        from bench.plots.readme import check_plot_folder

        check_plot_folder(args.out.parent)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    check_args(args)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    rows = run_sweep(args)
    print()
    print(summary_table(rows))
    print()
    print(seed_summary(rows, markdown=args.markdown))
    if not args.no_plots:
        from bench.plots import draw_all, load_results, report_lines
        from bench.plots.readme import write_readme

        out_dir = args.out.parent
        rows_by_file = load_results([out_dir])
        for line in report_lines(draw_all(rows_by_file, out_dir)):
            print(line)
        print(f"README: wrote {write_readme(out_dir, rows_by_file)}")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
