"""Which of a list of slides each rank runs, when a launcher starts several.

Every rank computes the same split from the same list, so the ranks need not talk: the
slides go largest first (pixels at the inference level), each to the rank with the fewest
pixels so far, ties to the lowest rank (the longest-processing-time rule: the busiest rank
ends within 4/3 of the best split). Each slide is run, and its outputs written, by exactly
one rank.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from histoseg.wsi.slide import open_slide


def share_of_slides(sizes_px: Sequence[int], rank: int, world: int) -> list[int]:
    """Indices, in the list's order, of the slides rank ``rank`` of ``world`` runs."""
    load = [0] * world
    owner = [0] * len(sizes_px)
    for index in sorted(range(len(sizes_px)), key=lambda i: (-sizes_px[i], i)):
        least_loaded = min(range(world), key=lambda r: (load[r], r))
        owner[index] = least_loaded
        load[least_loaded] += sizes_px[index]
    return [i for i, r in enumerate(owner) if r == rank]


def level_pixels(slide_path: Path, level: int) -> int:
    """Pixels of ``slide_path`` at pyramid ``level`` (checked: a missing level is refused)."""
    with open_slide(slide_path) as slide:
        width_px, height_px = slide.level_dimensions[slide.check_level(level)]
    return width_px * height_px
