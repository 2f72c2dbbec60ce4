"""The pieces of a data-parallel training run, each usable alone (the CLI and bench.scaling
share them): the engine-aware step, the warm-up schedule, checkpoints, validation, the split.

A step is three calls: gradients on this rank's batch (compiled), the engine's allreduce of
the gradients, and the optimizer update (compiled). Keeping the collective between two
compiled functions makes its time measurable around the call, on every engine.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from histoseg.errors import ConfigError
from histoseg.train.engines import Engine, check_compression
from histoseg.train.metrics import PixelMetrics
from histoseg.train.step import apply_gradients, compute_gradients, prepare_images, uses_float16

SCHEDULES = ("constant", "poly", "cosine")
SPLITS = ("auto", "slide", "centre")


# ----------------------------------------------------------------------------- the step
@dataclasses.dataclass
class StepTimes:
    """One step: the loss on this rank's batch and where the time went, seconds."""

    loss: float
    compute_s: float
    allreduce_s: float
    apply_s: float

    @property
    def step_s(self) -> float:
        return self.compute_s + self.allreduce_s + self.apply_s


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
    """

    def __init__(
        self,
        model: keras.Model,
        optimizer: Any,
        engine: Engine,
        *,
        compression: str = "none",
        bn_training: bool = True,
    ) -> None:
        self.model = model
        self.engine = engine
        self.compression = check_compression(compression)
        if uses_float16(model) and not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        self.optimizer = optimizer
        variables = model.trainable_variables
        optimizer.build(variables)

        if bn_training:

            @tf.function
            def gradients(images: Any, masks: Any) -> Any:
                return compute_gradients(model, images, masks, optimizer=optimizer)

        else:
            from histoseg.train.step import pixel_loss

            @tf.function
            def gradients(images: Any, masks: Any) -> Any:
                with tf.GradientTape() as tape:
                    logits = model(prepare_images(images), training=False)
                    loss = pixel_loss(masks, logits)
                    scaled = optimizer.scale_loss(loss)
                return loss, tape.gradient(scaled, variables)

        @tf.function
        def apply(grads: Any) -> None:
            apply_gradients(optimizer, grads, variables)

        self._gradients = gradients
        self._apply = apply

    def __call__(self, images: Any, masks: Any) -> StepTimes:
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
    folder: str | os.PathLike, step: int, model: keras.Model, optimizer: Any, keep: int = 3
) -> Path:
    """Write model and optimizer variables at ``step`` to ``folder/ckpt-<step>.npz`` atomically.

    A plain npz of every variable in a fixed order (model then optimizer): readable without
    TensorFlow, and restored onto a model built with the same configuration. Keeps the
    newest ``keep`` checkpoints.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(all_variables(model, optimizer))
    }
    arrays["step"] = np.array(step, dtype=np.int64)
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

    metrics = PixelMetrics()
    for images, masks in batches:
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

    "slide": every k-th slide in name order goes to validation (k = round(1/val_fraction)),
    so both sets span the whole folder. "centre": the CAMELYON17 centres in ``val_centres``
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
        k = max(2, round(1 / val_fraction))
        # count from the end so the last slide validates: with the synthetic set's pattern
        # (every third slide normal) validation then holds tumour and normal slides
        val = [s for i, s in enumerate(items) if (len(items) - 1 - i) % k == 0]
        train = [s for s in items if s not in val]
    if not train or not val:
        raise ConfigError(
            f"split {how!r} left an empty set: {len(train)} train, {len(val)} validation slides"
        )
    return train, val


def _name(slide: Any) -> str:
    path = slide[0] if isinstance(slide, (tuple, list)) else slide
    return Path(path).name


# ----------------------------------------------------------------------------- logging
class SummaryWriter:
    """TensorBoard scalars from the chief only; a no-op elsewhere or without a folder."""

    def __init__(self, folder: str | os.PathLike | None, enabled: bool) -> None:
        self._writer = tf.summary.create_file_writer(str(folder)) if folder and enabled else None

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            return
        with self._writer.as_default(step=step):
            for name, value in values.items():
                if value is not None and np.isfinite(value):
                    tf.summary.scalar(name, float(value))

    def close(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Small JSON side file (run config), written atomically."""
    from histoseg.results import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
