"""The model-configuration options every command that builds a DeepLabV3+ shares."""

from __future__ import annotations

import argparse

from histoseg.cli import int_in_range
from histoseg.config import HEAD_FILTERS, MAX_ALPHA, parse_alpha
from histoseg.models.backbones import BACKBONES
from histoseg.models.deeplabv3plus.builder import OUTPUT_STRIDES, PRECISIONS
from histoseg.models.remat import REMAT_MODES

MAX_NUM_CLASSES = 1024


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --backbone, --alpha, --num-classes, --output-stride, --precision, --remat and
    --head-filters."""
    add = parser.add_argument
    add("--backbone", default="xception65", choices=tuple(BACKBONES))
    add(
        "--alpha",
        type=parse_alpha,
        default=None,
        help=f"mobilenetv2 width multiplier, in (0, {MAX_ALPHA:g}]",
    )
    add(
        "--num-classes",
        type=int_in_range(1, MAX_NUM_CLASSES),
        default=2,
        help=f"1 to {MAX_NUM_CLASSES}",
    )
    add("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES)
    add("--precision", default="float32", choices=PRECISIONS)
    add("--remat", default="none", choices=REMAT_MODES)
    add(
        "--head-filters",
        type=int_in_range(1, 4096),
        default=HEAD_FILTERS,
        help=f"channels of ASPP and the decoder (default {HEAD_FILTERS}, the paper's)",
    )
