"""Whole-slide images: OpenSlide access, ASAP annotations, tissue masks, patches, synthetic slides.

Layered like the flow of data: ``slide`` (pixels) -> ``annotations`` (labels) -> ``tissue``
(where the tissue is) -> ``patches`` (which squares to train on) -> ``histoseg.data``.
"""

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
