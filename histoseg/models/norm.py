"""Which normalisation the model's conv blocks use: batch, frozen batch, or group norm.

Batch norm normalises with the moments of the batch in training and with moving averages
at inference. At batch 1 the two differ: training sees one patch's own moments (and the
ASPP image-pooling branch, a 1x1 map, normalises a single value to zero), inference sees
the average over many patches, so a model that fits its training patches can predict one
class everywhere at validation. Group norm (Wu & He, 2018) normalises each sample over
channel groups, the same in training and inference and independent of the batch size;
frozen batch norm always uses its stored statistics (useful from pretrained weights).

The backbones and the head build their normalisation through :func:`norm_layer`;
:func:`normalization` picks the kind for the layers built inside it.
"""

from __future__ import annotations

import contextlib
import math
import threading

import keras

from histoseg.errors import ConfigError
from histoseg.models.layers import BatchNorm

NORMS: tuple[str, ...] = ("batch", "frozen", "group")
DEFAULT_NORM = "batch"
#: Upper bound on channel groups; fewer when the channel count is not a multiple of it.
GROUP_NORM_GROUPS = 32

_kind = threading.local()


def check_norm(norm: str) -> str:
    """``norm`` if it is one of :data:`NORMS`, else a ConfigError naming the choices."""
    if norm not in NORMS:
        raise ConfigError(f"norm={norm!r} is not allowed; choose one of: {', '.join(NORMS)}")
    return norm


@contextlib.contextmanager
def normalization(norm: str):
    """Build the layers inside with normalisation ``norm`` (one of :data:`NORMS`)."""
    check_norm(norm)
    previous = getattr(_kind, "norm", DEFAULT_NORM)
    _kind.norm = norm
    try:
        yield
    finally:
        _kind.norm = previous


def norm_layer(*, epsilon: float, name: str) -> keras.layers.Layer:
    """A normalisation layer of the kind chosen by :func:`normalization` (default batch)."""
    norm = getattr(_kind, "norm", DEFAULT_NORM)
    if norm == "group":
        return GroupNorm(epsilon=epsilon, name=name)
    if norm == "frozen":
        return FrozenBatchNorm(epsilon=epsilon, name=name)
    return BatchNorm(epsilon=epsilon, name=name)


@keras.saving.register_keras_serializable(package="histoseg")
class FrozenBatchNorm(BatchNorm):
    """Batch norm that always normalises with its stored statistics and never updates them."""

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


@keras.saving.register_keras_serializable(package="histoseg")
class GroupNorm(keras.layers.GroupNormalization):
    """Group norm with the largest group count <= ``max_groups`` that divides the channels.

    Args:
        max_groups: upper bound on the number of groups (default 32, as Wu & He).
        **kwargs: passed to ``keras.layers.GroupNormalization`` (``epsilon``, ``name``).
    """

    def __init__(self, max_groups: int = GROUP_NORM_GROUPS, **kwargs):
        kwargs.pop("groups", None)
        super().__init__(groups=max_groups, **kwargs)
        self.max_groups = int(max_groups)

    def build(self, input_shape):
        self.groups = math.gcd(self.max_groups, int(input_shape[-1]))
        super().build(input_shape)

    def get_config(self):
        return {**super().get_config(), "max_groups": self.max_groups}
