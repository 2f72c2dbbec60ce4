"""A trained checkpoint as a tile predictor: the run's model rebuilt at the tile size.

``histoseg.train`` writes ``<run>/options.json`` (the model's configuration) and
``<run>/checkpoints/ckpt-<step>.npz`` (model variables, then optimizer state). Inference
rebuilds the same model at the tile size, with the ASPP image pooling limited to the
training patch, and reads the model's variables. A tile much larger than the training
patch can still change what the model predicts, so callers warn about one
(:func:`tile_size_warning`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.config import HEAD_FILTERS
from histoseg.errors import ConfigError

MODEL_KEYS = ("backbone", "alpha", "output_stride", "norm", "head_filters", "patch_size", "remat")


@dataclass(frozen=True)
class CheckpointInfo:
    """Where a checkpoint is and the model configuration its run recorded."""

    path: Path
    options: dict[str, Any]
    step: int
    sha256: str
    # True when histoseg.train re-estimated the batch-norm statistics before saving (its
    # final checkpoint); False for periodic ones and for files made before it recorded this
    bn_recalibrated: bool = False
    # what the run's prior correction subtracts from the tumour logit (histoseg.train.prior);
    # 0 for periodic checkpoints and for files made before runs recorded it
    tumour_logit_shift: float = 0.0

    @property
    def model_config(self) -> dict[str, Any]:
        return {k: self.options.get(k) for k in MODEL_KEYS}


def find_checkpoint(path: str | Path) -> CheckpointInfo:
    """A checkpoint file, a run folder or its ``checkpoints/`` folder -> its newest checkpoint.

    Raises:
        ConfigError: nothing there, no checkpoint, or no ``options.json`` for its run.
    """
    from histoseg.train.checkpoints import list_checkpoints

    path = Path(path)
    if not path.exists():
        raise ConfigError(f"--checkpoint {path}: no such file or folder")
    if path.is_dir():
        found = list_checkpoints(path) or list_checkpoints(path / "checkpoints")
        if not found:
            raise ConfigError(
                f"--checkpoint {path}: no ckpt-*.npz here or in its checkpoints/ folder "
                "(give a histoseg.train run folder or a checkpoint file)"
            )
        path = found[-1]
    candidates = [path.parent / "options.json", path.parent.parent / "options.json"]
    options_path = next((p for p in candidates if p.is_file()), None)
    if options_path is None:
        raise ConfigError(
            f"--checkpoint {path}: no options.json beside it or in its run folder; "
            "histoseg.train writes one in --run-dir"
        )
    try:
        options = json.loads(options_path.read_text(encoding="utf-8"))
        with np.load(path) as data:
            step = int(data["step"])
            recalibrated = bool(data["bn_recalibrated"]) if "bn_recalibrated" in data else False
            shift = float(data["tumour_logit_shift"]) if "tumour_logit_shift" in data else 0.0
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"--checkpoint {path}: not a histoseg checkpoint ({exc})") from None
    if not isinstance(options, dict) or "backbone" not in options:
        raise ConfigError(f"{options_path}: not a histoseg.train options file (no backbone)")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return CheckpointInfo(path, options, step, digest, recalibrated, shift)


def stale_batch_norm_warning(info: CheckpointInfo) -> str | None:
    """One line for a batch-norm model whose checkpoint holds the training loop's moving
    statistics (not re-estimated for its final weights), else None.

    Those statistics lag the weights, and inference mode with them can predict background
    everywhere although validation, which recalibrates first, scored well.
    """
    if info.bn_recalibrated or (info.options.get("norm") or "batch") != "batch":
        return None
    return (
        f"warning: {info.path.name} holds batch-norm statistics that were not re-estimated "
        "for its weights (a periodic checkpoint, or one saved by a histoseg.train older than "
        "the final-checkpoint recalibration); its predictions may be wrong"
    )


def tile_size_warning(info: CheckpointInfo, tile_size_px: int) -> str | None:
    """One line when tiles are over twice the training patch, else None.

    A model trained on small patches learns features that sit close to the zero padding at
    the patch border; over a much larger tile most features see no border, and its output
    can change wholesale (tumour that it finds at its patch size, missed at a large tile).
    """
    patch = int(info.options.get("patch_size") or 0)
    if not patch or tile_size_px <= 2 * patch:
        return None
    return (
        f"warning: --tile-size {tile_size_px} is {tile_size_px / patch:g}x the {patch} px "
        "patches this model was trained on; a model can predict differently on inputs much "
        "larger than its patches (compare with --tile-size near the patch size)"
    )


def build_tile_model(info: CheckpointInfo, tile_size_px: int):
    """The run's DeepLabV3+ at ``tile_size_px`` square, float32, with the checkpoint's weights.

    Raises:
        ConfigError: the tile size does not suit the model, or the checkpoint does not
            hold this model's variables.
    """
    from histoseg.models import build_deeplabv3plus
    from histoseg.train.checkpoints import assign_variables

    cfg = info.model_config
    stride = int(cfg["output_stride"] or 16)
    if tile_size_px % stride:
        raise ConfigError(
            f"--tile-size {tile_size_px} must be a multiple of the model's output stride {stride}"
        )
    kwargs = {"alpha": cfg["alpha"]} if cfg.get("alpha") is not None else {}
    model = build_deeplabv3plus(
        cfg["backbone"],
        (tile_size_px, tile_size_px, 3),
        2,
        stride,
        "float32",
        "none",
        norm=cfg.get("norm") or "batch",
        image_pooling_px=int(cfg.get("patch_size") or tile_size_px),
        head_filters=int(cfg.get("head_filters") or HEAD_FILTERS),
        **kwargs,
    )
    assign_variables(info.path, list(model.variables), prefix=True)
    return model


def tumour_probability_fn(model, tumour_logit_shift: float = 0.0):
    """A compiled ``uint8 (1, T, T, 3) -> float32 (T, T)`` tumour-probability function.

    ``tumour_logit_shift`` is subtracted from the tumour-minus-background logit (a run's prior
    correction, :attr:`CheckpointInfo.tumour_logit_shift`).
    """
    import tensorflow as tf

    from histoseg.models.layers import prepare_images
    from histoseg.train.prior import corrected_probability

    @tf.function(reduce_retracing=True)
    def predict(images):
        logits = model(prepare_images(images), training=False)
        probability = tf.nn.softmax(tf.cast(logits, tf.float32), axis=-1)[0, ..., 1]
        if tumour_logit_shift:
            probability = corrected_probability(probability, tumour_logit_shift)
        return probability

    return predict
