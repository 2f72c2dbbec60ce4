"""The spatial projection of a ``bench.scaling`` sweep: one patch over S ranks per group,
projected to the cluster from the rows of engine "spatial" (:mod:`histoseg.scaling.spatial`),
with the halo exchange's traffic traced at the projected patch and its time model checked
against the halo times measured on this machine."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.results import make_row
from histoseg.scaling.measured import (
    calibrated_overhead,
    calibration_points_from_rows,
    spread_from_rows,
)
from histoseg.scaling.model import DEFAULT_WORKERS, Network, band_text, calibrate, curve_points
from histoseg.scaling.spatial import halo_exchange_s, partition_figures, project_spatial


def halo_traffic_at(
    backbone: str, backbone_options: Any, patch_size: int, spatial_workers: int
) -> dict:
    """The halo traffic of one step of the model at ``patch_size`` px over
    ``spatial_workers`` ranks, from a trace (:func:`histoseg.spatial.traffic.halo_traffic`)."""
    from histoseg.models import build_deeplabv3plus
    from histoseg.spatial.traffic import halo_traffic

    options = dict(backbone_options or ())
    model = build_deeplabv3plus(backbone, (patch_size, patch_size, 3), **options)
    return halo_traffic(model, spatial_workers)


def spatial_projection(
    rows: Sequence[dict], args: argparse.Namespace, spread_rows: Sequence[dict]
) -> tuple[str, list[dict]]:
    """The spatial projection of ``--project-spatial-size`` px over
    ``--project-spatial-workers`` ranks per patch to the cluster, from the rows of engine
    "spatial" in ``rows`` (compute, the partition's overhead) and the data-parallel rows
    of ``spread_rows`` (the per-collective overhead from their probes, the straggler
    spread): its text and its projection row; ("", []) without spatial rows."""
    spatial = [r for r in rows if r["config"]["engine"] == "spatial" and r["status"] == "ok"]
    if not spatial:
        return "", []
    try:
        figures = partition_figures(spatial)
    except ConfigError as exc:
        return f"no spatial projection: {exc}", []
    size, ranks = args.project_spatial_size, args.project_spatial_workers
    network = Network(args.bandwidth_gbps, args.latency_us * 1e-6, args.workers_per_node)
    data_parallel = [r for r in spread_rows if r["config"]["engine"] != "spatial"]
    inputs: dict[str, Any] = {"patch_size_px": size, "spatial_workers": ranks, **figures}
    overhead = calibrated_overhead(data_parallel, inputs)
    traffic = halo_traffic_at(figures["backbone"], figures["backbone_options"], size, ranks)
    inputs.update({f"halo_{k}": traffic[k] for k in ("collectives", "gather_bytes", "sum_bytes")})
    compute_s = figures["compute_s_per_megapixel"] * size * size / 1e6 / ranks
    inputs["compute_s"] = compute_s * figures["partition_overhead"]
    inputs["halo_s_check_on_this_machine"] = halo_checks(spatial, data_parallel)
    max_workers = args.nodes * args.workers_per_node
    table = project_spatial(
        inputs["compute_s"],
        traffic,
        figures["gradient_bytes"],
        ranks,
        [n for n in DEFAULT_WORKERS if ranks <= n <= max_workers],
        network=network,
        overhead_s=overhead,
        spread=spread_from_rows(data_parallel),
    )
    row = _projection_row(inputs, table, network, getattr(args, "command", None))
    lines = [
        f"spatial projection: {size} px over {ranks} ranks per patch (a model; inputs below)",
        *(f"  {k}: {v}" for k, v in inputs.items()),
        "  workers  groups  halo_s  allreduce_s  step_s  efficiency",
        *(
            f"  {t['workers']:>7} {t['groups']:>7} {t['halo_s']:>7.3f} {t['allreduce_s']:>12.4f}"
            f" {t['step_s']:>7.2f}  {100 * t['efficiency']:.1f}%"
            + (f" ({band_text(t)})" if "efficiency_low" in t else "")
            for t in table
        ),
    ]
    return "\n".join(lines), [row]


def halo_checks(spatial: Sequence[dict], data_parallel: Sequence[dict]) -> str:
    """Each measured multi-rank row's halo time against the halo model fed this machine's
    calibration (the data-parallel rows' allreduce probes: overhead per collective and
    bandwidth) and the row's own traffic; "no calibration" without probes."""
    try:
        local = calibrate(calibration_points_from_rows(data_parallel))
    except ConfigError:
        return "no calibration"
    checks = []
    for r in spatial:
        m, n = r["measured"], r["config"]["workers"]
        if n < 2:
            continue
        here = Network(local.local_bytes_per_s * 8 / 1e9, 0.0, n)
        traffic = {
            "collectives": m["halo_collectives"],
            "gather_bytes": m["halo_gather_bytes"],
            "sum_bytes": m["halo_sum_bytes"],
        }
        model_s = halo_exchange_s(traffic, n, here, local.overhead_s)
        checks.append(
            f"{r['config']['patch_size']} px x{n}: model {model_s:.3f} s, measured "
            f"{m['halo_s']:.3f} s"
        )
    return "; ".join(checks)


def _projection_row(
    inputs: dict[str, Any], table: list[dict], network: Network, command: str | None
) -> dict:
    """The spatial projection's row: engine "projection" with ``spatial_workers``, at the
    table's last rank count, the whole curve and the inputs in ``extra``."""
    last = table[-1]
    band = {k: last[k] for k in ("efficiency_low", "efficiency_high") if k in last}
    return make_row(
        "scaling",
        {
            "patch_size": inputs["patch_size_px"],
            "backbone": inputs["backbone"],
            "engine": "projection",
            "spatial_workers": inputs["spatial_workers"],
            "workers": last["workers"],
            "nodes": last["nodes"],
            "compression": "none",
            "bandwidth_gbps": network.bandwidth_gbps,
            "workers_per_node": network.workers_per_node,
        },
        predicted={
            "efficiency": last["efficiency"],
            **band,
            **{k: last[k] for k in ("halo_s", "allreduce_s", "straggler_s", "step_s")},
            "compute_s": inputs["compute_s"],
        },
        extra={"inputs": inputs, "projection": curve_points(table), "command": command},
    )
