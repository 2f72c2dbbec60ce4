"""The model-configuration options every command that builds a DeepLabV3+ shares."""

from __future__ import annotations

import argparse

from histoseg.models.backbones import BACKBONES
from histoseg.models.deeplabv3plus.builder import OUTPUT_STRIDES, PRECISIONS
from histoseg.models.remat import REMAT_MODES


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Add --backbone, --alpha, --num-classes, --output-stride, --precision and --remat."""
    add = parser.add_argument
    add("--backbone", default="xception65", choices=tuple(BACKBONES))
    add("--alpha", type=float, default=None, help="mobilenetv2 width multiplier")
    add("--num-classes", type=int, default=2)
    add("--output-stride", type=int, default=16, choices=OUTPUT_STRIDES)
    add("--precision", default="float32", choices=PRECISIONS)
    add("--remat", default="none", choices=REMAT_MODES)
