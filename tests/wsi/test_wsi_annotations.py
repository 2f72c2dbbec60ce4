"""ASAP XML: round trip, rasterisation, label maps, and hostile input (hypothesis)."""

from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from matplotlib.path import Path as MplPath

from histoseg.errors import AnnotationError
from histoseg.wsi import Annotations, AnnotationWarning, write_asap_xml
from histoseg.wsi.raster import fill_polygons

FAST = settings(
    max_examples=60, deadline=5000, suppress_health_check=[HealthCheck.function_scoped_fixture]
)


def _xml(body: str, groups: str = "") -> bytes:
    return (
        '<?xml version="1.0"?><ASAP_Annotations><Annotations>'
        f"{body}</Annotations><AnnotationGroups>{groups}</AnnotationGroups></ASAP_Annotations>"
    ).encode()


def _annotation(group: str, points, name: str = "A", kind: str = "Polygon") -> str:
    coords = "".join(
        f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(points)
    )
    return (
        f'<Annotation Name="{name}" Type="{kind}" PartOfGroup="{group}">'
        f"<Coordinates>{coords}</Coordinates></Annotation>"
    )


SQUARE = [(10, 10), (50, 10), (50, 50), (10, 50)]

polygons = st.lists(
    st.tuples(st.floats(-20, 220, allow_nan=False), st.floats(-20, 170, allow_nan=False)),
    min_size=3,
    max_size=12,
).map(lambda pts: np.array(pts, dtype=np.float64))


@FAST
@given(
    groups=st.dictionaries(
        st.sampled_from(["_0", "_1", "_2", "Tumor"]), st.lists(polygons, min_size=1, max_size=3)
    ),
    downsample=st.sampled_from([1.0, 2.0, 4.0, 1.5]),
)
def test_round_trip_mask_equals_direct_rasterisation(tmp_path_factory, groups, downsample):
    path = tmp_path_factory.mktemp("xml") / "a.xml"
    write_asap_xml(path, groups)
    parsed = Annotations.from_xml(path)
    region = (-10.0, -5.0, 230.0, 170.0)
    mask = parsed.rasterize(region, downsample)
    size = (math.ceil(region[2] / downsample), math.ceil(region[3] / downsample))
    positives = [p for g, ps in groups.items() if g != "_2" for p in ps]
    expected = fill_polygons(positives, region, downsample, size)
    if "_2" in groups:
        expected &= ~fill_polygons(groups["_2"], region, downsample, size)
    assert mask.shape == (size[1], size[0]) and mask.dtype == np.uint8
    np.testing.assert_array_equal(mask, expected.astype(np.uint8))
    assert [a.group for a in parsed.annotations] == [g for g, ps in groups.items() for _ in ps]
    originals = [p for ps in groups.values() for p in ps]
    for a, original in zip(parsed.annotations, originals, strict=True):
        np.testing.assert_array_equal(a.vertices, original)  # coordinates survive exactly


@FAST
@given(polygon=polygons, downsample=st.sampled_from([1.0, 2.0, 3.0, 0.5]))
def test_fill_matches_point_in_polygon_at_pixel_centres(polygon, downsample):
    region = (-20.0, -20.0, 240.0, 190.0)
    mask = fill_polygons([polygon], region, downsample)
    h, w = mask.shape
    jj, ii = np.meshgrid(np.arange(w), np.arange(h))
    centres = np.stack(
        [region[0] + (jj.ravel() + 0.5) * downsample, region[1] + (ii.ravel() + 0.5) * downsample],
        axis=1,
    )
    expected = MplPath(polygon).contains_points(centres).reshape(h, w)
    # Pixel centres exactly on an edge may go either way; allow a hair of disagreement.
    assert (mask != expected).mean() < 0.01


