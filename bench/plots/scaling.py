"""The weak-scaling figure: efficiency and total throughput against workers, per engine and
allreduce compression, measured (solid) beside the ring-allreduce projection (dashed), and the
study's 2048 px projection to 256 nodes with its straggler band (shaded)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from bench.plots import caption
from bench.plots.select import (
    compression_of,
    inputs_line,
    number,
    projection_from_model,
    projection_of,
    section,
)
from bench.plots.style import PALETTE, STYLE, PlotOutcome, log2_axis, new_figure, save
from histoseg.results import step_mode_of
from histoseg.scaling.measured import projection_from, spread_from_rows
from histoseg.scaling.model import DEFAULT_WORKERS, Network, band_text, project, published_checks
from histoseg.scaling.stragglers import Spread
from histoseg.train.engines.base import DEFAULT_STEP_MODE

#: (engine, compression, patch size) -> [(workers, efficiency, throughput per worker)]
Points = dict[tuple, list[tuple[int, float | None, float | None]]]
#: (legend label, compression) -> [(workers, efficiency)]
Curves = dict[tuple[str, str], list[tuple[int, float]]]
#: (legend label, [(workers, low, central, high efficiency)])
Band = tuple[str, list[tuple[int, float, float, float]]]
#: The study's cluster run the band projects: 2048 px patches, 256 nodes x 2 workers.
STUDY_PATCH_PX, STUDY_NODES, STUDY_WORKERS_PER_NODE = 2048, 256, 2
BAND_COLOR = "#7B3294"
SPATIAL_COLOR = "#1B7837"


def engine_label(engine: str, compression: str) -> str:
    """Legend text of one (engine, compression) line of the weak-scaling plot."""
    if engine == "none":  # bench.scaling's control: N processes that never communicate
        return "no communication (independent processes)"
    kind = "uncompressed" if compression == "none" else f"{compression}-compressed"
    return f"{engine}, {kind} allreduce"


def measured_points(rows: Sequence[dict], notes: list[str]) -> Points:
    """The measured rows' points; rows that did not run become notes (put first)."""
    points: Points = {}
    not_run: list[tuple[str, str, str]] = []
    for row in rows:
        config = row.get("config", {})
        key = (str(config.get("engine", "?")), compression_of(row), config.get("patch_size"))
        what = f"{key[0]}, {key[1]}, {key[2]} px, {config.get('workers', '?')} workers"
        if row.get("status", "ok") != "ok":
            not_run.append(caption.status_item(row, what))
            continue
        scaling = section(row, "scaling")
        workers = number(config.get("workers"))
        efficiency = number(scaling.get("efficiency"))
        per_worker = number(scaling.get("throughput_per_worker"))
        if workers is not None and (efficiency is not None or per_worker is not None):
            points.setdefault(key, []).append((int(workers), efficiency, per_worker))
    notes[:0] = caption.compact_notes(not_run)
    # One worker has nothing to compress: its point starts every compression's line.
    for (engine, _compression, size), pts in points.items():
        if not any(w == 1 for w, *_ in pts):
            for (e2, _c2, s2), other in list(points.items()):
                single = [p for p in other if p[0] == 1]
                if e2 == engine and s2 == size and single:
                    pts.append(single[0])
                    break
    return points


