"""Which slides train and which validate: by slide, or by CAMELYON17 centre."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ConfigError

SPLITS = ("auto", "slide", "centre")


CAMELYON17_RE = re.compile(r"patient_(\d+)_node_(\d+)", re.IGNORECASE)


def centre_of(slide_name: str) -> int | None:
    """CAMELYON17 centre of a slide named ``patient_<p>_node_<n>`` (20 patients a centre)."""
    m = CAMELYON17_RE.search(slide_name)
    return int(m.group(1)) // 20 if m else None


def split_slides(
    slides: Sequence[Any],
    *,
    how: str = "auto",
    val_fraction: float = 1 / 3,
    val_centres: Sequence[int] | None = None,
) -> tuple[list[Any], list[Any]]:
    """Split slides (paths, or (tif, xml) pairs) into training and validation slides.

    "slide": ``val_fraction`` of the annotated slides and of the others, evenly spaced in
    name order from the last one, validate, so validation holds tumour slides whenever there
    are at least two. "centre": the CAMELYON17 centres in ``val_centres``
    (default: the last one) validate, the others train. "auto": "centre" when every name is
    CAMELYON17-style and there are at least two centres, else "slide".
    """
    if how not in SPLITS:
        raise ConfigError(f"split {how!r} is not one of {', '.join(SPLITS)}")
    items = sorted(slides, key=lambda s: _name(s))
    if len(items) < 2:
        raise ConfigError(
            f"need at least 2 slides to split into training and validation, got {len(items)}"
        )
    centres = [centre_of(_name(s)) for s in items]
    if how == "auto":
        how = "centre" if all(c is not None for c in centres) and len(set(centres)) > 1 else "slide"
    if how == "centre":
        if any(c is None for c in centres):
            bad = next(_name(s) for s, c in zip(items, centres, strict=True) if c is None)
            raise ConfigError(
                f"split by centre needs CAMELYON17 names (patient_<p>_node_<n>); got {bad}"
            )
        held = set(val_centres) if val_centres else {max(centres)}
        val = [s for s, c in zip(items, centres, strict=True) if c in held]
        train = [s for s, c in zip(items, centres, strict=True) if c not in held]
    else:
        if not 0 < val_fraction < 1:
            raise ConfigError(f"validation fraction must be in (0, 1), got {val_fraction}")
        # stratified by "has annotations" so validation sees tumour whenever training does;
        # a group of one slide stays in training
        val = []
        for group in (
            [s for s in items if _has_annotations(s)],
            [s for s in items if not _has_annotations(s)],
        ):
            if len(group) < 2:
                continue
            n_val = min(len(group) - 1, max(1, round(len(group) * val_fraction)))
            picks = np.linspace(len(group) - 1, 0, n_val + 1)[:n_val].round().astype(int)
            val += [group[i] for i in sorted(set(picks.tolist()))]
        if not val:
            val = [items[-1]]
        train = [s for s in items if s not in val]
    if not train or not val:
        raise ConfigError(
            f"split {how!r} left an empty set: {len(train)} train, {len(val)} validation slides"
        )
    return train, val


def _has_annotations(slide: Any) -> bool:
    return isinstance(slide, (tuple, list)) and len(slide) > 1 and slide[1] is not None


def _name(slide: Any) -> str:
    path = slide[0] if isinstance(slide, (tuple, list)) else slide
    return Path(path).name
