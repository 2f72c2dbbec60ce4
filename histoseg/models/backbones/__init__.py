"""Backbones of DeepLabV3+: each maps an image tensor to ``(low_level, high_level)`` features."""

from histoseg.models.backbones.mobilenetv2 import mobilenetv2
from histoseg.models.backbones.resnet50 import resnet50
from histoseg.models.backbones.xception65 import xception65

#: Registry of backbones by name: ``fn(inputs, *, output_stride, remat, **kwargs)``.
BACKBONES = {"xception65": xception65, "mobilenetv2": mobilenetv2, "resnet50": resnet50}

__all__ = ["BACKBONES", "mobilenetv2", "resnet50", "xception65"]
