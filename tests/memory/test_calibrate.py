"""The measured route: an affine fit in patch area, and the sweep that feeds it."""

import pytest

from histoseg.errors import ConfigError
from histoseg.memory.calibrate import calibrated_prediction, fit_area


def test_an_affine_figure_is_recovered_exactly_and_extrapolated():
    def figure(p):
        return 500_000_000 + 3_000 * p * p

    fit = fit_area([(p, figure(p)) for p in (256, 384, 512)])
    assert fit.max_residual < 1e-9
    assert fit.at(2048) == figure(2048)


def test_residuals_show_a_departure_from_affine():
    points = [(256, 100), (384, 300), (512, 200)]
    assert fit_area(points).max_residual > 0.1


def test_one_size_is_refused():
    with pytest.raises(ConfigError, match="two or more patch sizes"):
        fit_area([(256, 1), (256, 2)])


def test_the_prediction_names_its_route_and_sizes():
    measured = {
        p: {"activation_bytes": 2_000 * p * p, "peak_bytes": 10**8 + 3_000 * p * p}
        for p in (256, 512)
    }
    predicted = calibrated_prediction(measured, 1024)
    assert predicted["method"] == "calibrated"
    assert predicted["calibration_sizes_px"] == [256, 512]
    assert predicted["activation_bytes"] == 2_000 * 1024**2
    assert predicted["peak_bytes"] == 10**8 + 3_000 * 1024**2


def test_with_phase_peaks_the_step_peak_is_the_largest_phase_extrapolated():
    """At small patches the update's fixed bytes top a backward pass that grows faster; a
    fit of the step peaks mixes the two, each phase fitted on its own does not."""

    def phases(p):
        return {
            "forward": 10**8 + 1_000 * p * p,
            "backward": 2 * 10**8 + 3_000 * p * p,
            "update": 10**9,
        }

    measured = {}
    for p in (256, 384, 512):
        peaks = phases(p)
        measured[p] = {
            "activation_bytes": 1_000 * p * p,
            "peak_bytes": max(peaks.values()),
            "phase_peak_bytes": peaks,
        }
    predicted = calibrated_prediction(measured, 2048)
    assert predicted["peak_phase"] == "backward"
    assert predicted["peak_bytes"] == phases(2048)["backward"]
    assert predicted["phase_peak_bytes"]["update"] == 10**9
    without = {
        p: {k: v for k, v in m.items() if k != "phase_peak_bytes"} for p, m in measured.items()
    }
    assert calibrated_prediction(without, 2048)["peak_bytes"] < 0.8 * phases(2048)["backward"]


def test_a_traced_step_is_cut_into_its_phases_at_its_reads():
    from bench.worker import phase_peaks

    totals = [5, 9, 7, 12, 8, 6, 10, 4]  # reads at events 0 (before), 2 (forward), 5 (gradients)
    assert phase_peaks(totals, 0, 2, 5) == {"forward": 9, "backward": 12, "update": 10}


@pytest.mark.slow
def test_calibrate_measures_small_patches_and_extrapolates(tmp_path):
    """A real sweep: the 64 and 96 px points are measured (rows of their own), the 160 px
    target is predicted from them, the analytic estimate kept beside it. Slow (two worker
    processes, about 35 s): the default run tests the fit on rows above and the worker in
    tests/memory/test_memory_cli.py."""
    from bench.memory import main
    from histoseg.results import load_rows

    out = tmp_path / "cal.json"
    argv = ["--backbone", "mobilenetv2", "--backbone-option", "alpha=0.35", "--steps", "1"]
    argv += ["--sizes", "160", "--calibrate", "64", "96", "--predict-only", "--quiet"]
    assert main([*argv, "--out", str(out)]) == 0
    rows = {r["config"]["patch_size"]: r for r in load_rows(out)}
    assert rows[64]["status"] == rows[96]["status"] == "ok"
    target = rows[160]
    assert target["status"] == "skipped"
    assert target["predicted"]["method"] == "calibrated"
    assert target["predicted"]["calibration_sizes_px"] == [64, 96]
    assert target["extra"]["analytic"]["method"] == "analytic"
    slope = (rows[96]["measured"]["peak_bytes"] - rows[64]["measured"]["peak_bytes"]) / (
        96**2 - 64**2
    )
    expected = rows[64]["measured"]["peak_bytes"] + slope * (160**2 - 64**2)
    assert target["predicted"]["peak_bytes"] == pytest.approx(expected, rel=1e-6)


def _slab_bytes(p, n):
    from histoseg.memory.calibrate import halo_sides

    return 200_000_000 + 6_000 * p * p // n + 90_000 * halo_sides(n) * p


