"""bench.scaling: end to end with real worker processes on tiny patches (the no-communication
control, so the test needs neither Horovod nor free ports), and how a launch's figures are
summarised in each step mode."""

from __future__ import annotations

import json

import pytest

from bench.scaling import kept_rows, main, markdown_table, summarise
from histoseg.results import make_row


def test_weak_scaling_rows_with_repeats_pinning_and_efficiency(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    argv = ["--workers", "1", "2", "--sizes", "64", "--engine", "none", "--backbone"]
    argv += ["mobilenetv2", "--alpha", "0.35", "--steps", "1", "--warmup", "1"]
    argv += ["--repeats", "2", "--threads-per-worker", "1", "--out", str(out)]
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
        assert len(launches) == 2 and launches == sorted(launches)
        assert row["measured"]["step_s"] == launches[0]  # the median of two is the lower
        others = row["extra"]["launches_other_cpu_cores"]
        assert len(others) == 2 and all(c >= 0 for c in others)
        assert row["extra"]["discarded_launches"] == []
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
    # one worker: no collective, all of the step is compute
    m = summarise([_record(0, [0.5, 0.7, 0.6])], batch_size=1, patch_size=64)
    assert (m["compute_s"], m["allreduce_s"], m["allreduce_exposed_s"]) == (0.6, 0.0, 0.0)


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
            measured={"step_s": 1.0, "allreduce_share": share},
            scaling={"efficiency": efficiency},
            extra={"launches_other_cpu_cores": [0.01, 0.03]},
        )

    rows = [row("horovod", 2, "none", 0.9, 0.01), row("horovod", 2, "fp16", 0.92, 0.02)]
    rows += [row("none", 2, "none", 0.95), row("none", 1, "none", 1.0)]
    lines = markdown_table(rows).splitlines()
    assert len(lines) == 4 and lines[2].startswith("| none | overlap | 512 | 95.0% |")
    assert "| 90.0% / 92.0% | 94.7% / 96.8% | 1.0% / 2.0% |" in lines[3]
    assert lines[3].endswith("| 0.03 / 0.03 |")
