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


def test_stale_batch_norm_and_oversized_tiles_are_flagged(tmp_path, tiny_run):
    import json

    import numpy as np

    from histoseg.infer.model import find_checkpoint, stale_batch_norm_warning, tile_size_warning

    assert stale_batch_norm_warning(find_checkpoint(tiny_run)) is None
    # a periodic checkpoint, or one from before histoseg.train recorded the recalibration
    old = tmp_path / "old"
    (old / "checkpoints").mkdir(parents=True)
    with np.load(tiny_run / "checkpoints" / "ckpt-00000001.npz") as data:
        arrays = {k: data[k] for k in data.files if k != "bn_recalibrated"}
    np.savez(old / "checkpoints" / "ckpt-00000001.npz", **arrays)
    options = json.loads((tiny_run / "options.json").read_text())
    (old / "options.json").write_text(json.dumps(options))
    warning = stale_batch_norm_warning(find_checkpoint(old))
    assert warning.startswith("warning: ckpt-00000001.npz") and "\n" not in warning
    # tiles far larger than the training patch (128 px here) are flagged too
    assert tile_size_warning(find_checkpoint(tiny_run), 256) is None
    assert "8x the 128 px" in tile_size_warning(find_checkpoint(tiny_run), 1024)
    # group norm has no statistics to go stale
    (old / "options.json").write_text(json.dumps({**options, "norm": "group"}))
    assert stale_batch_norm_warning(find_checkpoint(old)) is None


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
