"""ASAP XML annotations (CAMELYON16/17): safe parsing, writing, and rasterisation to masks.

The parser runs on the stdlib expat with no DTD, no entities and bounded depth and size,
so hostile files (billion laughs, external entities) give an AnnotationError, never a hang.
It streams the file and keeps 24 bytes per vertex, and refuses, in one line, a file over
these limits (CAMELYON16/17 files are a few MB with at most tens of thousands of
vertices per polygon):

- :data:`MAX_FILE_BYTES` (256 MiB) per file,
- :data:`MAX_POLYGONS` (100,000) annotations per file,
- :data:`MAX_VERTICES_PER_POLYGON` (250,000) vertices per annotation,
- :data:`MAX_VERTICES` (5,000,000) vertices per file,
- :data:`MAX_DEPTH` (32) nested elements, coordinates within :data:`MAX_COORDINATE_PX`.

Rasterisation time grows with edges x rows spanned, so the per-polygon limit also bounds
the time of a hostile zigzag; its memory is bounded by the output (see ``raster``).
"""

from __future__ import annotations

import math
import warnings
import xml.parsers.expat
from array import array
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO
from xml.sax.saxutils import quoteattr

import numpy as np

from histoseg.errors import AnnotationError
from histoseg.files import atomic_output
from histoseg.wsi.raster import fill_polygons

TUMOR = 1
EXCLUDE = 0

# Group name -> label. CAMELYON16: `Tumor`, `_0`, `_1` positive, `_2` normal tissue
# inside a tumour; CAMELYON17: `metastases` positive, `normal` excluded.
CAMELYON16_LABELS: dict[str, int] = {"Tumor": TUMOR, "_0": TUMOR, "_1": TUMOR, "_2": EXCLUDE}
CAMELYON17_LABELS: dict[str, int] = {"metastases": TUMOR, "normal": EXCLUDE}
DEFAULT_LABELS: dict[str, int] = {**CAMELYON16_LABELS, **CAMELYON17_LABELS}

POLYGON_TYPES = {"polygon", "spline", "rectangle"}
POINT_TYPES = {"dot", "pointset", "measurement"}
MAX_COORDINATE_PX = 1e8  # CAMELYON level 0 is ~2e5 px; anything near 1e8 is garbage
MAX_DEPTH = 32
MAX_FILE_BYTES = 256 * 1024 * 1024
MAX_POLYGONS = 100_000
MAX_VERTICES_PER_POLYGON = 250_000
MAX_VERTICES = 5_000_000


class AnnotationWarning(UserWarning):
    """An annotation that is suspicious but usable (outside the slide, ignored point set)."""


@dataclass(frozen=True)
class Annotation:
    """One ASAP annotation: a closed polygon in level-0 pixels and its group."""

    name: str
    group: str
    label: int
    vertices: np.ndarray  # (N, 2) float64, level-0 (x, y)

    @property
    def bbox_level0(self) -> tuple[float, float, float, float]:
        """(x_min, y_min, x_max, y_max) in level-0 pixels."""
        v = self.vertices
        return (
            float(v[:, 0].min()),
            float(v[:, 1].min()),
            float(v[:, 0].max()),
            float(v[:, 1].max()),
        )


