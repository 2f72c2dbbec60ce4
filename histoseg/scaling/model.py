"""What adding workers buys: a ring-allreduce cost model projecting weak-scaling efficiency.

A model, not a measurement. In data-parallel training every step is compute (each worker
on its own patches) followed by an allreduce of the gradients. A synchronous step waits for
the slowest of the N workers, and a ring allreduce over N workers moves 2(N-1)/N of the
gradient bytes through every worker's link and takes 2(N-1) latency-bound hops, so

    slowest_s(N)   = compute_s * (1 + cv * e_N)        e_N = E[max of N standard normals]
    allreduce_s(N) = overhead_s + 2 (N-1) latency_s + 2 (N-1)/N * gradient_bytes / bandwidth
    exposed_s(N)   = (1 - overlap) * max(0, allreduce_s(N) - overlap_window * compute_s)
    efficiency(N)  = compute_s / (slowest_s(N) + exposed_s(N))

The straggler term (:mod:`histoseg.scaling.stragglers`) draws each worker's compute per step from a
normal of coefficient of variation ``cv``; ``cv`` is the launch-to-launch spread of the step
times bench.scaling records in rows without a collective, and its confidence band makes the
projection a band (``efficiency_low`` .. ``efficiency_high``). ``overlap_window`` is the share
of a step the allreduce can run beside computation (0 here: the projection of this study's
step hides nothing; 2/3 for Horovod's overlap with the backward pass; 1 for a step whose
update lags by one step), ``overlap`` a flat hidden fraction.

fp16 compression halves gradient_bytes. ``overhead_s`` is the framework's fixed cost per
allreduce (Horovod's negotiation and fusion, TF's collective launch), which does not depend on
the network: it is calibrated by a least-squares fit of the model to allreduce times measured
on this machine (which also yields this machine's effective bandwidth, reported for checking
the fit but not carried to the cluster). Assumptions, printed with every projection:
ranks of a node sit next to each other in the ring (as ``horovodrun -H node:2`` places them),
so each node's link carries one rank's ring traffic; intra-node hops cost nothing; no overlap
of communication with computation unless ``overlap`` says so; compute per worker does not
change with N (weak scaling: fixed patches per worker).

The model takes numbers; :mod:`histoseg.scaling.measured` reads them off measured rows.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError
from histoseg.scaling.stragglers import PUBLISHED, Spread, straggler_factor

#: The study's network: 100 Gb/s Intel OmniPath, 2 processes per dual-socket node.
DEFAULT_BANDWIDTH_GBPS = 100.0
#: One-hop latency of an OmniPath message through MPI (about a microsecond).
DEFAULT_LATENCY_S = 1.0e-6
DEFAULT_WORKERS_PER_NODE = 2
DEFAULT_WORKERS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


@dataclasses.dataclass(frozen=True)
class Network:
    """The cluster's interconnect as the model sees it.

    Attributes:
        bandwidth_gbps: link bandwidth per node, gigabits per second.
        latency_s: one ring hop's latency, seconds.
        workers_per_node: training processes per node (they share the node's link).
        nic_share: how many of a node's ranks send over its link at once in each ring
            step (1 when a node's ranks are adjacent in the ring).
    """

    bandwidth_gbps: float = DEFAULT_BANDWIDTH_GBPS
    latency_s: float = DEFAULT_LATENCY_S
    workers_per_node: int = DEFAULT_WORKERS_PER_NODE
    nic_share: int = 1

    def __post_init__(self) -> None:
        if not self.bandwidth_gbps > 0:
            raise ConfigError(f"bandwidth must be > 0 Gb/s, got {self.bandwidth_gbps}")
        if self.latency_s < 0:
            raise ConfigError(f"latency must be >= 0 s, got {self.latency_s}")
        if self.workers_per_node < 1 or self.nic_share < 1:
            raise ConfigError("workers_per_node and nic_share must be >= 1")

    @property
    def bytes_per_s(self) -> float:
        """Bandwidth one rank gets on the wire, bytes per second."""
        return self.bandwidth_gbps * 1e9 / 8.0 / self.nic_share


@dataclasses.dataclass(frozen=True)
class Calibration:
    """The ring model fitted to allreduce times measured on one machine.

    Attributes:
        overhead_s: fixed framework cost per allreduce (carried to the cluster projection).
        local_bytes_per_s: this machine's effective bandwidth (a check of the fit only).
        points: the (gradient_bytes, workers, seconds) measurements fitted.
        max_relative_error: worst |model - measured| / measured over the points.
    """

    overhead_s: float
    local_bytes_per_s: float
    points: tuple[tuple[float, int, float], ...]
    max_relative_error: float

    def predict_local_s(self, gradient_bytes: float, workers: int) -> float:
        """The fitted model's allreduce time on the calibration machine."""
        if workers <= 1:
            return 0.0
        return self.overhead_s + ring_bytes(gradient_bytes, workers) / self.local_bytes_per_s


def ring_bytes(gradient_bytes: float, workers: int) -> float:
    """Bytes each rank sends in a ring allreduce: 2(N-1)/N of the buffer."""
    return 2.0 * (workers - 1) / workers * gradient_bytes if workers > 1 else 0.0


def ring_allreduce_s(
    gradient_bytes: float, workers: int, network: Network, overhead_s: float = 0.0
) -> float:
    """Seconds for one ring allreduce of ``gradient_bytes`` over ``workers`` ranks (0 for 1)."""
    if workers < 1:
        raise ConfigError(f"workers must be >= 1, got {workers}")
    if workers == 1:
        return 0.0
    return (
        overhead_s
        + 2.0 * (workers - 1) * network.latency_s
        + ring_bytes(gradient_bytes, workers) / network.bytes_per_s
    )


def calibrate(points: Iterable[tuple[float, int, float]]) -> Calibration:
    """Fit ``seconds = overhead_s + ring_bytes / bandwidth`` to measured allreduces.

    Args:
        points: (gradient_bytes, workers, seconds) of allreduces measured with workers >= 2.
            Two or more distinct byte counts fit both terms; a single one fits the
            bandwidth with zero overhead (the pessimistic reading for the cluster).

    Raises:
        ConfigError: no usable point.
    """
    pts = tuple((float(b), int(n), float(s)) for b, n, s in points if n >= 2 and s > 0 and b > 0)
    if not pts:
        raise ConfigError("calibration needs allreduce times measured with 2 or more workers")
    xs = [ring_bytes(b, n) for b, n, _ in pts]
    ys = [s for _, _, s in pts]
    if len({round(x) for x in xs}) >= 2:
        mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
        sxx = sum((x - mean_x) ** 2 for x in xs)
        slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
        intercept = mean_y - slope * mean_x
        if slope <= 0 or intercept < 0:
            # noise made a line through the points unphysical: fall back to a pure
            # bandwidth fit through the origin
            slope, intercept = sum(ys) / sum(xs), 0.0
    else:
        slope, intercept = sum(ys) / sum(xs), 0.0
    cal = Calibration(intercept, 1.0 / slope, pts, 0.0)
    worst = max(abs(cal.predict_local_s(b, n) - s) / s for b, n, s in pts)
    return dataclasses.replace(cal, max_relative_error=worst)


def project(
    compute_s: float,
    gradient_bytes: float,
    workers: Sequence[int] = DEFAULT_WORKERS,
    *,
    network: Network | None = None,
    overhead_s: float = 0.0,
    fp16: bool = False,
    overlap: float = 0.0,
    overlap_window: float = 0.0,
    spread: Spread | None = None,
) -> list[dict[str, float]]:
    """Predicted step time and weak-scaling efficiency for each worker count.

    Args:
        compute_s: forward + backward + update time of one worker's step, seconds.
        gradient_bytes: fp32 gradient bytes of the model (4 x trainable parameters).
        workers: worker counts to predict.
        network: the cluster's network (default: the study's 100 Gb/s OmniPath).
        overhead_s: framework cost per allreduce (from :func:`calibrate`).
        fp16: fp16 compression (halves the bytes on the wire).
        overlap: fraction of the allreduce hidden behind the backward pass (0 = none).
        overlap_window: share of the step the allreduce can run beside computation; only
            what exceeds ``overlap_window * compute_s`` is exposed (0 = none).
        spread: the per-worker step-time spread (straggler term); None = no stragglers.

    Returns:
        One dict per worker count: workers, nodes, wire_bytes, allreduce_s,
        exposed_allreduce_s, straggler_s (slowest worker's compute - compute_s), step_s,
        efficiency, throughput_ratio (patches/s relative to one worker), and with a
        ``spread`` the band efficiency_low (its high cv) .. efficiency_high (its low cv).
    """
    network = network or Network()
    if not compute_s > 0:
        raise ConfigError(f"compute time per step must be > 0 s, got {compute_s}")
    if not 0.0 <= overlap < 1.0 or not 0.0 <= overlap_window <= 1.0:
        raise ConfigError(
            f"overlap must be in [0, 1) and overlap_window in [0, 1], got "
            f"{overlap}, {overlap_window}"
        )
    wire_bytes = gradient_bytes / 2.0 if fp16 else gradient_bytes
    rows = []
    for n in workers:
        allreduce_s = ring_allreduce_s(wire_bytes, n, network, overhead_s)
        exposed_s = (1.0 - overlap) * max(0.0, allreduce_s - overlap_window * compute_s)
        slowest_s = compute_s * straggler_factor(n, spread.cv if spread else 0.0)
        step_s = slowest_s + exposed_s
        efficiency = compute_s / step_s
        row = {
            "workers": n,
            "nodes": math.ceil(n / network.workers_per_node),
            "wire_bytes": wire_bytes,
            "allreduce_s": allreduce_s,
            "exposed_allreduce_s": exposed_s,
            "straggler_s": slowest_s - compute_s,
            "step_s": step_s,
            "efficiency": efficiency,
            "throughput_ratio": n * efficiency,
        }
        if spread:
            for key, cv in (("efficiency_low", spread.high), ("efficiency_high", spread.low)):
                row[key] = compute_s / (compute_s * straggler_factor(n, cv) + exposed_s)
        rows.append(row)
    return rows


def compute_s_for_efficiency(
    efficiency: float,
    gradient_bytes: float,
    workers: int,
    *,
    network: Network | None = None,
    overhead_s: float = 0.0,
    fp16: bool = False,
    cv: float = 0.0,
) -> float:
    """The shortest compute time per step at which ``workers`` still reach ``efficiency``
    (no overlap); ``inf`` where stragglers of spread ``cv`` alone cost more than that."""
    network = network or Network()
    if not 0 < efficiency < 1:
        raise ConfigError(f"efficiency must be in (0, 1), got {efficiency}")
    wire = gradient_bytes / 2.0 if fp16 else gradient_bytes
    t = ring_allreduce_s(wire, workers, network, overhead_s)
    # efficiency = c / (c * factor + t)  ->  c = t / (1 / efficiency - factor)
    margin = 1.0 / efficiency - straggler_factor(workers, cv)
    return t / margin if margin > 0 else math.inf


def projection(
    *,
    compute_s: float,
    gradient_bytes: float,
    overhead_s: float = 0.0,
    network: Network | None = None,
    max_workers: int = 512,
    overlap: float = 0.0,
    spread: Spread | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> tuple[dict[str, Any], dict[str, list[dict[str, float]]]]:
    """fp32 and fp16-compressed tables up to ``max_workers``, and every input they used.

    ``inputs`` comes first in the returned inputs (where the caller's numbers came from);
    then the numbers, the spread (or why there is none) and, per table, the compute time
    per step below which ``max_workers`` fall under 90% and the band at ``max_workers``.
    """
    network = network or Network()
    if not gradient_bytes:
        raise ConfigError("gradient bytes unknown: give --gradient-bytes")
    inputs = dict(inputs or {})
    inputs.update(
        {
            "compute_s": compute_s,
            "gradient_bytes_fp32": gradient_bytes,
            "overhead_s": overhead_s,
            "bandwidth_gbps": network.bandwidth_gbps,
            "latency_s": network.latency_s,
            "workers_per_node": network.workers_per_node,
            "overlap": overlap,
        }
    )
    inputs.update(
        spread.as_inputs()
        if spread
        else {"straggler_cv": "unknown (no rows with repeated launches): no straggler term"}
    )
    workers = [n for n in DEFAULT_WORKERS if n <= max_workers]
    if max_workers not in workers:
        workers.append(max_workers)
    tables = {}
    for name, fp16 in (("fp32", False), ("fp16", True)):
        # how fast a worker may get before the network and stragglers cost 10%: the margin
        inputs[f"compute_s_for_90pct_at_{max_workers}_{name} (derived)"] = compute_s_for_efficiency(
            0.9,
            gradient_bytes,
            max_workers,
            network=network,
            overhead_s=overhead_s,
            fp16=fp16,
            cv=spread.cv if spread else 0.0,
        )
        tables[name] = project(
            compute_s,
            gradient_bytes,
            workers,
            network=network,
            overhead_s=overhead_s,
            fp16=fp16,
            overlap=overlap,
            spread=spread,
        )
        if spread:
            inputs[f"efficiency_band_at_{max_workers}_{name}"] = band_text(tables[name][-1])
    return inputs, tables


def format_projection(
    inputs: Mapping[str, Any], tables: Mapping[str, Sequence[Mapping[str, float]]]
) -> str:
    """The model's inputs, then one efficiency table per variant (e.g. fp32 and fp16), with
    the straggler band beside each efficiency where the spread is known."""
    lines = ["ring-allreduce projection with stragglers (a model; inputs below)", "inputs:"]
    width = max(len(k) for k in inputs)
    lines += [f"  {k:<{width}}  {_fmt(v)}" for k, v in inputs.items()]
    names = list(tables)
    banded = "efficiency_low" in tables[names[0]][0]
    header = f"{'workers':>8} {'nodes':>6}"
    for name in names:
        header += f" {name + ' allreduce_s':>18} {name + ' eff':>10}"
        header += f" {name + ' band':>16}" if banded else ""
    lines += ["", header]
    for i, row in enumerate(tables[names[0]]):
        line = f"{row['workers']:>8} {row['nodes']:>6}"
        for name in names:
            r = tables[name][i]
            line += f" {r['allreduce_s']:>18.4g} {100 * r['efficiency']:>9.2f}%"
            line += f" {band_text(r):>16}" if banded else ""
        lines.append(line)
    return "\n".join(lines)


def curve_points(table: Iterable[Mapping[str, float]]) -> list[dict[str, float]]:
    """A projection table as stored in rows (``extra.projection``): workers and efficiency
    per worker count, with the straggler band (``efficiency_low``, ``efficiency_high``)
    where the table has one."""
    keys = ("workers", "efficiency", "efficiency_low", "efficiency_high")
    return [{k: row[k] for k in keys if k in row} for row in table]


def band_text(row: Mapping[str, float]) -> str:
    """``92.3-95.1%``: a projection row's straggler band."""
    return f"{100 * row['efficiency_low']:.1f}-{100 * row['efficiency_high']:.1f}%"


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def published_checks(spread: Spread) -> list[dict[str, Any]]:
    """Each published run of :data:`histoseg.scaling.stragglers.PUBLISHED` projected with
    ``spread``: its inputs, the projected efficiency and band, and the published figure."""
    checks = []
    for run in PUBLISHED:
        network = Network(run.bandwidth_gbps, run.latency_s, run.workers_per_node)
        row = project(
            run.compute_s,
            4.0 * run.parameters,
            [run.workers],
            network=network,
            overlap_window=run.overlap_window,
            spread=spread,
        )[0]
        checks.append(
            {
                "run": run,
                "projection": row,
                "off_points": 100 * (row["efficiency"] - run.efficiency),
            }
        )
    return checks


def format_published(spread: Spread, checks: Sequence[Mapping[str, Any]]) -> str:
    """The published runs beside their projection, with what is published and assumed."""
    lines = [
        "the projection fed published large runs (a calibration check; nothing fitted to them)",
        f"spread: cv {100 * spread.cv:.2f}% (band {100 * spread.low:.2f}-{100 * spread.high:.2f}%)"
        f", {spread.source}",
    ]
    for check in checks:
        run, row = check["run"], check["projection"]
        lines += [
            "",
            f"{run.name}: projected {100 * row['efficiency']:.1f}% (band {band_text(row)}), "
            f"published {100 * run.efficiency:.1f}%, off by {check['off_points']:+.1f} points"
            + ("" if run.checked else " (a known miss, not held to the check)"),
            f"  source: {run.source}",
            f"  fed: {run.workers} workers, {run.workers_per_node} per node, step "
            f"{run.compute_s:.3f} s, {run.parameters / 1e6:.1f} M parameters, "
            f"{run.bandwidth_gbps:g} Gb/s, {run.latency_s * 1e6:g} us/hop, overlap window "
            f"{run.overlap_window:.2f} of a step",
            f"  model: allreduce {row['allreduce_s']:.4f} s, exposed "
            f"{row['exposed_allreduce_s']:.4f} s, slowest worker +{row['straggler_s']:.4f} s",
        ]
        lines += [f"  published: {item}" for item in run.published]
        lines += [f"  assumed: {item}" for item in run.assumed]
    return "\n".join(lines)