def test_the_slab_law_is_recovered_across_rank_counts_and_extrapolated():
    from histoseg.memory.calibrate import fit_slabs

    points = [(p, n, _slab_bytes(p, n)) for n in (2, 4) for p in (128, 256, 384)]
    fit = fit_slabs(points)
    assert fit.max_residual < 1e-9
    assert fit.fitted_workers == (2, 4) and fit.fitted_sizes_px == (256, 384)  # the largest two
    assert fit.at(8192, 8) == pytest.approx(_slab_bytes(8192, 8), rel=1e-9)
    with pytest.raises(ConfigError, match="two or more rank counts"):
        fit_slabs([p for p in points if p[1] == 2])


def test_the_largest_patch_per_rank_comes_from_the_measured_rows_of_its_config():
    from bench.memory_table import largest_patches
    from histoseg.config import StepConfig
    from histoseg.memory.devices import planned_bytes
    from histoseg.results import make_row

    base = StepConfig(backbone="mobilenetv2", patch_size=128, steps=1)
    held = 100_000_000  # weights, optimizer state, Horovod's buffer: beyond activations
    rows = [
        make_row(
            "memory",
            base.replace(patch_size=p, spatial_workers=n).as_dict(),
            measured={
                "activation_bytes": _slab_bytes(p, n),
                "peak_bytes": _slab_bytes(p, n) + held,
            },
        )
        for n in (2, 4)
        for p in (128, 256, 384)
    ]
    budget = 24 * 10**9
    ((_, best, peak),) = largest_patches([base.replace(spatial_workers=8)], budget, rows)
    assert best % 128 == 0 and peak == _slab_bytes(best, 8) + held
    assert planned_bytes(peak) <= budget < planned_bytes(_slab_bytes(best + 128, 8) + held)
    # another model's rows say nothing about this one
    other = base.replace(backbone="xception65", spatial_workers=8)
    assert largest_patches([other], budget, rows) == [(other, None, None)]


def test_a_sweep_predicts_more_ranks_from_the_rows_it_holds(tmp_path):
    """``--predict-only`` at 8 ranks, with rows at 2 and 4 ranks in ``--out``: the row is
    predicted by the slab law (no rank is started), never fitted on itself."""
    from bench.memory import main
    from histoseg.config import StepConfig
    from histoseg.results import load_rows, make_row, write_rows

    base = StepConfig(backbone="mobilenetv2", patch_size=128, steps=1)
    out = tmp_path / "slabs.json"
    measured = [
        make_row(
            "memory",
            base.replace(patch_size=p, spatial_workers=n).as_dict(),
            measured={
                "peak_bytes": _slab_bytes(p, n) + 1000,
                "activation_bytes": _slab_bytes(p, n),
            },
        )
        for n in (2, 4)
        for p in (128, 256, 384)
    ]
    write_rows(out, measured)
    argv = ["--backbone", "mobilenetv2", "--sizes", "1024", "--spatial-workers", "8"]
    assert main([*argv, "--predict-only", "--quiet", "--out", str(out)]) == 0
    (row,) = [r for r in load_rows(out) if r["config"]["spatial_workers"] == 8]
    assert row["status"] == "skipped"
    assert row["predicted"]["method"] == "slab_law"
    assert row["predicted"]["fitted_workers"] == [2, 4]
    assert row["predicted"]["activation_bytes"] == pytest.approx(_slab_bytes(1024, 8), rel=1e-9)
    assert row["predicted"]["peak_bytes"] == row["predicted"]["activation_bytes"] + 1000


def test_with_recomputation_the_slab_peak_is_fitted_not_activations_plus_a_constant():
    """A recomputed block's tensors, at the peak in the backward pass, grow with the slab:
    the peak has a slab law of its own; without recomputation what is beyond the
    activations is held constant."""
    from histoseg.memory.calibrate import peak_from_activations, slab_law_prediction

    def peak(p, n):  # block inputs kept, plus one block recomputed: 3x the slab
        return 4 * _slab_bytes(p, n) - 300_000_000

    rows = [
        (p, n, {"activation_bytes": _slab_bytes(p, n), "peak_bytes": peak(p, n)})
        for n in (2, 4)
        for p in (256, 384)
    ]
    assert not peak_from_activations(8, "full") and peak_from_activations(8, "none")
    assert not peak_from_activations(1, "none")  # a whole step's peak is fitted as well
    fitted = slab_law_prediction(rows, 4096, 8, peak_from_activations=False)
    assert fitted["peak_bytes"] == pytest.approx(peak(4096, 8), rel=1e-9)
    held = slab_law_prediction(rows, 4096, 8)
    assert held["peak_bytes"] == _slab_bytes(4096, 8) + peak(384, 2) - _slab_bytes(384, 2)


def test_with_recomputation_the_measured_routes_predict_upwards_only():
    from bench.memory import extrapolates
    from histoseg.config import StepConfig

    assert extrapolates(StepConfig(patch_size=256), (384, 512))  # plain backprop: both ways
    assert not extrapolates(StepConfig(patch_size=256, remat="full"), (384, 512))
    assert extrapolates(StepConfig(patch_size=384, remat="full"), (384, 512))
    assert extrapolates(StepConfig(patch_size=4096, remat="blocks"), (768, 1024))
