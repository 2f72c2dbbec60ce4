"""``python -m bench.memory``: what patch size costs in memory and time, measured and predicted.

A config is a train step (``--mode train``, the default) or a forward pass alone
(``--mode infer``: inference, ``training=False``, no optimizer and no recomputation); the
rows of a forward pass carry ``mode`` "infer" in their config (docs/memory-harness.md,
"Inference memory").

The sweep is the product of the list-valued options. Every config is first predicted by
the analytic model (``histoseg.memory.estimate``); one that fits the device's free memory
is then measured in a fresh ``bench.worker`` process (a crash or an out-of-memory kill
becomes a row with its status and reason, and the sweep goes on); one that does not fit is
written as a "skipped" row carrying only its prediction. Rows are written atomically to
``--out`` (JSON, with a CSV beside it) after every config, so an interrupted sweep resumes
where it stopped: configs already measured are skipped unless ``--force``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import sample_configs
from bench.memory_args import (
    BASELINE_OUT,
    DEFAULT_OUT,
    as_forward_passes,
    build_parser,
    configs_from_args,
)
from bench.memory_runs import median_process, run_worker
from bench.memory_table import (
    print_largest_patches,
    slab_points,
    summary_markdown,
    summary_table,
)
from histoseg.cli import check_output, run_main
from histoseg.config import PRECISIONS, StepConfig
from histoseg.errors import ConfigError, HistosegError
from histoseg.files import locked
from histoseg.memory.calibrate import calibrated_prediction, peak_from_activations
from histoseg.memory.devices import fit_problem, parse_size
from histoseg.results import (
    check_results_path,
    config_key,
    load_rows_if_exists,
    make_row,
    merge_rows,
    write_rows,
)

#: What CI guards: small configs that measure in seconds. The default test run checks the
#: MobileNetV2 rows; the Xception-65 row is checked with --runslow.
BASELINE_CONFIGS: tuple[StepConfig, ...] = (
    StepConfig(
        patch_size=128,
        backbone="mobilenetv2",
        backbone_options=(("alpha", 0.35),),
        remat="none",
        steps=1,
    ),
    StepConfig(
        patch_size=128,
        backbone="mobilenetv2",
        backbone_options=(("alpha", 0.35),),
        remat="blocks",
        steps=1,
    ),
    StepConfig(patch_size=64, backbone="xception65", remat="none", steps=1),
)
#: Memory per patch may grow at most this much before the CI regression fails.
REGRESSION_TOLERANCE = 0.05
#: The figures the CI regression compares.
REGRESSION_METRICS = ("activation_bytes_per_patch", "peak_bytes_per_patch")
#: Row statuses that count as "already measured" when a sweep is re-run.
DONE_STATUSES = ("ok", "oom")


def predict(config: StepConfig) -> dict[str, int]:
    """The analytic estimate of ``config`` (the ``predicted`` section of its row): a train
    step's, or a forward pass's (:mod:`histoseg.memory.inference`) for mode infer; on the
    torch backend, the step replayed on fake tensors (:mod:`histoseg.memory.torch_replay`)."""
    if config.backend == "torch":
        from histoseg.memory.torch_replay import replay

        try:
            return replay(config).as_dict()
        except HistosegError:
            raise
        except Exception as exc:  # an op the fake tensors do not support: a row, not a crash
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise HistosegError(f"torch replay failed: {type(exc).__name__}: {first}") from exc
    from histoseg.memory.estimate import estimate, estimate_inference

    step = {
        "patch_size": config.patch_size,
        "batch_size": config.batch_size,
        "backbone": config.backbone,
        "output_stride": config.output_stride,
        "precision": config.precision,
        "device": config.device,
        "backbone_options": config.backbone_options,
    }
    if config.mode == "infer":
        return estimate_inference(**step).as_dict()
    return estimate(**step, remat=config.remat, optimizer=config.optimizer).as_dict()


def fit_check(config: StepConfig, predicted: dict[str, int]) -> str | None:
    """Why ``config`` cannot run here (as a row reason), or None when it should fit; a
    patch cut across ranks runs all its ranks here, each at the predicted peak."""
    return fit_problem(predicted["peak_bytes"], config.device, config.spatial_workers)


def sweep(
    configs: Sequence[StepConfig],
    out: Path,
    *,
    predict_only: bool = False,
    force: bool = False,
    timeout_s: float | None = None,
    progress: bool = True,
    lock_file: Path | None = None,
    note: str | None = None,
    command: str | None = None,
    draw: dict[str, int] | None = None,
    allocator_trace: bool = False,
    repeats: int = 1,
    calibration_sizes: Sequence[int] = (),
) -> list[dict[str, Any]]:
    """Predict, fit-check and measure each config (in ``repeats`` fresh processes, see
    :func:`median_process`); write ``out`` after every one.

    With ``calibration_sizes`` each config is first measured at those patch sizes (rows
    of their own, reused when ``out`` has them), and its prediction is the calibrated
    route's (:mod:`histoseg.memory.calibrate`), the analytic one kept beside it. ``draw``
    (``{"sample": N, "seed": S}``) marks rows of a random draw (``--sample``) in
    ``extra.draw``: scattered points, which the patch-size figure leaves out.

    Returns:
        The rows of this sweep, in config order (old rows kept for configs not re-run).
    """
    from tqdm import tqdm

    marks = {k: v for k, v in (("note", note), ("command", command), ("draw", draw)) if v}

    def old_row(config: StepConfig) -> dict[str, Any] | None:
        key = config_key(config.as_dict())
        rows = [r for r in load_rows_if_exists(out) if r.get("kind") == "memory"]
        return next((r for r in rows if config_key(r["config"]) == key), None)

    def run(
        config: StepConfig,
        calibration: dict[int, dict[str, Any]] | None = None,
        only_predict: bool = predict_only,
    ) -> dict[str, Any]:
        old = old_row(config)
        done = old is not None and (old["status"] in DONE_STATUSES or only_predict)
        if done and not force and calibration is None:
            return old
        row = _one(
            config,
            rows_in_out=load_rows_if_exists(out),
            predict_only=only_predict,
            force=force,
            timeout_s=timeout_s,
            lock=lock_file,
            allocator_trace=allocator_trace,
            repeats=repeats,
            calibration=calibration,
        )
        if marks:
            row.setdefault("extra", {}).update(marks)
        # Re-read before writing: another sweep may have added rows to the same file.
        write_rows(out, merge_rows(load_rows_if_exists(out), [row]))
        return row

    mine: list[dict[str, Any]] = []
    bar = tqdm(configs, desc="bench.memory", unit="config", disable=not progress)
    for config in bar:
        bar.set_postfix_str(f"{config.backbone} {config.patch_size}px b{config.batch_size}")
        calibration = None
        if calibration_sizes:
            # measured even under --predict-only: they are what the prediction is made of
            points = [
                run(config.replace(patch_size=p), only_predict=False) for p in calibration_sizes
            ]
            calibration = {
                r["config"]["patch_size"]: calibration_point(r)
                for r in points
                if r["status"] == "ok"
            }
        mine.append(run(config, calibration))
    return mine


def calibration_point(row: dict[str, Any]) -> dict[str, Any]:
    """What the measured route fits of a measured row: its ``measured`` section, with the
    peak of each phase of the step when the row was traced (``--allocator-trace``)."""
    phases = ((row.get("extra") or {}).get("allocator_trace") or {}).get("phase_peak_bytes")
    return {**row["measured"], "phase_peak_bytes": phases} if phases else row["measured"]


def _gpu_visible(backend: str) -> bool:
    if backend == "torch":
        import torch

        return torch.cuda.is_available()
    from histoseg.memory.devices import tensorflow_sees_gpu

    return tensorflow_sees_gpu()


def _one(
    config: StepConfig,
    *,
    predict_only: bool,
    force: bool,
    timeout_s: float | None,
    lock: Path | None = None,
    allocator_trace: bool = False,
    repeats: int = 1,
    calibration: dict[int, dict[str, Any]] | None = None,
    rows_in_out: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    cfg = config.as_dict()
    if config.device == "gpu" and not predict_only and not _gpu_visible(config.backend):
        framework = "PyTorch" if config.backend == "torch" else "TensorFlow"
        return make_row("memory", cfg, status="skipped", reason=f"no GPU visible to {framework}")
    extra: dict[str, Any] = {"steps": config.steps}
    try:
        # a slab has no analytic estimate: only the measured route predicts it
        predicted = predict(config) if config.spatial_workers == 1 else None
        if predicted is None and calibration is None:
            predicted = _slab_law(config, rows_in_out)
        if calibration is not None:
            extra["analytic"] = predicted
            predicted = calibrated_prediction(
                calibration,
                config.patch_size,
                peak_from_activations=peak_from_activations(config.spatial_workers, config.remat),
            )
    except HistosegError as exc:
        return make_row("memory", cfg, status="error", reason=str(exc), extra=extra)
    if predicted is None and predict_only:
        reason = (
            "a patch cut across ranks is predicted by the measured route only: --calibrate, "
            "or rows of it at 2+ rank counts and sizes in --out"
        )
        return make_row("memory", cfg, status="skipped", reason=reason, extra=extra)
    if predict_only:
        reason = "predicted only (--predict-only), not measured"
        return make_row(
            "memory", cfg, status="skipped", reason=reason, predicted=predicted, extra=extra
        )
    # The fit check runs once the lock is held: a run that held it may have held memory too.
    with locked(lock):
        why_not = None if force or predicted is None else fit_check(config, predicted)
        if why_not:
            return make_row(
                "memory", cfg, status="skipped", reason=why_not, predicted=predicted, extra=extra
            )
        rows = [run_worker(config, timeout_s, allocator_trace=allocator_trace)]
        # a config that failed once fails again: only measured ones are repeated
        while rows[0]["status"] == "ok" and len(rows) < repeats:
            rows.append(run_worker(config, timeout_s, allocator_trace=allocator_trace))
    row = median_process(rows) if len(rows) > 1 else rows[0]
    if calibration is not None:
        # the worker's own prediction is the analytic one of the model it built
        row.setdefault("extra", {})["analytic"] = row.pop("predicted", extra["analytic"])
        row["predicted"] = predicted
    if predicted is not None:
        row.setdefault("predicted", predicted)
    return row


def _slab_law(config: StepConfig, rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """The slab law's prediction of ``config`` from measured ``rows`` of it at other sizes
    and rank counts (:func:`histoseg.memory.calibrate.slab_law_prediction`), or None when
    they are too few."""
    from histoseg.memory.calibrate import slab_law_prediction

    this = (config.patch_size, config.spatial_workers)  # never fitted on itself
    points = [q for q in slab_points(config, rows) if q[:2] != this]
    try:
        predicted = slab_law_prediction(
            points,
            config.patch_size,
            config.spatial_workers,
            peak_from_activations=peak_from_activations(config.spatial_workers, config.remat),
        )
    except ConfigError:
        return None
    return predicted if extrapolates(config, predicted["fitted_sizes_px"]) else None


def extrapolates(config: StepConfig, sizes: Sequence[int]) -> bool:
    """Whether a measured route fitted at patch ``sizes`` predicts ``config``: with
    recomputation only upwards. Below the sizes it was fitted at, a recomputed step's
    peak is in another phase: the fixed bytes of the gradient sum and the update, not the
    recomputed block's tensors that grow with the patch (xception65 bfloat16 ``full``
    over 2 and 4 ranks: flat at 384-768 px, growing from 1024 px), which an affine fit in
    area misses by 10-20%."""
    return config.remat == "none" or config.patch_size >= min(sizes)


def refresh_predictions(out: Path, calibration_sizes: Sequence[int] = ()) -> list[dict[str, Any]]:
    """Recompute the ``predicted`` section of every memory row in ``out`` (no training).

    The estimate is deterministic code, so after changing it the predictions of an
    existing sweep can be brought up to date without measuring again. With
    ``calibration_sizes`` (or for a row already calibrated, its own sizes) a row whose
    config was measured at those patch sizes in ``out`` is predicted by the calibrated
    route from those rows (a file of GPU rows measured elsewhere is re-predicted so), the
    analytic estimate kept in ``extra.analytic``; a row at one of those sizes is not
    predicted from itself, and with recomputation a row below those sizes not at all
    (:func:`extrapolates`). A patch cut across ranks without a calibration is predicted by
    the slab law of the file's rows of its config at other sizes and rank counts, when
    there are enough.
    """
    from histoseg.results import load_rows

    rows = load_rows(out)
    memory = [r for r in rows if r.get("kind") == "memory"]
    measured = {
        config_key(r["config"]): calibration_point(r)
        for r in memory
        if r["status"] == "ok" and r.get("measured")
    }

    def calibration_for(row: dict[str, Any]) -> dict[int, dict[str, Any]] | None:
        sizes = calibration_sizes or (row.get("predicted") or {}).get("calibration_sizes_px")
        if not sizes or row["config"]["patch_size"] in sizes:  # never fitted on itself
            return None
        if not extrapolates(StepConfig.from_dict(row["config"]), sizes):
            return None
        found = {p: measured.get(config_key({**row["config"], "patch_size": p})) for p in sizes}
        return None if None in found.values() else found

    for row in memory:
        extra = row.setdefault("extra", {})
        config = StepConfig.from_dict(row["config"])
        try:
            analytic = predict(config) if config.spatial_workers == 1 else None
        except HistosegError as exc:
            extra["predict_error"] = str(exc)
            continue
        calibration = calibration_for(row)
        if calibration is None:
            # a slab: the slab law from the file's other rows of its config, if enough
            predicted = analytic if analytic is not None else _slab_law(config, memory)
            if predicted is None:
                row.pop("predicted", None)
            else:
                row["predicted"] = predicted
            extra.pop("analytic", None)
        else:
            row["predicted"] = calibrated_prediction(
                calibration,
                config.patch_size,
                peak_from_activations=peak_from_activations(config.spatial_workers, config.remat),
            )
            extra["analytic"] = analytic
    write_rows(out, rows)
    return memory


def compare_to_baseline(
    baseline: dict[str, Any],
    current: dict[str, Any],
    tolerance: float = REGRESSION_TOLERANCE,
) -> list[dict[str, Any]]:
    """Compare memory per patch of a fresh row with its baseline row.

    Returns:
        One dict per metric of :data:`REGRESSION_METRICS`: ``metric``, ``baseline``,
        ``current``, ``change`` (relative) and ``verdict``: "grew" (fails CI: more than
        ``tolerance`` larger), "shrank" (more than ``tolerance`` smaller: refresh the
        baseline on purpose) or "same".
    """
    out = []
    for metric in REGRESSION_METRICS:
        old = baseline["measured"][metric]
        new = current["measured"][metric]
        change = (new - old) / old if old else float("inf") if new else 0.0
        verdict = "grew" if change > tolerance else "shrank" if change < -tolerance else "same"
        out.append(
            {
                "metric": metric,
                "baseline": old,
                "current": new,
                "change": change,
                "verdict": verdict,
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.out.suffix != ".json":
        raise ConfigError(f"--out {args.out} must end in .json (a .csv is written beside it)")
    if args.baseline:
        configs = list(BASELINE_CONFIGS)
        args.force = True
        if args.out == DEFAULT_OUT:
            args.out = BASELINE_OUT
    elif args.sample is not None:
        drawn = sample_configs(args.sample, args.seed, steps=args.steps, norms=args.norm)
        drawn = [
            c.replace(backend=args.backend)
            for c in drawn
            if c.precision in (args.precision or PRECISIONS)
        ]
        configs = drawn if "train" in args.mode else []
        configs += as_forward_passes(drawn) if "infer" in args.mode else []
    else:
        configs = configs_from_args(args)
    memory = parse_size(args.device_memory) if args.device_memory else None
    if args.show:
        from histoseg.results import load_rows

        shown = [r for r in load_rows(args.out) if r.get("kind") == "memory"]
        print(summary_markdown(shown) if args.markdown else summary_table(shown))
        return 0
    check_results_path(args.out)  # the user's JSON or CSV, or an unwritable folder: refused
    check_output(args.out, force=True)  # now, not after the sweep
    _load_backend(_rows_backend(args.out) if args.refresh_predictions else args.backend)
    if args.refresh_predictions:
        rows = refresh_predictions(args.out, args.calibrate or ())
        print(summary_table(rows))
        print(f"\n{len(rows)} rows re-predicted in {args.out}")
        return 0
    rows = sweep(
        configs,
        args.out,
        predict_only=args.predict_only,
        force=args.force,
        timeout_s=args.timeout_s,
        progress=not args.quiet,
        lock_file=args.lock_file,
        note=args.note,
        command=_command(argv),
        draw=None if args.sample is None else {"sample": args.sample, "seed": args.seed},
        allocator_trace=args.allocator_trace,
        repeats=args.repeats,
        calibration_sizes=args.calibrate or (),
    )
    print(summary_table(rows))
    print(f"\n{len(rows)} rows -> {args.out} (+ {args.out.with_suffix('.csv').name})")
    _refresh_results_readme(args.out)
    if memory is not None:
        print_largest_patches(configs, memory, load_rows_if_exists(args.out))
    return 0


def _command(argv: Sequence[str] | None) -> str:
    """The command line of this sweep, as ``results/README.md`` shows it."""
    from histoseg.cli import command_line

    return command_line("bench.memory", argv)


def _refresh_results_readme(out: Path) -> None:
    """Regenerate results/README.md after a sweep into the results folder."""
    if out.parent.name != "results":
        return
    try:
        from bench.plots.readme import write_readme

        print(f"README: wrote {write_readme(out.parent)}")
    except Exception as exc:  # the README is a convenience; the rows are already written
        print(f"README not refreshed: {type(exc).__name__}: {exc}", file=sys.stderr)


def _rows_backend(out: Path) -> str:
    """The one Keras backend of the memory rows in ``out`` (what a refresh must load)."""
    from histoseg.results import load_rows

    backends = {
        StepConfig.from_dict(r["config"]).backend
        for r in load_rows(out)
        if r.get("kind") == "memory"
    }
    if len(backends) > 1:
        raise ConfigError(
            f"{out} holds rows of both backends; a process loads Keras with one, so refresh "
            "a file of one backend"
        )
    return backends.pop() if backends else "tensorflow"


def _load_backend(backend: str) -> None:
    """Load Keras's ``backend`` in this process before anything imports Keras: the torch
    backend for its replay, or TensorFlow with the GPU hidden."""
    if backend == "torch":
        from histoseg.memory.torch_replay import torch_backend

        torch_backend()
    else:
        _hide_gpus_from_this_process()


def _hide_gpus_from_this_process() -> None:
    """Keep the parent's symbolic builds off the GPU, whose memory the workers measure."""
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        tf.config.set_visible_devices([], "GPU")


if __name__ == "__main__":
    raise SystemExit(run_main(main))