def test_exclusion_painted_last_and_camelyon17_names():
    data = _xml(
        _annotation("metastases", [(0, 0), (100, 0), (100, 100), (0, 100)])
        + _annotation("normal", SQUARE, name="hole")
    )
    mask = Annotations.from_bytes(data).rasterize((0, 0, 100, 100))
    assert mask[30, 30] == 0 and mask[5, 5] == 1 and mask[80, 80] == 1
    assert mask.sum() == 100 * 100 - 40 * 40


def test_levels_give_the_same_mask_at_lower_resolution():
    ann = Annotations.from_bytes(_xml(_annotation("_0", SQUARE)))
    full = ann.rasterize((0, 0, 64, 64))
    half = ann.rasterize((0, 0, 64, 64), level=1, level_downsamples=(1.0, 2.0))
    assert half.shape == (32, 32)
    np.testing.assert_array_equal(half, full[1::2, 1::2])


def test_missing_xml_means_no_tumour(tmp_path):
    ann = Annotations.from_xml(tmp_path / "normal_001.xml")
    assert len(ann) == 0 and not ann.has_tumor
    assert ann.rasterize((0, 0, 32, 16)).sum() == 0
    assert Annotations.from_xml(None).rasterize((0, 0, 8, 8)).shape == (8, 8)


def test_label_map_is_configurable():
    data = _xml(_annotation("carcinoma", SQUARE))
    with pytest.raises(AnnotationError, match=r"unknown group 'carcinoma'.*known groups"):
        Annotations.from_bytes(data, source="x.xml")
    ann = Annotations.from_bytes(data, label_map={"carcinoma": 1})
    assert ann.rasterize((0, 0, 60, 60)).sum() == 40 * 40
    assert len(Annotations.from_bytes(data, label_map={"carcinoma": None})) == 0


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (_annotation("_0", [(0, 0), (5, 5)], name="tiny"), r"'tiny'.*2 point"),
        (_annotation("_0", [(0, 0), (5, "nan"), (9, 9)]), "non-finite"),
        (_annotation("_0", [(0, 0), (5, "1e400"), (9, 9)]), "non-finite"),
        (_annotation("_0", [(0, 0), (5, 3e9), (9, 9)]), "beyond"),
        (_annotation("_0", [(0, 0), (5, "five"), (9, 9)]), "not a number"),
        (_annotation("_0", SQUARE, kind="Ellipse"), "unsupported type"),
        ('<Coordinate X="1" Y="2" />', "outside an <Annotation>"),
        ('<Annotation Name="A" PartOfGroup="_0"><Coordinates><Coordinate X="1" />', "without Y"),
        (_annotation("_0", SQUARE) + "<Annotation", "malformed"),
    ],
)
def test_bad_annotations_name_file_and_annotation(body, message):
    with pytest.raises(AnnotationError, match=message) as info:
        Annotations.from_bytes(_xml(body), source="slide_7.xml")
    assert "slide_7.xml" in str(info.value)


HOSTILE = [
    b"",
    b"<",
    b"not xml at all",
    b"<Annotations/>",
    b'<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;">]>'
    b"<ASAP_Annotations>&lol2;</ASAP_Annotations>",
    b'<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><ASAP_Annotations>&e;</ASAP_Annotations>',
    b"<ASAP_Annotations>&undefined;</ASAP_Annotations>",
    b"<ASAP_Annotations>" + b"<a>" * 10000 + b"</a>" * 10000 + b"</ASAP_Annotations>",
    _xml(_annotation("_0", SQUARE))[:-30],
    b"\xff\xfe<\x00A\x00",
]


@pytest.mark.parametrize("data", HOSTILE, ids=range(len(HOSTILE)))
def test_hostile_xml_gives_annotation_error(data):
    with pytest.raises(AnnotationError):
        Annotations.from_bytes(data, source="evil.xml")


_tag = st.sampled_from(
    ["ASAP_Annotations", "Annotations", "Annotation", "Coordinates", "Coordinate", "Group", "x"]
)
_attr_value = st.one_of(
    st.sampled_from(["_0", "_2", "nan", "inf", "-inf", "1e999", "-1e308", "", "Polygon", "Dot"]),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**30), 10**30).map(str),
    st.text(max_size=8),
)


