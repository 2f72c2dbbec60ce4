"""Read the CAMELYON16 and CAMELYON17 challenges' folder layouts into (slide, XML) pairs.

``--data camelyon16=DIR`` expects the published CAMELYON16 tree::

    DIR/training/tumor/tumor_001.tif ...        DIR/training/normal/normal_001.tif ...
    DIR/training/lesion_annotations/tumor_001.xml ...
    DIR/testing/images/test_001.tif ...         DIR/testing/reference.csv
    DIR/testing/lesion_annotations/test_001.xml ...   (testing/ is optional)

Every tumour slide needs its XML and every XML its slide. Training slides train and the
testing slides validate (the study's split by slide); without testing/ the training slides
are split by slide.

``--data camelyon17=DIR`` expects the published CAMELYON17 tree (``center_N`` or
``centre_N``)::

    DIR/training/center_0/patient_000_node_0.tif ... center_4/...
    DIR/training/lesion_annotations/patient_004_node_4.xml ...
    DIR/training/stage_labels.csv              (patient_000_node_0.tif,negative ...)

Only slides a pixel label exists for can train a segmenter: the annotated slides and those
the stage labels call negative. Positive slides without an XML are left out (counted in
:attr:`Dataset.left_out`); an XML without its slide is an error. The slides are split by
slide across all centres, as in the study.
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path

from histoseg.errors import ConfigError

DATASETS = ("camelyon16", "camelyon17")
SLIDE_SUFFIX = ".tif"
_CENTRE_RE = re.compile(r"^cent(?:er|re)_(\d+)$")

Pair = tuple[Path, Path | None]


@dataclass
class Dataset:
    """The slides of a dataset; ``validation`` empty when the caller should split them."""

    name: str
    training: list[Pair]
    validation: list[Pair] = field(default_factory=list)
    left_out: list[Path] = field(default_factory=list)  # slides without a pixel label


def parse_data_spec(text: str) -> tuple[str, Path]:
    """'camelyon16=/data/c16' -> ('camelyon16', Path('/data/c16'))."""
    name, sep, folder = text.partition("=")
    if not sep or not folder or name not in DATASETS:
        raise ConfigError(
            f"--data {text!r} must be NAME=FOLDER with NAME one of {', '.join(DATASETS)}"
        )
    return name, Path(folder)


def read_dataset(text: str) -> Dataset:
    """The slides of a ``NAME=FOLDER`` data argument (see the module docstring)."""
    name, folder = parse_data_spec(text)
    _folder(folder, f"{name} folder")
    return camelyon16(folder) if name == "camelyon16" else camelyon17(folder)


def camelyon16(folder: Path) -> Dataset:
    """The CAMELYON16 tree under ``folder``: training pairs, and testing pairs to validate."""
    training = _folder(folder / "training", "CAMELYON16 training folder")
    tumour = _slides(_folder(training / "tumor", "CAMELYON16 tumour slides folder"))
    normal = _slides(_folder(training / "normal", "CAMELYON16 normal slides folder"))
    notes = _folder(training / "lesion_annotations", "CAMELYON16 annotations folder")
    pairs = _matched(tumour, notes) + [(tif, None) for tif in normal]
    validation: list[Pair] = []
    testing = folder / "testing"
    if testing.exists():
        images = _slides(_folder(testing / "images", "CAMELYON16 testing images folder"))
        labels = _reference_labels(testing / "reference.csv")
        test_notes = _folder(testing / "lesion_annotations", "CAMELYON16 testing annotations")
        for tif in images:
            label = labels.get(tif.stem.lower())
            if label is None:
                raise ConfigError(f"{tif.name} has no row in {testing / 'reference.csv'}")
            if label == "tumor":
                validation += _matched([tif], test_notes, check_orphans=False)
            else:
                validation.append((tif, None))
        _no_orphans(test_notes, {tif.stem for tif in images})
    return Dataset("camelyon16", pairs, validation)


def camelyon17(folder: Path) -> Dataset:
    """The CAMELYON17 tree under ``folder``: usable slides of every centre, to be split."""
    root = folder / "training" if (folder / "training").is_dir() else folder
    centres = sorted(p for p in root.iterdir() if p.is_dir() and _CENTRE_RE.match(p.name))
    if not centres:
        raise ConfigError(f"no CAMELYON17 centre folders (center_0 ... center_4) in {root}")
    slides = [tif for centre in centres for tif in _slides(centre)]
    notes = _folder(root / "lesion_annotations", "CAMELYON17 annotations folder")
    labels = _stage_labels(root / "stage_labels.csv")
    by_stem = {tif.stem: tif for tif in slides}
    _no_orphans(notes, set(by_stem))
    pairs: list[Pair] = []
    left_out: list[Path] = []
    for tif in slides:
        xml = notes / f"{tif.stem}.xml"
        label = labels.get(tif.name)
        if label is None:
            raise ConfigError(f"{tif.name} has no row in {root / 'stage_labels.csv'}")
        if xml.is_file():
            pairs.append((tif, xml))
        elif label == "negative":
            pairs.append((tif, None))
        else:
            left_out.append(tif)
    return Dataset("camelyon17", pairs, [], left_out)


def _folder(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise ConfigError(f"{what} {path} does not exist")
    return path


def _slides(folder: Path) -> list[Path]:
    found = sorted(p for p in folder.iterdir() if p.suffix.lower() == SLIDE_SUFFIX)
    if not found:
        raise ConfigError(f"no slides (*{SLIDE_SUFFIX}) in {folder}")
    return found


def _matched(slides: list[Path], notes: Path, *, check_orphans: bool = True) -> list[Pair]:
    """(slide, XML) for slides that must have one; any unmatched file is an error."""
    pairs = []
    for tif in slides:
        xml = notes / f"{tif.stem}.xml"
        if not xml.is_file():
            raise ConfigError(f"tumour slide {tif} has no annotation {xml}")
        pairs.append((tif, xml))
    if check_orphans:
        _no_orphans(notes, {tif.stem for tif in slides})
    return pairs


def _no_orphans(notes: Path, stems: set[str]) -> None:
    for xml in sorted(notes.glob("*.xml")):
        if xml.stem not in stems:
            raise ConfigError(f"annotation {xml} has no slide {xml.stem}{SLIDE_SUFFIX}")


def _csv_rows(path: Path) -> list[list[str]]:
    if not path.is_file():
        raise ConfigError(f"label file {path} does not exist")
    with path.open(newline="") as f:
        return [[cell.strip() for cell in row] for row in csv.reader(f) if row]


def _reference_labels(path: Path) -> dict[str, str]:
    """CAMELYON16 testing/reference.csv: ``Test_001,Tumor,...`` -> {'test_001': 'tumor'}."""
    labels = {}
    for row in _csv_rows(path):
        if len(row) < 2 or row[1].lower() not in ("tumor", "normal"):
            raise ConfigError(f"{path}: row {row} is not NAME,Tumor|Normal,...")
        labels[Path(row[0]).stem.lower()] = row[1].lower()
    return labels


def _stage_labels(path: Path) -> dict[str, str]:
    """CAMELYON17 stage_labels.csv: slide rows ``patient_000_node_0.tif,negative``."""
    return {
        row[0]: row[1].lower()
        for row in _csv_rows(path)
        if len(row) >= 2 and row[0].lower().endswith(SLIDE_SUFFIX)
    }
