"""The wsi command lines: happy paths, and one stderr line + exit 2 for every bad input."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.cli import run_main
from histoseg.wsi import patches, synth


def _run(main, argv, capsys):
    code = run_main(main, [str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def test_patches_cli_writes_csv_preview_and_summary(tmp_path, synthetic_slides, capsys):
    out, preview = tmp_path / "p.csv", tmp_path / "p.png"
    code, stdout, err = _run(
        patches.main,
        [
            "--slide",
            synthetic_slides.tumor_tif,
            "--annotations",
            synthetic_slides.tumor_xml,
            "--patch-size",
            256,
            "--out",
            out,
            "--preview",
            preview,
        ],
        capsys,
    )
    assert code == 0, err
    assert "kept" in stdout and "dropped" in stdout and "with tumour" in stdout
    rows = list(csv.DictReader(out.open()))
    assert rows and {"x", "y", "level", "patch_size", "tissue_fraction", "tumor_fraction"} <= set(
        rows[0]
    )
    assert any(float(r["tumor_fraction"]) > 0 for r in rows)
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _bad_inputs(tmp, slides):
    text = tmp / "notes.tif"
    text.write_text("hello\n")
    truncated = tmp / "truncated.tif"
    truncated.write_bytes(slides.tumor_tif.read_bytes()[:3000])
    malformed = tmp / "malformed.xml"
    malformed.write_text("<ASAP_Annotations><Annotations><Annotation")
    unknown = tmp / "unknown.xml"
    unknown.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="x" PartOfGroup="weird">'
        '<Coordinates><Coordinate Order="0" X="1" Y="1"/><Coordinate Order="1" X="9" Y="1"/>'
        '<Coordinate Order="2" X="9" Y="9"/></Coordinates></Annotation></Annotations></ASAP_Annotations>'
    )
    far = tmp / "far.xml"
    far.write_text(
        unknown.read_text()
        .replace('"weird"', '"_0"')
        .replace('X="9"', 'X="9e6"')
        .replace('X="1"', 'X="8e6"')
    )
    existing = tmp / "exists.csv"
    existing.write_text("x\n")
    good = ["--slide", slides.tumor_tif, "--patch-size", 256, "--out", tmp / "o.csv"]
    return {
        "missing slide": (
            ["--slide", tmp / "nope.tif", "--patch-size", 256, "--out", tmp / "o.csv"],
            "not found",
        ),
        "not a slide": (
            ["--slide", text, "--patch-size", 256, "--out", tmp / "o.csv"],
            "notes.tif",
        ),
        "corrupt slide": (
            ["--slide", truncated, "--patch-size", 256, "--out", tmp / "o.csv"],
            "truncated.tif",
        ),
        "malformed xml": ([*good, "--annotations", malformed], "malformed XML"),
        "unknown group": ([*good, "--annotations", unknown], "unknown group"),
        "xml of another slide": ([*good, "--annotations", far], "wholly outside"),
        "missing xml": ([*good, "--annotations", tmp / "none.xml"], "not found"),
        "patch larger than slide": (
            [*good[:2], "--patch-size", 4096, "--out", tmp / "o.csv"],
            "larger than the slide",
        ),
        "bad level": ([*good, "--level", 9], "level 9 out of range"),
        "bad min tissue": ([*good, "--min-tissue", 2], "--min-tissue: must be a finite number"),
        "zero patch size": (
            [*good[:2], "--patch-size", 0, "--out", tmp / "o.csv"],
            "--patch-size: must be a whole number >= 32, got '0'",
        ),
        "not a number": (
            [*good[:2], "--patch-size", "big", "--out", tmp / "o.csv"],
            "--patch-size: must be a whole number",
        ),
        "missing argument": (["--slide", slides.tumor_tif], "required"),
        "existing output": ([*good[:4], "--out", existing], "--force"),
    }


def test_patches_cli_bad_inputs_one_line_exit_2(tmp_path, synthetic_slides, capsys):
    for name, (argv, message) in _bad_inputs(tmp_path, synthetic_slides).items():
        code, _stdout, err = _run(patches.main, argv, capsys)
        assert code == 2, (name, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (name, err)
        assert message in lines[0], (name, lines[0])


def test_patches_cli_warns_and_goes_on_for_a_polygon_past_the_edge(
    tmp_path, synthetic_slides, capsys
):
    edge = tmp_path / "edge.xml"
    edge.write_text(
        '<ASAP_Annotations><Annotations><Annotation Name="rim" PartOfGroup="carcinoma">'
        '<Coordinates><Coordinate Order="0" X="2000" Y="10"/><Coordinate Order="1" X="2100" Y="10"/>'
        '<Coordinate Order="2" X="2000" Y="90"/></Coordinates></Annotation></Annotations>'
        "</ASAP_Annotations>"
    )
    argv = ["--slide", synthetic_slides.tumor_tif, "--annotations", edge, "--patch-size", 256]
    code, _, err = _run(patches.main, [*argv, "--out", tmp_path / "o.csv"], capsys)
    assert code == 2 and "unknown group 'carcinoma'" in err
    argv += ["--label-map", "carcinoma=1", "--out", tmp_path / "o.csv"]
    code, stdout, err = _run(patches.main, argv, capsys)
    assert code == 0 and "kept" in stdout
    assert err.startswith("warning: ") and "'rim'" in err and "outside" in err
    bad = [*argv[:-4], "--label-map", "carcinoma=2", "--out", tmp_path / "o.csv", "--force"]
    code, _, err = _run(patches.main, bad, capsys)
    assert code == 2 and "GROUP=1" in err


def test_synth_cli_and_idempotent_dataset(tmp_path, capsys):
    argv = [
        "--out",
        tmp_path / "s",
        "--slides",
        3,
        "--size",
        "640x480",
        "--tile",
        256,
        "--no-progress",
    ]
    code, stdout, err = _run(synth.main, argv, capsys)
    assert code == 0, err
    assert "normal slide, no XML" in stdout
    tifs = sorted((tmp_path / "s").glob("*.tif"))
    assert len(tifs) == 3 and len(list((tmp_path / "s").glob("*.xml"))) == 2
    stamps = [t.stat().st_mtime_ns for t in tifs]
    pairs = synth.ensure_synthetic_dataset(
        tmp_path / "s", 3, (640, 480), tile_px=256, progress=False
    )
    assert [t.stat().st_mtime_ns for t, _ in pairs] == stamps
    assert pairs[2][1] is None and pairs[0][1].name == "slide_000.xml"
    for argv, message in [
        (["--out", tmp_path / "x", "--size", "20000by16000"], "WIDTHxHEIGHT"),
        (["--out", tmp_path / "x", "--size", "10x10"], "at least 64x64"),
        (["--out", tmp_path / "x", "--tile", 100], "multiple of 32"),
        (["--out", tmp_path / "x", "--slides", 0], "n_slides"),
    ]:
        code, _, err = _run(synth.main, argv, capsys)
        assert code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


def test_module_entry_point_runs(tmp_path, synthetic_slides):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "histoseg.wsi.patches",
            "--slide",
            str(tmp_path / "missing.tif"),
            "--patch-size",
            "256",
            "--out",
            str(tmp_path / "o.csv"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (
        result.returncode == 2 and result.stderr.count("\n") == 1 and "not found" in result.stderr
    )


@pytest.mark.slow
def test_acceptance_slide_20000x16000(tmp_path):
    from histoseg.wsi import open_slide

    tif, xml = synth.write_synthetic_slide(
        tmp_path / "big.tif", (20000, 16000), seed=0, progress=False
    )
    with open_slide(tif) as slide:
        assert slide.dimensions == (20000, 16000) and max(slide.level_dimensions[-1]) < 1000
    assert xml is not None and xml.exists()


def _one_error_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_patches_cli_out_is_a_directory_fails_cleanly(tmp_path, synthetic_slides, capsys):
    folder = tmp_path / "taken"
    folder.mkdir()
    argv = ["--slide", synthetic_slides.tumor_tif, "--patch-size", 256, "--out", folder]
    code, _, err = _run(patches.main, [*argv, "--force"], capsys)
    assert code == 2 and str(folder) in _one_error_line(err)
    assert folder.is_dir() and not list(tmp_path.glob(".*"))


def test_save_patches_removes_its_temporary_file_on_failure(tmp_path):
    folder = tmp_path / "taken"
    folder.mkdir()
    ref = patches.PatchRef(slide_path="s.tif", x=0, y=0, level=0, patch_size=256)
    with pytest.raises(OSError):
        patches.save_patches(folder, [ref])
    assert folder.is_dir() and not list(tmp_path.glob(".*"))


def test_patches_cli_bad_preview_path_fails_before_any_output(tmp_path, synthetic_slides, capsys):
    folder = tmp_path / "pics"
    folder.mkdir()
    out = tmp_path / "o.csv"
    for preview in (tmp_path / "u.xyz", folder):
        argv = ["--slide", synthetic_slides.tumor_tif, "--patch-size", 256, "--out", out]
        code, _, err = _run(patches.main, [*argv, "--preview", preview, "--force"], capsys)
        assert code == 2 and str(preview) in _one_error_line(err), err
        assert not out.exists() and not list(tmp_path.glob(".*"))
        assert sorted(p.name for p in tmp_path.iterdir()) == ["pics"]


def test_patches_draw_preview_is_atomic(tmp_path, synthetic_slides, monkeypatch):
    from PIL import Image

    from histoseg.wsi import open_slide
    from histoseg.wsi.annotations import Annotations

    def broken_save(self, fp, *args, **kwargs):
        Path(fp).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Image.Image, "save", broken_save)
    with open_slide(synthetic_slides.normal_tif) as slide, pytest.raises(OSError):
        patches.draw_preview(slide, [], Annotations.from_xml(None), tmp_path / "p.png")
    assert not list(tmp_path.iterdir())


def test_synth_regenerates_a_truncated_slide(tmp_path, capsys):
    import json

    folder = tmp_path / "s"
    argv = ["--out", folder, "--slides", 1, "--size", "640x480", "--tile", 256, "--no-progress"]
    assert _run(synth.main, argv, capsys)[0] == 0
    tif = folder / "slide_000.tif"
    whole = tif.read_bytes()
    manifest = folder / "synthetic.json"
    for old_manifest in (False, True):
        if old_manifest:  # written before sizes were recorded: the read check must catch it
            data = json.loads(manifest.read_text())
            del data["slides"]["slide_000.tif"]["bytes"]
            manifest.write_text(json.dumps(data))
        tif.write_bytes(whole[: len(whole) // 2])
        code, stdout, err = _run(synth.main, argv, capsys)
        assert code == 0, err
        assert "regenerating" in err and str(tif) in err, (old_manifest, err)
        assert tif.read_bytes() == whole and str(tif) in stdout
    # A sound slide is reused untouched and silently.
    stamp = tif.stat().st_mtime_ns
    code, _, err = _run(synth.main, argv, capsys)
    assert code == 0 and "regenerating" not in err and tif.stat().st_mtime_ns == stamp


def test_patches_cli_accepts_and_prints_a_path_with_non_utf8_bytes(
    tmp_path, synthetic_slides, capsys
):
    import os

    folder = os.fsencode(tmp_path)
    slide = os.fsdecode(folder + b"/slide_\xff.tif")
    xml = os.fsdecode(folder + b"/slide_\xff.xml")
    out = os.fsdecode(folder + b"/out_\xfe.csv")
    os.symlink(synthetic_slides.tumor_tif, slide)
    os.symlink(synthetic_slides.tumor_xml, xml)
    argv = ["--slide", slide, "--annotations", xml, "--patch-size", 256, "--out", out]
    code, stdout, err = _run(patches.main, argv, capsys)
    assert code == 0, err
    assert "slide_\\xff.tif: kept" in stdout and "out_\\xfe.csv" in stdout
    refs = patches.load_patches(out)
    assert refs and refs[0].slide_path == slide and refs[0].annotations_path == xml
    assert os.fsencode(refs[0].slide_path).endswith(b"slide_\xff.tif")


def test_patches_cli_prints_its_estimate_before_the_work(tmp_path, synthetic_slides, capsys):
    argv = ["--slide", synthetic_slides.normal_tif, "--patch-size", 256, "--out", tmp_path / "o"]
    code, stdout, err = _run(patches.main, argv, capsys)
    first, second = stdout.splitlines()
    assert code == 0 and err == ""
    assert "48 grid positions; up to" in first and "of memory" in first and "kept" in second


def test_grid_in_bands_equals_grid_at_once_and_shows_progress(
    synthetic_slides, monkeypatch, capsys
):
    kwargs = {"min_tissue": 0.0, "annotations": synthetic_slides.tumor_xml, "stride": 96}
    whole = patches.grid_patches(synthetic_slides.tumor_tif, 128, **kwargs)
    monkeypatch.setattr(patches, "POSITIONS_PER_CHUNK", 7)
    banded = patches.grid_patches(synthetic_slides.tumor_tif, 128, progress=True, **kwargs)
    assert banded == whole and len(whole) == 21 * 15
    err = capsys.readouterr().err
    assert f"0/{len(whole)}" in err and "patch/s" in err