def projection_curves(
    projection_rows: Sequence[dict],
    measured_rows: Sequence[dict],
    points: Points,
    shaded: dict | None = None,
) -> tuple[Curves, list[str]]:
    """The dashed curves and a caption line of inputs per curve: from dedicated projection
    rows when there are any (less ``shaded``, the row drawn as the straggler band), else the
    measured rows' ``extra.projection``, else the model."""
    curves: Curves = {}
    inputs_lines: list[str] = []
    if projection_rows:
        for row in projection_rows:
            curve = projection_of(row) if row is not shaded else []
            if curve:
                fp = compression_of(row).replace("none", "fp32")
                label = f"projection, {row.get('config', {}).get('patch_size')} px, {fp} allreduce"
                inputs = section(row, "extra").get("inputs")
                if not isinstance(inputs, Mapping) or "straggler_cv_low" not in inputs:
                    label += " (no stragglers)"
                curves[(label, compression_of(row))] = curve
                line = inputs_line(inputs) if isinstance(inputs, Mapping) else ""
                if line:
                    inputs_lines.append(f"{label} inputs: {line}")
        return curves, inputs_lines
    for row in measured_rows:
        curve = projection_of(row)
        config = row.get("config", {})
        key = (
            f"projection, {config.get('engine')}, {config.get('patch_size')} px, {compression_of(row)}",
            compression_of(row),
        )
        if curve and len(curve) > len(curves.get(key, [])):
            curves[key] = curve
    if curves:
        return curves, inputs_lines
    for engine, compression, size in points:
        same_engine = [r for r in measured_rows if r.get("config", {}).get("engine") == engine]
        if size is None:
            continue
        curve, line = projection_from_model(same_engine, int(size), compression)
        if curve:
            label = f"projection, {engine}, {size} px, {compression}"
            curves[(label, compression)] = curve
            if line:
                inputs_lines.append(f"{label} inputs: {line}")
    return curves, inputs_lines


def straggler_band(
    projection_rows: Sequence[dict], measured_rows: Sequence[dict], spread_rows: Sequence[dict]
) -> tuple[Band | None, list[str]]:
    """The study's 2048 px projection to 256 nodes x 2 with its straggler band, and the caption
    lines that say how it was calibrated.

    The band is the one the fp32 projection row stores (``extra.projection`` items with
    ``efficiency_low``/``efficiency_high``, as bench.scaling writes them) where it holds one;
    else it is projected here from the row's inputs (``extra.inputs``), or without a row from
    histoseg.scaling's model on the measured rows. The spread is the row's own where it holds
    one, else pooled from ``spread_rows`` (launch-to-launch step time of the rows without a
    collective). A band that cannot be made becomes a caption line saying why.
    """
    spread = spread_from_rows(spread_rows)
    workers = [w for w in DEFAULT_WORKERS if w <= STUDY_NODES * STUDY_WORKERS_PER_NODE]
    fp32 = study_row(projection_rows)
    inputs = section(fp32, "extra").get("inputs") if fp32 else None
    try:
        if isinstance(inputs, Mapping) and "straggler_cv_low" in inputs:
            spread = Spread(
                inputs["straggler_cv"],
                inputs["straggler_cv_low"],
                inputs["straggler_cv_high"],
                str(inputs.get("straggler_cv_source")),
            )
        if spread is None:
            return None, ["no straggler band: no scaling rows with repeated launches"]
        if not isinstance(inputs, Mapping):
            inputs, _ = projection_from(
                measured_rows, patch_size=STUDY_PATCH_PX, max_workers=workers[-1], spread=spread
            )
        table = project(
            inputs["compute_s"],
            inputs["gradient_bytes_fp32"],
            workers,
            network=Network(
                inputs["bandwidth_gbps"], inputs["latency_s"], int(inputs["workers_per_node"])
            ),
            overhead_s=inputs["overhead_s"],
            spread=spread,
        )
        checks = published_checks(spread)
    except Exception as exc:  # the band is an extra that must never stop the figure
        return None, [f"no straggler band ({type(exc).__name__}: {exc})"]
    # the band the row stores where it holds one (bench.scaling writes it), else the model's
    stored = stored_band(fp32) if fp32 else []
    table = stored or table
    last = table[-1]
    label = f"projection with stragglers, {STUDY_PATCH_PX} px, fp32 (band)"
    points = [
        (r["workers"], r["efficiency_low"], r["efficiency"], r["efficiency_high"]) for r in table
    ]
    held = "; ".join(
        f"{c['run'].name}: {100 * c['projection']['efficiency']:.1f}% against "
        f"{100 * c['run'].efficiency:.1f}% published"
        for c in checks
        if c["run"].checked
    )
    lines = [
        f"Shaded: the study's {STUDY_PATCH_PX} px run projected to {last['nodes']} nodes x "
        f"{STUDY_WORKERS_PER_NODE} workers with stragglers, {band_text(last)} at "
        f"{last['workers']} workers (line: {100 * last['efficiency']:.1f}%); compute_s="
        f"{inputs['compute_s']:.3g}, overhead_s={inputs['overhead_s']:.3g}, "
        f"{inputs['bandwidth_gbps']:g} Gb/s, fp32 allreduce.",
        f"Calibration: a synchronous step waits for the slowest of N workers, E[max of N normals] "
        f"(exact order statistic) of a step-time spread cv {100 * spread.cv:.2f}% (band "
        f"{100 * spread.low:.2f}-{100 * spread.high:.2f}%: {spread.source}). Fed the published "
        f"runs, the same model gives {held} (python -m histoseg.scaling --published; "
        "docs/cluster.md says where it is wrong).",
    ]
    return (label, points), lines


