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
from histoseg.wsi.slide import Slide, open_slide

__all__ = [
    "CAMELYON16_LABELS",
    "CAMELYON17_LABELS",
    "DEFAULT_LABELS",
    "Annotation",
    "AnnotationWarning",
    "Annotations",
    "Slide",
    "open_slide",
    "write_asap_xml",
]