class Annotations:
    """The annotations of one slide, ready to rasterise into masks of any region and level.

    Example:
        >>> ann = Annotations.from_xml("slide_000.xml")
        >>> mask = ann.rasterize((4096, 2048, 2048, 2048), downsample=2.0)  # 1024x1024
    """

    def __init__(self, annotations: Sequence[Annotation] = (), source: str | None = None):
        self.annotations = list(annotations)
        self.source = source
        self._boxes = np.array([a.bbox_level0 for a in self.annotations], dtype=np.float64).reshape(
            -1, 4
        )

    @classmethod
    def empty(cls, source: str | None = None) -> Annotations:
        """No annotations: a tumour-free ("normal") slide."""
        return cls([], source)

    @classmethod
    def from_xml(
        cls,
        path: str | Path | None,
        label_map: Mapping[str, int | None] | None = None,
    ) -> Annotations:
        """Parse an ASAP XML file.

        Args:
            path: the XML; None or a missing file means a slide without tumour.
            label_map: group name -> label (1 tumour, 0 exclusion painted last, None to
                ignore the group). Default: CAMELYON16 and CAMELYON17 group names.

        Raises:
            AnnotationError: malformed XML, unknown group, polygon with < 3 points,
                non-finite or absurd coordinates; the message names file and annotation.
        """
        if path is None:
            return cls.empty()
        path = Path(path)
        if not path.exists():
            return cls.empty(str(path))
        if not path.is_file():
            raise AnnotationError(f"{path}: annotation path is not a file")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise AnnotationError(
                f"{path}: {size} bytes is larger than the {MAX_FILE_BYTES} bytes allowed"
            )
        with path.open("rb") as fh:
            raw = _parse_asap(fh, str(path))
        return cls._from_raw(raw, label_map, str(path))

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        label_map: Mapping[str, int | None] | None = None,
        source: str = "<bytes>",
    ) -> Annotations:
        """Parse ASAP XML held in memory (see :meth:`from_xml`)."""
        if len(data) > MAX_FILE_BYTES:
            raise AnnotationError(
                f"{source}: {len(data)} bytes is larger than the {MAX_FILE_BYTES} bytes allowed"
            )
        return cls._from_raw(_parse_asap(data, source), label_map, source)

    @classmethod
    def _from_raw(
        cls,
        raw: list[_RawAnnotation],
        label_map: Mapping[str, int | None] | None,
        source: str,
    ) -> Annotations:
        labels = dict(DEFAULT_LABELS if label_map is None else label_map)
        annotations = []
        for index, (name, group, kind, coords) in enumerate(raw):
            where = f"{source}: annotation {name!r} (#{index}, group {group!r})"
            if kind.lower() in POINT_TYPES:
                warnings.warn(
                    f"{where}: type {kind!r} has no area; ignored", AnnotationWarning, stacklevel=2
                )
                continue
            if kind and kind.lower() not in POLYGON_TYPES:
                raise AnnotationError(
                    f"{where}: unsupported type {kind!r}; allowed: Polygon, Spline, Rectangle, Dot"
                )
            if group not in labels:
                known = ", ".join(sorted(labels))
                raise AnnotationError(
                    f"{where}: unknown group {group!r}; known groups: {known} "
                    "(pass label_map to name others)"
                )
            label = labels[group]
            if label is None:
                continue
            if len(coords.order) < 3:
                raise AnnotationError(
                    f"{where}: polygon has {len(coords.order)} point(s), needs >= 3"
                )
            annotations.append(Annotation(name, group, int(label), coords.vertices()))
        return cls(annotations, source)

    # --- queries -------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.annotations)

    def __bool__(self) -> bool:
        return True  # an empty set is still a valid (tumour-free) annotation set

    @property
    def has_tumor(self) -> bool:
        return any(a.label != EXCLUDE for a in self.annotations)

    def groups(self) -> dict[str, list[np.ndarray]]:
        """Group name -> polygons, in file order (for writing back to XML)."""
        out: dict[str, list[np.ndarray]] = {}
        for a in self.annotations:
            out.setdefault(a.group, []).append(a.vertices)
        return out

    def check_bounds(self, dimensions: tuple[int, int], tolerance_px: float = 1.0) -> None:
        """Check the polygons against a slide's level-0 size.

        Warns (AnnotationWarning) for a polygon partly outside the slide; raises
        AnnotationError for one wholly outside it (the XML belongs to another slide).
        """
        width, height = dimensions
        for a in self.annotations:
            x0, y0, x1, y1 = a.bbox_level0
            where = f"{self.source}: annotation {a.name!r} (group {a.group!r})"
            if (
                x1 < -tolerance_px
                or y1 < -tolerance_px
                or x0 > width + tolerance_px
                or y0 > height + tolerance_px
            ):
                raise AnnotationError(
                    f"{where}: lies wholly outside the {width}x{height} px slide "
                    f"(bbox {x0:.0f},{y0:.0f}-{x1:.0f},{y1:.0f}); wrong XML for this slide?"
                )
            if (
                x0 < -tolerance_px
                or y0 < -tolerance_px
                or x1 > width + tolerance_px
                or y1 > height + tolerance_px
            ):
                warnings.warn(
                    f"{where}: extends outside the {width}x{height} px slide",
                    AnnotationWarning,
                    stacklevel=2,
                )

    def rasterize(
        self,
        region_level0_xywh: Sequence[float],
        downsample: float = 1.0,
        *,
        size_px: tuple[int, int] | None = None,
        level: int | None = None,
        level_downsamples: Sequence[float] | None = None,
    ) -> np.ndarray:
        """The label mask of a region: 0 background, 1 tumour; exclusions painted last.

        Args:
            region_level0_xywh: (x, y, width, height) in level-0 pixels.
            downsample: level-0 pixels per mask pixel (ignored when ``level`` is given).
            size_px: (width, height) of the mask; default region size / downsample.
            level: a pyramid level; needs ``level_downsamples`` (``slide.level_downsamples``).
            level_downsamples: the slide's downsample per level.

        Returns:
            uint8 array (height, width). Pixel (i, j) is labelled by whether its centre
            lies inside a polygon, so masks line up with the pixels read at that level.
        """
        if level is not None:
            if level_downsamples is None or not 0 <= level < len(level_downsamples):
                raise AnnotationError(
                    f"rasterize(level={level}) needs level_downsamples covering that level"
                )
            downsample = float(level_downsamples[level])
        if not (downsample > 0 and math.isfinite(downsample)):
            raise AnnotationError(f"downsample must be a positive number, got {downsample}")
        x, y, w, h = (float(v) for v in region_level0_xywh)
        if size_px is None:
            size_px = (math.ceil(w / downsample - 1e-9), math.ceil(h / downsample - 1e-9))
        mask = np.zeros((size_px[1], size_px[0]), dtype=np.uint8)
        hits = self._hits((x, y, w, h))
        # Positive labels first (ascending), exclusions last so they win.
        for label in sorted({a.label for a in hits}, key=lambda v: (v == EXCLUDE, v)):
            polygons = [a.vertices for a in hits if a.label == label]
            mask[fill_polygons(polygons, (x, y, w, h), downsample, size_px)] = label
        return mask

    def _hits(self, region: tuple[float, float, float, float]) -> list[Annotation]:
        if not self.annotations:
            return []
        x, y, w, h = region
        b = self._boxes
        keep = (b[:, 2] >= x) & (b[:, 3] >= y) & (b[:, 0] <= x + w) & (b[:, 1] <= y + h)
        return [a for a, k in zip(self.annotations, keep, strict=True) if k]

    def __repr__(self) -> str:
        return f"Annotations({self.source!r}, {len(self.annotations)} polygons)"


