"""The ring-allreduce projection model: formula, calibration, rows, CLI."""

from __future__ import annotations

import pytest

from histoseg import scaling
from histoseg.errors import ConfigError
from histoseg.results import make_row


def test_ring_allreduce_formula():
    net = scaling.Network(bandwidth_gbps=80.0, latency_s=2e-6, workers_per_node=2)
    assert net.bytes_per_s == pytest.approx(10e9)
    assert scaling.ring_allreduce_s(1e9, 1, net) == 0.0
    # 4 workers: 2*3/4 of 1 GB at 10 GB/s = 0.15 s, plus 6 hops of 2 us, plus overhead
    t = scaling.ring_allreduce_s(1e9, 4, net, overhead_s=0.01)
    assert t == pytest.approx(0.01 + 6 * 2e-6 + 0.15)
    with pytest.raises(ConfigError):
        scaling.ring_allreduce_s(1e9, 0, net)


def test_fp16_halves_the_bytes_and_efficiency_falls_with_workers():
    fp32 = scaling.project(1.0, 4e8, [1, 2, 8, 64, 512], overhead_s=0.001)
    fp16 = scaling.project(1.0, 4e8, [1, 2, 8, 64, 512], overhead_s=0.001, fp16=True)
    assert fp32[0]["efficiency"] == 1.0
    assert [r["wire_bytes"] for r in fp16] == [2e8] * 5
    effs = [r["efficiency"] for r in fp32]
    assert effs == sorted(effs, reverse=True)
    assert all(h["efficiency"] > f["efficiency"] for h, f in zip(fp16[1:], fp32[1:], strict=True))
    assert fp32[-1]["nodes"] == 256


def test_compute_needed_for_an_efficiency_inverts_the_projection():
    need = scaling.compute_s_for_efficiency(0.9, 1.6e8, 512, overhead_s=0.002)
    row = scaling.project(need, 1.6e8, [512], overhead_s=0.002)[0]
    assert row["efficiency"] == pytest.approx(0.9)


def test_calibration_recovers_overhead_and_bandwidth():
    true_overhead, bw = 0.003, 2e9
    points = [(b, 2, true_overhead + b / bw) for b in (1e5, 1e6, 1e7, 4e7)]  # ring_bytes = b at N=2
    cal = scaling.calibrate(points)
    assert cal.overhead_s == pytest.approx(true_overhead, rel=1e-6)
    assert cal.local_bytes_per_s == pytest.approx(bw, rel=1e-6)
    assert cal.max_relative_error < 1e-9
    with pytest.raises(ConfigError):
        scaling.calibrate([(1e6, 1, 0.1)])


def _row(workers, size, step_s, allreduce_s, compression="none", probe=None):
    measured = {
        "step_s": step_s,
        "compute_s": step_s - allreduce_s,
        "allreduce_s": allreduce_s,
        "gradient_bytes": 8e6,
    }
    if probe:
        measured["allreduce_probe"] = probe
    config = {"patch_size": size, "backbone": "mobilenetv2", "workers": workers}
    config["compression"] = compression
    return make_row("scaling", config, measured=measured, machine={})


def test_projection_from_rows_scales_compute_by_pixels():
    rows = [_row(1, 512, 1.0, 0.0), _row(1, 1024, 4.0, 0.0), _row(2, 512, 1.1, 0.1)]
    got = scaling.compute_s_from_rows(rows, 2048)
    assert got["compute_s"] == pytest.approx(16.0)
    assert got["gradient_bytes"] == 8e6
    assert scaling.compute_s_from_rows(rows, 512)["how"] == "measured"
    assert scaling.calibration_points_from_rows(rows) == [(8e6, 2, 0.1)]
    inputs, tables = scaling.projection_from(rows, patch_size=2048, max_workers=512)
    assert inputs["compute_s"] == pytest.approx(16.0)
    assert set(tables) == {"fp32", "fp16"}
    assert tables["fp32"][-1]["workers"] == 512
    with pytest.raises(ConfigError):
        scaling.compute_s_from_rows([_row(2, 512, 1.0, 0.1)], 512)


def test_cli_prints_inputs_beside_outputs(capsys):
    assert (
        scaling.main(["--compute-s", "20", "--gradient-bytes", "1.6e8", "--overhead-s", "0.002"])
        == 0
    )
    out = capsys.readouterr().out
    assert "bandwidth_gbps" in out and "compute_s" in out and "fp16 eff" in out
    assert "512" in out.splitlines()[-1]
