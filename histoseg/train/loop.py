"""The pieces of a data-parallel training run, each usable alone (the CLI and bench.scaling
share them): the engine-aware step, the warm-up schedule, checkpoints, validation, the split.

A step runs in one of two modes. "overlap" (the default): one compiled function computes
the gradients, averages each one across the ranks inside the graph (the engine's collective
starts as soon as the backward pass has produced that gradient, while the rest of the
backward pass goes on) and applies them. "separate": three calls, gradients (compiled), the
engine's allreduce of all gradients, the update (compiled); the collective never overlaps
the backward pass, but its time is measurable around the call.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from histoseg.errors import ConfigError
from histoseg.models.norm import FrozenBatchNorm
from histoseg.train.engines import (
    DEFAULT_STEP_MODE,
    Engine,
    check_compression,
    check_step_mode,
)
from histoseg.train.metrics import PixelMetrics
from histoseg.train.step import (
    apply_gradients,
    compute_gradients,
    pixel_loss,
    prepare_images,
    uses_float16,
)

SCHEDULES = ("constant", "poly", "cosine")
SPLITS = ("auto", "slide", "centre")


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass
class StepTimes:
    """One step: the loss on this rank's batch and where the time went, seconds.

    In "separate" mode the step is split into ``compute_s`` (gradients), ``allreduce_s``
    (the collective, timed around the call) and ``apply_s`` (update). In "overlap" mode the
    three run as one compiled call and cannot be timed apart: ``compute_s`` holds the whole
    step and ``allreduce_s`` / ``apply_s`` are None (see ``bench.scaling`` for how the
    exposed communication is measured there).
    """

    loss: float
    compute_s: float
    allreduce_s: float | None
    apply_s: float | None

    @property
    def step_s(self) -> float:
        return self.compute_s + (self.allreduce_s or 0.0) + (self.apply_s or 0.0)

    @property
    def overlapped(self) -> bool:
        return self.allreduce_s is None


class DistributedStep:
    """Train one step on this rank's batch: gradients, engine allreduce, optimizer update.

    Args:
        model: the model to train (variables identical on every rank: broadcast first).
        optimizer: a Keras optimizer; wrapped in a LossScaleOptimizer when the model
            computes in float16.
        engine: the initialised engine whose allreduce averages the gradients.
        compression: "none" or "fp16" (gradients travel as float16).
        bn_training: run batch normalisation in training mode (batch statistics). False
            uses the moving statistics, which makes a step independent of how the batch
            is split across ranks (used by the engine self-check).
        step_mode: "overlap" (one compiled call, communication overlapping the backward
            pass) or "separate" (three calls, the collective timed on its own); None
            takes :data:`DEFAULT_STEP_MODE`.
        tumour_weight: loss weight of tumour pixels (``histoseg.train.step.pixel_loss``).

    Raises:
        ConfigError: an unknown compression or step mode.
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: Any,
        engine: Engine,
        *,
        compression: str = "none",
        bn_training: bool = True,
        step_mode: str | None = None,
        tumour_weight: float = 1.0,
    ) -> None:
        self.model = model
        self.engine = engine
        self.compression = check_compression(compression)
        self.step_mode = check_step_mode(step_mode or DEFAULT_STEP_MODE)
        if uses_float16(model) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.optimizer = optimizer
        variables = model.trainable_variables
        optimizer.build(variables)

        def loss_and_gradients(images: Any, masks: Any) -> Any:
            if bn_training:
                return compute_gradients(
                    model, images, masks, optimizer=optimizer, tumour_weight=tumour_weight
                )
            with tf.GradientTape() as tape:
                logits = model(prepare_images(images), training=False)
                loss = pixel_loss(masks, logits, tumour_weight)
                scaled = optimizer.scale_loss(loss)
            return loss, tape.gradient(scaled, variables)

        def whole_step(images: Any, masks: Any, communicate: bool) -> Any:
            loss, grads = loss_and_gradients(images, masks)
            if communicate:
                grads = engine.allreduce_gradients_in_graph(list(grads), self.compression)
            apply_gradients(optimizer, grads, variables)
            return loss

        @tf.function
        def apply(grads: Any) -> None:
            apply_gradients(optimizer, grads, variables)

        self._gradients = tf.function(loss_and_gradients)
        self._apply = apply
        self._overlapped = tf.function(lambda i, m: whole_step(i, m, True))
        self._local = tf.function(lambda i, m: whole_step(i, m, False))

    def __call__(self, images: Any, masks: Any) -> StepTimes:
        if self.step_mode == "overlap":
            t0 = time.perf_counter()
            loss = float(self._overlapped(images, masks))  # waits for the whole step
            return StepTimes(loss, time.perf_counter() - t0, None, None)
        t0 = time.perf_counter()
        loss, grads = self._gradients(images, masks)
        loss = float(loss)  # waits for the compiled gradients
        t1 = time.perf_counter()
        grads = self.engine.allreduce_gradients(list(grads), compression=self.compression)
        for g in grads:  # wait for the collective to finish before reading the clock
            if g is not None:
                g.numpy()
                break
        t2 = time.perf_counter()
        self._apply(grads)
        _ = self.optimizer.iterations.numpy()
        t3 = time.perf_counter()
        return StepTimes(loss, t1 - t0, t2 - t1, t3 - t2)

    def local_step(self, images: Any, masks: Any) -> float:
        """The overlapped step's compiled function without its collective; returns seconds.

        It trains this rank alone (the ranks' weights drift apart), so it is only for timing:
        overlapped step time minus this one is the communication the step still exposes.
        """
        t0 = time.perf_counter()
        float(self._local(images, masks))
        return time.perf_counter() - t0


