"""Catalogue of hostile and careless input: one stderr line, a non-zero exit, nothing touched.

Every case runs a command-line ``main`` through ``run_main`` (as ``python -m`` does) and
checks the exit code, that stderr is exactly one ``error:`` line naming the culprit, that
no traceback was printed, and that no file in the slide folder or the output folder was
created, changed or removed. Slides are tiny synthetic TIFFs, so the module takes seconds;
only the two signal cases start processes (bench.memory and its worker, ~4 s each).

Issue 18's rows, and where each is checked:

- ASAP XML past the vertex, polygon, vertex-per-file and byte limits, billion laughs, XXE,
  NaN/huge coordinates, another slide's XML: ``XML_CASES`` here; the rasteriser's memory
  bounded by the output (a 20,001-vertex zigzag under tracemalloc) in
  tests/wsi/test_wsi_annotations.py.
- ``--patch-size 1``, a grid over a minute or the free memory (``--force``), output = input,
  unwritable folders, non-UTF-8 paths: the patches cases here; a non-UTF-8 slide that
  succeeds in tests/wsi/test_wsi_cli.py.
- ``synth --size 1000000x1000000``, bad ``--tile``/``--mpp``/``--seed`` (no empty folder),
  the user's ``slide_000.tif``/``.xml`` or ``synthetic.json`` in ``--out``: the synth cases.
- ``--alpha nan``/``inf`` (models, steptime): ``MODEL_CASES``.
- ``bench.plots --out`` on the user's README.md or figures: the plots cases.
- ``--engine horovod`` without horovodrun: the training case.
- Modes: every file written gets the user's umask here; results files (and a full disk, a
  foreign JSON or companion CSV such as the user's ``side.csv``) in tests/test_results.py.
- SIGTERM and SIGINT to ``bench.memory``: its worker ends with it, results unchanged.
- ``bench.accuracy --pixel-budget inf``, ``--val-fraction 2``/``nan``,
  ``--synthetic-slides 0``, the user's README.md or CSV beside ``--out``: refused before
  any work.
- ``bench.memory --timeout-s nan/inf/0/-1``, ``--output-stride 7``, an unwritable ``--out``
  or the user's ``side.csv``: refused before any work.
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
from histoseg.errors import ConfigError, ResultsError
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


# --- synthetic slides: huge sizes, bad numbers, the user's files -------------------------
def _synth(*argv):
    return ["--slides", 1, "--size", "640x480", "--tile", 256, "--no-progress", *argv]


SYNTH_CASES = {
    "size 1000000x1000000": (
        ["--slides", 1, "--size", "1000000x1000000"],
        "1,000,000x1,000,000 px; ~150 GB on disk",
    ),
    "size 64x1000000000": (["--slides", 1, "--size", "64x1000000000"], "pass --force"),
    "size past the TIFF limit": (["--size", "5000000000x64"], "the TIFF limit"),
    "size 10x10": (["--size", "10x10"], "at least 64x64"),
    "size not WxH": (["--size", "big"], "WIDTHxHEIGHT"),
    "tile 7": (_synth("--tile", 7), "--tile: must be a multiple of 32 in [32, 8192], got '7'"),
    "tile 100": (_synth("--tile", 100), "multiple of 32"),
    "tile 0": (_synth("--tile", 0), "got '0'"),
    "mpp nan": (_synth("--mpp", "nan"), "--mpp: must be a finite number in (0, 1000], got 'nan'"),
    "mpp inf": (_synth("--mpp", "inf"), "got 'inf'"),
    "mpp -1": (_synth("--mpp", -1), "got '-1'"),
    "mpp 0": (_synth("--mpp", 0), "got '0'"),
    "seed -1": (_synth("--seed", -1), "--seed: must be a whole number >= 0, got '-1'"),
    "slides 0": (["--slides", 0, "--size", "640x480"], "n_slides must be >= 1, got 0"),
}


@pytest.mark.parametrize("case", list(SYNTH_CASES))
def test_synth_refuses_before_making_any_folder(case, tmp_path, capsys):
    from histoseg.wsi import synth

    argv, expect = SYNTH_CASES[case]
    line = _refused(synth.main, ["--out", tmp_path / "s", *argv], capsys, [tmp_path], expect=expect)
    assert not (tmp_path / "s").exists(), line


def _users_dataset_folder(tmp: Path, case: str) -> Path:
    folder = tmp / "mine"
    folder.mkdir()
    if case == "slide_000.tif/.xml":
        (folder / "slide_000.tif").write_bytes(b"my own scan\n")
        (folder / "slide_000.xml").write_text("<mine/>\n")
    elif case == "synthetic.json":
        (folder / "synthetic.json").write_text("my own notes\n")
    else:  # slide_002 is a normal slide: writing it would delete the XML beside it
        (folder / "slide_002.xml").write_text("<mine/>\n")
    return folder


@pytest.mark.parametrize(
    ("case", "expect"),
    [
        ("slide_000.tif/.xml", "slide_000.tif exists and was not written by histoseg.wsi.synth"),
        ("synthetic.json", "synthetic.json exists and is not a histoseg.wsi.synth manifest"),
        ("slide_002.xml", "slide_002.xml exists and was not written"),
    ],
)
def test_synth_never_replaces_the_users_files_without_force(case, expect, tmp_path, capsys):
    from histoseg.wsi import synth

    folder = _users_dataset_folder(tmp_path, case)
    argv = ["--out", folder, *_synth("--slides", 3)]
    line = _refused(synth.main, argv, capsys, [tmp_path], expect=expect)
    assert "--force" in line
    with pytest.raises(ConfigError, match="refusing to replace"):  # nor through the library
        synth.ensure_synthetic_dataset(folder, 3, (640, 480), tile_px=256, progress=False)


def test_synth_replaces_its_own_slides_and_with_force_the_users(tmp_path, capsys):
    from histoseg.wsi import synth

    folder = _users_dataset_folder(tmp_path, "slide_000.tif/.xml")
    argv = [str(a) for a in ["--out", folder, *_synth()]]
    assert run_main(synth.main, [*argv, "--force"]) == 0
    assert (folder / "slide_000.tif").read_bytes() != b"my own scan\n"
    (folder / "slide_000.tif").write_bytes(b"truncated")  # ours now: regenerated, no --force
    assert run_main(synth.main, argv) == 0, capsys.readouterr().err
    assert "regenerating" in capsys.readouterr().err


def test_synth_refuses_an_unwritable_or_file_out(tmp_path, capsys, monkeypatch):
    import tempfile

    from histoseg.wsi import synth

    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    _refused(synth.main, ["--out", a_file, *_synth()], capsys, [tmp_path], expect="is a file")

    def read_only(*args, dir=None, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    argv = ["--out", tmp_path / "locked" / "s", *_synth()]
    line = _refused(synth.main, argv, capsys, [tmp_path], expect="cannot write in")
    assert "Read-only file system" in line and not (tmp_path / "locked").exists()


def test_synth_gates_a_long_dataset_behind_force(tmp_path, capsys, monkeypatch):
    from histoseg.wsi import synth, synth_work

    monkeypatch.setattr(synth_work, "MAX_UNFORCED_S", 0.0)
    argv = ["--out", tmp_path / "s", *_synth()]
    line = _refused(synth.main, argv, capsys, [tmp_path], expect="more than 0 s a slide")
    assert "640x480 px" in line and "--force" in line
    assert run_main(synth.main, [str(a) for a in [*argv, "--force"]]) == 0
    assert (tmp_path / "s" / "slide_000.tif").is_file()


# --- bench.plots: the user's README and pictures -------------------------------------------
@pytest.fixture
def results_folder(tmp_path) -> Path:
    from histoseg.results import make_row, write_rows

    config = {"patch_size": 64, "batch_size": 1, "backbone": "mobilenetv2", "device": "cpu"}
    config |= {"output_stride": 16, "precision": "float32", "remat": "none", "threads": 1}
    row = make_row("memory", config, measured={"peak_bytes": 10**8}, machine={})
    write_rows(tmp_path / "results" / "memory.json", [row])
    return tmp_path / "results"


@pytest.mark.parametrize(
    ("users_file", "flags"),
    [
        ("README.md", []),
        ("memory_vs_patch_size.png", ["--no-readme"]),
        ("memory_vs_patch_size.svg", ["--no-readme"]),
    ],
)
def test_plots_never_replace_the_users_files_without_force(
    users_file, flags, results_folder, tmp_path, capsys
):
    from bench.plots import main

    out = tmp_path / "plots"
    out.mkdir()
    (out / users_file).write_bytes(b"my own notes\n")
    argv = ["--results", results_folder, "--out", out, *flags]
    line = _refused(main, argv, capsys, [results_folder, out], expect=f"{users_file} exists")
    assert "--force" in line
    assert run_main(main, [str(a) for a in [*argv, "--force"]]) == 0
    assert (out / users_file).read_bytes() != b"my own notes\n"
    assert run_main(main, [str(a) for a in argv]) == 0  # once drawn, they are ours to redraw


def test_plots_refuse_an_out_that_is_a_file_and_readme_refuses_the_users(
    results_folder, tmp_path, capsys
):
    from bench.plots import main
    from bench.plots.readme import main as readme_main

    a_file = tmp_path / "a_file"
    a_file.write_text("x\n")
    argv = ["--results", results_folder, "--out", a_file]
    _refused(main, argv, capsys, [tmp_path], expect="is a file")
    (results_folder / "README.md").write_text("# my results\n")
    argv = ["--results", results_folder]
    _refused(readme_main, argv, capsys, [tmp_path], expect="README.md exists and is not")


def test_figures_drawn_before_the_marker_are_ours_only_beside_our_readme(tmp_path):
    from bench.plots.readme import check_plot_folder

    legacy = b"\x89PNG\r\n\x1a\n....tEXtSoftware\x00Matplotlib version3.11.2"
    (tmp_path / "memory_vs_patch_size.png").write_bytes(legacy)
    with pytest.raises(ResultsError, match=r"not a figure that bench\.plots drew"):
        check_plot_folder(tmp_path, readme=False)
    (tmp_path / "README.md").write_text(
        "# Results\n\nGenerated by `python -m bench.results_readme` (also ...)\n"
    )
    check_plot_folder(tmp_path)


@pytest.mark.parametrize(("umask", "mode"), [(0o022, 0o644), (0o027, 0o640)])
def test_every_file_written_gets_the_users_umask(umask, mode, slides, results_folder, tmp_path):
    """Patch lists, previews, synthetic slides, figures and the README: 0644 under umask
    022, never the temporary file's 0600 (results files: tests/test_results.py)."""
    from bench.plots import main as plots_main
    from histoseg.wsi import synth

    out = tmp_path / "out"
    old = os.umask(umask)
    try:
        argv = ["--slide", slides.tif, "--patch-size", 256, "--out", out / "p.csv"]
        assert run_main(patches.main, [str(a) for a in [*argv, "--preview", out / "p.png"]]) == 0
        assert run_main(synth.main, [str(a) for a in ["--out", out / "s", *_synth()]]) == 0
        argv = ["--results", str(results_folder), "--out", str(out / "plots")]
        assert run_main(plots_main, argv) == 0
    finally:
        os.umask(old)
    written = [p for p in out.rglob("*") if p.is_file()]
    assert {p.name for p in written} >= {"p.csv", "p.png", "slide_000.tif", "synthetic.json"}
    assert {p.name for p in written} >= {"README.md", "memory_vs_patch_size.svg"}
    assert {p.name: p.stat().st_mode & 0o777 for p in written} == {p.name: mode for p in written}


