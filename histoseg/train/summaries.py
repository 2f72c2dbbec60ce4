"""What a run leaves beside its checkpoints: TensorBoard scalars and small JSON side files."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import tensorflow as tf


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


def read_scalars(folder: str | os.PathLike) -> dict[str, list[tuple[int, float]]]:
    """``{tag: [(step, value), ...]}`` of the scalars a :class:`SummaryWriter` wrote to
    ``folder`` (its event files in name order), without the tensorboard package."""
    scalars: dict[str, list[tuple[int, float]]] = {}
    for path in sorted(Path(folder).glob("events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                if value.metadata.plugin_data.plugin_name != "scalars":
                    continue
                number = float(tf.make_ndarray(value.tensor))
                scalars.setdefault(value.tag, []).append((event.step, number))
    return scalars


def write_json(path: str | os.PathLike, data: Any) -> None:
    """Small JSON side file (run config), written atomically."""
    from histoseg.results import atomic_write_text

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")
