"""Ranks started by a launcher share a list of slides: each slide run by exactly one rank."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from histoseg.cli import run_main
from histoseg.errors import ConfigError
from histoseg.infer.__main__ import main as infer_main
from histoseg.infer.share import share_of_slides
from histoseg.train.launch import horovodrun_command, world_from_env


@pytest.mark.parametrize("world", [1, 2, 3, 5])
def test_every_slide_goes_to_exactly_one_rank(world):
    sizes = [9, 1, 4, 4, 7, 2, 2, 8]
    shares = [share_of_slides(sizes, rank, world) for rank in range(world)]
    assert sorted(i for share in shares for i in share) == list(range(len(sizes)))
    assert all(share == sorted(share) for share in shares)


def test_largest_first_to_the_least_loaded_rank():
    # 9 r0; 8 r1; 7 r1 (15); 4 r0 (13); 4 r0 (17); 2 r1 (17); 2 r0 (19, a tie); 1 r1 (18)
    sizes = [9, 1, 4, 4, 7, 2, 2, 8]
    loads = [sum(sizes[i] for i in share_of_slides(sizes, r, 2)) for r in range(2)]
    assert sorted(loads) == [18, 19]
    assert share_of_slides([5, 5], 0, 2) == [0] and share_of_slides([5, 5], 1, 2) == [1]
    assert share_of_slides([5], 1, 2) == []  # more ranks than slides: a rank may idle


def test_world_from_launcher_variables():
    assert world_from_env({}) == (0, 1, 1)
    assert world_from_env({"HOROVOD_RANK": "1", "HOROVOD_SIZE": "4"}) == (1, 4, 4)
    env = {"OMPI_COMM_WORLD_RANK": "3", "OMPI_COMM_WORLD_SIZE": "8"}
    assert world_from_env({**env, "OMPI_COMM_WORLD_LOCAL_SIZE": "2"}) == (3, 8, 2)
    assert world_from_env({"PMI_RANK": "2", "PMI_SIZE": "4", "MPI_LOCALNRANKS": "4"}) == (2, 4, 4)
    # a batch script's plain process is one process; srun's ranks are its step's
    assert world_from_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "4"}) == (0, 1, 1)
    srun = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "6"}
    assert world_from_env({**srun, "SLURM_STEP_TASKS_PER_NODE": "2(x3)"}) == (5, 6, 2)
    # ranks on the host only set default threads: unreadable, they fall back to the world
    assert world_from_env({**srun, "SLURM_STEP_TASKS_PER_NODE": "?"}) == (5, 6, 6)
    for rank, size in (("2", "2"), ("\u00b2", "4"), ("1x", "2"), ("0", "")):
        with pytest.raises(ConfigError, match="HOROVOD_RANK"):
            world_from_env({"HOROVOD_RANK": rank, "HOROVOD_SIZE": size})


def _two_slides(tiny_slide, tmp_path):
    slides = []
    for name in ("a", "b"):
        slides.append(tmp_path / f"{name}.tif")
        shutil.copyfile(tiny_slide, slides[-1])
    return slides


def test_a_rank_runs_only_its_share_on_its_share_of_cores(
    tiny_slide, tiny_run, tmp_path, monkeypatch, capsys
):
    import histoseg.train.cli

    threads = []
    # the process's TensorFlow has started: record the thread count instead of setting it
    monkeypatch.setattr(histoseg.train.cli, "configure_threads", lambda t, pin: threads.append(t))
    monkeypatch.setattr("histoseg.config.default_threads", lambda: 4)
    monkeypatch.setattr("os.cpu_count", lambda: 4)  # not bound by a launcher: half each
    for name in ("HISTOSEG_THREADS", "OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOROVOD_RANK", "1")
    monkeypatch.setenv("HOROVOD_SIZE", "2")
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.json").write_text("rank 0 finished first")  # not this rank's: no refusal
    argv = ["--checkpoint", str(tiny_run), "--out", str(out), "--tile-size", "256"]
    argv += ["--no-progress", "--slide", *map(str, _two_slides(tiny_slide, tmp_path))]
    assert run_main(infer_main, argv) == 0
    assert "rank 1 of 2: 1 of 2 slides" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["a.json", "b.json", "b.png", "b.tif"]
    assert threads == [2]


@pytest.mark.slow
def test_two_horovod_ranks_write_every_slides_outputs_once(tiny_slide, tiny_run, tmp_path):
    out = tmp_path / "out"
    command = [sys.executable, "-m", "histoseg.infer", "--checkpoint", str(tiny_run)]
    command += ["--out", str(out), "--tile-size", "256", "--no-progress", "--slide"]
    command += [str(s) for s in _two_slides(tiny_slide, tmp_path)]
    done = subprocess.run(
        horovodrun_command(2, command), capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    names = sorted(p.name for p in out.iterdir())
    assert names == ["a.json", "a.png", "a.tif", "b.json", "b.png", "b.tif"]
    assert "rank 0 of 2: 1 of 2 slides" in done.stdout + done.stderr