# --- training: a launcher-less Horovod run -----------------------------------------------
def test_horovod_engine_without_a_launcher_is_refused(tmp_path, capsys, monkeypatch):
    from histoseg.train import cli

    for name in cli.RANK_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.chdir(tmp_path)
    argv = ["--engine", "horovod", "--steps", "1", "--run-dir", tmp_path / "run"]
    line = _refused(cli.main, argv, capsys, [tmp_path], expect="--engine horovod: this process")
    assert "horovodrun -np 2" in line and "--engine none" in line
    cli.check_launcher("horovod", {"HOROVOD_RANK": "0"})  # under horovodrun: accepted
    cli.check_launcher("none", {})


# --- bench.memory and bench.accuracy: refused before any work ------------------------------
BENCH_MEMORY = ["--sizes", "64", "--backbone", "mobilenetv2", "--steps", "1", "--quiet"]


def _no_bench_work(monkeypatch, tmp_path):
    import bench.accuracy
    import bench.memory

    def work(*args, **kwargs):
        raise AssertionError("work began before the refusal")

    monkeypatch.chdir(tmp_path)
    for module, names in (
        (bench.memory, ("sweep", "refresh_predictions", "_hide_gpus_from_this_process")),
        (bench.accuracy, ("run_sweep",)),
    ):
        for name in names:
            monkeypatch.setattr(module, name, work)


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--timeout-s", "nan"], "--timeout-s"),
        (["--timeout-s", "inf"], "--timeout-s"),
        (["--timeout-s", "0"], "--timeout-s"),
        (["--timeout-s", "-1"], "--timeout-s"),
        (["--output-stride", "7", "--sizes", "224"], "7"),
    ],
)
def test_bench_memory_refuses_bad_numbers_before_any_work(
    argv, expect, tmp_path, capsys, monkeypatch
):
    from bench.memory import main

    _no_bench_work(monkeypatch, tmp_path)
    argv = [*BENCH_MEMORY, *argv, "--out", tmp_path / "m.json"]
    _refused(main, argv, capsys, [tmp_path], expect=expect)


