"""CI regression on memory per patch: re-measure the baseline configs, compare, fail on growth.

``results/baseline/memory_baseline.json`` holds measured rows for a few small configs, made
by ``python -m bench.memory --baseline``. Each is measured again here in a fresh
``bench.worker`` process (the baseline configs are float32, whose allocator figures repeat
closely from process to process, see docs/memory-harness.md; time is never asserted).
The test fails when activation or peak bytes per patch grew by more than 5%, and warns
when they shrank by more than 5%, so that the baseline is refreshed on purpose. A growth
seen in the first process is measured in two more, and the median of the three decides,
as the harness reports a config (``--repeats 3``): where the executor runs ops in another
order, one process's peak can land a chunk higher (+6.7% once for mobilenetv2 at 128 px,
whose peak is 25 MB), while a real growth shows in every process.

To see it bite, widen the model (test-only knob, read by bench.worker)::

    HISTOSEG_BENCH_WIDEN=1.25 .venv/bin/python -m pytest tests/test_memory_regression.py
"""

from __future__ import annotations

import statistics
import warnings
from pathlib import Path

import pytest

from bench.memory import (
    BASELINE_OUT,
    REGRESSION_METRICS,
    REGRESSION_TOLERANCE,
    compare_to_baseline,
    run_worker,
)
from histoseg.config import StepConfig
from histoseg.results import load_rows

BASELINE = Path(__file__).resolve().parent.parent / BASELINE_OUT


def _baseline_rows():
    if not BASELINE.exists():
        return []
    return [r for r in load_rows(BASELINE) if r["kind"] == "memory" and r["status"] == "ok"]


def _params():
    params = []
    for row in _baseline_rows():
        c = row["config"]
        name = f"{c['backbone']}-{c['patch_size']}px-{c['precision']}-remat_{c['remat']}"
        marks = [pytest.mark.slow] if c["backbone"] != "mobilenetv2" else []
        params.append(pytest.param(row, id=name, marks=marks))
    return params


def _table(comparison):
    return "\n".join(
        f"  {c['metric']}: baseline {c['baseline']:,.0f} B, now {c['current']:,.0f} B "
        f"({100 * c['change']:+.1f}%)"
        for c in comparison
    )


def test_baseline_exists_and_has_rows():
    assert _baseline_rows(), (
        f"no ok rows in {BASELINE}; make it with python -m bench.memory --baseline"
    )


@pytest.mark.parametrize("baseline", _params())
def test_memory_per_patch_has_not_grown(baseline):
    config = StepConfig.from_dict(baseline["config"]).replace(steps=1)
    fresh = run_worker(config, timeout_s=240)
    assert fresh["status"] == "ok", f"worker failed: {fresh.get('reason')}"
    comparison = compare_to_baseline(baseline, fresh, REGRESSION_TOLERANCE)
    if any(c["verdict"] == "grew" for c in comparison):
        runs = [fresh] + [run_worker(config, timeout_s=240) for _ in range(2)]
        assert all(r["status"] == "ok" for r in runs), [r.get("reason") for r in runs]
        fresh["measured"] = {
            **fresh["measured"],
            **{m: statistics.median(r["measured"][m] for r in runs) for m in REGRESSION_METRICS},
        }
        comparison = compare_to_baseline(baseline, fresh, REGRESSION_TOLERANCE)
    shrank = [c for c in comparison if c["verdict"] == "shrank"]
    grew = [c for c in comparison if c["verdict"] == "grew"]
    if shrank:
        warnings.warn(
            "memory per patch shrank by more than 5%; refresh the baseline on purpose with "
            f"`python -m bench.memory --baseline`:\n{_table(shrank)}",
            stacklevel=1,
        )
    assert not grew, (
        f"memory per patch grew by more than {REGRESSION_TOLERANCE:.0%} against {BASELINE.name}"
        f" (made at commit {baseline['machine'].get('commit')}):\n{_table(comparison)}"
    )
