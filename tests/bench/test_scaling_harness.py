"""bench.scaling end to end: real worker processes on tiny patches (the no-communication
control, so the test needs neither Horovod nor free ports)."""

from __future__ import annotations

import json

from bench.scaling import main


def test_weak_scaling_rows_with_repeats_pinning_and_efficiency(tmp_path, capsys):
    out = tmp_path / "scaling.json"
    argv = ["--workers", "1", "2", "--sizes", "64", "--engine", "none", "--backbone"]
    argv += ["mobilenetv2", "--alpha", "0.35", "--steps", "1", "--warmup", "1"]
    argv += ["--repeats", "2", "--threads-per-worker", "1", "--out", str(out)]
    assert main(argv) == 0
    rows = [r for r in json.loads(out.read_text()) if r["config"]["engine"] == "none"]
    assert sorted(r["config"]["workers"] for r in rows) == [1, 2]
    for row in rows:
        assert row["status"] == "ok"
        launches = row["extra"]["launches_step_s"]
        assert len(launches) == 2 and launches == sorted(launches)
        assert row["measured"]["step_s"] == launches[0]  # the median of two is the lower
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
