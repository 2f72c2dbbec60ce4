"""`python -m bench.scaling`: weak scaling of the train step over workers, engines and patch sizes.

Weak scaling: every worker trains the same fixed batch of patches per step whatever the
number of workers, with the same threads per worker (default: cores // the largest worker
count, so no count oversubscribes the cores). For each engine, patch size, step mode and
compression, each worker count runs as fresh processes (``horovodrun --gloo`` on localhost
for Horovod, ``histoseg.train.launch`` for tf.distribute). Efficiency is
throughput(N) / (N x throughput(1)), one worker running the same step mode.

``allreduce_s`` is the step time the communication costs. A "separate" step times its
collective around the call (gradients, allreduce, update are three calls). An "overlap" step
runs them as one compiled call, so the collective cannot be timed on its own: after its
timed steps every rank runs the same compiled step without the collective for as many
steps, and ``allreduce_s`` = overlapped step - that step (the exposed communication,
``measured.allreduce_timing`` says which).

Rows are kind "scaling" (``scaling.efficiency``, ``scaling.throughput_per_worker``,
``scaling.allreduce_s``), merged into ``--out`` atomically. Then the ring-allreduce model of
:mod:`histoseg.scaling`, calibrated on the allreduce times measured here, projects the
efficiency to the study's cluster (256 nodes x 2 workers, 100 Gb/s) with its straggler term:
the spread of step time is pooled from every row without a collective that ``--out`` will
hold (this sweep's and those already there), so the projection is a band. It is printed
with its inputs and stored as rows of engine "projection" (``predicted.efficiency``,
``efficiency_low``, ``efficiency_high``; the curve per worker count in ``extra.projection``).
``--reproject`` makes the projection again from the measured rows of ``--out``, measuring
nothing.

``--spatial-workers N``: engine "spatial" instead, one patch over N ranks against 1 rank, its
halo exchange timed (``scaling.halo_s``); its rows feed :mod:`bench.scaling_spatial`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.isolated import busy_cpu_s, run_process, wait_for_quiet
from bench.scaling_spatial import spatial_projection
from bench.scaling_table import markdown_table, spatial_markdown_table, summary_table
from bench.scaling_worker import spatial_worker_main, summarise, summarise_spatial, worker_main
from histoseg.cli import ArgumentParser, command_line, run_main
from histoseg.config import MAX_ALPHA, StepConfig, parse_alpha
from histoseg.errors import ConfigError, EngineUnavailableError
from histoseg.results import (
    config_key,
    load_rows,
    load_rows_if_exists,
    make_row,
    merge_rows,
    write_rows,
)
from histoseg.scaling.measured import calibrated_overhead, projection_from, spread_from_rows
from histoseg.scaling.model import (
    DEFAULT_WORKERS,
    Network,
    curve_points,
    format_projection,
    project,
)
from histoseg.train.engines.base import DEFAULT_STEP_MODE, STEP_MODES

DEFAULT_OUT = Path("results/scaling.json")
# "none" with N workers runs N independent processes (no communication at all): the
# control that shows how much of the efficiency the shared hardware alone costs
ENGINES = ("horovod", "tf", "none")


def launch(spec: dict[str, Any], workers: int, timeout_s: float) -> str | None:
    """Run ``workers`` ranks of ``spec`` through ``python -m histoseg.train.launch``, as one
    process group (:func:`bench.isolated.run_process`), so a timeout or a stopped sweep ends
    every rank. Returns None when the launcher exited 0, else ``"status: reason"``."""
    from histoseg.train.launch import horovodrun_path

    if spec["engine"] == "horovod" or (spec["engine"] == "spatial" and workers > 1):
        try:
            horovodrun_path()
        except EngineUnavailableError as exc:
            return f"skipped: {exc}"
    log_dir = Path(spec["out_dir"]) / "logs"
    engine = spec["engine"]
    if engine == "spatial":  # one patch over horovodrun's ranks; one rank runs alone
        engine = "horovod" if workers > 1 else "none"
    command = [sys.executable, "-m", "histoseg.train.launch", "--engine", engine]
    command += ["-n", str(workers), "--threads-per-worker", str(spec["threads"])]
    command += ["--log-dir", str(log_dir), "--"]
    command += [sys.executable, "-m", "bench.scaling", "--worker", json.dumps(spec)]
    finished = run_process(command, timeout_s=timeout_s)
    if finished.timed_out:
        return f"error: timed out after {timeout_s:g} s"
    if finished.returncode != 0:
        return f"error: exit {finished.returncode}: {finished.last_stderr_line}"
    return None


def point_config(
    args: argparse.Namespace, engine: str, size: int, compression: str, step: str, workers: int
) -> dict[str, Any]:
    """The config section of a point's row: the step's keys (the rank worker trains
    float32, output stride 16, no recomputation, Adam on the CPU), then the point's own.
    Engine "spatial" cuts each patch across ``workers`` ranks (``spatial_workers``)."""
    common: dict[str, Any] = dict(
        patch_size=size,
        batch_size=args.batch_size,
        backbone=args.backbone,
        threads=args.threads_per_worker,
        backbone_options=() if args.alpha is None else (("alpha", args.alpha),),
    )
    if engine == "spatial":
        config = StepConfig(**common, spatial_workers=workers).as_dict()
        config.update(engine=engine, workers=workers)
    else:
        config = StepConfig(**common, engine=engine, workers=workers).as_dict()
    return {**config, "compression": compression, "step": step}


def run_point(
    args: argparse.Namespace, engine: str, size: int, compression: str, step: str, workers: int
) -> dict:
    """Launch one (engine, size, compression, step mode, workers) point; returns its row."""
    config = point_config(args, engine, size, compression, step, workers)
    launches, discarded = [], []
    for _ in range(args.repeats):
        for attempt in range(args.retries + 1):
            wait_for_quiet(args.max_other_cpu)
            result = _launch_once(args, engine, size, compression, step, workers)
            if isinstance(result, str):  # a failed launch: the point's row says why
                status, reason = result.split(":", 1)
                return make_row("scaling", config, status=status, reason=reason.strip())
            # Other jobs on a shared machine take the ranks' cores: a launch during which
            # they used more than --max-other-cpu cores is run again (up to --retries
            # times; the last try is kept whatever it saw), and the discarded one recorded.
            if result[0]["other_cpu_cores"] <= args.max_other_cpu or attempt == args.retries:
                break
            discarded.append(result[0])
        launches.append(result)
    # Launches of one point differ by up to a third here (two shared cores in a VM); the
    # median launch by step time is the point's figure, and every launch's time is kept.
    launches.sort(key=lambda launch: launch[0]["step_s"])
    measured, records = launches[(len(launches) - 1) // 2]
    if engine == "spatial":  # the ranks share each patch
        scaling = {
            "throughput_per_worker": measured["patches_per_s"] / workers,
            "halo_s": measured["halo_s"],
        }
    else:
        scaling = {
            "throughput_per_worker": args.batch_size / measured["step_s"],
            "allreduce_s": measured["allreduce_s"],
        }
    return make_row(
        "scaling",
        config,
        measured=measured,
        scaling=scaling,
        extra={
            "steps": args.steps,
            "warmup": args.warmup,
            "launches_step_s": [launch[0]["step_s"] for launch in launches],
            # CPU used outside the ranks during each launch, in cores (same order)
            "launches_other_cpu_cores": [launch[0]["other_cpu_cores"] for launch in launches],
            "discarded_launches": [
                {"step_s": m["step_s"], "other_cpu_cores": m["other_cpu_cores"]} for m in discarded
            ],
            "command": getattr(args, "command", None),
            "horovod_cycle_time_ms": records[0].get("horovod_cycle_time_ms"),
            "cores": [r.get("cores") for r in sorted(records, key=lambda r: r["rank"])],
        },
    )


def _launch_once(
    args: argparse.Namespace, engine: str, size: int, compression: str, step: str, workers: int
) -> tuple[dict, list[dict]] | str:
    """One launch of a point: (summary, rank records), or "status: reason" when it failed."""
    with tempfile.TemporaryDirectory(prefix="histoseg-scaling-") as tmp:
        spec = {
            "engine": engine,
            "patch_size": size,
            "batch_size": args.batch_size,
            "backbone": args.backbone,
            "alpha": args.alpha,
            "compression": compression,
            "step": step,
            "threads": args.threads_per_worker,
            "steps": args.steps,
            "warmup": args.warmup,
            "pin": not args.no_pin,
            "out_dir": tmp,
        }
        busy0, wall0 = busy_cpu_s(), time.monotonic()
        failed = launch(spec, workers, args.timeout_s)
        busy_s, wall_s = busy_cpu_s() - busy0, time.monotonic() - wall0
        files = sorted(Path(tmp).glob("rank*.json"))
        if failed or len(files) != workers:
            return failed or f"error: {len(files)} of {workers} ranks wrote a record"
        records = [json.loads(f.read_text()) for f in files]
    summary = summarise_spatial if engine == "spatial" else summarise
    measured = summary(records, args.batch_size, size)
    # Cores' worth of CPU that processes other than the ranks (the launcher included) used
    # during the launch: on a shared machine, what tells a disturbed launch from a clean one.
    ranks_cpu_s = sum(r.get("cpu_s", 0.0) for r in records)
    measured["other_cpu_cores"] = max(0.0, busy_s - ranks_cpu_s) / wall_s
    return measured, records


def add_efficiency(rows: list[dict]) -> None:
    """efficiency = throughput(N) / (N x throughput(1)) against the same engine, size,
    compression and step mode (one worker runs the same compiled step, minus the collective)."""
    base = {}
    for r in rows:
        c = r["config"]
        if r["status"] == "ok" and c["workers"] == 1:
            base[(c["engine"], c["patch_size"], c["compression"], c.get("step"))] = r
    for r in rows:
        c = r["config"]
        # the 1-worker baseline never allreduces, so its compression does not matter
        ref = base.get((c["engine"], c["patch_size"], c["compression"], c.get("step"))) or base.get(
            (c["engine"], c["patch_size"], "none", c.get("step"))
        )
        if r["status"] != "ok" or ref is None:
            continue
        one = ref["scaling"]["throughput_per_worker"]
        total = r["measured"]["patches_per_s"]
        r["scaling"]["efficiency"] = total / (c["workers"] * one)
        r["scaling"]["total_throughput"] = total


def attach_projection(
    rows: list[dict], args: argparse.Namespace, spread_rows: Sequence[dict] | None = None
) -> tuple[str, list[dict]]:
    """Calibrate the ring model on these rows, add each row's cluster curve as
    ``extra.projection``, and build the headline projection rows (2048 px, 256 x 2).

    The straggler spread is pooled from every row without a collective in ``spread_rows``
    (default ``rows``; the no-communication control's rows included), compute time from
    every single-worker row, the allreduce's overhead from the rows' probes (as
    ``python -m histoseg.scaling --results`` reads the same rows); curves are added to the
    rows of a real engine only. Curves and projection rows carry the straggler band
    (``efficiency_low``, ``efficiency_high``) when the rows hold repeated launches.
    """
    network = Network(args.bandwidth_gbps, args.latency_us * 1e-6, args.workers_per_node)
    spread = spread_from_rows(rows if spread_rows is None else spread_rows)
    # the calibration histoseg.scaling makes of the same rows (the control has no allreduce)
    overhead = calibrated_overhead(rows, {})
    rows = [r for r in rows if r["config"]["engine"] != "spatial"]  # not data parallel
    engine_rows = [r for r in rows if r["config"]["engine"] != "none"]
    max_workers = args.nodes * args.workers_per_node
    workers = [n for n in DEFAULT_WORKERS if n <= max_workers]
    for r in engine_rows:
        if r["status"] != "ok" or r["config"]["workers"] < 2:
            continue
        curve = project(
            r["measured"]["compute_s"],
            r["measured"]["gradient_bytes"],
            workers,
            network=network,
            overhead_s=overhead,
            fp16=r["config"]["compression"] == "fp16",
            spread=spread,
        )
        r.setdefault("extra", {})["projection"] = curve_points(curve)
    if not any(r["status"] == "ok" for r in engine_rows):
        return "no measured horovod/tf rows: no projection", []
    inputs, tables = projection_from(
        [r for r in rows if r["status"] == "ok"],
        patch_size=args.project_size,
        compute_scale=args.compute_scale,
        network=network,
        max_workers=max_workers,
        spread=spread,
    )
    made = make_projection_rows(inputs, tables, network, getattr(args, "command", None))
    return format_projection(inputs, tables), made


def make_projection_rows(
    inputs: dict[str, Any], tables: dict[str, list[dict]], network: Any, command: str | None
) -> list[dict]:
    """One row of engine "projection" per allreduce variant, at the table's last worker
    count: predicted efficiency and its straggler band, the whole curve, the inputs and the
    command that made it."""
    rows = []
    for name, table in tables.items():
        last = table[-1]
        band = {k: last[k] for k in ("efficiency_low", "efficiency_high") if k in last}
        rows.append(
            make_row(
                "scaling",
                {
                    "patch_size": inputs["patch_size_px"],
                    "backbone": inputs.get("backbone"),
                    "engine": "projection",
                    "workers": last["workers"],
                    "nodes": last["nodes"],
                    "compression": "fp16" if name == "fp16" else "none",
                    "bandwidth_gbps": network.bandwidth_gbps,
                    "workers_per_node": network.workers_per_node,
                },
                predicted={
                    "efficiency": last["efficiency"],
                    **band,
                    "allreduce_s": last["allreduce_s"],
                    "straggler_s": last["straggler_s"],
                    "step_s": last["step_s"],
                    "compute_s": inputs["compute_s"],
                },
                extra={
                    "inputs": inputs,
                    "projection": curve_points(table),
                    "command": command,
                },
            )
        )
    return rows


def kept_rows(old: Sequence[dict], new: Sequence[dict]) -> list[dict]:
    """``old`` rows less those made before step modes existed that ``new`` measures again.

    Rows without ``config.step`` came from the three-call step, but their config key cannot
    tell them from a row of either mode; left beside new rows of the same point they would
    be read as a second measurement of it.
    """
    remeasured = {
        config_key({k: v for k, v in r["config"].items() if k != "step"})
        for r in new
        if r.get("kind") == "scaling"
    }
    return [
        r
        for r in old
        if not (
            r.get("kind") == "scaling"
            and "step" not in r.get("config", {})
            and r.get("config", {}).get("engine") != "projection"
            and config_key(r["config"]) in remeasured
        )
    ]


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m bench.scaling",
        description="Weak scaling of the DeepLabV3+ train step over workers (Horovod, tf.distribute).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            "  python -m bench.scaling --workers 1 2 --sizes 512 1024 --engine horovod tf\n"
            "  python -m bench.scaling --workers 1 2 --sizes 512 --engine horovod "
            "--compression none fp16 --backbone xception65 --out results/scaling_x65.json\n"
            "  python -m bench.scaling --spatial-workers 2 --sizes 512 1024 "
            "--backbone xception65 --out results/scaling_spatial.json\n"
        ),
    )
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--sizes", type=int, nargs="+", default=[512, 1024], help="patch sizes, px")
    p.add_argument(
        "--engine",
        nargs="+",
        choices=ENGINES,
        default=["horovod", "tf"],
        help="none = N independent processes, the no-communication control",
    )
    p.add_argument(
        "--spatial-workers",
        type=int,
        nargs="+",
        metavar="N",
        help="measure engine spatial instead: each patch cut across N ranks (and the "
        "1-rank step it is compared with); halo_s is the halo exchange's exposed time",
    )
    p.add_argument("--compression", nargs="+", choices=("none", "fp16"), default=["none"])
    p.add_argument(
        "--step",
        nargs="+",
        choices=STEP_MODES,
        default=[DEFAULT_STEP_MODE],
        help="train step mode(s): overlap (one compiled step, allreduce overlapping the "
        "backward pass; allreduce_s = the exposed part) or separate (three calls, "
        f"allreduce timed around the collective); default {DEFAULT_STEP_MODE}",
    )
    p.add_argument("--backbone", default="mobilenetv2")
    p.add_argument(
        "--alpha", type=parse_alpha, help=f"mobilenetv2 width multiplier, in (0, {MAX_ALPHA:g}]"
    )
    p.add_argument("--batch-size", type=int, default=1, help="patches per worker per step")
    p.add_argument("--steps", type=int, default=5, help="timed steps (median reported)")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="launches per point; the median launch by step time is reported (default 1)",
    )
    _launch_options(p)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"results (default {DEFAULT_OUT})")
    p.add_argument(
        "--show",
        action="store_true",
        help="measure nothing: print the 2-worker table of the rows in --out (Markdown)",
    )
    p.add_argument(
        "--reproject",
        action="store_true",
        help="measure nothing: project the measured rows in --out again (the projection "
        "options below apply) and rewrite its projection rows and curves",
    )
    _projection_options(p)
    return p


def _launch_options(p: argparse.ArgumentParser) -> None:
    """How each point's ranks are launched and when a launch is taken as disturbed."""
    p.add_argument(
        "--threads-per-worker",
        type=int,
        help="compute threads per worker (default: cores // largest worker count)",
    )
    p.add_argument("--timeout-s", type=float, default=900.0, help="per launch")
    p.add_argument(
        "--max-other-cpu",
        type=float,
        default=0.3,
        help="a launch during which other processes (launcher included) used more CPU than "
        "this many cores is run again (default 0.3); each launch first waits for the "
        "machine to be this quiet",
    )
    p.add_argument(
        "--retries", type=int, default=2, help="extra tries of a disturbed launch (default 2)"
    )
    p.add_argument(
        "--no-pin",
        action="store_true",
        help="leave workers unpinned (default: each rank on its own block of cores)",
    )


def _projection_options(p: argparse.ArgumentParser) -> None:
    """The ring-allreduce projection's inputs (histoseg.scaling)."""
    proj = p.add_argument_group("projection (histoseg.scaling)")
    proj.add_argument("--project-size", type=int, default=2048, help="patch size, px")
    proj.add_argument("--nodes", type=int, default=256)
    proj.add_argument("--workers-per-node", type=int, default=2)
    proj.add_argument("--bandwidth-gbps", type=float, default=100.0)
    proj.add_argument("--latency-us", type=float, default=1.0)
    proj.add_argument(
        "--compute-scale", type=float, default=1.0, help="scale the measured compute time"
    )
    proj.add_argument(
        "--project-spatial-size",
        type=int,
        default=8192,
        help="patch size, px, of the spatial projection (from rows of engine spatial)",
    )
    proj.add_argument(
        "--project-spatial-workers", type=int, default=8, help="ranks per patch of it"
    )
    p.add_argument("--worker", help=argparse.SUPPRESS)


def reproject(rows: list[dict], args: argparse.Namespace) -> int:
    """``--reproject``: project the measured rows of ``--out`` again, measuring nothing.

    Every measured scaling row is the sweep: its projection rows (engine "projection")
    replace the stored ones of the same config, and each multi-worker row's
    ``extra.projection`` is recomputed; the measured figures stay as they are.
    """
    measured = [
        r for r in rows if r.get("kind") == "scaling" and r["config"].get("engine") != "projection"
    ]
    text, projection_rows = attach_projection(measured, args)
    spatial_text, spatial_rows = spatial_projection(measured, args, measured)
    projection_rows += spatial_rows
    if spatial_text:
        text += f"\n\n{spatial_text}"
    if not projection_rows:
        raise ConfigError(f"--reproject: {args.out}: {text}")
    write_rows(args.out, merge_rows(rows, projection_rows))
    print(summary_table(measured))
    print()
    print(text)
    print(f"\nrows: {args.out} (+ .csv): {len(projection_rows)} projection row(s) rewritten")
    return 0


def sweep_points(args: argparse.Namespace) -> list[tuple[str, int, str, str, int]]:
    """The sweep's (engine, size, compression, step, workers) points, every one checked
    before any launch (an invalid one is refused with one line)."""
    if args.spatial_workers:
        args.engine, args.workers = ["spatial"], sorted({1, *args.spatial_workers})
        args.step, args.compression = ["spatial"], ["none"]
        ranks = args.project_spatial_workers
        if ranks < 2 or args.project_spatial_size % (16 * ranks):
            raise ConfigError(
                f"--project-spatial-size {args.project_spatial_size} must be a multiple of 16 "
                f"x --project-spatial-workers ({ranks}, at least 2)"
            )
    if any(w < 1 for w in args.workers) or any(s < 16 or s % 16 for s in args.sizes):
        raise ConfigError("--workers must be >= 1 and --sizes multiples of 16")
    if args.repeats < 1:
        raise ConfigError(f"--repeats must be >= 1, got {args.repeats}")
    from histoseg.train.launch import default_threads_per_worker

    args.threads_per_worker = args.threads_per_worker or default_threads_per_worker(
        max(args.workers)
    )
    points = [
        (engine, size, compression, step, workers)
        for engine in args.engine
        for size in args.sizes
        for step in args.step
        for compression in args.compression
        for workers in sorted(args.workers)
        # compression only matters where gradients travel: N > 1 ranks of a real engine
        if not ((workers == 1 or engine == "none") and compression != args.compression[0])
    ]
    for point in points:
        point_config(args, *point)
    return points


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        return (spatial_worker_main if spec["engine"] == "spatial" else worker_main)(spec)

    args.command = command_line("bench.scaling", argv)
    if args.out.suffix != ".json":
        raise ConfigError(f"--out {args.out} must end in .json (a .csv is written beside it)")
    if args.show or args.reproject:
        if not args.out.exists():
            raise ConfigError(f"--show/--reproject: no results file {args.out}; run a sweep first")
        if args.reproject:
            return reproject(load_rows(args.out), args)
        rows = load_rows(args.out)
        print("\n\n".join(t for t in (markdown_table(rows), spatial_markdown_table(rows)) if t))
        return 0
    points = sweep_points(args)
    rows: list[dict] = []
    for i, (engine, size, compression, step, workers) in enumerate(points, 1):
        head = f"[{i}/{len(points)}] {engine} {size} px {compression} {step} x{workers}"
        print(f"{head}: running ({args.threads_per_worker} thread(s) per worker)", flush=True)
        started = time.monotonic()
        row = run_point(args, engine, size, compression, step, workers)
        rows.append(row)
        add_efficiency(rows)
        m = row.get("measured", {})
        kind = "halo" if engine == "spatial" else "allreduce"
        done = (
            f"{m['step_s']:.3f} s/step, {kind} {m[f'{kind}_s']:.4f} s "
            f"({100 * m[f'{kind}_share']:.1f}%)"
            if row["status"] == "ok"
            else f"{row['status']}: {row.get('reason', '')[:200]}"
        )
        print(f"{head}: {done} [{time.monotonic() - started:.0f} s]", flush=True)
        write_rows(args.out, merge_rows(kept_rows(load_rows_if_exists(args.out), rows), rows))
    old = load_rows_if_exists(args.out)
    kept = kept_rows(old, rows)
    if len(kept) < len(old):
        print(
            f"{args.out}: replaced {len(old) - len(kept)} row(s) made before step modes "
            "existed (no config.step) by this run's rows of the same points",
            flush=True,
        )
    # the straggler spread pools every row without a collective that the file will hold:
    # this sweep's and those already there (a sweep of one launch per point has none)
    text, projection_rows = attach_projection(rows, args, spread_rows=merge_rows(kept, rows))
    spatial_text, spatial_rows = spatial_projection(rows, args, merge_rows(kept, rows))
    write_rows(args.out, merge_rows(kept, rows + projection_rows + spatial_rows))
    print()
    print(summary_table(rows))
    print()
    print(text)
    if spatial_text:
        print(f"\n{spatial_text}")
    print(f"\nrows: {args.out} (+ .csv)")
    return 0 if any(r["status"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
