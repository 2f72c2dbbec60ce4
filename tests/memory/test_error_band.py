"""Never silently optimistic: every measured step in results/ fits its prediction's band.

The fit check and the largest-patch answers plan with the predicted peak plus
``PEAK_ERROR_BAND``; a committed measurement above that would be a config the harness
calls a fit that runs out of memory.
"""

from pathlib import Path

import pytest

from histoseg.memory.devices import PEAK_ERROR_BAND, planned_bytes
from histoseg.results import load_rows

RESULTS = Path(__file__).resolve().parents[2] / "results"


def _measured_steps():
    for path in sorted(RESULTS.rglob("*.json")):
        for row in load_rows(path):
            measured, predicted = row.get("measured") or {}, row.get("predicted") or {}
            if row.get("kind") == "memory" and row["status"] == "ok" and "peak_bytes" in predicted:
                yield (
                    path.relative_to(RESULTS),
                    row,
                    measured["peak_bytes"],
                    predicted["peak_bytes"],
                )


def test_results_hold_measured_steps():
    assert sum(1 for _ in _measured_steps()) >= 40


@pytest.mark.parametrize("path", sorted({str(p) for p, *_ in _measured_steps()}))
def test_no_measured_step_peak_exceeds_its_planned_bytes(path):
    misses = []
    for where, row, measured, predicted in _measured_steps():
        if str(where) == path and measured > planned_bytes(predicted):
            c = row["config"]
            misses.append(
                f"{c['patch_size']} px b{c['batch_size']} {c['backbone']} {c['precision']} "
                f"{c['remat']} {c.get('optimizer')}: measured {measured:,} B, predicted "
                f"{predicted:,} B ({(predicted - measured) / measured:+.1%})"
            )
    assert not misses, f"under-predicted by more than {PEAK_ERROR_BAND:.0%}:\n" + "\n".join(misses)


def test_a_patch_cut_across_ranks_must_fit_every_rank_on_this_machine():
    """bench.memory runs all N ranks of a spatial config here: the fit check counts N."""
    from histoseg.memory.devices import available_bytes, fit_problem

    free = available_bytes("cpu")
    peak = int(free * 0.3)
    assert fit_problem(peak, "cpu") is None
    reason = fit_problem(peak, "cpu", processes=4)
    assert reason is not None and reason.startswith("4 ranks x predicted")
