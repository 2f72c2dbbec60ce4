"""The slides and patches a run trains and validates on, and the validation set's ceiling."""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from histoseg.errors import ConfigError
from histoseg.train.engines import (
    Engine,
)
from histoseg.train.options import TrainOptions
from histoseg.train.split import split_slides

SLIDE_SUFFIXES = (".tif", ".tiff", ".svs", ".ndpi", ".mrxs", ".scn", ".vms", ".bif")


def find_slides(slides: str, annotations: str | None) -> list[tuple[Path, Path | None]]:
    """(slide, ASAP XML or None) for every slide file in ``slides``; XML by the same stem."""
    folder = Path(slides)
    if not folder.is_dir():
        raise ConfigError(f"slides folder {folder} does not exist")
    notes = Path(annotations) if annotations else folder
    if not notes.is_dir():
        raise ConfigError(f"annotations folder {notes} does not exist")
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() in SLIDE_SUFFIXES)
    if not found:
        raise ConfigError(f"no slides ({', '.join(SLIDE_SUFFIXES)}) in {folder}")
    pairs = []
    for tif in found:
        xml = notes / f"{tif.stem}.xml"
        pairs.append((tif, xml if xml.exists() else None))
    return pairs


def _data(options: TrainOptions, engine: Engine) -> list[tuple[Path, Path | None]]:
    if options.slides:
        return find_slides(options.slides, options.annotations)
    from histoseg.wsi.synth import ensure_synthetic_dataset

    def make() -> list[tuple[Path, Path | None]]:
        return ensure_synthetic_dataset(
            options.synthetic_dir,
            options.synthetic_slides,
            options.synthetic_size_px,
            seed=options.synthetic_seed,
            progress=options.progress and engine.is_chief,
            task=options.synthetic_task,
        )

    # the chief writes the slides, the others wait and then find them made
    pairs = make() if engine.is_chief else None
    engine.barrier()
    return pairs if pairs is not None else make()


def train_and_val_slides(options: TrainOptions, engine: Engine) -> tuple[list, list]:
    """The (slide, XML) pairs to train on and to validate on."""
    if not options.data:
        return split_slides(
            _data(options, engine),
            how=options.split,
            val_fraction=options.val_fraction,
            val_centres=options.val_centres,
        )
    from histoseg.wsi.camelyon import read_dataset

    dataset = read_dataset(options.data)
    if dataset.left_out and engine.is_chief:
        print(
            f"{options.data}: left out {len(dataset.left_out)} positive slides without a "
            f"lesion annotation (e.g. {dataset.left_out[0].name})",
            file=sys.stderr,
        )
    if dataset.validation:
        return dataset.training, dataset.validation
    # the study validates on slides of every centre: split by slide unless told otherwise
    return split_slides(
        dataset.training,
        how="slide" if options.split == "auto" else options.split,
        val_fraction=options.val_fraction,
        val_centres=options.val_centres,
    )


def training_patches(
    options: TrainOptions,
    slides: Sequence[tuple[Path, Path | None]],
    n: int,
    seed: int,
    tissues: Sequence[Any] | None = None,
) -> list:
    """``n`` training patches drawn over ``slides``, shuffled; ``tissues``: each slide's
    tissue grid when the caller has detected it already (default: detected here)."""
    from histoseg.wsi.patches import sample_patches

    per_slide = max(1, math.ceil(n / len(slides)))
    refs = []
    for i, (tif, xml) in enumerate(slides):
        refs += sample_patches(
            tif,
            options.patch_size,
            per_slide,
            seed=seed * 1000 + i,
            level=options.level,
            min_tissue=options.min_tissue,
            annotations=xml,
            tumor_ratio=options.tumor_ratio if xml is not None else None,
            batch_size=options.batch_size,
            tissue=tissues[i] if tissues is not None else None,
        )
    if not refs:
        raise ConfigError(
            f"no patches of {options.patch_size} px with tissue on the training slides"
        )
    rng = np.random.default_rng(seed)
    return [refs[i] for i in rng.permutation(len(refs))]


def validation_patches(options: TrainOptions, slides: Sequence[tuple[Path, Path | None]]) -> list:
    from histoseg.wsi.patches import grid_patches

    refs = []
    for tif, xml in slides:
        refs += grid_patches(tif, options.patch_size, options.level, options.min_tissue, xml)
    if options.max_val_patches and len(refs) > options.max_val_patches:
        # a deterministic subset: up to half tumour patches (tumour is a few percent of a
        # slide's tissue, so an even subset of the grid would hold almost none), the rest
        # normal tissue, each part evenly spaced over the grid so it spans every slide
        tumour = [r for r in refs if r.is_tumor]
        normal = [r for r in refs if not r.is_tumor]
        n_tumour = min(len(tumour), options.max_val_patches // 2)
        refs = _evenly(tumour, n_tumour) + _evenly(normal, options.max_val_patches - n_tumour)
    if not refs:
        raise ConfigError(f"no validation patches of {options.patch_size} px with tissue")
    return refs


def validation_ceiling(options: TrainOptions, val_refs: Sequence[Any]) -> dict | None:
    """The Bayes ceiling (:mod:`histoseg.wsi.ceiling`) of the validation patches of a run
    on synthetic level-0 slides, as plain numbers for the results row; None otherwise."""
    if options.slides or options.data or options.level != 0:
        return None
    from histoseg.wsi.ceiling import bayes_ceiling
    from histoseg.wsi.synth import dataset_designs

    designs = dataset_designs(
        options.synthetic_slides,
        options.synthetic_size_px,
        options.synthetic_seed,
        options.synthetic_task,
    )
    names = sorted({Path(r.slide_path).name for r in val_refs})
    origins = [[(r.x, r.y) for r in val_refs if Path(r.slide_path).name == n] for n in names]
    ceiling = bayes_ceiling([designs[n] for n in names], options.patch_size, origins)
    return {
        "accuracy": ceiling.accuracy,
        "miou": ceiling.miou,
        "iou_tumour": ceiling.iou_tumour,
        "decidable_fraction": ceiling.decidable_fraction,
    }


def _evenly(items: Sequence[Any], n: int) -> list[Any]:
    """``n`` items evenly spaced over ``items`` (all of them when there are fewer)."""
    if n >= len(items):
        return list(items)
    if n <= 0:
        return []
    keep = np.linspace(0, len(items) - 1, n).round().astype(int)
    return [items[i] for i in sorted(set(keep.tolist()))]