@pytest.mark.parametrize("case", ["unwritable folder", "the user's side.csv"])
def test_bench_memory_refuses_its_out_before_any_work(case, tmp_path, capsys, monkeypatch):
    import tempfile

    from bench.memory import main

    (tmp_path / "side.csv").write_text("name,score\nalice,3\n")
    if case == "unwritable folder":
        (tmp_path / "side.csv").unlink()

        def read_only(*args, dir=None, **kwargs):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), dir)

        monkeypatch.setattr(tempfile, "mkstemp", read_only)
    _no_bench_work(monkeypatch, tmp_path)
    expect = "cannot write" if case == "unwritable folder" else "side.csv exists"
    argv = [*BENCH_MEMORY, "--out", tmp_path / "side.json"]
    _refused(main, argv, capsys, [tmp_path], expect=expect)


@pytest.mark.parametrize(
    ("argv", "expect"),
    [
        (["--pixel-budget", "inf"], "--pixel-budget"),
        (["--pixel-budget", "nan"], "--pixel-budget"),
        (["--val-fraction", "2"], "--val-fraction"),
        (["--val-fraction", "nan"], "--val-fraction"),
        (["--synthetic-slides", "0"], "--synthetic-slides"),
    ],
)
def test_bench_accuracy_refuses_bad_numbers_before_any_work(
    argv, expect, tmp_path, capsys, monkeypatch
):
    from bench.accuracy import main

    _no_bench_work(monkeypatch, tmp_path)
    argv = ["--synthetic-task", "local", "--sizes", "64", "--out", tmp_path / "a.json", *argv]
    _refused(main, argv, capsys, [tmp_path], expect=expect)


