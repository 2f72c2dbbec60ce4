"""Catalogue of hostile and careless input: one stderr line, a non-zero exit, nothing touched.

Every case runs a command-line ``main`` through ``run_main`` (as ``python -m`` does) and
checks the exit code, that stderr is exactly one ``error:`` line naming the culprit, that
no traceback was printed, and that no file in the slide folder or the output folder was
created, changed or removed. Slides are tiny synthetic TIFFs, so the module takes seconds.
Results-file faults (full disk, foreign files, umask) are in tests/test_results.py.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from histoseg.cli import run_main
from histoseg.wsi import patches
from histoseg.wsi.synth import write_synthetic_slide

SLIDE_PX = (768, 512)

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    '<!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">]>'
    "<ASAP_Annotations>&lol2;</ASAP_Annotations>"
)
EXTERNAL_ENTITY = (
    '<!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><ASAP_Annotations>&e;</ASAP_Annotations>'
)


def _asap(*polygons: list[tuple[object, object]], group: str = "_0") -> str:
    body = ""
    for n, points in enumerate(polygons):
        coords = "".join(
            f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(points)
        )
        body += (
            f'<Annotation Name="p{n}" Type="Polygon" PartOfGroup="{group}">'
            f"<Coordinates>{coords}</Coordinates></Annotation>"
        )
    return f"<ASAP_Annotations><Annotations>{body}</Annotations></ASAP_Annotations>"


def _zigzag(n: int) -> list[tuple[float, float]]:
    return [(10 + 700 * i / n, 10 if i % 2 == 0 else 500) for i in range(n)]


SQUARE = [(100, 100), (300, 100), (300, 300), (100, 300)]


@dataclass(frozen=True)
class Slides:
    folder: Path
    tif: Path
    xml: Path


@pytest.fixture(scope="module")
def slides(tmp_path_factory) -> Slides:
    folder = tmp_path_factory.mktemp("hostile_slides")
    tif, xml = write_synthetic_slide(
        folder / "slide.tif", SLIDE_PX, seed=11, tile_px=256, progress=False
    )
    return Slides(folder, tif, xml)


def _snapshot(*folders: Path) -> dict[str, tuple[str, int]]:
    """Every file under the folders: content hash and mode (what 'nothing touched' means)."""
    out = {}
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and not path.is_symlink():
                digest = hashlib.sha256(path.read_bytes()).hexdigest()
                out[os.fsdecode(path)] = (digest, path.stat().st_mode)
            else:
                out[os.fsdecode(path)] = ("link" if path.is_symlink() else "dir", 0)
    return out


def _refused(main, argv, capsys, folders, *, expect: str, code: int = 2) -> str:
    before = _snapshot(*folders)
    rc = run_main(main, [os.fspath(a) if isinstance(a, Path) else str(a) for a in argv])
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert rc == code, err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    assert expect in lines[0], lines[0]
    assert _snapshot(*folders) == before, "a file was created, changed or removed"
    return lines[0]


# --- patches: annotations --------------------------------------------------------------
XML_CASES = {
    "zigzag over the per-polygon vertex limit": (
        {"MAX_VERTICES_PER_POLYGON": 100},
        _asap(_zigzag(101)),
        "more than 100 vertices (the limit per polygon)",
    ),
    "more polygons than allowed": (
        {"MAX_POLYGONS": 3},
        _asap(SQUARE, SQUARE, SQUARE, SQUARE),
        "more than 3 annotations (the limit per file)",
    ),
    "more vertices than allowed per file": (
        {"MAX_VERTICES": 10},
        _asap(SQUARE, SQUARE, SQUARE),
        "more than 10 vertices (the limit per file)",
    ),
    "file larger than allowed": ({"MAX_FILE_BYTES": 64}, _asap(SQUARE), "bytes allowed"),
    "billion laughs": ({}, BILLION_LAUGHS, "DTDs and entities are not allowed"),
    "external entity": ({}, EXTERNAL_ENTITY, "DTDs and entities are not allowed"),
    "NaN coordinate": ({}, _asap([(1, 1), ("nan", 5), (9, 9)]), "non-finite coordinate"),
    "infinite coordinate": ({}, _asap([(1, 1), ("1e999", 5), (9, 9)]), "non-finite"),
    "absurd coordinate": ({}, _asap([(1, 1), (3e9, 5), (9, 9)]), "beyond"),
    "Order out of range": (
        {},
        _asap(SQUARE).replace('Order="0"', 'Order="99999999999999999999"'),
        "out of range",
    ),
    "XML of another slide": ({}, _asap([(9e6, 9e6), (9.1e6, 9e6), (9e6, 9.1e6)]), "wholly"),
    "unknown group": ({}, _asap(SQUARE, group="weird"), "unknown group 'weird'"),
    "two-point polygon": ({}, _asap([(1, 1), (5, 5)]), "needs >= 3"),
    "truncated XML": ({}, _asap(SQUARE)[:-40], "malformed XML"),
    "not XML": ({}, "just some notes\n", "malformed XML"),
    "wrong root element": ({}, "<html><body/></html>", "expected <ASAP_Annotations>"),
    "deep nesting": ({}, "<ASAP_Annotations>" + "<a>" * 100 + "</a>" * 100, "deeper than"),
    "empty file": ({}, "", "malformed XML"),
}


@pytest.mark.parametrize("case", list(XML_CASES))
def test_patches_refuses_hostile_annotations(case, slides, tmp_path, capsys, monkeypatch):
    import histoseg.wsi.annotations as annotations

    limits, text, expect = XML_CASES[case]
    for name, value in limits.items():
        monkeypatch.setattr(annotations, name, value)
    xml = tmp_path / "in" / "evil.xml"
    xml.parent.mkdir()
    xml.write_text(text)
    out = tmp_path / "out" / "p.csv"
    out.parent.mkdir()
    argv = ["--slide", slides.tif, "--annotations", xml, "--patch-size", 256, "--out", out]
    line = _refused(patches.main, argv, capsys, [slides.folder, tmp_path], expect=expect)
    assert "evil.xml" in line


# --- patches: slides, options and outputs ------------------------------------------------
def _cases(slides: Slides, tmp: Path) -> dict[str, tuple[list, str]]:
    tmp.mkdir(exist_ok=True)
    notes = tmp / "notes.tif"
    notes.write_text("hello\n")
    truncated = tmp / "truncated.tif"
    truncated.write_bytes(slides.tif.read_bytes()[:3000])
    existing = tmp / "mine.csv"
    existing.write_text("my own notes\n")
    folder = tmp / "a_folder"
    folder.mkdir()
    a_file = tmp / "a_file"
    a_file.write_text("x\n")
    link = tmp / "link.tif"
    link.symlink_to(slides.tif)
    out = tmp / "o.csv"
    base = ["--slide", slides.tif, "--patch-size", 256]
    weird = os.fsdecode(os.fsencode(tmp) + b"/slide_\xff.tif")
    return {
        "missing slide": (["--slide", tmp / "nope.tif", *base[2:], "--out", out], "not found"),
        "text file as slide": (["--slide", notes, *base[2:], "--out", out], "notes.tif"),
        "truncated slide": (["--slide", truncated, *base[2:], "--out", out], "truncated.tif"),
        "non-UTF-8 missing slide": (["--slide", weird, *base[2:], "--out", out], "slide_\\xff"),
        "patch size 1": ([*base[:2], "--patch-size", 1, "--out", out], ">= 32, got '1'"),
        "patch size 0": ([*base[:2], "--patch-size", 0, "--out", out], ">= 32, got '0'"),
        "patch size nan": ([*base[:2], "--patch-size", "nan", "--out", out], "whole number"),
        "patch size 1e3": ([*base[:2], "--patch-size", "1e3", "--out", out], "whole number"),
        "patch larger than slide": (
            [*base[:2], "--patch-size", 4096, "--out", out],
            "larger than the slide",
        ),
        "min tissue nan": ([*base, "--min-tissue", "nan", "--out", out], "--min-tissue"),
        "min tissue inf": ([*base, "--min-tissue", "inf", "--out", out], "--min-tissue"),
        "min tissue 2": ([*base, "--min-tissue", 2, "--out", out], "in [0, 1], got '2'"),
        "level -1": ([*base, "--level", -1, "--out", out], "--level"),
        "level past the pyramid": ([*base, "--level", 9, "--out", out], "level 9 out of range"),
        "stride 0": ([*base, "--stride", 0, "--out", out], "--stride"),
        "bad label map": ([*base, "--label-map", "x=2", "--out", out], "GROUP=1"),
        "out is the slide, with --force": (
            [*base, "--out", slides.tif, "--force"],
            "is the --slide file",
        ),
        "out is the slide through a link": (
            [*base, "--out", link, "--force"],
            "is the --slide file",
        ),
        "out is the annotations, with --force": (
            [*base, "--annotations", slides.xml, "--out", slides.xml, "--force"],
            "is the --annotations file",
        ),
        "preview is the out": (
            [*base, "--out", out, "--preview", out, "--force"],
            "is the --out file",
        ),
        "existing file without --force": ([*base, "--out", existing], "pass --force"),
        "out is a folder": ([*base, "--out", folder, "--force"], "is a directory"),
        "out under a file": ([*base, "--out", a_file / "o.csv"], "is not a folder"),
        "preview extension": ([*base, "--out", out, "--preview", tmp / "p.xyz"], "extension"),
        "unknown option": ([*base, "--out", out, "--bogus"], "unrecognized arguments"),
    }


def _case_names() -> list[str]:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        fake = Slides(Path(tmp), Path(tmp) / "s.tif", Path(tmp) / "s.xml")
        fake.tif.write_bytes(b"")
        return list(_cases(fake, Path(tmp) / "cases"))


@pytest.mark.parametrize("case", _case_names())
def test_patches_refuses_bad_slides_options_and_outputs(case, slides, tmp_path, capsys):
    argv, expect = _cases(slides, tmp_path)[case]
    _refused(patches.main, argv, capsys, [slides.folder, tmp_path], expect=expect)


def test_patches_refuses_an_unwritable_folder_before_any_work(
    slides, tmp_path, capsys, monkeypatch
):
    import tempfile

    folder = tmp_path / "locked"
    folder.mkdir()

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    monkeypatch.setattr(patches, "detect_tissue", lambda *a, **k: pytest.fail("work began"))
    argv = ["--slide", slides.tif, "--patch-size", 256, "--out", folder / "sub" / "o.csv"]
    line = _refused(patches.main, argv, capsys, [slides.folder, tmp_path], expect="cannot write")
    assert str(folder) in line and "Read-only file system" in line


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into a mode 0500 folder")
def test_patches_refuses_a_mode_0500_folder(slides, tmp_path, capsys):
    folder = tmp_path / "locked"
    folder.mkdir(mode=0o500)
    try:
        argv = ["--slide", slides.tif, "--patch-size", 256, "--out", folder / "o.csv"]
        _refused(patches.main, argv, capsys, [slides.folder], expect="Permission denied")
    finally:
        folder.chmod(0o700)


@pytest.mark.parametrize(
    ("constant", "value", "expect"),
    [("MAX_UNFORCED_S", 0.0, "more than 0 s"), ("BASE_BYTES", 10**18, "free memory")],
)
def test_patches_gates_long_or_large_grids_behind_force(
    slides, tmp_path, capsys, monkeypatch, constant, value, expect
):
    from histoseg.wsi import grid_work

    monkeypatch.setattr(grid_work, constant, value)
    argv = ["--slide", slides.tif, "--patch-size", 64, "--out", tmp_path / "o.csv"]
    line = _refused(patches.main, argv, capsys, [slides.folder, tmp_path], expect=expect)
    assert "grid positions" in line and "--force" in line and "slide.tif" in line
    assert run_main(patches.main, [str(a) for a in [*argv, "--force"]]) == 0
    assert (tmp_path / "o.csv").is_file()


# --- model and step-time options ---------------------------------------------------------
MODEL_CASES = [
    (["--alpha", "nan"], "--alpha: must be a finite number in (0, 4], got 'nan'"),
    (["--alpha", "inf"], "got 'inf'"),
    (["--alpha=-inf"], "got '-inf'"),
    (["--alpha", "0"], "got '0'"),
    (["--alpha", "1e400"], "got '1e400'"),
    (["--num-classes", "0"], "--num-classes"),
    (["--output-stride", "7"], "invalid choice: 7"),
    (["--backbone", "resnet9000"], "invalid choice"),
]


@pytest.mark.parametrize(("argv", "expect"), MODEL_CASES)
@pytest.mark.parametrize("module", ["histoseg.models.__main__", "histoseg.train.steptime"])
def test_model_options_are_refused_at_parse_time(module, argv, expect, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    _refused(main, argv, capsys, [tmp_path], expect=expect)


@pytest.mark.parametrize(
    ("module", "argv", "expect"),
    [
        ("histoseg.models.__main__", ["--input-size", "1"], "in [32, 65536], got '1'"),
        ("histoseg.models.__main__", ["--input-size", "nan"], "--input-size"),
        ("histoseg.train.steptime", ["--patch-size", "1"], "in [32, 16384], got '1'"),
        ("histoseg.train.steptime", ["--steps", "0"], "--steps"),
        ("histoseg.train.steptime", ["--batch-size", "-1"], "--batch-size"),
        ("histoseg.train.steptime", ["--seed", "-1"], "--seed"),
    ],
)
def test_size_and_count_options_are_refused_at_parse_time(module, argv, expect, tmp_path, capsys):
    import importlib

    main = importlib.import_module(module).main
    _refused(main, argv, capsys, [tmp_path], expect=expect)


# --- the process as a whole --------------------------------------------------------------
def test_a_closed_stdout_ends_quietly(slides, tmp_path):
    """``... | head`` closing the pipe early: no BrokenPipeError traceback."""
    argv = [sys.executable, "-m", "histoseg.wsi.patches", "--slide", str(slides.tif)]
    argv += ["--patch-size", "256", "--out", str(tmp_path / "o.csv"), "--no-progress"]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) in (0, 141), err
    assert "Traceback" not in err and err.strip() == ""