@st.composite
def xml_documents(draw):
    """Random trees of ASAP-like tags with random attributes, sometimes cut short."""
    depth = draw(st.integers(1, 40))
    parts, closing = [], []
    for _ in range(depth):
        tag = draw(_tag)
        attrs = draw(
            st.dictionaries(
                st.sampled_from(["Name", "PartOfGroup", "Type", "X", "Y", "Order"]),
                _attr_value,
                max_size=4,
            )
        )
        rendered = " ".join(
            f'{k}="{v.replace("&", "&amp;").replace("<", "&lt;").replace(chr(34), "")}"'
            for k, v in attrs.items()
        )
        parts.append(f"<{tag} {rendered}>")
        closing.append(f"</{tag}>")
    text = "".join(parts) + "".join(reversed(closing))
    if draw(st.booleans()):
        text = text[: draw(st.integers(0, len(text)))]
    return text.encode("utf-8", "surrogatepass")


@settings(max_examples=80, deadline=5000)
@given(data=xml_documents())
def test_random_documents_parse_or_raise_annotation_error(data):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AnnotationWarning)
        try:
            ann = Annotations.from_bytes(data, source="fuzz.xml")
        except AnnotationError:
            return
    for a in ann.annotations:  # whatever parses is usable
        assert np.isfinite(a.vertices).all() and len(a.vertices) >= 3
        ann.rasterize((0, 0, 16, 16))


@settings(max_examples=100, deadline=5000)
@given(data=st.binary(max_size=300))
def test_random_bytes_never_crash(data):
    with contextlib.suppress(AnnotationError):
        Annotations.from_bytes(data, source="bytes.xml")


def test_check_bounds_warns_and_errors():
    ann = Annotations.from_bytes(
        _xml(_annotation("_0", [(90, 90), (130, 90), (130, 130)], name="edge")), source="b.xml"
    )
    with pytest.warns(AnnotationWarning, match="'edge'.*outside"):
        ann.check_bounds((100, 100))
    far = Annotations.from_bytes(
        _xml(_annotation("_0", [(5000, 5000), (5100, 5000), (5100, 5100)]))
    )
    with pytest.raises(AnnotationError, match="wholly outside"):
        far.check_bounds((100, 100))


def test_dot_annotations_are_ignored_with_a_warning():
    data = _xml(_annotation("_0", [(1, 1)], kind="Dot") + _annotation("_0", SQUARE))
    with pytest.warns(AnnotationWarning, match="no area"):
        ann = Annotations.from_bytes(data)
    assert len(ann) == 1


def test_vertices_follow_order_attribute_with_ties_in_file_order():
    coords = "".join(
        f'<Coordinate Order="{o}" X="{x}" Y="{y}" />'
        for o, x, y in [(2, 50, 50), (0, 10, 10), (1, 50, 10), (2, 10, 50)]
    )
    body = f'<Annotation Name="A" PartOfGroup="_0"><Coordinates>{coords}</Coordinates></Annotation>'
    (ann,) = Annotations.from_bytes(_xml(body)).annotations
    np.testing.assert_array_equal(ann.vertices, [(10, 10), (50, 10), (50, 50), (10, 50)])


