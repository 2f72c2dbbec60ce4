"""The projection's numbers, read off the rows ``bench.scaling`` measured.

The cost model (:mod:`histoseg.scaling.model`, :mod:`histoseg.scaling.stragglers`) takes
numbers; this module is where they come from when a user points at a results file: the
compute time per step (single-worker rows), the allreduce calibration points (multi-worker
rows and their probes) and the straggler spread (repeated launches of rows without a
collective).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.scaling.model import Network, calibrate, projection
from histoseg.scaling.stragglers import DEFAULT_CONFIDENCE, Spread, pooled_spread


def _ok_scaling(row: Mapping[str, Any]) -> bool:
    """A measured data-parallel row (engine "spatial" cuts one patch across its ranks: its
    step and communication are another model's)."""
    return (
        row.get("kind") == "scaling"
        and row.get("status") == "ok"
        and row.get("config", {}).get("engine") != "spatial"
    )


def compute_s_from_rows(rows: Iterable[Mapping[str, Any]], patch_size: int) -> dict[str, Any]:
    """Compute time per step at ``patch_size`` from measured scaling rows.

    Uses single-worker rows (no communication), compute = step_s - allreduce_s; at sizes not
    measured it scales with pixels (a convolutional network's work is linear in pixels)
    from a least-squares fit ``compute_s = a * pixels`` over the measured sizes.

    Returns:
        compute_s, gradient_bytes, backbone, how ("measured" or "scaled from ..."), and
        the per-size measurements used.
    """
    singles = [
        r
        for r in rows
        if _ok_scaling(r) and r.get("config", {}).get("workers") == 1 and "measured" in r
    ]
    if not singles:
        raise ConfigError("no measured single-worker scaling rows to take compute time from")
    by_size: dict[int, list[float]] = {}
    gradient_bytes = None
    backbone = None
    for r in singles:
        m = r["measured"]
        compute = float(m.get("compute_s", m["step_s"] - m.get("allreduce_s", 0.0)))
        by_size.setdefault(int(r["config"]["patch_size"]), []).append(compute)
        gradient_bytes = m.get("gradient_bytes", gradient_bytes)
        backbone = r["config"].get("backbone", backbone)
    sizes = {s: min(v) for s, v in sorted(by_size.items())}
    if patch_size in sizes:
        compute_s, how = sizes[patch_size], "measured"
    else:
        px = [s * s for s in sizes]
        per_pixel = sum(p * t for p, t in zip(px, sizes.values(), strict=True)) / sum(
            p * p for p in px
        )
        compute_s = per_pixel * patch_size * patch_size
        how = f"scaled by pixels from {', '.join(str(s) for s in sizes)} px"
    return {
        "compute_s": compute_s,
        "gradient_bytes": gradient_bytes,
        "backbone": backbone,
        "how": how,
        "measured_compute_s": sizes,
    }


def calibration_points_from_rows(
    rows: Iterable[Mapping[str, Any]],
) -> list[tuple[float, int, float]]:
    """(wire bytes, workers, allreduce seconds) measured in multi-worker rows.

    Prefers the allreduce probes (a collective timed alone, ranks in step after a barrier,
    at several message sizes); only without any probe does it fall back to the gradient
    allreduce timed inside training steps, which also holds the wait for the slower rank.
    """
    probes, steps = [], []
    for r in rows:
        cfg, m = r.get("config", {}), r.get("measured", {})
        if not _ok_scaling(r) or cfg.get("workers", 1) < 2:
            continue
        if "allreduce_s" in m and "gradient_bytes" in m:
            wire = m["gradient_bytes"] / (2 if cfg.get("compression") == "fp16" else 1)
            steps.append((float(wire), int(cfg["workers"]), float(m["allreduce_s"])))
        for b, s in (m.get("allreduce_probe") or {}).items():
            probes.append((float(b), int(cfg["workers"]), float(s)))
    return probes or steps


def _no_collective(row: Mapping[str, Any]) -> bool:
    config = row.get("config", {})
    return config.get("engine") == "none" or config.get("workers") == 1


def spread_from_rows(
    rows: Iterable[Mapping[str, Any]], confidence: float = DEFAULT_CONFIDENCE
) -> Spread | None:
    """The launch-to-launch spread of measured rows without a collective, pooled.

    Uses ok rows of kind "scaling" with one worker or engine ``none`` that hold two or more
    launches (``extra.launches_step_s``). None when there are none.
    """
    groups = []
    for row in rows:
        if not _ok_scaling(row) or not _no_collective(row):
            continue
        launches = [float(s) for s in (row.get("extra") or {}).get("launches_step_s") or []]
        if len([s for s in launches if s > 0]) >= 2:
            groups.append(launches)
    source = f"launch-to-launch step time of {len(groups)} rows without a collective"
    return pooled_spread(groups, source, confidence)


def calibrated_overhead(rows: Sequence[Mapping[str, Any]], inputs: dict[str, Any]) -> float:
    """The per-allreduce overhead fitted to the rows' allreduce times (0 without any that
    took time: rows without a collective have none); the fit's figures go into ``inputs``."""
    try:
        cal = calibrate(calibration_points_from_rows(rows))
    except ConfigError:
        inputs["calibration_points"] = 0
        return 0.0
    inputs["calibration_points"] = len(cal.points)
    inputs["calibrated_overhead_s"] = cal.overhead_s
    inputs["local_bandwidth_GBps (fit check only)"] = cal.local_bytes_per_s / 1e9
    inputs["calibration_max_rel_error"] = cal.max_relative_error
    return cal.overhead_s


def projection_from(
    rows: Sequence[Mapping[str, Any]],
    *,
    patch_size: int,
    compute_s: float | None = None,
    compute_scale: float = 1.0,
    gradient_bytes: float | None = None,
    overhead_s: float | None = None,
    network: Network | None = None,
    max_workers: int = 512,
    overlap: float = 0.0,
    spread: Spread | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """:func:`histoseg.scaling.model.projection`, with every number not given taken from
    measured rows (the straggler spread too: pooled from the rows without a collective;
    none, no term)."""
    inputs: dict[str, Any] = {"patch_size_px": patch_size}
    if compute_s is None or gradient_bytes is None:
        if not rows:
            raise ConfigError("give --compute-s and --gradient-bytes, or --results with rows")
        measured = compute_s_from_rows(rows, patch_size)
        if compute_s is None:
            compute_s = measured["compute_s"] * compute_scale
            inputs["compute_s_source"] = f"{measured['backbone']}, 1 worker, {measured['how']}" + (
                f", x{compute_scale}" if compute_scale != 1.0 else ""
            )
        gradient_bytes = gradient_bytes or measured["gradient_bytes"]
        inputs["backbone"] = measured["backbone"]
    if not gradient_bytes:
        raise ConfigError("gradient bytes unknown: give --gradient-bytes")
    if overhead_s is None:
        overhead_s = calibrated_overhead(rows, inputs)
    return projection(
        compute_s=compute_s,
        gradient_bytes=gradient_bytes,
        overhead_s=overhead_s,
        network=network,
        max_workers=max_workers,
        overlap=overlap,
        spread=spread or spread_from_rows(rows),
        inputs=inputs,
    )
