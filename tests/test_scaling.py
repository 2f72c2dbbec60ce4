"""The ring-allreduce projection model: formula, calibration, stragglers, published checks, CLI."""

from __future__ import annotations

import math

import pytest

from histoseg.errors import ConfigError
from histoseg.results import make_row
from histoseg.scaling import __main__ as scaling_cli
from histoseg.scaling import measured, stragglers
from histoseg.scaling import model as scaling


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
    got = measured.compute_s_from_rows(rows, 2048)
    assert got["compute_s"] == pytest.approx(16.0)
    assert got["gradient_bytes"] == 8e6
    assert measured.compute_s_from_rows(rows, 512)["how"] == "measured"
    assert measured.calibration_points_from_rows(rows) == [(8e6, 2, 0.1)]
    inputs, tables = measured.projection_from(rows, patch_size=2048, max_workers=512)
    assert inputs["compute_s"] == pytest.approx(16.0)
    assert set(tables) == {"fp32", "fp16"}
    assert tables["fp32"][-1]["workers"] == 512
    with pytest.raises(ConfigError):
        measured.compute_s_from_rows([_row(2, 512, 1.0, 0.1)], 512)


def test_cli_prints_inputs_beside_outputs(capsys):
    assert (
        scaling_cli.main(
            ["--compute-s", "20", "--gradient-bytes", "1.6e8", "--overhead-s", "0.002"]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "bandwidth_gbps" in out and "compute_s" in out and "fp16 eff" in out
    assert "512" in out.splitlines()[-1]


# ----------------------------------------------------------------------------- stragglers
def test_expected_max_of_normals_matches_the_order_statistic():
    assert stragglers.expected_max_normal(1) == 0.0
    assert stragglers.expected_max_normal(2) == pytest.approx(1 / math.sqrt(math.pi), rel=1e-7)
    # tabulated E[max of N standard normals]
    for n, value in ((10, 1.538753), (100, 2.507594), (1000, 3.241436)):
        assert stragglers.expected_max_normal(n) == pytest.approx(value, abs=2e-6)
    # sqrt(2 ln N) is only the leading term of its growth, and overstates it
    for n in (512, 27360):
        assert stragglers.expected_max_normal(n) < math.sqrt(2 * math.log(n))
    with pytest.raises(ConfigError):
        stragglers.expected_max_normal(0)


def test_the_slowest_worker_sets_the_step_and_the_spread_makes_a_band():
    spread = stragglers.Spread(0.02, 0.01, 0.03, "test")
    rows = scaling.project(10.0, 1e3, [1, 2, 512], overhead_s=0.0, spread=spread)
    assert rows[0]["efficiency"] == 1.0 and rows[0]["straggler_s"] == 0.0
    e512 = stragglers.expected_max_normal(512)
    # a tiny model: the allreduce is negligible, the slowest of 512 workers is not
    assert rows[-1]["efficiency"] == pytest.approx(1 / (1 + 0.02 * e512), rel=1e-4)
    assert rows[-1]["efficiency_low"] == pytest.approx(1 / (1 + 0.03 * e512), rel=1e-4)
    assert rows[-1]["efficiency_high"] == pytest.approx(1 / (1 + 0.01 * e512), rel=1e-4)
    effs = [r["efficiency"] for r in rows]
    assert effs == sorted(effs, reverse=True)
    # without a spread the model is the ring model alone
    plain = scaling.project(10.0, 1e3, [512], overhead_s=0.0)[0]
    assert plain["straggler_s"] == 0.0 and "efficiency_low" not in plain


def test_an_overlap_window_hides_only_what_fits_beside_the_compute():
    net = scaling.Network(bandwidth_gbps=8.0, latency_s=0.0)  # 1 GB/s
    # 2 workers: 1 GB on the wire = 1 s of allreduce beside a 1.5 s step
    hidden = scaling.project(1.5, 1e9, [2], network=net, overlap_window=1.0)[0]
    assert hidden["exposed_allreduce_s"] == 0.0 and hidden["efficiency"] == 1.0
    part = scaling.project(1.5, 1e9, [2], network=net, overlap_window=0.5)[0]
    assert part["exposed_allreduce_s"] == pytest.approx(0.25)
    with pytest.raises(ConfigError):
        scaling.project(1.5, 1e9, [2], network=net, overlap_window=1.5)


def test_compute_needed_for_90pct_counts_the_stragglers():
    need = scaling.compute_s_for_efficiency(0.9, 1.6e8, 512, overhead_s=0.002, cv=0.02)
    spread = stragglers.Spread.given(0.02)
    row = scaling.project(need, 1.6e8, [512], overhead_s=0.002, spread=spread)[0]
    assert row["efficiency"] == pytest.approx(0.9)
    # a spread that alone costs more than 10% at 512 workers: no compute time is enough
    assert scaling.compute_s_for_efficiency(0.9, 1.6e8, 512, cv=0.05) == math.inf


def _launched(engine, workers, launches):
    config = {"engine": engine, "workers": workers, "patch_size": 512}
    return make_row(
        "scaling",
        config,
        measured={"step_s": launches[0]},
        extra={"launches_step_s": list(launches)},
        machine={},
    )


def test_spread_is_pooled_from_rows_without_a_collective():
    rows = [
        _launched("tf", 1, (0.9, 1.0, 1.1)),  # relative deviations -0.1, 0, 0.1
        _launched("none", 2, (1.9, 2.1)),  # -0.05, 0.05
        _launched("horovod", 2, (5.0, 9.0, 1.0)),  # has a collective: not a compute spread
        _launched("tf", 1, (1.0,)),  # a single launch has no spread
    ]
    spread = measured.spread_from_rows(rows)
    assert spread.rows == 2 and spread.dof == 3
    assert spread.cv == pytest.approx(math.sqrt((0.01 + 0.01 + 0.0025 + 0.0025) / 3))
    assert spread.low < spread.cv < spread.high
    assert measured.spread_from_rows(rows[2:]) is None
    inputs, tables = measured.projection_from(
        rows, patch_size=512, compute_s=1.0, gradient_bytes=4e6, max_workers=8
    )
    assert inputs["straggler_cv"] == spread.cv
    assert tables["fp32"][-1]["efficiency_low"] < tables["fp32"][-1]["efficiency_high"]
    assert "efficiency_band_at_8_fp32" in inputs


#: The launches (each the median of 8 steps) of the committed results/scaling.json rows
#: without a collective (commits 12d3db4 and ef53f73, MobileNetV2 on this 2-core VM): the
#: spread the published checks are fed, fixed here so the check does not move with new rows.
MEASURED_LAUNCHES = (
    ("none", 1, (0.7116, 0.7297, 0.7326)),
    ("none", 2, (0.7704, 0.7826, 0.7838)),
    ("none", 1, (3.1292, 3.1844, 3.1931)),
    ("none", 2, (3.1910, 3.2005, 3.2420)),
    ("horovod", 1, (0.7469, 0.7555, 0.8028)),
    ("horovod", 1, (3.2399, 3.2525, 3.3123)),
    ("tf", 1, (0.7087, 0.7233, 0.7315)),
    ("tf", 1, (3.1248, 3.2389, 3.2412)),
    ("none", 1, (0.7120, 0.7494, 0.7553)),
    ("none", 2, (0.7895, 0.8335, 0.8350)),
    ("horovod", 1, (0.7609, 0.7666, 0.7723)),
    ("tf", 1, (0.7230, 0.7379, 0.7473)),
)


def _measured_spread():
    return measured.spread_from_rows([_launched(*row) for row in MEASURED_LAUNCHES])


def test_projection_lands_within_5_points_of_the_published_large_runs():
    spread = _measured_spread()
    assert spread.cv == pytest.approx(0.0209, abs=5e-4) and spread.dof == 24
    checks = {c["run"].name: c for c in scaling.published_checks(spread)}
    horovod = checks["Horovod, ResNet-101, 512 GPUs"]
    kurth = checks["Kurth et al., DeepLabv3+, 27,360 GPUs"]
    for check in (horovod, kurth):
        assert check["run"].checked
        assert abs(check["off_points"]) <= 5.0, check
        # both runs hide their allreduce: what the model charges them is the slowest worker
        assert check["projection"]["exposed_allreduce_s"] == 0.0
    assert horovod["projection"]["efficiency"] == pytest.approx(0.940, abs=0.002)
    assert kurth["projection"]["efficiency"] == pytest.approx(0.921, abs=0.002)
    # Kurth et al.'s band holds the published 90.7%; Horovod's lies above its 90%
    assert kurth["projection"]["efficiency_low"] <= 0.907 <= kurth["projection"]["efficiency_high"]
    assert horovod["projection"]["efficiency_low"] > 0.90


def test_published_checks_do_not_hang_on_the_assumed_step_time():
    spread = _measured_spread()
    kurth = next(r for r in stragglers.PUBLISHED if r.workers == 27360)
    network = scaling.Network(kurth.bandwidth_gbps, kurth.latency_s, kurth.workers_per_node)
    effs = {
        scaling.project(
            step_s,
            4 * kurth.parameters,
            [kurth.workers],
            network=network,
            overlap_window=kurth.overlap_window,
            spread=spread,
        )[0]["efficiency"]
        for step_s in (0.1, 1.3, 5.0)
    }
    assert max(effs) - min(effs) < 1e-12


def test_a_known_miss_is_shown_not_hidden():
    checks = scaling.published_checks(_measured_spread())
    vgg = next(c for c in checks if not c["run"].checked)
    # VGG-16's 553 MB of gradients: the model, at line rate, is far more optimistic than 68%
    assert vgg["off_points"] > 10


def test_cli_prints_the_band_and_the_published_checks(capsys):
    args = ["--compute-s", "20", "--gradient-bytes", "1.6e8", "--overhead-s", "0.002"]
    assert scaling_cli.main([*args, "--cv", "0.02", "0.015", "0.03"]) == 0
    out = capsys.readouterr().out
    assert "fp32 band" in out and "straggler_cv_low" in out
    assert "-" in out.splitlines()[-1].split()[-1]  # the band at 512 workers
    assert scaling_cli.main(["--published", "--cv", "0.02"]) == 0
    out = capsys.readouterr().out
    assert "published 90.0%" in out and "published 90.7%" in out and "assumed:" in out
    with pytest.raises(ConfigError):
        scaling_cli.main(["--published"])
    with pytest.raises(ConfigError):
        scaling_cli.main([*args, "--cv", "0.02", "0.01"])


def test_weak_scaling_plot_shades_the_study_band_with_its_calibration():
    from bench.plots.scaling import straggler_band

    inputs = {
        "compute_s": 11.5,
        "gradient_bytes_fp32": 1.09e7,
        "overhead_s": 0.009,
        "bandwidth_gbps": 100.0,
        "latency_s": 1e-6,
        "workers_per_node": 2,
    }
    projection = make_row(
        "scaling",
        {"engine": "projection", "workers": 512, "patch_size": 2048, "compression": "none"},
        predicted={"efficiency": 0.999},
        extra={"inputs": inputs},
        machine={},
    )
    measured = [_launched(*row) for row in MEASURED_LAUNCHES]
    band, lines = straggler_band([projection], measured, measured)
    label, points = band
    assert "2048 px" in label and points[-1][0] == 512
    _, low, central, high = points[-1]
    assert low < central < high < 0.999  # the stored row's 99.9% had no stragglers
    assert central == pytest.approx(0.939, abs=0.002)
    caption = " ".join(lines)
    assert "256 nodes x 2" in caption and "cv 2.09%" in caption and "90.7% published" in caption
    band, lines = straggler_band([projection], measured, [])
    assert band is None and "no straggler band" in lines[0]


def test_curve_points_keep_the_band_where_the_table_has_one():
    spread = stragglers.Spread(0.02, 0.01, 0.03, "test")
    banded = scaling.curve_points(scaling.project(1.0, 4e6, [1, 8], spread=spread))
    assert set(banded[-1]) == {"workers", "efficiency", "efficiency_low", "efficiency_high"}
    plain = scaling.curve_points(scaling.project(1.0, 4e6, [1, 8]))
    assert set(plain[-1]) == {"workers", "efficiency"}


def test_weak_scaling_plot_shades_the_band_a_projection_row_stores(tmp_path):
    from bench.plots.scaling import draw_weak_scaling, projection_curves, straggler_band

    inputs = {
        "compute_s": 12.0,
        "gradient_bytes_fp32": 1.09e7,
        "overhead_s": 0.009,
        "bandwidth_gbps": 100.0,
        "latency_s": 1e-6,
        "workers_per_node": 2,
        **_measured_spread().as_inputs(),
    }
    curve = [
        {"workers": w, "efficiency_low": lo, "efficiency": c, "efficiency_high": hi}
        for w, lo, c, hi in ((1, 1.0, 1.0, 1.0), (2, 0.97, 0.98, 0.99), (512, 0.90, 0.93, 0.95))
    ]

    def row(compression):
        return make_row(
            "scaling",
            {
                "engine": "projection",
                "workers": 512,
                "nodes": 256,
                "patch_size": 2048,
                "compression": compression,
                "workers_per_node": 2,
            },
            predicted={"efficiency": 0.93, "efficiency_low": 0.90, "efficiency_high": 0.95},
            extra={"inputs": inputs, "projection": curve},
            machine={},
        )

    fp32, fp16 = row("none"), row("fp16")
    band, lines = straggler_band([fp32, fp16], [], [])
    assert band[1] == [(1, 1.0, 1.0, 1.0), (2, 0.97, 0.98, 0.99), (512, 0.90, 0.93, 0.95)]
    assert "90.0-95.0% at 512 workers (line: 93.0%)" in lines[0] and "256 nodes" in lines[0]
    # the shaded row is not drawn again dashed; the other is, without the legacy label
    curves, _ = projection_curves([fp32, fp16], [], {}, shaded=fp32)
    assert [label for label, _ in curves] == ["projection, 2048 px, fp16 allreduce"]
    assert draw_weak_scaling([fp32, fp16], tmp_path).drawn
    svg = (tmp_path / "weak_scaling.svg").read_text()
    assert "no stragglers" not in svg and "fp32 (band)" in svg


def test_the_spatial_projection_costs_the_halo_exchange_as_implemented():
    """Allgathers of every rank's boundary rows and allreduces of the stacked halo
    gradients, each collective paying the framework's overhead and a ring's latency; only
    rank counts that are whole groups; a band from the spread."""
    from histoseg.scaling.model import Network
    from histoseg.scaling.spatial import halo_exchange_s, project_spatial
    from histoseg.scaling.stragglers import Spread

    network = Network(100.0, 1e-6, 2)
    traffic = {"collectives": 100, "gather_bytes": 1e6, "sum_bytes": 2e6}
    wire = 7 * 1e6 + 2 * 7 / 8 * 2e6
    expected = 100 * (1e-3 + 7 * 1e-6) + wire / 12.5e9
    assert halo_exchange_s(traffic, 8, network, 1e-3) == pytest.approx(expected)
    assert halo_exchange_s(traffic, 1, network, 1e-3) == 0.0
    spread = Spread(0.02, 0.015, 0.03, "given")
    table = project_spatial(
        10.0, traffic, 4e6, 8, [1, 4, 8, 12, 16, 512], network=network, overhead_s=1e-3,
        spread=spread,
    )  # fmt: skip
    assert [t["workers"] for t in table] == [8, 16, 512]
    assert [t["groups"] for t in table] == [1, 2, 64]
    for t in table:
        assert t["halo_s"] == pytest.approx(expected)
        assert t["efficiency_low"] < t["efficiency"] < t["efficiency_high"] < 1.0
        assert t["patches_per_s"] == pytest.approx(t["groups"] / t["step_s"])
    assert table[0]["efficiency"] > table[-1]["efficiency"]  # stragglers and the allreduce


def test_partition_figures_come_from_the_spatial_rows():
    from histoseg.scaling.spatial import partition_figures

    def row(px, ranks, compute_s):
        config = {"engine": "spatial", "patch_size": px, "workers": ranks, "backbone": "b"}
        measured = {"compute_s": compute_s, "gradient_bytes": 8e6}
        return make_row("scaling", config, measured=measured, machine={})

    rows = [row(256, 1, 1.0), row(512, 1, 4.0), row(512, 2, 2.2), row(256, 2, 0.6)]
    figures = partition_figures(rows)
    assert figures["compute_s_per_megapixel"] == pytest.approx(4.0 / 0.262144)
    assert figures["partition_overhead"] == pytest.approx(2 * 2.2 / 4.0)  # the largest patch
    assert figures["partition_measured_at"] == "512 px over 2 ranks"
    with pytest.raises(ConfigError, match="no multi-rank row of engine spatial"):
        partition_figures([row(512, 2, 2.2)])
    other = [row(1024, 1, 2.0), row(1024, 2, 1.5)]  # another model, at a larger patch
    for r in other:
        r["config"]["backbone"] = "c"
    mixed = partition_figures([*rows, *other])  # the largest patch's model, alone
    assert mixed["backbone"] == "c" and mixed["partition_overhead"] == pytest.approx(1.5)
    assert mixed["compute_s_per_megapixel"] == pytest.approx(2.0 / 1.048576)


def test_weak_scaling_plot_draws_the_spatial_projection_as_its_own_band(tmp_path):
    """A projection row with ``spatial_workers`` is the green band, not a dashed curve or
    the study's band; measured rows of engine spatial (strong scaling) are not points."""
    from bench.plots.scaling import draw_weak_scaling, spatial_band

    curve = [
        {"workers": w, "efficiency_low": lo, "efficiency": c, "efficiency_high": hi}
        for w, lo, c, hi in ((8, 0.97, 0.98, 0.99), (512, 0.85, 0.9, 0.93))
    ]
    inputs = {"compute_s": 20.0, "partition_overhead": 1.05, "halo_collectives": 308}
    projection = make_row(
        "scaling",
        {
            "engine": "projection",
            "patch_size": 8192,
            "spatial_workers": 8,
            "workers": 512,
            "compression": "none",
            "workers_per_node": 2,
        },
        predicted={"efficiency": 0.9},
        extra={"inputs": inputs, "projection": curve},
        machine={},
    )
    strong = make_row(
        "scaling",
        {"engine": "spatial", "patch_size": 512, "workers": 2, "compression": "none"},
        measured={"step_s": 1.0},
        scaling={"efficiency": 0.6, "throughput_per_worker": 0.5},
        machine={},
    )
    (label, points), lines = spatial_band([projection])
    assert label.startswith("spatial projection, 8192 px over 8 ranks per patch")
    assert points == [(8, 0.97, 0.98, 0.99), (512, 0.85, 0.9, 0.93)]
    assert "308 collectives" in lines[0] and "x 1.050 partition overhead" in lines[0]
    outcome = draw_weak_scaling([projection, strong], tmp_path)
    assert outcome.drawn
    svg = (tmp_path / "weak_scaling.svg").read_text()
    assert "8192 px over 8 ranks" in svg and "512 px (measured)" not in svg