def test_bench_accuracy_refuses_the_users_files_before_any_work(tmp_path, capsys, monkeypatch):
    from bench.accuracy import main

    _no_bench_work(monkeypatch, tmp_path)
    (tmp_path / "README.md").write_text("# my notes\n")
    argv = ["--synthetic-task", "local", "--sizes", "64", "--out", tmp_path / "a.json"]
    _refused(main, argv, capsys, [tmp_path], expect="README.md")
    (tmp_path / "README.md").unlink()
    (tmp_path / "a.csv").write_text("name,score\nalice,3\n")
    _refused(main, argv, capsys, [tmp_path], expect="a.csv exists")


# --- signals: the worker process ends with the command ------------------------------------
@pytest.mark.skipif(not os.path.exists("/proc/self/task"), reason="reads /proc (Linux)")
@pytest.mark.parametrize(
    ("signame", "code", "line"),
    [("SIGTERM", 143, "error: terminated (SIGTERM)"), ("SIGINT", 130, "interrupted")],
)
def test_a_signal_to_bench_memory_ends_its_worker_and_keeps_the_results(
    signame, code, line, tmp_path
):
    """The parent alone gets the signal (``kill PID``, not the terminal's Ctrl-C to the
    whole group): its worker must not be left running, and the results file stays as it was."""
    import signal
    import time

    from histoseg.cli import child_pids
    from histoseg.results import make_row, write_rows

    out = tmp_path / "m.json"
    write_rows(
        out, [make_row("memory", {"patch_size": 1}, status="skipped", reason="x", machine={})]
    )
    before = _snapshot(tmp_path)
    argv = [sys.executable, "-m", "bench.memory", *BENCH_MEMORY, "--steps", "50"]
    argv += ["--backbone-option", "alpha=0.35", "--out", str(out)]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 120
        while not (workers := [p for p in child_pids(proc.pid) if _is_worker(p)]):
            assert time.monotonic() < deadline and proc.poll() is None, "no worker started"
            time.sleep(0.05)
        proc.send_signal(getattr(signal, signame))
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    err = err.decode()
    assert proc.returncode == code, err
    assert err.strip().splitlines() == [line] and "Traceback" not in err
    deadline = time.monotonic() + 10
    while any(_running(pid) for pid in workers):
        assert time.monotonic() < deadline, f"worker {workers} left running"
        time.sleep(0.05)
    assert _snapshot(tmp_path) == before


def _is_worker(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"bench.worker" in f.read()
    except OSError:
        return False


def _running(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
