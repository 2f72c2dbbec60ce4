"""DeepLabV3+ (Chen et al., 2018): ASPP, decoder, the builder and its multiply-add count."""

from histoseg.models.deeplabv3plus.builder import (
    OUTPUT_STRIDES,
    PRECISIONS,
    build_deeplabv3plus,
    build_for_step,
)
from histoseg.models.deeplabv3plus.macs import count_macs, count_params, model_macs

__all__ = [
    "OUTPUT_STRIDES",
    "PRECISIONS",
    "build_deeplabv3plus",
    "build_for_step",
    "count_macs",
    "count_params",
    "model_macs",
]
