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
