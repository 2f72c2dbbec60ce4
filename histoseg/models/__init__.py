"""The DeepLabV3+ model family with memory-saving modes (mixed precision, rematerialisation).

Public API: :func:`build_deeplabv3plus`, :func:`build_for_step`, :func:`count_macs`, :func:`count_params`,
:func:`model_macs` and the registries ``BACKBONES``, ``PRECISIONS``, ``REMAT_MODES``,
``OUTPUT_STRIDES``, ``NORMS``.
"""

from histoseg.models.backbones import BACKBONES
from histoseg.models.deeplabv3plus import (
    OUTPUT_STRIDES,
    PRECISIONS,
    build_deeplabv3plus,
    build_for_step,
    count_macs,
    count_params,
    model_macs,
)
from histoseg.models.norm import NORMS
from histoseg.models.remat import REMAT_MODES

__all__ = [
    "BACKBONES",
    "NORMS",
    "OUTPUT_STRIDES",
    "PRECISIONS",
    "REMAT_MODES",
    "build_deeplabv3plus",
    "build_for_step",
    "count_macs",
    "count_params",
    "model_macs",
]