def gradient_bytes(model: keras.Model) -> int:
    """Bytes of one full set of gradients (trainable variables, in their dtypes)."""
    return int(
        sum(np.prod(v.shape) * np.dtype(v.dtype).itemsize for v in model.trainable_variables)
    )


def all_variables(model: keras.Model, optimizer: Any) -> list[Any]:
    """Model weights (BN statistics included) then optimizer state, the broadcast/checkpoint set."""
    return list(model.variables) + list(optimizer.variables)


# ----------------------------------------------------------------------------- schedule
@keras.saving.register_keras_serializable(package="histoseg")
class WarmupSchedule(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak_lr`` over ``warmup_steps``, then constant, poly or cosine decay.

    Large effective batches (many workers) start unstable at the scaled learning rate; the
    warm-up ramps to it (Goyal et al., "Accurate, large minibatch SGD"). Poly decay with power
    0.9 is DeepLab's schedule.
    """

    def __init__(
        self,
        peak_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        decay: str = "poly",
        end_lr: float = 0.0,
        power: float = 0.9,
    ) -> None:
        if decay not in SCHEDULES:
            raise ConfigError(f"schedule {decay!r} is not one of {', '.join(SCHEDULES)}")
        if not peak_lr > 0:
            raise ConfigError(f"learning rate must be > 0, got {peak_lr}")
        self.peak_lr = float(peak_lr)
        self.total_steps = max(1, int(total_steps))
        self.warmup_steps = max(0, int(warmup_steps))
        self.decay = decay
        self.end_lr = float(end_lr)
        self.power = float(power)

    def __call__(self, step: Any) -> Any:
        step = tf.cast(step, tf.float32)
        warm = float(max(1, self.warmup_steps))
        warmup_lr = self.peak_lr * tf.minimum(1.0, (step + 1.0) / warm)
        span = float(max(1, self.total_steps - self.warmup_steps))
        progress = tf.clip_by_value((step - self.warmup_steps) / span, 0.0, 1.0)
        if self.decay == "constant":
            decayed = tf.constant(self.peak_lr)
        elif self.decay == "poly":
            decayed = self.end_lr + (self.peak_lr - self.end_lr) * (1.0 - progress) ** self.power
        else:
            cosine = 0.5 * (1.0 + tf.cos(math.pi * progress))
            decayed = self.end_lr + (self.peak_lr - self.end_lr) * cosine
        if self.warmup_steps == 0:
            return decayed
        return tf.where(step < self.warmup_steps, warmup_lr, decayed)

    def get_config(self) -> dict[str, Any]:
        return {
            "peak_lr": self.peak_lr,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "decay": self.decay,
            "end_lr": self.end_lr,
            "power": self.power,
        }


# ----------------------------------------------------------------------------- checkpoints
CHECKPOINT_RE = re.compile(r"ckpt-(\d+)\.npz$")


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model: keras.Model,
    optimizer: Any,
    keep: int = 3,
    bn_recalibrated: bool = False,
) -> Path:
    """Write model and optimizer variables at ``step`` to ``folder/ckpt-<step>.npz`` atomically.

    A plain npz of every variable in a fixed order (model then optimizer): readable without
    TensorFlow, and restored onto a model built with the same configuration. Keeps the
    newest ``keep`` checkpoints. ``bn_recalibrated`` records (as ``bn_recalibrated`` in the
    file) that the batch-norm statistics were re-estimated for these weights, so that
    inference can tell a checkpoint fit for inference mode from a periodic one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(all_variables(model, optimizer))
    }
    arrays["step"] = np.array(step, dtype=np.int64)
    arrays["bn_recalibrated"] = np.array(bn_recalibrated)
    path = folder / f"ckpt-{step:08d}.npz"
    tmp = folder / f".ckpt-{step:08d}.npz.tmp"
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
    os.replace(tmp, path)
    for old in list_checkpoints(folder)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def list_checkpoints(folder: str | os.PathLike) -> list[Path]:
    """Checkpoints in ``folder``, oldest first."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def load_checkpoint(path: str | os.PathLike, model: keras.Model, optimizer: Any) -> int:
    """Restore variables from ``path`` (a checkpoint file, or a folder: its newest); returns
    the step it was taken at.

    Raises:
        ConfigError: no checkpoint there, or one made for another model configuration.
    """
    path = Path(path)
    if path.is_dir():
        found = list_checkpoints(path)
        if not found:
            raise ConfigError(f"no checkpoint (ckpt-*.npz) in {path}")
        path = found[-1]
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    variables = all_variables(model, optimizer)
    with np.load(path) as data:
        names = sorted(k for k in data.files if k.startswith("v"))
        if len(names) != len(variables):
            raise ConfigError(
                f"checkpoint {path} holds {len(names)} variables, this model and optimizer "
                f"have {len(variables)}: was it made with another backbone or optimizer?"
            )
        for name, v in zip(names, variables, strict=True):
            value = data[name]
            if tuple(value.shape) != tuple(v.shape):
                raise ConfigError(
                    f"checkpoint {path}: {name} has shape {value.shape}, the model expects "
                    f"{tuple(v.shape)} (another patch size is fine; another model is not)"
                )
            v.assign(value)
        return int(data["step"])


# ----------------------------------------------------------------------------- validation
def recalibrate_batch_norm(
    model: keras.Model, batches: Iterable[tuple[Any, Any]], engine: Engine, num_batches: int
) -> int:
    """Re-estimate every batch-norm layer's moving statistics for the current weights.

    During training the moving averages (momentum 0.99) mix statistics of weights from
    about a hundred steps back; early in training, while the weights still move fast, that
    stale mixture can be far from what the final weights produce, and inference-mode
    outputs collapse even though training-mode outputs are good. Before validating, run
    ``num_batches`` training batches forward in training mode (no gradients, no update)
    with the momentum set so the moving statistics become the plain average over those
    batches ("precise BN", Wu & Johnson 2021), then average them over the ranks.

    Returns:
        How many batches were used on this rank.
    """
    layers = [
        layer
        for layer in model._flatten_layers()
        if isinstance(layer, keras.layers.BatchNormalization)
        and not isinstance(layer, FrozenBatchNorm)  # never updates its statistics
    ]
    if not layers or num_batches <= 0:
        return 0
    from histoseg.data import iterate_batches

    saved = [layer.momentum for layer in layers]
    used = 0
    try:
        # iterate_batches: a corrupt slide is a one-line SlideError, not a wrapped TF error
        for images, _ in iterate_batches(batches):
            used += 1
            for layer in layers:
                # moving = (k-1)/k * moving + 1/k * batch: the running mean of k batches
                layer.momentum = 1.0 - 1.0 / used
            # eager on purpose: a compiled call would freeze the momentum at trace time
            model(prepare_images(images), training=True)
            if used >= num_batches:
                break
    finally:
        for layer, momentum in zip(layers, saved, strict=True):
            layer.momentum = momentum
    stats = [v for layer in layers for v in (layer.moving_mean, layer.moving_variance)]
    averaged = engine.allreduce_gradients([tf.convert_to_tensor(v) for v in stats])
    for v, value in zip(stats, averaged, strict=True):
        v.assign(value)
    return used


def evaluate(
    model: keras.Model, batches: Iterable[tuple[Any, Any]], engine: Engine
) -> PixelMetrics:
    """Pixel metrics of ``model`` over this rank's validation batches, summed over all ranks.

    Every rank must call it (the final sum is a collective), even one with no batches.
    """

    @tf.function
    def tumour_probability(images: Any) -> Any:
        logits = model(prepare_images(images), training=False)
        return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[..., 1]

    from histoseg.data import iterate_batches

    metrics = PixelMetrics()
    # iterate_batches: a corrupt slide is a one-line SlideError, not a wrapped TF error
    for images, masks in iterate_batches(batches):
        metrics.update(np.asarray(masks), tumour_probability(images).numpy())
    return metrics.reduce(engine)


# ----------------------------------------------------------------------------- split
CAMELYON17_RE = re.compile(r"patient_(\d+)_node_(\d+)", re.IGNORECASE)


def centre_of(slide_name: str) -> int | None:
    """CAMELYON17 centre of a slide named ``patient_<p>_node_<n>`` (20 patients a centre)."""
    m = CAMELYON17_RE.search(slide_name)
    return int(m.group(1)) // 20 if m else None


def split_slides(
    slides: Sequence[Any],
    *,
    how: str = "auto",
    val_fraction: float = 1 / 3,
    val_centres: Sequence[int] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Split slides (paths, or (tif, xml) pairs) into training and validation slides.

    "slide": ``val_fraction`` of the annotated slides and of the others, evenly spaced in
    name order from the last one, validate, so validation holds tumour slides whenever there
    are at least two. "centre": the CAMELYON17 centres in ``val_centres``
    (default: the last one) validate, the others train. "auto": "centre" when every name is
    CAMELYON17-style and there are at least two centres, else "slide".
    """
    if how not in SPLITS:
        raise ConfigError(f"split {how!r} is not one of {', '.join(SPLITS)}")
    items = sorted(slides, key=lambda s: _name(s))
    if len(items) < 2:
        raise ConfigError(
            f"need at least 2 slides to split into training and validation, got {len(items)}"
        )
    centres = [centre_of(_name(s)) for s in items]
    if how == "auto":
        how = "centre" if all(c is not None for c in centres) and len(set(centres)) > 1 else "slide"
    if how == "centre":
        if any(c is None for c in centres):
            bad = next(_name(s) for s, c in zip(items, centres, strict=True) if c is None)
            raise ConfigError(
                f"split by centre needs CAMELYON17 names (patient_<p>_node_<n>); got {bad}"
            )
        held = set(val_centres) if val_centres else {max(centres)}
        val = [s for s, c in zip(items, centres, strict=True) if c in held]
        train = [s for s, c in zip(items, centres, strict=True) if c not in held]
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"validation fraction must be in (0, 1), got {val_fraction}")
        # stratified by "has annotations" so validation sees tumour whenever training does;
        # a group of one slide stays in training
        val = []
        for group in (
            [s for s in items if _has_annotations(s)],
            [s for s in items if not _has_annotations(s)],
        ):
            if len(group) < 2:
                continue
            n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction)))
            picks = np.linspace(len(group) - 1, 0, n_val + 1)[:n_val].round().astype(int)
            val += [group[i] for i in sorted(set(picks.tolist()))]
        if not val:
            val = [items[-1]]
        train = [s for s in items if s not in val]
    if not train or not val:
        raise ConfigError(
            f"split {how!r} left an empty set: {len(train)} train, {len(val)} validation slides"
        )
    return train, val