@pytest.mark.parametrize(
    ("limit", "value", "body", "message"),
    [
        (
            "MAX_VERTICES_PER_POLYGON",
            5,
            _annotation("_0", SQUARE * 2),
            "more than 5 vertices.*per polygon",
        ),
        ("MAX_POLYGONS", 2, _annotation("_0", SQUARE) * 3, "more than 2 annotations.*per file"),
        ("MAX_VERTICES", 6, _annotation("_0", SQUARE) * 2, "more than 6 vertices.*per file"),
        ("MAX_FILE_BYTES", 100, _annotation("_0", SQUARE), r"\d+ bytes is larger than the 100"),
        ("MAX_COORDINATE_PX", 1e8, _annotation("_0", [(0, 0), (1, 1), (2, "1e30")]), "beyond"),
    ],
)
def test_input_limits_are_refused_in_one_line(tmp_path, monkeypatch, limit, value, body, message):
    import histoseg.wsi.annotations as module

    monkeypatch.setattr(module, limit, value)
    path = tmp_path / "big.xml"
    path.write_bytes(_xml(body))
    for parse in (
        lambda: Annotations.from_xml(path),
        lambda: Annotations.from_bytes(path.read_bytes(), source=str(path)),
    ):
        with pytest.raises(AnnotationError, match=message) as info:
            parse()
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_the_documented_limits_are_those_enforced():
    import histoseg.wsi.annotations as module

    doc = module.__doc__
    for name in ("MAX_FILE_BYTES", "MAX_POLYGONS", "MAX_VERTICES_PER_POLYGON", "MAX_VERTICES"):
        value = getattr(module, name)
        shown = f"{value // 2**20} MiB" if name == "MAX_FILE_BYTES" else f"{value:,}"
        assert f":data:`{name}` ({shown})" in doc, name


def _zigzag(n: int, height: float) -> np.ndarray:
    xs = np.linspace(0.0, 200.0, n)
    ys = np.where(np.arange(n) % 2 == 0, 0.0, height)
    return np.stack([xs, ys], axis=1)


@pytest.mark.parametrize("downsample", [1.0, 2.5])
def test_chunked_crossings_give_the_same_mask(monkeypatch, downsample):
    import histoseg.wsi.raster as raster

    rng = np.random.default_rng(7)
    polygons = [rng.uniform(-20, 220, size=(int(rng.integers(3, 40)), 2)) for _ in range(20)]
    polygons.append(_zigzag(301, 180.0))
    region = (-10.0, -10.0, 230.0, 200.0)
    whole = [fill_polygons([p], region, downsample) for p in polygons]
    monkeypatch.setattr(raster, "CROSSINGS_PER_CHUNK", 7)
    monkeypatch.setattr(raster, "ROWS_PER_BAND", 3)
    for polygon, expected in zip(polygons, whole, strict=True):
        np.testing.assert_array_equal(fill_polygons([polygon], region, downsample), expected)
    assert any(m.any() for m in whole) and not all(m.all() for m in whole)


def test_a_zigzag_of_many_tall_edges_fills_in_memory_bounded_by_the_output():
    import tracemalloc

    polygon = _zigzag(20_001, 400.0)  # 20,000 edges x 400 rows = 8e6 crossings
    tracemalloc.start()
    try:
        mask = fill_polygons([polygon], (0.0, 0.0, 200.0, 400.0))
        _, peak_bytes = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # A crossing costs ~60 bytes of scratch; all 8e6 at once would be ~500 MB.
    assert peak_bytes < 64 * 2**20, peak_bytes
    rows, cols = np.random.default_rng(3).integers(0, (400, 200), size=(300, 2)).T
    expected = MplPath(polygon).contains_points(np.stack([cols + 0.5, rows + 0.5], axis=1))
    assert (mask[rows, cols] != expected).mean() < 0.02


def test_write_asap_xml_leaves_nothing_behind_on_a_full_disk(tmp_path, monkeypatch):
    import errno
    from pathlib import Path

    path = write_asap_xml(tmp_path / "a.xml", {"_0": [np.array(SQUARE, dtype=float)]})
    before = path.read_bytes()

    def full(self, text, *args, **kwargs):
        Path.write_bytes(self, text[:10].encode())
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(OSError, match="No space"):
        write_asap_xml(path, {"_0": [np.array(SQUARE, dtype=float) * 2]})
    monkeypatch.undo()
    assert path.read_bytes() == before and [p.name for p in tmp_path.iterdir()] == ["a.xml"]
