"""Small synthetic slides written once per test session (the real TIFF -> OpenSlide path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from histoseg.wsi.synth import write_synthetic_slide

SLIDE_SIZE_PX = (2048, 1536)
TILE_PX = 256


@dataclass(frozen=True)
class SyntheticSlides:
    tumor_tif: Path
    tumor_xml: Path
    normal_tif: Path
    folder: Path


@pytest.fixture(scope="session")
def synthetic_slides(tmp_path_factory: pytest.TempPathFactory) -> SyntheticSlides:
    folder = tmp_path_factory.mktemp("synthetic")
    tumor_tif, tumor_xml = write_synthetic_slide(
        folder / "tumor.tif", SLIDE_SIZE_PX, seed=11, tile_px=TILE_PX, progress=False
    )
    normal_tif, normal_xml = write_synthetic_slide(
        folder / "normal.tif", SLIDE_SIZE_PX, seed=12, tile_px=TILE_PX, tumor=False, progress=False
    )
    assert tumor_xml is not None and normal_xml is None
    return SyntheticSlides(tumor_tif, tumor_xml, normal_tif, folder)
