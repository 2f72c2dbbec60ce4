"""What one patch cut across S ranks costs on a cluster: the spatial projection.

A model, not a measurement, beside the data-parallel one (:mod:`histoseg.scaling.model`).
N ranks form N / S groups; each group trains one patch, every rank its slab of it. A step
is each rank's compute on its slab, the halo exchange (the collectives the executor runs
on every layer that looks at neighbours, forward, backward and recomputation, counted and
sized by :func:`histoseg.spatial.traffic.halo_traffic`), one allreduce of the gradients
over all N ranks (summed within a group, averaged across groups), and the wait for the
slowest of the N ranks:

    halo_s(S)    = collectives * (overhead_s + (S-1) latency_s)
                   + ((S-1) * gather_bytes + 2 (S-1)/S * sum_bytes) / bandwidth
    step_s(N)    = compute_s * (1 + cv * e_N) + halo_s(S) + allreduce_s(N)
    efficiency   = compute_s / step_s(N)

``compute_s`` is one rank's compute on its slab without the exchange: the whole patch's
compute over S, times the partition's own compute overhead (the halo rows each rank
recomputes), which the caller reads off measured rows. The efficiency is against that
slab compute alone: 1 is S ranks doing a patch S times faster than one worker would
(could it hold the patch), and the number of patches per second grows with the groups.

The exchange is costed as it is implemented: Horovod has no point-to-point transfer, so
each halo is an allgather of every rank's boundary rows (a rank receives S - 1 ranks' rows,
where it reads at most two neighbours') and each halo gradient an allreduce of S stacked
boundaries. A neighbour-only exchange would send about 2 / (S - 1) of these bytes. Every
collective pays the framework's fixed overhead (``overhead_s``, calibrated on this
machine's allreduce probes as the data-parallel model's is) and a ring's latency; no
exchange overlaps compute, and the ranks of a group are costed as if on different nodes.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.scaling.model import DEFAULT_WORKERS, Network, ring_allreduce_s
from histoseg.scaling.stragglers import Spread, straggler_factor


def halo_exchange_s(
    traffic: Mapping[str, float], spatial_workers: int, network: Network, overhead_s: float
) -> float:
    """Seconds one step's halo exchange takes on ``network`` (see the module docstring);
    ``traffic`` as :func:`histoseg.spatial.traffic.halo_traffic` returns it."""
    s = spatial_workers
    if s < 2:
        return 0.0
    wire = (s - 1) * traffic["gather_bytes"] + 2.0 * (s - 1) / s * traffic["sum_bytes"]
    latency = traffic["collectives"] * (overhead_s + (s - 1) * network.latency_s)
    return latency + wire / network.bytes_per_s


def project_spatial(
    compute_s: float,
    traffic: Mapping[str, float],
    gradient_bytes: float,
    spatial_workers: int,
    workers: Sequence[int] = DEFAULT_WORKERS,
    *,
    network: Network | None = None,
    overhead_s: float = 0.0,
    spread: Spread | None = None,
) -> list[dict[str, float]]:
    """Step time and efficiency of groups of ``spatial_workers`` ranks, per rank count.

    Args:
        compute_s: one rank's compute per step on its slab, seconds.
        traffic: the halo traffic of one step at this patch size and rank count.
        gradient_bytes: fp32 gradient bytes of the model.
        spatial_workers: ranks per patch (S).
        workers: total rank counts; those below S or not a multiple of it are left out.
        network, overhead_s, spread: as :func:`histoseg.scaling.model.project`.

    Returns:
        One dict per rank count: workers, groups, nodes, halo_s, allreduce_s, straggler_s,
        step_s, efficiency, patches_per_s, and with a ``spread`` the band efficiency_low
        .. efficiency_high.
    """
    network = network or Network()
    if not compute_s > 0:
        raise ConfigError(f"compute time per step must be > 0 s, got {compute_s}")
    halo_s = halo_exchange_s(traffic, spatial_workers, network, overhead_s)
    rows = []
    for n in workers:
        if n < spatial_workers or n % spatial_workers:
            continue
        allreduce_s = ring_allreduce_s(gradient_bytes, n, network, overhead_s)
        slowest_s = compute_s * straggler_factor(n, spread.cv if spread else 0.0)
        step_s = slowest_s + halo_s + allreduce_s
        row = {
            "workers": n,
            "groups": n // spatial_workers,
            "nodes": math.ceil(n / network.workers_per_node),
            "halo_s": halo_s,
            "allreduce_s": allreduce_s,
            "straggler_s": slowest_s - compute_s,
            "step_s": step_s,
            "efficiency": compute_s / step_s,
            "patches_per_s": n // spatial_workers / step_s,
        }
        if spread:
            for key, cv in (("efficiency_low", spread.high), ("efficiency_high", spread.low)):
                slowest = compute_s * straggler_factor(n, cv)
                row[key] = compute_s / (slowest + halo_s + allreduce_s)
        rows.append(row)
    return rows


def _spatial_rows(rows: Sequence[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return [
        r
        for r in rows
        if r.get("kind") == "scaling"
        and r.get("status") == "ok"
        and r.get("config", {}).get("engine") == "spatial"
    ]


def _model_of(row: Mapping[str, Any]) -> tuple:
    config = row["config"]
    return config.get("backbone"), str(config.get("backbone_options") or ())


def partition_figures(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The compute figures a spatial projection needs, from measured rows of engine
    "spatial" (``bench.scaling --spatial-workers``) of one model: that of the largest
    patch measured on more ranks whose size was measured on one rank too.

    Returns:
        ``backbone`` and ``backbone_options``, ``compute_s_per_megapixel`` (the 1-rank
        steps of that model, a
        least-squares fit through the origin in pixels), ``partition_overhead`` (at that
        patch: the ranks' summed compute without the exchange over the 1-rank step's) and
        where it was measured, and the model's ``gradient_bytes``.

    Raises:
        ConfigError: no multi-rank row at a size a 1-rank row of its model has.
    """
    spatial = _spatial_rows(rows)
    singles = {
        (_model_of(r), int(r["config"]["patch_size"])): r
        for r in spatial
        if r["config"]["workers"] == 1
    }
    multi = [
        r
        for r in spatial
        if r["config"]["workers"] > 1 and (_model_of(r), r["config"]["patch_size"]) in singles
    ]
    if not multi:
        raise ConfigError(
            "no multi-rank row of engine spatial at a size with a 1-rank row: run "
            "bench.scaling --spatial-workers N first"
        )
    ref = max(multi, key=lambda r: (r["config"]["patch_size"], r["config"]["workers"]))
    model, size, n = _model_of(ref), int(ref["config"]["patch_size"]), ref["config"]["workers"]
    ones = {p: float(r["measured"]["compute_s"]) for (m, p), r in singles.items() if m == model}
    megapixels = [p * p / 1e6 for p in ones]
    per_megapixel = sum(m * t for m, t in zip(megapixels, ones.values(), strict=True)) / sum(
        m * m for m in megapixels
    )
    return {
        "backbone": ref["config"].get("backbone"),
        "backbone_options": ref["config"].get("backbone_options") or [],
        "compute_s_per_megapixel": per_megapixel,
        "partition_overhead": n * float(ref["measured"]["compute_s"]) / ones[size],
        "partition_measured_at": f"{size} px over {n} ranks",
        "gradient_bytes": float(ref["measured"]["gradient_bytes"]),
    }
