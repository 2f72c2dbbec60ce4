"""Whole-slide images: OpenSlide access, ASAP annotations, tissue masks, patches, synthetic slides.

Layered like the flow of data: ``slide`` (pixels) -> ``annotations`` (labels) -> ``tissue``
(where the tissue is) -> ``patches`` (which squares to train on) -> ``histoseg.data``.
Beside them: ``synth`` and ``context`` (synthetic slides of the "local" and "context"
tasks), ``ceiling`` (the best score a patch size allows on them) and ``camelyon`` (the
challenges' published folder layouts).

Names are imported lazily, so ``python -m histoseg.wsi.patches`` runs its module once.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "annotations": [
        "CAMELYON16_LABELS",
        "CAMELYON17_LABELS",
        "DEFAULT_LABELS",
        "Annotation",
        "AnnotationWarning",
        "Annotations",
        "write_asap_xml",
    ],
    "patches": [
        "PatchRef",
        "arrange_by_tumor_ratio",
        "grid_patches",
        "load_patches",
        "sample_patches",
        "save_patches",
        "shard",
    ],
    "slide": ["Slide", "open_slide"],
    "tissue": ["CoverageGrid", "detect_tissue"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = [
    "CAMELYON16_LABELS",
    "CAMELYON17_LABELS",
    "DEFAULT_LABELS",
    "Annotation",
    "AnnotationWarning",
    "Annotations",
    "CoverageGrid",
    "PatchRef",
    "Slide",
    "arrange_by_tumor_ratio",
    "detect_tissue",
    "grid_patches",
    "load_patches",
    "open_slide",
    "sample_patches",
    "save_patches",
    "shard",
    "write_asap_xml",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'histoseg.wsi' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"histoseg.wsi.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])


if TYPE_CHECKING:
    from histoseg.wsi.annotations import (
        CAMELYON16_LABELS,
        CAMELYON17_LABELS,
        DEFAULT_LABELS,
        Annotation,
        Annotations,
        AnnotationWarning,
        write_asap_xml,
    )
    from histoseg.wsi.patches import (
        PatchRef,
        arrange_by_tumor_ratio,
        grid_patches,
        load_patches,
        sample_patches,
        save_patches,
        shard,
    )
    from histoseg.wsi.slide import Slide, open_slide
    from histoseg.wsi.tissue import CoverageGrid, detect_tissue
