"""bench.norm_check on a tiny run: the table's rows for batch and group normalisation."""

from __future__ import annotations

import pytest

from bench.norm_check import main
from histoseg.cli import run_main


def test_bad_values_are_one_line_errors(capsys):
    assert run_main(main, ["--steps", "0"]) == 2
    assert "--steps must be >= 1, got 0" in capsys.readouterr().err
    assert run_main(main, ["--patch-size", "100"]) == 2
    assert "--patch-size 100 must be a multiple of 16" in capsys.readouterr().err


@pytest.mark.slow  # about half a minute: two tiny trainings and five validations
def test_table_scores_the_same_weights_each_way(tmp_path, capsys):
    argv = [
        "--steps", "2", "--patch-size", "64", "--alpha", "0.35", "--max-val-patches", "4",
        "--synthetic-size", "1024x1024", "--synthetic-dir", str(tmp_path / "s"),
    ]  # fmt: skip
    assert run_main(main, [*argv, "--norm", "batch"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line[:34].strip() for line in lines[1:]] == [
        "train batches, training mode",
        "validation, inference mode",
        "validation, after recalibration",
        "validation, per-patch statistics",
    ]
    assert run_main(main, [*argv, "--norm", "group"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert not any("recalibration" in line for line in lines)  # group norm has no statistics
