"""``histoseg.train --spatial-workers N``: a run whose patches are cut across ranks trains
as the same run without the cut (real ranks under ``horovodrun --gloo`` on localhost).

The runs use SGD (an optimizer whose step scales with the gradient, unlike Adam, so a
gradient summed or averaged wrongly shows in the next loss) and group norm (batch 1). The
first step's loss is a forward pass of the same weights on the same patch: float32
rounding apart (the partitioned moments are summed in another order). Later losses move
further apart: float32 differences grow through the updates (docs/spatial.md).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.cli import run_main
from histoseg.results import load_rows
from histoseg.train import launch
from histoseg.train.cli import main
from histoseg.train.engines import horovod_available
from histoseg.train.summaries import read_scalars

needs_horovod = pytest.mark.skipif(
    not horovod_available(), reason="Horovod not built (scripts/build_horovod.sh)"
)


def _flags(tmp_path, name: str) -> list[str]:
    return [
        "--synthetic-slides", "3",
        "--synthetic-size", "1024x1024",
        "--synthetic-dir", str(tmp_path / "slides"),
        "--backbone", "mobilenetv2",
        "--alpha", "0.35",
        "--patch-size", "64",
        "--batch-size", "1",
        "--max-val-patches", "4",
        "--optimizer", "sgd",
        "--learning-rate", "0.002",
        "--steps", "2",
        "--checkpoint-every", "0",
        "--log-every", "1",
        "--no-progress",
        "--run-dir", str(tmp_path / name),
        "--results", str(tmp_path / f"{name}.json"),
    ]  # fmt: skip


def _ranks(ranks: int, flags: list[str]) -> dict:
    """Run ``python -m histoseg.train`` as ``ranks`` Horovod ranks; its results row."""
    command = [sys.executable, "-m", "histoseg.train", "--engine", "horovod", "--threads", "1"]
    command += flags
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(
        launch.horovodrun_command(ranks, command), env=env, capture_output=True, timeout=600
    )
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-3000:]
    (row,) = load_rows(flags[flags.index("--results") + 1])
    return row


def _losses(row: dict) -> list[float]:
    """The chief's loss at every step (its TensorBoard scalars)."""
    return [
        loss
        for _, loss in read_scalars(Path(row["extra"]["run_dir"]) / "tensorboard")["train/loss"]
    ]


def _same_run(cut: dict, whole: dict) -> None:
    assert cut["config"]["step"] == "spatial"
    # the same validation pixels, each counted once over the ranks' slabs
    for key in ("val_patches", "pixels"):
        assert cut["metrics"][key] == whole["metrics"][key], key
    assert abs(cut["metrics"]["accuracy"] - whole["metrics"]["accuracy"]) < 1e-2
    (cut_first, cut_second), (first, second) = _losses(cut), _losses(whole)
    assert abs(cut_first - first) <= 1e-4 * first  # the same forward pass
    # the first update moves the loss as far: the gradients were summed (or averaged) right
    # (twice the gradient would about double the change at this small rate)
    change = second - first
    assert abs((cut_second - cut_first) - change) <= 0.02 * abs(change)


@needs_horovod
def test_a_patch_cut_across_two_ranks_trains_as_one_process(tmp_path):
    assert run_main(main, _flags(tmp_path, "whole")) == 0
    (whole,) = load_rows(tmp_path / "whole.json")
    cut = _ranks(2, [*_flags(tmp_path, "cut"), "--spatial-workers", "2"])
    assert cut["config"]["spatial_workers"] == 2 and cut["config"]["workers"] == 1
    _same_run(cut, whole)


@pytest.mark.slow  # four ranks on two cores: about a minute
@needs_horovod
def test_two_blocks_of_two_spatial_ranks_train_as_two_data_parallel_workers(tmp_path):
    """Spatial x data parallelism: 2 blocks of 2 ranks (Horovod process sets) against 2
    data-parallel workers of one rank each, the same patches per worker."""
    whole = _ranks(2, _flags(tmp_path, "whole"))
    cut = _ranks(4, [*_flags(tmp_path, "cut"), "--spatial-workers", "2"])
    assert cut["config"]["spatial_workers"] == 2 and cut["config"]["workers"] == 2
    assert cut["extra"]["peak_learning_rate"] == whole["extra"]["peak_learning_rate"]
    _same_run(cut, whole)


@pytest.mark.parametrize(
    ("world", "patch_px", "message"),
    [
        ("2", "48", "patch_size 48 px cannot be cut into 2 slabs"),
        ("3", "64", "3 ranks cannot be cut into blocks of 2 spatial workers"),
    ],
)
def test_a_patch_or_world_that_does_not_cut_is_refused(
    world, patch_px, message, monkeypatch, capsys, tmp_path
):
    monkeypatch.setenv("HOROVOD_RANK", "0")
    monkeypatch.setenv("HOROVOD_SIZE", world)
    flags = ["--engine", "horovod", "--spatial-workers", "2", "--patch-size", patch_px]
    flags += ["--run-dir", str(tmp_path / "run")]
    assert run_main(main, flags) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "run").exists()  # nothing was written
