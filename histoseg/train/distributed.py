"""The engine-aware train step, in one of two modes.

"overlap" (the default): one compiled function computes the gradients, averages each one
across the ranks inside the graph (the engine's collective starts as soon as the backward
pass has produced that gradient, while the rest of the backward pass goes on) and applies
them. "separate": three calls, gradients (compiled), the engine's allreduce of all
gradients, the update (compiled); the collective never overlaps the backward pass, but its
time is measurable around the call.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from histoseg.train.engines import (
    DEFAULT_STEP_MODE,
    Engine,
    check_compression,
    check_step_mode,
)
from histoseg.train.step import (
    apply_gradients,
    compute_gradients,
    pixel_loss,
    prepare_images,
    uses_float16,
)


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
