"""Validation of a run: batch-norm statistics re-estimated for the final weights, then pixel
metrics over the validation patches of every rank."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import keras
import numpy as np
import tensorflow as tf

from histoseg.models.norm import FrozenBatchNorm
from histoseg.train.engines import Engine
from histoseg.train.metrics import PixelMetrics
from histoseg.train.prior import corrected_probability
from histoseg.train.step import prepare_images


def recalibrate_batch_norm(
    model: keras.Model,
    batches: Iterable[tuple[Any, Any]],
    engine: Engine,
    num_batches: int,
    forward: Callable[[Any], Any] | None = None,
) -> int:
    """Re-estimate every batch-norm layer's moving statistics for the current weights.

    During training the moving averages (momentum 0.99) mix statistics of weights from
    about a hundred steps back; early in training, while the weights still move fast, that
    stale mixture can be far from what the final weights produce, and inference-mode
    outputs collapse even though training-mode outputs are good. Before validating, run
    ``num_batches`` training batches forward in training mode (no gradients, no update)
    with the momentum set so the moving statistics become the plain average over those
    batches ("precise BN", Wu & Johnson 2021), then average them over the ranks.

    ``forward(images)`` runs the batch forward in training mode, eagerly (default: the
    whole model; a spatial run passes its step's ``forward_training``).

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
    if forward is None:

        def forward(images: Any) -> Any:
            return model(prepare_images(images), training=True)

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
            forward(images)  # eager on purpose: compiled, the momentum would be frozen
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
    model: keras.Model,
    batches: Iterable[tuple[Any, Any]],
    engine: Engine,
    *,
    tumour_probability: Callable[[Any], Any] | None = None,
    rows: slice = slice(None),
    tumour_logit_shift: float = 0.0,
) -> PixelMetrics:
    """Pixel metrics of ``model`` over this rank's validation batches, summed over all ranks.

    Every rank must call it (the final sum is a collective), even one with no batches.
    A spatial run scores ``rows`` of every patch with its step's ``tumour_probability``
    (those rows' probabilities); the default is the whole model on the whole patch.
    ``tumour_logit_shift``: scores the probability with this subtracted from the tumour logit
    (a run's prior correction, :mod:`histoseg.train.prior`).
    """
    if tumour_probability is None:

        @tf.function
        def tumour_probability(images: Any) -> Any:
            logits = model(prepare_images(images), training=False)
            return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[..., 1]

    from histoseg.data import iterate_batches

    metrics = PixelMetrics()
    first = not rows.start  # the rows of a patch's first slab count the patch
    # iterate_batches: a corrupt slide is a one-line SlideError, not a wrapped TF error
    for images, masks in iterate_batches(batches):
        probability = np.asarray(tumour_probability(images).numpy(), dtype=np.float64)
        if tumour_logit_shift:
            probability = corrected_probability(probability, tumour_logit_shift)
        metrics.update(np.asarray(masks)[:, rows], probability, patches=None if first else 0)
    return metrics.reduce(engine)
