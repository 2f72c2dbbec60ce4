"""Whole-slide access over OpenSlide: levels, mpp, regions as uint8 RGB arrays."""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import openslide
from openslide import lowlevel

from histoseg.errors import SlideError

# A single read larger than this is almost certainly a mistake (a whole level 0 of a
# gigapixel slide); refuse it rather than let the process be killed for memory.
MAX_REGION_PX = 1 << 28


class Slide:
    """One open whole-slide image (a pyramidal TIFF or any format OpenSlide reads).

    Coordinates given to :meth:`read_region` are level-0 pixels whatever the level, as in
    OpenSlide. Use :func:`open_slide` to make one; close it (or use ``with``) when done.

    Example:
        >>> with open_slide("data/synthetic/slide_000.tif") as slide:
        ...     patch = slide.read_region((4096, 2048), 0, (1024, 1024))
        >>> patch.shape, patch.dtype
        ((1024, 1024, 3), dtype('uint8'))
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.exists():
            raise SlideError(f"slide file not found: {self.path}")
        if not self.path.is_file():
            raise SlideError(f"slide path is not a file: {self.path}")
        try:
            self._osr = openslide.OpenSlide(str(self.path))
        except openslide.OpenSlideUnsupportedFormatError:
            raise SlideError(
                f"{self.path}: not a slide OpenSlide can read: unsupported format or a "
                "corrupt/truncated file (expected a pyramidal tiled TIFF, .svs, .ndpi, .mrxs, ...)"
            ) from None
        except (openslide.OpenSlideError, OSError, ValueError) as exc:
            raise SlideError(f"{self.path}: corrupt or unreadable slide ({exc})") from None
        try:
            self.level_count: int = self._osr.level_count
            self.level_dimensions: tuple[tuple[int, int], ...] = tuple(self._osr.level_dimensions)
            self.level_downsamples: tuple[float, ...] = tuple(self._osr.level_downsamples)
            self._properties = dict(self._osr.properties)
        except openslide.OpenSlideError as exc:
            self._osr.close()
            raise SlideError(f"{self.path}: corrupt or unreadable slide ({exc})") from None
        if self.level_count < 1 or min(self.level_dimensions[0]) < 1:
            self._osr.close()
            raise SlideError(f"{self.path}: slide has no readable level 0")
        self._closed = False

    # --- metadata -------------------------------------------------------------------
    @property
    def dimensions(self) -> tuple[int, int]:
        """Level-0 size as (width, height) in pixels."""
        return self.level_dimensions[0]

    @property
    def properties(self) -> dict[str, str]:
        """OpenSlide properties (vendor, resolution, ...), as strings."""
        return dict(self._properties)

    @property
    def vendor(self) -> str | None:
        return self._properties.get(openslide.PROPERTY_NAME_VENDOR)

    @property
    def mpp_xy(self) -> tuple[float, float]:
        """Micrometres per level-0 pixel along x and y.

        Raises:
            SlideError: the slide records no resolution.
        """
        try:
            mpp_x = float(self._properties[openslide.PROPERTY_NAME_MPP_X])
            mpp_y = float(self._properties[openslide.PROPERTY_NAME_MPP_Y])
        except (KeyError, ValueError):
            raise SlideError(
                f"{self.path}: slide records no resolution (no openslide.mpp-x/-y); "
                "write X/YResolution with a centimetre or inch unit, or pass the mpp explicitly"
            ) from None
        if not (mpp_x > 0 and mpp_y > 0 and np.isfinite(mpp_x) and np.isfinite(mpp_y)):
            raise SlideError(f"{self.path}: invalid resolution mpp=({mpp_x}, {mpp_y})")
        return mpp_x, mpp_y

    @property
    def mpp(self) -> float:
        """Micrometres per level-0 pixel (mean of x and y).

        Raises:
            SlideError: the slide records no resolution.
        """
        mpp_x, mpp_y = self.mpp_xy
        return (mpp_x + mpp_y) / 2.0

    def best_level_for_downsample(self, downsample: float) -> int:
        """The level whose downsample is the largest one not above ``downsample``."""
        if not downsample > 0:
            raise SlideError(f"{self.path}: downsample must be > 0, got {downsample}")
        best = 0
        for level, level_downsample in enumerate(self.level_downsamples):
            if level_downsample <= downsample * (1 + 1e-6):
                best = level
        return best

    def check_level(self, level: int) -> int:
        if not isinstance(level, (int, np.integer)) or not 0 <= level < self.level_count:
            raise SlideError(
                f"{self.path}: level {level!r} out of range; the slide has levels "
                f"0..{self.level_count - 1}"
            )
        return int(level)

    # --- pixels ---------------------------------------------------------------------
    def read_region(
        self,
        location_px_level0: Sequence[int],
        level: int,
        size_px: Sequence[int],
    ) -> np.ndarray:
        """Read a region as RGB, transparent parts composited on white.

        Args:
            location_px_level0: (x, y) of the top-left corner in level-0 pixels.
            level: pyramid level to read from.
            size_px: (width, height) of the output in pixels of ``level``.

        Returns:
            uint8 array of shape (height, width, 3). Areas outside the slide are white.
        """
        self._check_open()
        level = self.check_level(level)
        x, y = (int(v) for v in location_px_level0)
        w, h = (int(v) for v in size_px)
        if w <= 0 or h <= 0:
            raise SlideError(f"{self.path}: region size must be positive, got {w}x{h}")
        if w * h > MAX_REGION_PX:
            raise SlideError(
                f"{self.path}: region {w}x{h} px is larger than the {MAX_REGION_PX} px "
                "allowed in one read; read it in patches"
            )
        argb = np.empty((h, w), dtype=np.uint32)
        try:
            # Straight into a numpy buffer: skips PIL and the un-premultiply that
            # openslide-python does, which are most of the cost at 1024 px.
            lowlevel._read_region(
                self._osr._osr,
                argb.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
                x,
                y,
                level,
                w,
                h,
            )
        except openslide.OpenSlideError as exc:
            raise SlideError(
                f"{self.path}: read failed at ({x}, {y}) level {level}: {exc}"
            ) from None
        return premultiplied_argb_to_rgb(argb)

    def read_level(self, level: int) -> np.ndarray:
        """Read a whole (small) level as RGB."""
        level = self.check_level(level)
        return self.read_region((0, 0), level, self.level_dimensions[level])

    def thumbnail(self, max_size_px: int | Sequence[int]) -> np.ndarray:
        """An RGB thumbnail fitting in ``max_size_px`` (an int or (width, height)).

        Reads the smallest level that is still at least as large as the thumbnail, then
        shrinks it with PIL, so it stays cheap on gigapixel slides.
        """
        from PIL import Image

        if isinstance(max_size_px, (int, np.integer)):
            max_w = max_h = int(max_size_px)
        else:
            max_w, max_h = (int(v) for v in max_size_px)
        if max_w <= 0 or max_h <= 0:
            raise SlideError(f"{self.path}: thumbnail size must be positive, got {max_size_px}")
        width0, height0 = self.dimensions
        scale = max(width0 / max_w, height0 / max_h, 1.0)
        level = self.best_level_for_downsample(scale)
        image = self.read_level(level)
        out_w = max(1, round(width0 / scale))
        out_h = max(1, round(height0 / scale))
        if image.shape[1] != out_w or image.shape[0] != out_h:
            image = np.asarray(Image.fromarray(image).resize((out_w, out_h), Image.Resampling.BOX))
        return image

    # --- lifetime -------------------------------------------------------------------
    def _check_open(self) -> None:
        if self._closed:
            raise SlideError(f"{self.path}: slide is closed")

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._osr.close()

    def __enter__(self) -> Slide:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        w, h = self.dimensions
        return f"Slide({str(self.path)!r}, {w}x{h}, levels={self.level_count})"


def premultiplied_argb_to_rgb(argb: np.ndarray) -> np.ndarray:
    """OpenSlide's premultiplied ARGB (uint32, HxW) -> RGB composited on white (uint8).

    Over white, a premultiplied colour c with alpha a becomes c + (255 - a): exact, and
    no division, unlike un-premultiplying first.
    """
    bgra = argb.view(np.uint8).reshape(*argb.shape, 4)  # little-endian: B, G, R, A
    if not np.little_endian:  # pragma: no cover - every platform OpenSlide wheels exist for
        bgra = bgra[..., ::-1]
    rgb = np.empty((*argb.shape, 3), dtype=np.uint8)
    # Three plane copies beat one reversed-stride copy by ~3x at 1024 px.
    rgb[..., 0] = bgra[..., 2]
    rgb[..., 1] = bgra[..., 1]
    rgb[..., 2] = bgra[..., 0]
    alpha = bgra[..., 3]
    if alpha.min(initial=255) < 255:
        rgb += (255 - alpha)[..., None]
    return rgb


def open_slide(path: str | Path) -> Slide:
    """Open a whole-slide image.

    Raises:
        SlideError: the file is missing, corrupt, or not a format OpenSlide reads.
    """
    return Slide(path)
