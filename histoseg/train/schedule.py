"""The learning-rate schedule of a run: linear warm-up, then constant, poly or cosine decay."""

from __future__ import annotations

import math
from typing import Any

import keras
import tensorflow as tf

from histoseg.errors import ConfigError

SCHEDULES = ("constant", "poly", "cosine")


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