def _has_annotations(slide: Any) -> bool:
    return isinstance(slide, (tuple, list)) and len(slide) > 1 and slide[1] is not None


def _name(slide: Any) -> str:
    path = slide[0] if isinstance(slide, (tuple, list)) else slide
    return Path(path).name


# ----------------------------------------------------------------------------- logging
def _scalar_metadata() -> Any:
    from tensorflow.core.framework import summary_pb2

    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
    )


_SCALAR_METADATA = _scalar_metadata()


class SummaryWriter:
    """TensorBoard scalars from the chief only; a no-op elsewhere or without a folder.

    Written with ``tf.summary.write`` and the scalars plugin's metadata, so the event files
    are what ``tf.summary.scalar`` writes without needing the tensorboard package installed.
    """

    def __init__(self, folder: str | os.PathLike | None, enabled: bool) -> None:
        self._writer = tf.summary.create_file_writer(str(folder)) if folder and enabled else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                if value is not None and np.isfinite(value):
                    # tf.summary.scalar needs the tensorboard package; this is what it writes
                    tf.summary.write(
                        name, tf.constant(float(value), tf.float32), metadata=_SCALAR_METADATA
                    )

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Small JSON side file (run config), written atomically."""
    from histoseg.results import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


# ----------------------------------------------------------------------------- a whole run
SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")


@dataclasses.dataclass
class TrainOptions:
    """Everything one training run needs; the CLI fills it from its flags.

    ``learning_rate`` is per worker: the run's peak rate is ``learning_rate * workers`` unless
    ``scale_lr`` is False (the linear scaling rule for a global batch ``workers`` times larger).
    """

    slides: str | None = None
    annotations: str | None = None
    data: str | None = None  # "camelyon16=DIR" or "camelyon17=DIR" (histoseg.wsi.camelyon)
    synthetic_task: str = "local"
    synthetic_dir: str = "data/synthetic"
    synthetic_slides: int = 6
    synthetic_size_px: tuple[int, int] = (8000, 6000)
    # The slides' own seed, apart from the training seed: runs with different training
    # seeds train on the same synthetic slides (and share one folder of them).
    synthetic_seed: int = 0
    split: str = "auto"
    val_fraction: float = 1 / 3
    val_centres: tuple[int, ...] = ()
    patch_size: int = 256
    level: int = 0
    min_tissue: float = 0.5
    tumor_ratio: float | None = 0.5
    tumour_weight: float = 1.0
    batch_size: int = 2
    max_val_patches: int | None = 64
    backbone: str = "xception65"
    alpha: float | None = None
    output_stride: int = 16
    precision: str = "float32"
    remat: str = "none"
    norm: str = "batch"
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    schedule: str = "poly"
    warmup_steps: int | None = None
    scale_lr: bool = True
    steps: int | None = 100
    epochs: float | None = None
    fp16_allreduce: bool = False
    step_mode: str = DEFAULT_STEP_MODE
    run_dir: str = "runs/train"
    checkpoint_every: int = 50
    resume: str | None = None
    results: str | None = None
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    bn_recalibration_batches: int = 20


def find_slides(slides: str, annotations: str | None) -> list[tuple[Path, Path | None]]:
    """(slide, ASAP XML or None) for every slide file in ``slides``; XML by the same stem."""
    folder = Path(slides)
    if not folder.is_dir():
        raise ConfigError(f"slides folder {folder} does not exist")
    notes = Path(annotations) if annotations else folder
    if not notes.is_dir():
        raise ConfigError(f"annotations folder {notes} does not exist")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if not found:
        raise ConfigError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in {folder}")
    pairs = []
    for tif in found:
        xml = notes / f"{tif.stem}.xml"
        pairs.append((tif, xml if xml.exists() else None))
    return pairs


def _data(options: TrainOptions, engine: Engine) -> list[tuple[Path, Path | None]]:
    if options.slides:
        return find_slides(options.slides, options.annotations)
    from histoseg.wsi.synth import ensure_synthetic_dataset

    def make() -> list[tuple[Path, Path | None]]:
        return ensure_synthetic_dataset(
            options.synthetic_dir,
            options.synthetic_slides,
            options.synthetic_size_px,
            seed=options.synthetic_seed,
            progress=options.progress and engine.is_chief,
            task=options.synthetic_task,
        )

    # the chief writes the slides, the others wait and then find them made
    pairs = make() if engine.is_chief else None
    engine.barrier()
    return pairs if pairs is not None else make()


def _train_and_val_slides(options: TrainOptions, engine: Engine) -> tuple[list, list]:
    """The (slide, XML) pairs to train on and to validate on."""
    if not options.data:
        return split_slides(
            _data(options, engine),
            how=options.split,
            val_fraction=options.val_fraction,
            val_centres=options.val_centres,
        )
    from histoseg.wsi.camelyon import read_dataset

    dataset = read_dataset(options.data)
    if dataset.left_out and engine.is_chief:
        print(
            f"{options.data}: left out {len(dataset.left_out)} positive slides without a "
            f"lesion annotation (e.g. {dataset.left_out[0].name})",
            file=sys.stderr,
        )
    if dataset.validation:
        return dataset.training, dataset.validation
    # the study validates on slides of every centre: split by slide unless told otherwise
    return split_slides(
        dataset.training,
        how="slide" if options.split == "auto" else options.split,
        val_fraction=options.val_fraction,
        val_centres=options.val_centres,
    )


def _patches(
    options: TrainOptions, slides: Sequence[tuple[Path, Path | None]], n: int, seed: int
) -> list:
    from histoseg.wsi.patches import sample_patches

    per_slide = max(1, math.ceil(n / len(slides)))
    refs = []
    for i, (tif, xml) in enumerate(slides):
        refs += sample_patches(
            tif,
            options.patch_size,
            per_slide,
            seed=seed * 1000 + i,
            level=options.level,
            min_tissue=options.min_tissue,
            annotations=xml,
            tumor_ratio=options.tumor_ratio if xml is not None else None,
            batch_size=options.batch_size,
        )
    if not refs:
        raise ConfigError(
            f"no patches of {options.patch_size} px with tissue on the training slides"
        )
    rng = np.random.default_rng(seed)
    return [refs[i] for i in rng.permutation(len(refs))]


def _val_patches(options: TrainOptions, slides: Sequence[tuple[Path, Path | None]]) -> list:
    from histoseg.wsi.patches import grid_patches

    refs = []
    for tif, xml in slides:
        refs += grid_patches(tif, options.patch_size, options.level, options.min_tissue, xml)
    if options.max_val_patches and len(refs) > options.max_val_patches:
        # a deterministic subset: up to half tumour patches (tumour is a few percent of a
        # slide's tissue, so an even subset of the grid would hold almost none), the rest
        # normal tissue, each part evenly spaced over the grid so it spans every slide
        tumour = [r for r in refs if r.is_tumor]
        normal = [r for r in refs if not r.is_tumor]
        n_tumour = min(len(tumour), options.max_val_patches // 2)
        refs = _evenly(tumour, n_tumour) + _evenly(normal, options.max_val_patches - n_tumour)
    if not refs:
        raise ConfigError(f"no validation patches of {options.patch_size} px with tissue")
    return refs


def validation_ceiling(options: TrainOptions, val_refs: Sequence[Any]) -> dict | None:
    """The Bayes ceiling (:mod:`histoseg.wsi.ceiling`) of the validation patches of a run
    on synthetic level-0 slides, as plain numbers for the results row; None otherwise."""
    if options.slides or options.data or options.level != 0:
        return None
    from histoseg.wsi.ceiling import bayes_ceiling
    from histoseg.wsi.synth import dataset_designs

    designs = dataset_designs(
        options.synthetic_slides,
        options.synthetic_size_px,
        options.synthetic_seed,
        options.synthetic_task,
    )
    names = sorted({Path(r.slide_path).name for r in val_refs})
    origins = [[(r.x, r.y) for r in val_refs if Path(r.slide_path).name == n] for n in names]
    ceiling = bayes_ceiling([designs[n] for n in names], options.patch_size, origins)
    return {
        "accuracy": ceiling.accuracy,
        "miou": ceiling.miou,
        "iou_tumour": ceiling.iou_tumour,
        "decidable_fraction": ceiling.decidable_fraction,
    }


def _evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced over ``items`` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    keep = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(keep.tolist()))]


def run(options: TrainOptions, engine: Engine) -> dict[str, Any]:
    """Train and validate as one rank of ``engine``; returns the results row (every rank).

    Only the chief logs, writes TensorBoard summaries, checkpoints and the results file.
    """
    from histoseg.data import iterate_batches, make_dataset
    from histoseg.models import build_deeplabv3plus
    from histoseg.results import load_rows_if_exists, make_row, merge_rows, write_rows
    from histoseg.train.metrics import constant_background_metrics
    from histoseg.train.step import make_optimizer
    from histoseg.wsi.patches import shard

    rank, size, chief = engine.rank, engine.size, engine.is_chief
    run_dir = Path(options.run_dir)
    train_slides, val_slides = _train_and_val_slides(options, engine)
    global_batch = options.batch_size * size
    if options.epochs is not None:
        from histoseg.wsi.patches import grid_patches

        grid = []
        for tif, xml in train_slides:
            grid += grid_patches(tif, options.patch_size, options.level, options.min_tissue, xml)
        total_steps = max(1, math.ceil(options.epochs * len(grid) / global_batch))
        train_refs = grid
    else:
        total_steps = int(options.steps or 1)
        train_refs = _patches(options, train_slides, total_steps * global_batch, options.seed)
    my_train = shard(train_refs, rank, size, equal=True)
    if not my_train:
        raise ConfigError(
            f"{len(train_refs)} training patches leave none for rank {rank} of {size}"
        )
    val_refs = _val_patches(options, val_slides)
    my_val = shard(val_refs, rank, size)

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
        **backbone_kwargs,
    )
    peak_lr = options.learning_rate * (size if options.scale_lr else 1)
    warmup = options.warmup_steps
    if warmup is None:
        warmup = min(100, total_steps // 10)
    optimizer = make_optimizer(options.optimizer, peak_lr, momentum=options.momentum)
    optimizer.learning_rate = WarmupSchedule(peak_lr, total_steps, warmup, options.schedule)
    compression = "fp16" if options.fp16_allreduce else "none"
    step = DistributedStep(
        model,
        optimizer,
        engine,
        compression=compression,
        step_mode=options.step_mode,
        tumour_weight=options.tumour_weight,
    )

    start_step = 0
    if options.resume and chief:
        source = run_dir / "checkpoints" if options.resume == "auto" else Path(options.resume)
        start_step = load_checkpoint(source, model, step.optimizer)
    engine.broadcast_variables(all_variables(model, step.optimizer), root_rank=0)
    start_step = int(
        np.asarray(engine.allreduce_sum([np.array([float(start_step if chief else 0)])])[0])[0]
    )

    if chief:
        write_json(run_dir / "options.json", {**dataclasses.asdict(options), "workers": size})
    summaries = SummaryWriter(run_dir / "tensorboard", chief)
    dataset = make_dataset(
        my_train, options.batch_size, shuffle=True, seed=options.seed + start_step, augment=True
    )
    # a patch read fails inside tf.numpy_function; iterate_batches turns TensorFlow's wrapped
    # error back into the SlideError naming the file (one line, no traceback)
    batches = iterate_batches(dataset)
    bar = None
    if chief and options.progress:
        from tqdm import tqdm

        bar = tqdm(total=total_steps, initial=start_step, desc="train", unit="step")
    history: list[StepTimes] = []
    started = time.perf_counter()
    last_checkpoint = None
    for i in range(start_step, total_steps):
        images, masks = next(batches)
        times = step(images, masks)
        history.append(times)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{times.loss:.4f}", refresh=False)
        if chief and ((i + 1) % options.log_every == 0 or i + 1 == total_steps):
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
            summaries.scalars(i + 1, scalars)
        if chief and options.checkpoint_every and (i + 1) % options.checkpoint_every == 0:
            last_checkpoint = save_checkpoint(run_dir / "checkpoints", i + 1, model, step.optimizer)
    train_s = time.perf_counter() - started
    if bar is not None:
        bar.close()
    recalibrated = recalibrate_batch_norm(
        model, iter(dataset), engine, options.bn_recalibration_batches
    )
    # after the recalibration: the last checkpoint is the model validation scores (the
    # stale moving statistics of the training loop can make inference mode predict nothing)
    if chief and total_steps > start_step:
        last_checkpoint = save_checkpoint(
            run_dir / "checkpoints", total_steps, model, step.optimizer, bn_recalibrated=True
        )
    val_batches = []
    if my_val:
        val_ds = make_dataset(
            my_val, options.batch_size, shuffle=False, repeat=False, drop_remainder=False
        )
        val_batches = val_ds
    metrics = evaluate(model, val_batches, engine)
    result = metrics.result()
    baseline = constant_background_metrics(metrics.confusion)
    engine.barrier()

    steady = history[min(2, len(history) - 1) :] if history else []
    step_s = float(np.median([t.step_s for t in steady])) if steady else math.nan
    timed = [t.allreduce_s for t in steady if t.allreduce_s is not None]
    # an overlapped step cannot time its collective apart (bench.scaling measures what it
    # exposes): None then, unless there is no communication at all
    allreduce_s = float(np.median(timed)) if timed else (0.0 if size == 1 else None)
    config = {
        "patch_size": options.patch_size,
        "batch_size": options.batch_size,
        "backbone": options.backbone,
        "output_stride": options.output_stride,
        "precision": options.precision,
        "remat": options.remat,
        "device": "gpu" if tf.config.list_physical_devices("GPU") else "cpu",
        "threads": options.threads,
        "engine": engine.name,
        "workers": size,
        "compression": compression,
        "step": step.step_mode,
        "optimizer": options.optimizer,
        "learning_rate": options.learning_rate,
        "steps": total_steps,
        "data": options.data or options.slides or "synthetic",
        "seed": options.seed,
    }
    if options.alpha is not None:
        config["alpha"] = options.alpha
    if not (options.slides or options.data) and options.synthetic_seed:
        config["synthetic_seed"] = options.synthetic_seed
    # only when not the default, so rows made before these options keep their identity
    if not (options.slides or options.data) and options.synthetic_task != "local":
        config["synthetic_task"] = options.synthetic_task
    if options.norm != "batch":
        config["norm"] = options.norm
    if options.tumour_weight != 1.0:
        config["tumour_weight"] = options.tumour_weight
    if options.tumor_ratio != 0.5:
        config["tumor_ratio"] = options.tumor_ratio
    row = make_row(
        "accuracy",
        config,
        metrics={
            **result,
            "baseline_accuracy": baseline["accuracy"],
            "baseline_miou": baseline["miou"],
            "baseline_auc": baseline["auc"],
        },
        measured={
            "step_s": step_s,
            "allreduce_s": allreduce_s,
            "patches_per_s": global_batch / step_s if step_s else math.nan,
            "megapixels_per_s": global_batch * options.patch_size**2 / step_s / 1e6
            if step_s
            else math.nan,
            "train_s": train_s,
            "final_loss": history[-1].loss if history else math.nan,
            "gradient_bytes": gradient_bytes(model),
        },
        extra={
            "train_slides": [Path(t).name for t, _ in train_slides],
            "val_slides": [Path(t).name for t, _ in val_slides],
            "train_patches": len(train_refs),
            "peak_learning_rate": peak_lr,
            "warmup_steps": warmup,
            "schedule": options.schedule,
            "start_step": start_step,
            "bn_recalibration_batches": recalibrated,
            "bayes_ceiling": validation_ceiling(options, val_refs),
            "run_dir": str(run_dir),
            "checkpoint": str(last_checkpoint) if last_checkpoint else None,
        },
    )
    if chief:
        summaries.scalars(
            total_steps,
            {f"val/{k}": result[k] for k in ("accuracy", "miou", "auc")},
        )
        summaries.close()
        results_path = Path(options.results) if options.results else run_dir / "results.json"
        write_rows(results_path, merge_rows(load_rows_if_exists(results_path), [row]))
        row.setdefault("extra", {})["results_path"] = str(results_path)
    return row
