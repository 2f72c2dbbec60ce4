"""bench.scaling: end to end with real worker processes on tiny patches (the no-communication
control, so the test needs neither Horovod nor free ports), and how a launch's figures are
summarised in each step mode."""

from __future__ import annotations

import ctypes
import json
import sys
import threading
import time

import pytest

from bench.scaling import attach_projection, kept_rows, main
from bench.scaling_table import markdown_table, summary_table
from bench.scaling_worker import summarise, thread_cpu_s
from histoseg.errors import ConfigError
from histoseg.results import make_row


# Each launch is ~13 s here; CI runs one launch per point, --runslow adds the median of two.
@pytest.mark.parametrize("repeats", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_weak_scaling_rows_with_repeats_pinning_and_efficiency(tmp_path, capsys, repeats):
    out = tmp_path / "scaling.json"
    argv = ["--workers", "1", "2", "--sizes", "64", "--engine", "none", "--backbone"]
    argv += ["mobilenetv2", "--alpha", "0.35", "--steps", "1", "--warmup", "1"]
    argv += ["--repeats", str(repeats), "--threads-per-worker", "1", "--out", str(out)]
    # never wait for the shared machine to be quiet here, never relaunch (a test, not a timing)
    argv += ["--max-other-cpu", "99", "--retries", "0"]
    assert main(argv) == 0
    rows = [r for r in json.loads(out.read_text()) if r["config"]["engine"] == "none"]
    assert sorted(r["config"]["workers"] for r in rows) == [1, 2]
    for row in rows:
        assert row["status"] == "ok"
        assert row["config"]["step"] == "overlap"  # the default step mode, in the config key
        assert row["extra"]["command"].startswith("python -m bench.scaling --workers 1 2")
        # independent processes never communicate: nothing exposed
        assert row["measured"]["allreduce_s"] == 0.0
        launches = row["extra"]["launches_step_s"]
        assert len(launches) == repeats and launches == sorted(launches)
        assert row["measured"]["step_s"] == launches[0]  # the median of two is the lower
        others = row["extra"]["launches_other_cpu_cores"]
        assert len(others) == repeats and all(c >= 0 for c in others)
        assert row["extra"]["discarded_launches"] == []
        if sys.platform.startswith("linux"):  # per-thread CPU of the timed steps, per rank
            assert row["measured"]["compute_thread_cpu_s"] > 0
            assert row["measured"]["other_thread_cpu_s"] >= 0
        workers = row["config"]["workers"]
        # every timed step of every rank, beside each rank's median
        assert [len(s) for s in row["measured"]["per_rank_steps_s"]] == [1] * workers
        # each rank pinned to its own core, where the machine has enough of them
        cores = row["extra"]["cores"]
        assert len(cores) == workers
        if all(c is not None for c in cores):
            assert len({c[0] for c in cores}) == workers
        efficiency = row["scaling"]["efficiency"]
        assert efficiency == 1.0 if workers == 1 else efficiency > 0
    assert out.with_suffix(".csv").exists()
    assert "efficiency" in capsys.readouterr().out.lower()


def _record(rank, step_s, mode="overlap", local=None):
    return {
        "rank": rank,
        "step_mode": mode,
        "step_s": step_s,
        "compute_s": step_s,
        "allreduce_s": [None] * len(step_s),
        "apply_s": [None] * len(step_s),
        "local_step_s": local or [],
        "gradient_bytes": 400,
        "parameters": 100,
    }


def test_overlapped_step_reports_the_exposed_communication():
    records = [
        _record(0, [1.0, 1.2, 1.1], local=[0.9, 1.0, 0.95]),
        _record(1, [1.1, 1.1, 1.1], local=[1.0, 1.0, 1.0]),
    ]
    m = summarise(records, batch_size=1, patch_size=64)
    # the slowest rank's median step against the slowest rank's step without the collective
    assert m["step_s"] == 1.1 and m["compute_s"] == 1.0
    assert m["allreduce_s"] == pytest.approx(0.1) == m["allreduce_exposed_s"]
    assert m["allreduce_share"] == pytest.approx(0.1 / 1.1)
    assert m["allreduce_timing"].startswith("exposed")
    # noise can make the difference negative: kept as measured, clamped in allreduce_s
    records = [_record(0, [1.0], local=[1.02]), _record(1, [1.0], local=[1.01])]
    m = summarise(records, batch_size=1, patch_size=64)
    assert m["allreduce_exposed_s"] == pytest.approx(-0.02) and m["allreduce_s"] == 0.0
    # what each rank's threads used per step: mean over ranks
    records[0]["thread_cpu_s_per_step"] = {"compute": 0.9, "other": 0.04}
    records[1]["thread_cpu_s_per_step"] = {"compute": 1.0, "other": 0.06}
    m = summarise(records, batch_size=1, patch_size=64)
    assert m["compute_thread_cpu_s"] == pytest.approx(0.95)
    assert m["other_thread_cpu_s"] == pytest.approx(0.05)
    # one worker: no collective, all of the step is compute
    m = summarise([_record(0, [0.5, 0.7, 0.6])], batch_size=1, patch_size=64)
    assert (m["compute_s"], m["allreduce_s"], m["allreduce_exposed_s"]) == (0.6, 0.0, 0.0)


def test_thread_cpu_counts_compute_threads_apart_from_the_rest():
    """A thread named as TensorFlow names its compute pool counts as compute; this (main)
    thread's work as other."""
    if not sys.platform.startswith("linux"):
        pytest.skip("per-thread CPU comes from /proc/self/task (Linux only)")

    def spin(seconds):
        end = time.thread_time() + seconds
        while time.thread_time() < end:
            pass

    spun, done = threading.Event(), threading.Event()

    def compute():
        # PR_SET_NAME (15): the thread's name as /proc shows it
        ctypes.CDLL(None).prctl(15, b"tf_Compute_t", 0, 0, 0)
        spin(0.4)
        spun.set()
        done.wait()  # stay alive: an ended thread's time leaves /proc with it

    before = thread_cpu_s()
    worker = threading.Thread(target=compute)
    worker.start()
    spin(0.1)
    spun.wait()
    after = thread_cpu_s()
    done.set()
    worker.join()
    assert after["compute"] - before["compute"] >= 0.35
    # the spin, and whatever this test process's other threads did meanwhile (not 0.4 s)
    assert 0.05 <= after["other"] - before["other"] < 0.3


def test_rows_from_before_step_modes_are_retired_only_where_remeasured():
    config = {"engine": "horovod", "patch_size": 512, "compression": "none", "workers": 2}
    legacy = make_row("scaling", config, measured={"step_s": 1.0})
    other = make_row("scaling", {**config, "patch_size": 1024}, measured={"step_s": 4.0})
    projection = make_row("scaling", {"engine": "projection", "workers": 512})
    new = make_row("scaling", {**config, "step": "overlap"}, measured={"step_s": 0.9})
    kept = kept_rows([legacy, other, projection], [new])
    assert kept == [other, projection]
    assert kept_rows([new], [new]) == [new]  # rows of a step mode are merge_rows' business


def test_show_table_puts_each_engine_beside_the_control():
    def row(engine, workers, compression, efficiency, share=0.0):
        config = {"engine": engine, "patch_size": 512, "compression": compression}
        return make_row(
            "scaling",
            {**config, "workers": workers, "step": "overlap"},
            measured={"step_s": 1.0, "allreduce_share": share, "other_thread_cpu_s": 0.05},
            scaling={"efficiency": efficiency},
            extra={"launches_other_cpu_cores": [0.01, 0.03]},
        )

    rows = [row("horovod", 2, "none", 0.9, 0.01), row("horovod", 2, "fp16", 0.92, 0.02)]
    rows += [row("none", 2, "none", 0.95), row("none", 1, "none", 1.0)]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| none | overlap | 512 | 95.0% |")
    assert "| 90.0% / 92.0% | 94.7% / 96.8% | 1.0% / 2.0% |" in lines[3]
    assert lines[3].endswith("| 50 / 50 | 0.03 / 0.03 |")


def _measured(engine, workers, compression="none", launches=(1.0, 1.0, 1.0), probe=None):
    config = {
        "engine": engine,
        "patch_size": 512,
        "compression": compression,
        "workers": workers,
        "step": "overlap",
        "backbone": "mobilenetv2",
    }
    step_s = sorted(launches)[len(launches) // 2]
    return make_row(
        "scaling",
        config,
        measured={
            "step_s": step_s,
            "compute_s": step_s,
            "allreduce_s": 0.0,
            "allreduce_share": 0.0,
            "patches_per_s": workers / step_s,
            "gradient_bytes": 4e6,
            "allreduce_probe": probe or {},
        },
        scaling={"throughput_per_worker": 1 / step_s, "efficiency": 1.0},
        extra={"launches_step_s": sorted(launches)},
        machine={},
    )


def _sweep_rows():
    probe = {"65536": 0.011, "1048576": 0.013, "4194304": 0.02}
    return [
        _measured("none", 1, launches=(0.9, 1.0, 1.1)),  # no collective: in the spread
        _measured("none", 2, launches=(0.95, 1.0, 1.05)),  # the control: in the spread too
        _measured("horovod", 1, launches=(1.0, 1.0, 1.0)),
        _measured("horovod", 2, launches=(1.0, 1.2, 1.4), probe=probe),  # a collective: not
        _measured("horovod", 2, "fp16", launches=(1.0, 1.1, 1.2), probe=probe),
    ]


def _projection_args(**kw):
    import argparse

    base = dict(bandwidth_gbps=100.0, latency_us=1.0, workers_per_node=2, nodes=4)
    return argparse.Namespace(**{**base, "project_size": 1024, "compute_scale": 1.0, **kw})


def test_projection_pools_the_spread_of_every_collective_free_row_and_stores_the_band():
    from histoseg.scaling.measured import projection_from, spread_from_rows

    rows = _sweep_rows()
    text, projected = attach_projection(rows, _projection_args(command="python -m x"))
    spread = spread_from_rows(rows)
    assert spread.rows == 3 and spread.dof == 6  # the control's rows count (they used not to)
    assert "fp32 band" in text
    by_comp = {r["config"]["compression"]: r for r in projected}
    assert set(by_comp) == {"none", "fp16"}
    for row in projected:
        inputs, predicted = row["extra"]["inputs"], row["predicted"]
        assert inputs["straggler_cv"] == spread.cv and inputs["compute_s"] == 4 * 1.0
        assert predicted["efficiency_low"] < predicted["efficiency"] < predicted["efficiency_high"]
        curve = row["extra"]["projection"]
        assert [p["workers"] for p in curve] == [1, 2, 4, 8]
        assert curve[-1] == {"workers": 8, **{k: predicted[k] for k in curve[-1] if k != "workers"}}
        assert all(p["efficiency_low"] <= p["efficiency"] <= p["efficiency_high"] for p in curve)
        assert row["extra"]["command"] == "python -m x"
    # the same figures python -m histoseg.scaling --results prints for these rows
    _, tables = projection_from(rows, patch_size=1024, max_workers=8)
    assert by_comp["none"]["predicted"]["efficiency"] == tables["fp32"][-1]["efficiency"]
    # each engine row's own curve carries the band; the control's rows get none
    for row in rows:
        curve = row.get("extra", {}).get("projection")
        if row["config"]["engine"] == "horovod" and row["config"]["workers"] == 2:
            assert "efficiency_low" in curve[-1] and curve[-1]["workers"] == 8
        else:
            assert curve is None
    # a spread from rows beyond the sweep's (the results file's) when given
    wider = [*rows, _measured("tf", 1, launches=(0.5, 1.0, 1.5))]
    _, projected = attach_projection(rows, _projection_args(), spread_rows=wider)
    assert projected[0]["extra"]["inputs"]["straggler_cv"] == spread_from_rows(wider).cv
    assert "@8" in summary_table(rows) and "-" in summary_table(rows).splitlines()[-1][-20:]


def test_reproject_rewrites_the_projection_rows_without_measuring(tmp_path, capsys):
    from histoseg.results import load_rows, write_rows

    out = tmp_path / "scaling.json"
    legacy = make_row(
        "scaling",
        {
            "patch_size": 2048,
            "backbone": "mobilenetv2",
            "engine": "projection",
            "workers": 512,
            "nodes": 256,
            "compression": "none",
            "bandwidth_gbps": 100.0,
            "workers_per_node": 2,
        },
        predicted={"efficiency": 0.999},
        machine={},
    )
    measured = _sweep_rows()
    write_rows(out, [legacy, *measured])
    assert main(["--reproject", "--out", str(out)]) == 0
    rows = load_rows(out)
    assert len(rows) == 1 + len(measured) + 1  # the fp32 row replaced in place, fp16 added
    assert rows[0]["predicted"]["efficiency"] < 0.99 and "efficiency_low" in rows[0]["predicted"]
    assert rows[0]["extra"]["command"] == f"python -m bench.scaling --reproject --out {out}"
    assert rows[-1]["config"]["compression"] == "fp16"
    for before, after in zip(measured, rows[1:-1], strict=True):  # measured figures untouched
        assert after["measured"] == before["measured"]
    assert "predicted.efficiency_high" in out.with_suffix(".csv").read_text().splitlines()[0]
    printed = capsys.readouterr().out
    assert "projection row(s) rewritten" in printed and "fp32 band" in printed
    with pytest.raises(ConfigError):
        main(["--reproject", "--out", str(tmp_path / "missing.json")])


def test_a_launch_keeps_every_rank_step():
    records = [_record(1, [1.0, 1.3, 1.1]), _record(0, [0.9, 1.0, 1.2])]
    m = summarise(records, batch_size=1, patch_size=64)
    assert m["per_rank_steps_s"] == [[0.9, 1.0, 1.2], [1.0, 1.3, 1.1]]  # by rank, in order
    assert m["per_rank_step_s"] == [1.0, 1.1]


def _horovodrun_missing() -> bool:
    from histoseg.errors import EngineUnavailableError
    from histoseg.train.launch import horovodrun_path

    try:
        horovodrun_path()
    except EngineUnavailableError:
        return True
    return False


# ~95 s here (two launches, each step traced twice, and the projection's trace): CI runs
# its parts below; --runslow runs it whole.
@pytest.mark.slow
@pytest.mark.skipif(_horovodrun_missing(), reason="horovodrun (Horovod) not installed")
def test_a_patch_cut_across_ranks_reports_its_halo_exchange_and_a_cluster_projection(
    tmp_path, capsys
):
    """``--spatial-workers 2``: the 1-rank step and 2 ranks under horovodrun, each timed
    with and without the halo exchange; the exchange's collectives come from the trace;
    the spatial projection row's curve has whole groups only."""
    out = tmp_path / "spatial.json"
    argv = ["--spatial-workers", "2", "--sizes", "64", "--backbone", "mobilenetv2"]
    argv += ["--alpha", "0.35", "--steps", "1", "--warmup", "1", "--threads-per-worker", "1"]
    argv += ["--max-other-cpu", "99", "--retries", "0", "--out", str(out)]
    argv += ["--project-spatial-size", "128", "--project-spatial-workers", "4", "--nodes", "4"]
    assert main(argv) == 0
    rows = json.loads(out.read_text())
    measured = {r["config"]["workers"]: r for r in rows if r["config"]["engine"] == "spatial"}
    assert sorted(measured) == [1, 2]
    one, two = measured[1]["measured"], measured[2]["measured"]
    assert measured[2]["status"] == "ok" and measured[2]["config"]["spatial_workers"] == 2
    assert one["halo_collectives"] == 0 and one["halo_s"] == 0.0
    assert two["halo_collectives"] > 50 and two["halo_gather_bytes"] > 0
    assert two["halo_s"] == max(0.0, two["step_s"] - two["compute_s"])
    assert two["patches_per_s"] == pytest.approx(1 / two["step_s"])  # one patch per step
    assert measured[2]["scaling"]["efficiency"] > 0
    (projection,) = [r for r in rows if r["config"]["engine"] == "projection"]
    assert projection["config"]["spatial_workers"] == 4
    assert [p["workers"] for p in projection["extra"]["projection"]] == [4, 8]
    assert projection["extra"]["inputs"]["halo_collectives"] > 50
    printed = capsys.readouterr().out
    assert "halo" in printed and "spatial projection: 128 px over 4 ranks" in printed


def test_a_spatial_launch_reports_the_exposed_halo_exchange_of_its_slowest_rank():
    from bench.scaling_worker import summarise_spatial

    def record(rank, steps, local, gather):
        return {
            "rank": rank,
            "step_s": steps,
            "local_step_s": local,
            "gradient_bytes": 400,
            "parameters": 100,
            "halo_collectives": 300,
            "halo_gather_bytes": gather,
            "halo_sum_bytes": 2 * gather,
        }

    records = [
        record(0, [2.0, 2.2, 2.1], [0.6, 0.7, 0.65], 10),
        record(1, [2.1] * 3, [0.7] * 3, 20),
    ]
    m = summarise_spatial(records, batch_size=1, patch_size=512)
    assert m["step_s"] == 2.1 and m["compute_s"] == 0.7
    assert m["halo_s"] == pytest.approx(1.4) == m["halo_exposed_s"]
    assert m["halo_share"] == pytest.approx(1.4 / 2.1)
    assert m["patches_per_s"] == pytest.approx(1 / 2.1)  # the ranks share the patch
    assert (m["halo_gather_bytes"], m["halo_sum_bytes"]) == (20, 40)  # the most loaded rank
    assert m["halo_timing"].startswith("exposed")
    # one rank: no exchange to leave out, nothing exposed
    alone = summarise_spatial([record(0, [1.0], [], 0)], batch_size=1, patch_size=512)
    assert alone["halo_s"] == 0.0 and alone["compute_s"] == 1.0


def test_a_spatial_sweep_refuses_a_projection_it_could_not_make_before_any_launch(tmp_path):
    out = tmp_path / "s.json"
    with pytest.raises(ConfigError, match="--project-spatial-size 1000 must be a multiple"):
        main(["--spatial-workers", "2", "--project-spatial-size", "1000", "--out", str(out)])
    with pytest.raises(ConfigError, match="multiple of spatial_workers x output stride"):
        main(["--spatial-workers", "2", "--sizes", "48", "--out", str(out)])
    assert not out.exists()
