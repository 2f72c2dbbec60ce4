"""`histoseg infer` and `histoseg.infer.evaluate` on bad input: one line, non-zero exit."""

from __future__ import annotations

import pytest

from histoseg.__main__ import main as histoseg_main
from histoseg.cli import run_main
from histoseg.infer.__main__ import main as infer_main
from histoseg.infer.evaluate import main as evaluate_main


def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_missing_checkpoint_is_named(tmp_path, tiny_slide, capsys):
    code = run_main(
        infer_main,
        [
            "--checkpoint",
            str(tmp_path / "nope"),
            "--slide",
            str(tiny_slide),
            "--out",
            str(tmp_path / "o"),
        ],
    )
    assert code == 2 and "nope" in _one_error_line(capsys)


def test_a_folder_without_options_json_is_refused(tmp_path, tiny_slide, tiny_run, capsys):
    lone = tmp_path / "lone"
    lone.mkdir()
    (lone / "ckpt-00000001.npz").write_bytes(
        (tiny_run / "checkpoints" / "ckpt-00000001.npz").read_bytes()
    )
    code = run_main(
        infer_main,
        ["--checkpoint", str(lone), "--slide", str(tiny_slide), "--out", str(tmp_path / "o")],
    )
    assert code == 2 and "options.json" in _one_error_line(capsys)


def test_existing_outputs_need_force(tmp_path, tiny_slide, tiny_run, capsys):
    (tmp_path / "tiny.json").write_text("my notes")
    code = run_main(
        infer_main,
        ["--checkpoint", str(tiny_run), "--slide", str(tiny_slide), "--out", str(tmp_path)],
    )
    assert code == 2 and "--force" in _one_error_line(capsys)
    assert (tmp_path / "tiny.json").read_text() == "my notes"


@pytest.mark.parametrize("tile", ["100", "abc"])
def test_bad_tile_size_names_the_option(tmp_path, tiny_slide, tiny_run, tile, capsys):
    argv = [
        "--checkpoint",
        str(tiny_run),
        "--slide",
        str(tiny_slide),
        "--out",
        str(tmp_path),
        "--tile-size",
        tile,
    ]
    code = run_main(infer_main, argv)
    line = _one_error_line(capsys)
    assert code == 2 and "tile" in line


def test_dispatcher_knows_infer(capsys):
    assert histoseg_main(["--help"]) == 0
    assert "infer" in capsys.readouterr().out


def test_evaluate_without_summaries_is_one_line(tmp_path, capsys):
    code = run_main(evaluate_main, ["--summaries", str(tmp_path), "--annotations", str(tmp_path)])
    assert code == 2 and "summaries" in _one_error_line(capsys)