# --- parsing ---------------------------------------------------------------------------
@dataclass
class _Coordinates:
    """One annotation's vertices as read: ``Order`` and (x, y), 24 bytes per vertex."""

    order: array = field(default_factory=lambda: array("q"))
    xy: array = field(default_factory=lambda: array("d"))

    def vertices(self) -> np.ndarray:
        """(N, 2) float64 in ``Order`` (stable for ties, as listed in the file)."""
        xy = np.frombuffer(self.xy, dtype=np.float64).reshape(-1, 2)
        order = np.frombuffer(self.order, dtype=np.int64)
        return xy[np.argsort(order, kind="stable")]


_RawAnnotation = tuple[str, str, str, _Coordinates]


def _parse_asap(data: bytes | BinaryIO, source: str) -> list[_RawAnnotation]:
    """(name, group, type, coordinates) per Annotation element, with expat made safe.

    ``data`` is the XML or a binary file streamed through expat in blocks.
    """
    parser = xml.parsers.expat.ParserCreate()
    annotations: list[_RawAnnotation] = []
    state = {"depth": 0, "current": None, "root": None, "vertices": 0}

    def refuse(*_args: object) -> None:
        raise AnnotationError(f"{source}: DTDs and entities are not allowed in annotation XML")

    def start(tag: str, attrs: dict[str, str]) -> None:
        state["depth"] += 1
        if state["depth"] > MAX_DEPTH:
            raise AnnotationError(f"{source}: XML nested deeper than {MAX_DEPTH} levels")
        if state["root"] is None:
            state["root"] = tag
            if tag != "ASAP_Annotations":
                raise AnnotationError(
                    f"{source}: root element is <{tag[:40]}>, expected <ASAP_Annotations>"
                )
        if tag == "Annotation":
            if len(annotations) >= MAX_POLYGONS:
                raise AnnotationError(
                    f"{source}: more than {MAX_POLYGONS} annotations (the limit per file)"
                )
            name = attrs.get("Name", f"#{len(annotations)}")
            group = attrs.get("PartOfGroup", "None")
            current = (name, group, attrs.get("Type", "Polygon"), _Coordinates())
            annotations.append(current)
            state["current"] = current
        elif tag == "Coordinate":
            _add_coordinate(state, attrs, source)

    def end(tag: str) -> None:
        state["depth"] -= 1
        if tag == "Annotation":
            state["current"] = None

    parser.StartDoctypeDeclHandler = refuse
    parser.EntityDeclHandler = refuse
    parser.UnparsedEntityDeclHandler = refuse
    parser.ExternalEntityRefHandler = refuse
    parser.NotationDeclHandler = refuse
    parser.SetParamEntityParsing(xml.parsers.expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartElementHandler = start
    parser.EndElementHandler = end
    try:
        if isinstance(data, bytes):
            parser.Parse(data, True)
        else:
            parser.ParseFile(data)
    except xml.parsers.expat.ExpatError as exc:
        raise AnnotationError(f"{source}: malformed XML ({exc})") from None
    except RecursionError:
        raise AnnotationError(f"{source}: XML nested too deeply") from None
    if state["root"] is None:
        raise AnnotationError(f"{source}: no XML element found")
    return annotations


def _add_coordinate(state: dict, attrs: dict[str, str], source: str) -> None:
    current = state["current"]
    if current is None:
        raise AnnotationError(f"{source}: <Coordinate> outside an <Annotation>")
    where = f"{source}: annotation {current[0]!r} (group {current[1]!r})"
    coords = current[3]
    try:
        order = int(attrs.get("Order", len(coords.order)))
        x = float(attrs["X"].replace(",", "."))
        y = float(attrs["Y"].replace(",", "."))
    except KeyError as exc:
        raise AnnotationError(f"{where}: <Coordinate> without {exc.args[0]}") from None
    except ValueError:
        raise AnnotationError(
            f"{where}: coordinate is not a number: {dict(list(attrs.items())[:3])!r}"[:300]
        ) from None
    if not (math.isfinite(x) and math.isfinite(y)):
        raise AnnotationError(f"{where}: non-finite coordinate ({x}, {y})")
    if abs(x) > MAX_COORDINATE_PX or abs(y) > MAX_COORDINATE_PX:
        raise AnnotationError(
            f"{where}: coordinate ({x:.4g}, {y:.4g}) is beyond {MAX_COORDINATE_PX:.0e} px"
        )
    if not -(2**63) <= order < 2**63:
        raise AnnotationError(f"{where}: Order {order:.4g} is out of range")
    if len(coords.order) >= MAX_VERTICES_PER_POLYGON:
        raise AnnotationError(
            f"{where}: more than {MAX_VERTICES_PER_POLYGON} vertices (the limit per polygon)"
        )
    state["vertices"] += 1
    if state["vertices"] > MAX_VERTICES:
        raise AnnotationError(f"{source}: more than {MAX_VERTICES} vertices (the limit per file)")
    coords.order.append(order)
    coords.xy.extend((x, y))


# --- writing ---------------------------------------------------------------------------
GROUP_COLOURS = {"_0": "#FF0000", "_1": "#FF0000", "_2": "#00FF00", "Tumor": "#FF0000"}


def write_asap_xml(path: str | Path, groups: Mapping[str, Iterable[np.ndarray]]) -> Path:
    """Write polygons as ASAP XML: ``groups`` maps a group name to its polygons.

    Coordinates are written exactly (shortest round-trip decimal, no exponent), so a round
    trip through :meth:`Annotations.from_xml` gives back the same polygons and masks.
    """
    path = Path(path)
    lines = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "\t<Annotations>"]
    index = 0
    for group, polygons in groups.items():
        colour = GROUP_COLOURS.get(group, "#F4FA58")
        for polygon in polygons:
            lines.append(
                f'\t\t<Annotation Name={quoteattr(f"Annotation {index}")} Type="Polygon" '
                f'PartOfGroup={quoteattr(group)} Color="{colour}">'
            )
            lines.append("\t\t\t<Coordinates>")
            for order, (x, y) in enumerate(np.asarray(polygon, dtype=np.float64)):
                lines.append(
                    f'\t\t\t\t<Coordinate Order="{order}" X="{_number(x)}" Y="{_number(y)}" />'
                )
            lines.append("\t\t\t</Coordinates>")
            lines.append("\t\t</Annotation>")
            index += 1
    lines.append("\t</Annotations>")
    lines.append("\t<AnnotationGroups>")
    for group in groups:
        colour = GROUP_COLOURS.get(group, "#F4FA58")
        lines.append(
            f'\t\t<Group Name={quoteattr(group)} PartOfGroup="None" Color="{colour}">'
            "<Attributes /></Group>"
        )
    lines.append("\t</AnnotationGroups>")
    lines.append("</ASAP_Annotations>")
    with atomic_output(path) as tmp:
        tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def _number(value: float) -> str:
    return np.format_float_positional(float(value), trim="-")
