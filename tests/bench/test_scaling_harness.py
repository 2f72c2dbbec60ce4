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

from bench.scaling import kept_rows, main, summarise
from bench.scaling_table import markdown_table
from bench.scaling_worker import thread_cpu_s
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
