"""Each memory config measured in a fresh ``bench.worker`` process (peaks are per process):
one timed run at a time under a lock, a dead or timed-out worker turned into a row naming
why, and the median process of a repeated config."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from bench.isolated import run_isolated
from histoseg.config import StepConfig
from histoseg.results import make_row


def run_worker(
    config: StepConfig, timeout_s: float | None = None, allocator_trace: bool = False
) -> dict[str, Any]:
    """Run ``config`` in a fresh ``bench.worker`` process (:func:`bench.isolated.run_isolated`;
    ``bench.spatial_worker``, which starts the ranks, for a patch cut across ranks) and
    return its row; a worker that failed to give one becomes an "oom" or "error" row
    naming why. With ``allocator_trace`` the worker profiles one more step and records the
    allocator's chunk waste in ``extra.allocator_trace`` (``bench.worker.allocator_chunk_waste``).
    """
    # a patch cut across ranks is measured by ranks that horovodrun starts
    module = "bench.spatial_worker" if config.spatial_workers > 1 else "bench.worker"
    command = [sys.executable, "-m", module, "--config", config.to_json()]
    if allocator_trace and config.spatial_workers == 1:
        command.append("--allocator-trace")
    result = run_isolated(command, timeout_s=timeout_s)
    if "schema" in result:  # the worker's own row
        return result
    return make_row("memory", config.as_dict(), status=result["status"], reason=result["reason"])


#: What each process of a repeated config keeps in ``extra.repeats``.
REPEAT_FIGURES = ("activation_bytes", "peak_bytes", "gradient_bytes", "before_step_bytes")


def median_process(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One row for a config measured in several fresh processes.

    TensorFlow casts the weights to bfloat16 in an order that changes from process to
    process, and which chunks the activations then land in changes with it: a small
    bfloat16 config's activation figure can differ by tens of percent between processes
    (docs/memory-harness.md). The row kept is the process with the median activation bytes
    (the lower middle of an even count), whole, so its figures come from one process; the
    allocator figures of every process go in ``extra.repeats``, and the first failure, if
    any, in ``extra.failed_repeat``.
    """
    ok = [r for r in rows if r["status"] == "ok"]
    if not ok:
        return rows[0]
    ok = sorted(ok, key=lambda r: r["measured"]["activation_bytes"])
    row = ok[(len(ok) - 1) // 2]
    extra = row.setdefault("extra", {})
    extra["repeats"] = [
        {k: r["measured"].get(k) for k in REPEAT_FIGURES} for r in rows if r["status"] == "ok"
    ]
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        extra["failed_repeat"] = f"{failed[0]['status']}: {failed[0].get('reason', '')}"
    return row
