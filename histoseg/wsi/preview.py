"""A picture of a patch grid: the slide's thumbnail with the kept patches and the tumour
outline drawn on it, written atomically in a format PIL writes without extra options."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from histoseg.errors import ConfigError
from histoseg.files import atomic_output
from histoseg.wsi.annotations import Annotations
from histoseg.wsi.slide import Slide

if TYPE_CHECKING:
    from histoseg.wsi.patches import PatchRef


def draw_preview(
    slide: Slide,
    refs: Sequence[PatchRef],
    annotations: Annotations,
    path: str | Path,
    max_size_px: int = 1600,
) -> Path:
    """PNG of the slide thumbnail with kept patches (green, tumour ones orange) and the
    tumour outline (blue; exclusions dashed-free cyan)."""
    from PIL import Image, ImageDraw

    thumb = slide.thumbnail(max_size_px)
    scale = thumb.shape[1] / slide.dimensions[0]
    image = Image.fromarray(thumb)
    draw = ImageDraw.Draw(image)
    for ref in refs:
        x, y, w, h = ref.region_level0(slide.level_downsamples[ref.level])
        colour = (255, 140, 0) if ref.is_tumor else (0, 170, 0)
        draw.rectangle(
            [x * scale, y * scale, (x + w) * scale - 1, (y + h) * scale - 1], outline=colour
        )
    for a in annotations.annotations:
        points = [(float(px) * scale, float(py) * scale) for px, py in a.vertices]
        colour = (0, 200, 255) if a.label == 0 else (0, 60, 255)
        draw.line([*points, points[0]], fill=colour, width=2)
    path = Path(path)
    fmt = preview_format(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_output(path) as tmp:
        image.save(tmp, format=fmt)
    return path


# Formats PIL writes an RGB image to with no extra options (others need a mode or plugin).
PREVIEW_FORMATS = {
    ".png": "PNG",
    ".jpg": "JPEG",
    ".jpeg": "JPEG",
    ".tif": "TIFF",
    ".tiff": "TIFF",
    ".webp": "WEBP",
    ".bmp": "BMP",
}


def preview_format(path: str | Path) -> str:
    """The PIL format a preview at ``path`` is written in, from its extension.

    Raises:
        ConfigError: ``path`` is a directory, or its extension is not one of
            :data:`PREVIEW_FORMATS` that this PIL can write.
    """
    from PIL import Image, features

    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"preview {path} is a directory; give a file such as p.png")
    fmt = PREVIEW_FORMATS.get(path.suffix.lower())
    Image.init()
    # WEBP needs PIL built with libwebp; check so the failure comes before any work.
    if fmt is None or fmt not in Image.SAVE or (fmt == "WEBP" and not features.check("webp")):
        allowed = ", ".join(e for e, f in PREVIEW_FORMATS.items() if f in Image.SAVE)
        raise ConfigError(f"preview {path}: unsupported image extension (use one of {allowed})")
    return fmt
