"""Checkpoints of a run: every variable of the model and optimizer in one .npz per step."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import keras
import numpy as np

from histoseg.errors import ConfigError
from histoseg.files import atomic_output
from histoseg.train.distributed import all_variables

CHECKPOINT_RE = re.compile(r"ckpt-(\d+)\.npz$")


def save_checkpoint(
    folder: str | os.PathLike,
    step: int,
    model: keras.Model,
    optimizer: Any,
    keep: int = 3,
    bn_recalibrated: bool = False,
    tumour_logit_shift: float = 0.0,
) -> Path:
    """Write model and optimizer variables at ``step`` to ``folder/ckpt-<step>.npz`` atomically.

    A plain npz of every variable in a fixed order (model then optimizer): readable without
    TensorFlow, and restored onto a model built with the same configuration. Keeps the
    newest ``keep`` checkpoints. ``bn_recalibrated`` records (as ``bn_recalibrated`` in the
    file) that the batch-norm statistics were re-estimated for these weights, so that
    inference can tell a checkpoint fit for inference mode from a periodic one.
    ``tumour_logit_shift`` (:mod:`histoseg.train.prior`) is what inference subtracts from the
    tumour logit; the final checkpoint of a run records its prior correction there.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {
        f"v{i:05d}": np.asarray(v.numpy()) for i, v in enumerate(all_variables(model, optimizer))
    }
    arrays["step"] = np.array(step, dtype=np.int64)
    arrays["bn_recalibrated"] = np.array(bn_recalibrated)
    arrays["tumour_logit_shift"] = np.array(tumour_logit_shift, dtype=np.float64)
    path = folder / f"ckpt-{step:08d}.npz"
    with atomic_output(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)  # a file object: numpy adds no .npz to the temporary name
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
    return assign_variables(path, all_variables(model, optimizer))


def assign_variables(path: Path, variables: Sequence[Any], *, prefix: bool = False) -> int:
    """Assign a checkpoint's variables, in the order saved, to ``variables``; its step.

    ``prefix``: ``variables`` are the first of those saved (a model without the optimizer
    it trained with, as inference builds it); otherwise they must be all of them.

    Raises:
        ConfigError: the checkpoint holds another count or shape of variables.
    """
    with np.load(path) as data:
        names = sorted(k for k in data.files if k.startswith("v"))
        if len(names) < len(variables) or (not prefix and len(names) != len(variables)):
            raise ConfigError(
                f"checkpoint {path} holds {len(names)} variables, the model needs "
                f"{len(variables)}: was it made with another backbone or optimizer?"
            )
        for name, v in zip(names, variables, strict=False):
            value = data[name]
            if tuple(value.shape) != tuple(v.shape):
                raise ConfigError(
                    f"checkpoint {path}: {name} has shape {value.shape}, the model's "
                    f"{getattr(v, 'path', name)} is {tuple(v.shape)} (another patch size is "
                    "fine; another model is not)"
                )
            v.assign(value)
        return int(data["step"]) if "step" in data.files else 0