def study_row(projection_rows: Sequence[dict]) -> dict | None:
    """The fp32 projection row of the study's patch size (the band's), if any."""
    return next(
        (
            r
            for r in projection_rows
            if compression_of(r) == "none"
            and r.get("config", {}).get("patch_size") == STUDY_PATCH_PX
        ),
        None,
    )


def stored_band(row: dict) -> list[dict]:
    """The straggler band a projection row stores per worker count (``extra.projection``
    items with ``efficiency_low`` and ``efficiency_high``); [] when any item lacks it."""
    keys = ("workers", "efficiency_low", "efficiency", "efficiency_high")
    items = section(row, "extra").get("projection") or []
    if not items or not all(number(item.get(k)) is not None for item in items for k in keys):
        return []
    config = row.get("config", {})
    per_node = int(number(config.get("workers_per_node")) or STUDY_WORKERS_PER_NODE)
    band = [{k: float(item[k]) for k in keys} for item in items]
    for item in band:
        item["workers"] = int(item["workers"])
        item["nodes"] = -(-item["workers"] // per_node)
    return sorted(band, key=lambda item: item["workers"])


def spatial_band(projection_rows: Sequence[dict]) -> tuple[Band | None, list[str]]:
    """The spatial projection (a row of engine "projection" with ``spatial_workers``, as
    ``bench.scaling`` writes it from rows of engine "spatial") as a band, and its caption."""
    row = next((r for r in projection_rows if r.get("config", {}).get("spatial_workers")), None)
    if row is None:
        return None, []
    config, inputs = row["config"], section(row, "extra").get("inputs") or {}
    band = stored_band(row)
    if not band:
        return None, ["no spatial band: its projection row holds no straggler band"]
    last = band[-1]
    label = (
        f"spatial projection, {config['patch_size']} px over {config['spatial_workers']} ranks "
        "per patch (band)"
    )
    points = [
        (b["workers"], b["efficiency_low"], b["efficiency"], b["efficiency_high"]) for b in band
    ]
    lines = [
        f"Green: one {config['patch_size']} px patch per group of {config['spatial_workers']} "
        f"ranks (spatial parallelism, a model), {band_text(last)} at {last['workers']} workers; "
        f"efficiency against the slab's compute alone (compute_s={number(inputs.get('compute_s')) or 0:.3g}: "
        f"the whole patch's, scaled by pixels from measured 1-rank steps, over the ranks, x "
        f"{number(inputs.get('partition_overhead')) or 0:.3f} partition overhead measured at "
        f"{inputs.get('partition_measured_at')}); halo exchange "
        f"{inputs.get('halo_collectives')} collectives per step costed as implemented "
        f"(allgathers and allreduces); check on this machine: "
        f"{inputs.get('halo_s_check_on_this_machine')}.",
    ]
    return (label, points), lines


def draw_weak_scaling(rows: Sequence[dict], out_dir: Path) -> PlotOutcome:
    """Weak-scaling efficiency and total throughput against workers, per engine and compression.

    Colour = engine + compression, marker = patch size. Projection curves (dashed) come from
    dedicated projection rows (``config.engine == "projection"``) when there are any, else
    from the measured rows' ``extra.projection``, else from histoseg.scaling's model.
    """
    outcome = PlotOutcome("weak_scaling")
    scaling_rows = [r for r in rows if r.get("kind") == "scaling"]
    if not scaling_rows:
        outcome.notes.append("no scaling rows (kind 'scaling'); run python -m bench.scaling")
        return outcome
    projection_rows = [r for r in scaling_rows if r.get("config", {}).get("engine") == "projection"]
    # one patch across ranks: strong scaling, drawn as its cluster projection only
    spatial, spatial_lines = spatial_band(projection_rows)
    projection_rows = [r for r in projection_rows if not r["config"].get("spatial_workers")]
    measured_rows = [
        r
        for r in scaling_rows
        if r.get("config", {}).get("engine") not in ("projection", "spatial")
    ]
    # One train-step mode per figure (bench.scaling --step): the default where measured.
    modes = sorted({step_mode_of(r) for r in measured_rows})
    shown_mode = DEFAULT_STEP_MODE if DEFAULT_STEP_MODE in modes or not modes else modes[0]
    other_modes = [r for r in measured_rows if step_mode_of(r) != shown_mode]
    measured_rows = [r for r in measured_rows if step_mode_of(r) == shown_mode]
    points = measured_points(measured_rows, outcome.notes)
    band, band_lines = straggler_band(projection_rows, measured_rows, scaling_rows)
    # a row whose stored band is shaded is not drawn again as a dashed curve
    banded = study_row(projection_rows)
    shaded = banded if band and banded and stored_band(banded) else None
    curves, inputs_lines = projection_curves(projection_rows, measured_rows, points, shaded)
    if not points and not curves and not spatial:
        outcome.notes.insert(0, "scaling rows hold no measured efficiency/throughput or projection")
        return outcome

    with matplotlib.rc_context(STYLE):
        fig = new_figure(12.5, 4.8)
        ax_eff, ax_tp = fig.subplots(1, 2)
        handles = _draw(ax_eff, ax_tp, points, curves, band, spatial)
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
        fig.suptitle("Weak scaling: fixed patches per worker", fontsize=12)
        plotted = measured_rows or projection_rows
        lines = [
            "weak scaling: every worker trains the same patches per step; total throughput = "
            "scaling.throughput_per_worker x workers; the 1-worker point (no allreduce) starts every "
            "compression's line. Dashed: the ring-allreduce projection (a model, not a measurement).",
            *band_lines,
            *spatial_lines,
            caption.config_line(
                plotted, varied=("workers", "engine", "patch_size", "threads", "compression")
            ),
            caption.machines_line(plotted),
            *inputs_lines,
        ]
        if other_modes:
            lines.append(
                f"train step: {shown_mode}; {len(other_modes)} row(s) of other step modes "
                f"({', '.join(m for m in modes if m != shown_mode)}) not drawn (see the CSV)"
            )
        lines += [f"missing: {n}" for n in outcome.notes]
        outcome.paths = save(fig, out_dir, outcome.name, caption.wrap(lines))
    return outcome


def _curve_color(compression: str) -> str:
    return "#444444" if compression == "fp16" else "#AAAAAA"


def _draw(
    ax_eff, ax_tp, points: Points, curves: Curves, band: Band | None, spatial: Band | None = None
) -> list:
    """Both panels; returns the legend's handles (colours, markers, then curves)."""
    combos = sorted({(e, c) for e, c, _ in points})
    colour_of = {combo: PALETTE[i % len(PALETTE)] for i, combo in enumerate(combos)}
    sizes = sorted({s for _, _, s in points if s is not None})
    marker_of = {s: "osD^v<>"[i % 7] for i, s in enumerate(sizes)}
    for (engine, compression, size), pts in sorted(points.items(), key=lambda kv: str(kv[0])):
        _draw_point_series(
            ax_eff,
            ax_tp,
            sorted(set(pts)),
            colour_of[(engine, compression)],
            marker_of.get(size, "o"),
        )
    for (label, compression), curve in sorted(curves.items()):
        ax_eff.plot(
            [w for w, _ in curve],
            [e * 100 for _, e in curve],
            ls="--",
            lw=1.6,
            color=_curve_color(compression),
            label=label,
        )
    for shown, colour, ls in ((band, BAND_COLOR, "-"), (spatial, SPATIAL_COLOR, "-.")):
        if shown:
            _fill_band(ax_eff, shown[1], colour, ls)
    measured_workers = [w for pts in points.values() for w, *_ in pts]
    band_seen = [w for b in (band, spatial) if b for w, *_ in b[1]]
    _style_axes(
        ax_eff,
        ax_tp,
        [*measured_workers, *(w for c in curves.values() for w, _ in c), *band_seen],
    )
    log2_axis(ax_tp, [*measured_workers, 1])
    handles = [Line2D([], [], color=colour_of[c], lw=6, label=engine_label(*c)) for c in combos]
    handles += [
        Line2D(
            [],
            [],
            color="#333333",
            marker=marker_of[s],
            ls="none",
            ms=7,
            label=f"{s} px (measured)",
        )
        for s in sizes
    ]
    handles += [
        Line2D([], [], color=_curve_color(c), ls="--", lw=1.6, label=label)
        for (label, c) in sorted(curves)
    ]
    for shown, colour in ((band, BAND_COLOR), (spatial, SPATIAL_COLOR)):
        if shown:
            handles.append(Patch(facecolor=colour, alpha=0.4, edgecolor=colour, label=shown[0]))
    return handles


def _fill_band(ax, points: list[tuple[int, float, float, float]], colour: str, ls: str) -> None:
    """A projection's band (low .. high efficiency, shaded) and its central line."""
    workers = [w for w, *_ in points]
    low, central, high = ([100 * p[i] for p in points] for i in (1, 2, 3))
    ax.fill_between(workers, low, high, color=colour, alpha=0.25, lw=0)
    ax.plot(workers, central, color=colour, lw=1.2, ls=ls)


def _draw_point_series(ax_eff, ax_tp, pts, color: str, marker: str) -> None:
    """One (engine, compression, size): efficiency, total throughput and its ideal line."""
    eff = [(w, e) for w, e, _ in pts if e is not None]
    if eff:
        ax_eff.plot(
            [w for w, _ in eff],
            [e * 100 for _, e in eff],
            marker=marker,
            ms=7,
            ls="-",
            lw=1.0,
            alpha=0.9,
            color=color,
        )
    tput = [(w, t * w) for w, _, t in pts if t is not None]
    if tput:
        ax_tp.plot(
            [w for w, _ in tput], [t for _, t in tput], marker=marker, ms=7, lw=1.5, color=color
        )
        base = dict(tput).get(1)
        if base:
            ideal = sorted({w for w, _ in tput})
            ax_tp.plot(ideal, [base * w for w in ideal], ls=":", lw=1.0, color="#999999")


def _style_axes(ax_eff, ax_tp, workers_seen: list[int]) -> None:
    ax_eff.axhline(90, color="#666666", lw=0.8, ls=":")
    ax_eff.annotate(
        "90% target",
        (0.01, 90),
        xycoords=("axes fraction", "data"),
        textcoords="offset points",
        xytext=(0, -11),
        fontsize=8,
        color="#444444",
    )
    log2_axis(ax_eff, [*workers_seen, 1])
    for ax in (ax_eff, ax_tp):
        ax.set_xlabel("workers (processes, log scale)")
    ax_eff.set_ylabel("weak-scaling efficiency (%)")
    ax_eff.set_ylim(0, 110)
    ax_eff.set_title("Efficiency = throughput(N) / (N x throughput(1))")
    ax_tp.set_ylabel("throughput, all workers (patches/s)")
    ax_tp.set_title("Throughput (grey dotted: ideal linear)")
