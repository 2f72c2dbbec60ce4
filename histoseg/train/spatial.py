"""The train step of a run whose patches are cut across ranks (``--spatial-workers N``).

Every block of N consecutive ranks trains on one patch (per batch item) at a time. The
ranks of a block read the same patches (the same shard of one deterministic dataset) and
each keeps its rows (:func:`histoseg.spatial.slab_rows`); the spatial executor exchanges
halo rows and moments within the block (a Horovod process set); the gradients are summed
over a block and averaged over the blocks. Validation runs the executor in inference mode
on the same slabs: the pixel metrics are sums, so summing them over every rank counts each
pixel once.
"""

from __future__ import annotations

import time
from typing import Any

import keras
import tensorflow as tf

from histoseg.models.layers import prepare_images
from histoseg.spatial import SpatialExecutor, make_spatial_train_step, slab_rows
from histoseg.train.distributed import StepTimes


class SpatialStep:
    """This rank's part of a spatially parallel run: the train step, and the forward
    passes batch-norm recalibration and validation take, all on this rank's rows.

    Args:
        model: The whole patch's model (identical weights on every rank: broadcast first).
        optimizer: A Keras optimizer (float32 or mixed_bfloat16 steps have no loss scale).
        comm: This rank's :class:`~histoseg.spatial.HorovodComm` (its block of ranks).
        tumour_weight: Loss weight of tumour pixels (``histoseg.train.step.pixel_loss``).
    """

    #: What the results row and the loop call this step (no collective can be timed apart).
    step_mode = "spatial"

    def __init__(self, model: keras.Model, optimizer: Any, comm: Any, *, tumour_weight=1.0):
        self.model = model
        self.optimizer = optimizer
        self.comm = comm
        start, stop = slab_rows(int(model.inputs[0].shape[1]), comm.size, comm.rank)
        #: This rank's rows of every patch (and of its mask).
        self.rows = slice(start, stop)
        self._training = SpatialExecutor(model, comm)
        self._train = make_spatial_train_step(
            self._training, optimizer, tumour_weight=tumour_weight
        )
        inference = SpatialExecutor(model, comm, training=False)

        @tf.function
        def tumour_probability(images: Any) -> Any:
            logits = inference(prepare_images(images[:, start:stop]))
            return tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[..., 1]

        self._probability = tumour_probability

    def __call__(self, images: Any, masks: Any) -> StepTimes:
        """One step on this rank's rows of the whole batch; the loss is the whole patch's."""
        started = time.perf_counter()
        loss = float(self._train(images[:, self.rows], masks[:, self.rows])["loss"])
        return StepTimes(loss, time.perf_counter() - started, None, None)

    def forward_training(self, images: Any) -> Any:
        """This rank's slab of the logits in training mode, eagerly (batch-norm moments over
        the whole patch, moving statistics updated): what recalibration runs."""
        return self._training(prepare_images(images[:, self.rows]))

    def tumour_probability(self, images: Any) -> Any:
        """This rank's rows of the tumour probability, in inference mode (compiled)."""
        return self._probability(images)
