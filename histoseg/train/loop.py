"""One training run as one rank of an engine: options in, a results row out.

The run's pieces live beside it, each usable alone (the CLI, bench.scaling and
bench.norm_check share them): the step (:mod:`~histoseg.train.distributed`), the schedule,
checkpoints, validation, the slide split and the run's patches (:mod:`~histoseg.train.slides`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from histoseg.errors import ConfigError
from histoseg.train.checkpoints import load_checkpoint, save_checkpoint
from histoseg.train.distributed import DistributedStep, StepTimes, all_variables, gradient_bytes
from histoseg.train.engines import Engine
from histoseg.train.options import TrainOptions
from histoseg.train.prior import PriorCorrection, corrected_probability, tumour_share
from histoseg.train.schedule import WarmupSchedule
from histoseg.train.slides import (
    train_and_val_slides,
    training_patches,
    validation_ceiling,
    validation_patches,
)
from histoseg.train.spatial import SpatialStep
from histoseg.train.summaries import SummaryWriter, write_json
from histoseg.train.validation import evaluate, recalibrate_batch_norm


@dataclasses.dataclass
class _Plan:
    """What one rank trains and validates on, and for how many steps."""

    train_slides: list
    val_slides: list
    train_refs: list
    my_train: list
    val_refs: list
    my_val: list
    total_steps: int
    global_batch: int
    correction: PriorCorrection


@dataclasses.dataclass
class _Trained:
    """What the training loop leaves: per-step times, wall time, last checkpoint."""

    history: list[StepTimes]
    train_s: float
    start_step: int
    last_checkpoint: Path | None
    dataset: Any
    summaries: SummaryWriter


def run(options: TrainOptions, engine: Engine, comm: Any = None) -> dict[str, Any]:
    """Train and validate as one rank of ``engine``; returns the results row (every rank).

    Only the chief logs, writes TensorBoard summaries, checkpoints and the results file.
    ``comm``: this rank's ``histoseg.spatial.HorovodComm`` when ``options.spatial_workers``
    is above 1 (made before the engine starts Horovod: it registers the blocks of ranks).
    """
    plan = _plan(options, engine)
    model, step, peak_lr, warmup = _build(options, engine, plan.total_steps, comm)
    trained = _train(options, engine, plan, model, step, peak_lr)
    spatial = isinstance(step, SpatialStep)
    recalibrated = recalibrate_batch_norm(
        model,
        iter(trained.dataset),
        engine,
        options.bn_recalibration_batches,
        forward=step.forward_training if spatial else None,
    )
    # after the recalibration: the last checkpoint is the model validation scores (the
    # stale moving statistics of the training loop can make inference mode predict nothing)
    if engine.is_chief and plan.total_steps > trained.start_step:
        trained.last_checkpoint = save_checkpoint(
            Path(options.run_dir) / "checkpoints",
            plan.total_steps,
            model,
            step.optimizer,
            bn_recalibrated=True,
            tumour_logit_shift=plan.correction.logit_shift if options.prior_correction else 0.0,
        )
    result, baseline, other = _validate(options, engine, model, plan, step)
    scored = {k: result[k] for k in other}
    corrected, uncorrected = (scored, other) if options.prior_correction else (other, scored)
    extra = {
        "peak_learning_rate": peak_lr,
        "warmup_steps": warmup,
        "bn_recalibration_batches": recalibrated,
        "prior_correction": {
            **plan.correction.as_row(),
            "applied": options.prior_correction,
            "corrected": corrected,
            "uncorrected": uncorrected,
        },
    }
    row = _row(options, engine, plan, trained, step, model, result, baseline, extra)
    if engine.is_chief:
        trained.summaries.scalars(
            plan.total_steps, {f"val/{k}": result[k] for k in ("accuracy", "miou", "auc")}
        )
        trained.summaries.close()
        _write_row(options, row)
    return row


def replica_of(options: TrainOptions, engine: Engine) -> tuple[int, int]:
    """(this rank's replica, replicas): the data-parallel view of the ranks. Every block of
    ``spatial_workers`` consecutive ranks trains one replica (the same patches)."""
    return engine.rank // options.spatial_workers, engine.size // options.spatial_workers


def _plan(options: TrainOptions, engine: Engine) -> _Plan:
    """The slides, this replica's share of the training and validation patches, the steps."""
    from histoseg.wsi.patches import grid_patches, shard
    from histoseg.wsi.slide import open_slide
    from histoseg.wsi.tissue import detect_tissue

    rank, size = replica_of(options, engine)
    train_slides, val_slides = train_and_val_slides(options, engine)
    global_batch = options.batch_size * size
    # each slide's tissue, detected once for the grid and the sampler
    tissues = [detect_tissue(open_slide(tif)) for tif, _ in train_slides]
    grid = []  # the training slides' tissue grid: their tumour share, and an epoch's patches
    for (tif, xml), tissue in zip(train_slides, tissues, strict=True):
        grid += grid_patches(
            tif, options.patch_size, options.level, options.min_tissue, xml, tissue=tissue
        )
    if options.epochs is not None:
        total_steps = max(1, math.ceil(options.epochs * len(grid) / global_batch))
        train_refs = grid
    else:
        total_steps = int(options.steps or 1)
        train_refs = training_patches(
            options, train_slides, total_steps * global_batch, options.seed, tissues
        )
    correction = PriorCorrection(
        tumour_weight=options.tumour_weight,
        train_tumour_share=tumour_share(train_refs),
        slide_tumour_share=tumour_share(grid),
    )
    my_train = shard(train_refs, rank, size, equal=True)
    if not my_train:
        raise ConfigError(
            f"{len(train_refs)} training patches leave none for rank {rank} of {size}"
        )
    val_refs = validation_patches(options, val_slides)
    return _Plan(
        train_slides,
        val_slides,
        train_refs,
        my_train,
        val_refs,
        shard(val_refs, rank, size),
        total_steps,
        global_batch,
        correction,
    )


def _build(
    options: TrainOptions, engine: Engine, total_steps: int, comm: Any
) -> tuple[keras.Model, DistributedStep | SpatialStep, float, int]:
    """The model, the engine-aware (or spatial) step with its scheduled optimizer, peak
    rate, warm-up."""
    from histoseg.models import build_deeplabv3plus
    from histoseg.train.step import make_optimizer

    backbone_kwargs = {"alpha": options.alpha} if options.alpha is not None else {}
    keras.utils.set_random_seed(options.seed)
    model = build_deeplabv3plus(
        options.backbone,
        (options.patch_size, options.patch_size, 3),
        2,
        options.output_stride,
        options.precision,
        options.remat,
        norm=options.norm,
        head_filters=options.head_filters,
        **backbone_kwargs,
    )
    peak_lr = options.learning_rate * (replica_of(options, engine)[1] if options.scale_lr else 1)
    warmup = options.warmup_steps
    if warmup is None:
        warmup = min(100, total_steps // 10)
    optimizer = make_optimizer(options.optimizer, peak_lr, momentum=options.momentum)
    optimizer.learning_rate = WarmupSchedule(peak_lr, total_steps, warmup, options.schedule)
    if options.spatial_workers > 1:
        step = SpatialStep(model, optimizer, comm, tumour_weight=options.tumour_weight)
        return model, step, peak_lr, warmup
    step = DistributedStep(
        model,
        optimizer,
        engine,
        compression="fp16" if options.fp16_allreduce else "none",
        step_mode=options.step_mode,
        tumour_weight=options.tumour_weight,
    )
    return model, step, peak_lr, warmup


def _resume(
    options: TrainOptions, engine: Engine, model: keras.Model, step: DistributedStep
) -> int:
    """The step to start from: the chief's checkpoint, if resuming, with every rank's
    variables set to the chief's."""
    start_step = 0
    if options.resume and engine.is_chief:
        run_dir = Path(options.run_dir)
        source = run_dir / "checkpoints" if options.resume == "auto" else Path(options.resume)
        start_step = load_checkpoint(source, model, step.optimizer)
    engine.broadcast_variables(all_variables(model, step.optimizer), root_rank=0)
    chief_step = float(start_step if engine.is_chief else 0)
    return int(np.asarray(engine.allreduce_sum([np.array([chief_step])])[0])[0])


def _train(
    options: TrainOptions,
    engine: Engine,
    plan: _Plan,
    model: keras.Model,
    step: DistributedStep,
    peak_lr: float,
) -> _Trained:
    """The training loop, from the resumed step to the last; the chief logs and checkpoints."""
    from histoseg.data import iterate_batches, make_dataset

    chief, run_dir = engine.is_chief, Path(options.run_dir)
    start_step = _resume(options, engine, model, step)
    if chief:
        write_json(
            run_dir / "options.json", {**dataclasses.asdict(options), "workers": engine.size}
        )
    summaries = SummaryWriter(run_dir / "tensorboard", chief)
    dataset = make_dataset(
        plan.my_train,
        options.batch_size,
        shuffle=True,
        seed=options.seed + start_step,
        augment=True,
    )
    # a patch read fails inside tf.numpy_function; iterate_batches turns TensorFlow's wrapped
    # error back into the SlideError naming the file (one line, no traceback)
    batches = iterate_batches(dataset)
    bar = None
    if chief and options.progress:
        from tqdm import tqdm

        bar = tqdm(total=plan.total_steps, initial=start_step, desc="train", unit="step")
    history: list[StepTimes] = []
    started = time.perf_counter()
    last_checkpoint = None
    for i in range(start_step, plan.total_steps):
        images, masks = next(batches)
        times = step(images, masks)
        history.append(times)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{times.loss:.4f}", refresh=False)
        if chief and ((i + 1) % options.log_every == 0 or i + 1 == plan.total_steps):
            summaries.scalars(i + 1, _train_scalars(step, times, peak_lr, plan.global_batch))
        if chief and options.checkpoint_every and (i + 1) % options.checkpoint_every == 0:
            last_checkpoint = save_checkpoint(run_dir / "checkpoints", i + 1, model, step.optimizer)
    train_s = time.perf_counter() - started
    if bar is not None:
        bar.close()
    return _Trained(history, train_s, start_step, last_checkpoint, dataset, summaries)


def _train_scalars(
    step: DistributedStep, times: StepTimes, peak_lr: float, global_batch: int
) -> dict[str, float]:
    lr = (
        float(step.optimizer.learning_rate.numpy())
        if hasattr(step.optimizer.learning_rate, "numpy")
        else peak_lr
    )
    scalars = {
        "train/loss": times.loss,
        "train/learning_rate": lr,
        "train/patches_per_s": global_batch / times.step_s,
    }
    if times.allreduce_s is not None:  # only a separate step times its collective
        scalars["train/allreduce_share"] = times.allreduce_s / times.step_s
    return scalars


def _validate(
    options: TrainOptions,
    engine: Engine,
    model: keras.Model,
    plan: _Plan,
    step: DistributedStep | SpatialStep,
) -> tuple[dict[str, Any], dict[str, float], dict[str, float]]:
    """Pixel metrics over every rank's validation patches (a spatial rank: its rows of its
    replica's patches), the all-background baseline's, and the other scoring's: the
    uncorrected probability's when the prior correction is applied, else the corrected one's
    (both from one pass: the correction only moves the threshold)."""
    from histoseg.data import make_dataset
    from histoseg.train.metrics import constant_background_metrics

    val_batches = []
    if plan.my_val:
        val_batches = make_dataset(
            plan.my_val, options.batch_size, shuffle=False, repeat=False, drop_remainder=False
        )
    spatial = {}
    if isinstance(step, SpatialStep):
        spatial = {"tumour_probability": step.tumour_probability, "rows": step.rows}
    shift = plan.correction.logit_shift if options.prior_correction else 0.0
    metrics = evaluate(model, val_batches, engine, tumour_logit_shift=shift, **spatial)
    result = metrics.result()
    baseline = constant_background_metrics(metrics.confusion)
    # the other scoring calls tumour where logit(scored) > -shift (applied), > +shift (not)
    other_shift = plan.correction.logit_shift * (1 if options.prior_correction else -1)
    other = metrics.at_threshold(corrected_probability(0.5, other_shift))
    engine.barrier()
    return result, baseline, other


def _row(
    options: TrainOptions,
    engine: Engine,
    plan: _Plan,
    trained: _Trained,
    step: DistributedStep,
    model: keras.Model,
    result: dict[str, Any],
    baseline: dict[str, float],
    extra: dict[str, Any],
) -> dict:
    """The run's accuracy row: config, validation metrics, step times, what it trained on."""
    from histoseg.results import make_row

    history = trained.history
    steady = history[min(2, len(history) - 1) :] if history else []
    step_s = float(np.median([t.step_s for t in steady])) if steady else math.nan
    timed = [t.allreduce_s for t in steady if t.allreduce_s is not None]
    # an overlapped step cannot time its collective apart (bench.scaling measures what it
    # exposes): None then, unless there is no communication at all
    allreduce_s = float(np.median(timed)) if timed else (0.0 if engine.size == 1 else None)
    patches_per_step = plan.global_batch
    return make_row(
        "accuracy",
        options.row_config(
            device="gpu" if tf.config.list_physical_devices("GPU") else "cpu",
            engine=engine.name,
            workers=replica_of(options, engine)[1],
            step_mode=step.step_mode,
            steps=plan.total_steps,
        ),
        metrics={
            **result,
            "baseline_accuracy": baseline["accuracy"],
            "baseline_miou": baseline["miou"],
            "baseline_auc": baseline["auc"],
        },
        measured={
            "step_s": step_s,
            "allreduce_s": allreduce_s,
            "patches_per_s": patches_per_step / step_s if step_s else math.nan,
            "megapixels_per_s": patches_per_step * options.patch_size**2 / step_s / 1e6
            if step_s
            else math.nan,
            "train_s": trained.train_s,
            "final_loss": history[-1].loss if history else math.nan,
            "gradient_bytes": gradient_bytes(model),
        },
        extra={
            "train_slides": [Path(t).name for t, _ in plan.train_slides],
            "val_slides": [Path(t).name for t, _ in plan.val_slides],
            "train_patches": len(plan.train_refs),
            "peak_learning_rate": extra["peak_learning_rate"],
            "warmup_steps": extra["warmup_steps"],
            "schedule": options.schedule,
            "start_step": trained.start_step,
            "bn_recalibration_batches": extra["bn_recalibration_batches"],
            "prior_correction": extra["prior_correction"],
            "bayes_ceiling": validation_ceiling(options, plan.val_refs),
            "run_dir": str(Path(options.run_dir)),
            "checkpoint": str(trained.last_checkpoint) if trained.last_checkpoint else None,
            **({"command": options.command} if options.command else {}),
        },
    )


def _write_row(options: TrainOptions, row: dict) -> None:
    """Merge the row into the run's results file (the chief's)."""
    from histoseg.results import load_rows_if_exists, merge_rows, write_rows

    results_path = (
        Path(options.results) if options.results else Path(options.run_dir) / "results.json"
    )
    write_rows(results_path, merge_rows(load_rows_if_exists(results_path), [row]))
    row.setdefault("extra", {})["results_path"] = str(results_path)
