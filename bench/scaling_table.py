"""A scaling sweep's rows as tables: fixed-width for the terminal, Markdown for docs/."""

from __future__ import annotations

import math
from collections.abc import Sequence

from histoseg.results import step_mode_of
from histoseg.scaling.model import band_text


def summary_table(rows: Sequence[dict]) -> str:
    """Measured rows, one line each; a row that carries a cluster projection
    (``extra.projection``) ends with its efficiency at the largest worker count and the
    straggler band (``projected``: ``93.9% (92.2-95.0%) @512``). ``comm`` is the
    gradient allreduce's time of a data-parallel row and the halo exchange's of an engine
    "spatial" row (``share``: of the step)."""
    head = (
        f"{'engine':<8} {'px':>5} {'comp':>5} {'step':>8} {'workers':>7} {'step_s':>8} "
        f"{'comm':>8} {'kind':>9} "
        f"{'share':>6} {'patch/s/worker':>14} {'total/s':>8} {'efficiency':>10}  projected"
    )
    lines = [head, "-" * len(head)]
    for r in rows:
        c = r["config"]
        if c["engine"] == "projection":
            continue
        if r["status"] != "ok":
            lines.append(
                f"{c['engine']:<8} {c['patch_size']:>5} {c['compression']:>5} "
                f"{c.get('step', '-'):>8} {c['workers']:>7}"
                f"  {r['status']}: {r.get('reason', '')[:70]}"
            )
            continue
        m, s = r["measured"], r["scaling"]
        kind = "halo" if c["engine"] == "spatial" else "allreduce"
        eff = s.get("efficiency")
        line = (
            f"{c['engine']:<8} {c['patch_size']:>5} {c['compression']:>5} "
            f"{c.get('step', '-'):>8} {c['workers']:>7} {m['step_s']:>8.3f} "
            f"{m[f'{kind}_s']:>8.4f} {kind:>9} {100 * m[f'{kind}_share']:>5.1f}% "
            f"{s['throughput_per_worker']:>14.3f} {m['patches_per_s']:>8.3f} "
            f"{'' if eff is None else f'{100 * eff:.1f}%':>10}  {projected_text(r)}"
        )
        lines.append(line.rstrip())
    return "\n".join(lines)


def projected_text(row: dict) -> str:
    """A row's projected efficiency at its curve's largest worker count, with the straggler
    band where the curve has one: ``93.9% (92.2-95.0%) @512``; "" without a curve."""
    curve = (row.get("extra") or {}).get("projection") or []
    if not curve:
        return ""
    last = max(curve, key=lambda p: p["workers"])
    band = f" ({band_text(last)})" if "efficiency_low" in last and "efficiency_high" in last else ""
    return f"{100 * last['efficiency']:.1f}%{band} @{last['workers']}"


def markdown_table(rows: Sequence[dict]) -> str:
    """The 2-worker figures of measured rows as a Markdown table (``--show``).

    One line per engine, step mode and patch size; fp32 / fp16 allreduce side by side.
    "vs control" divides the efficiency by the no-communication control's (engine "none",
    same patch size and step mode): the share of what two independent processes reach.
    "non-compute threads" is the CPU a rank's threads other than TensorFlow's compute pool
    (the engine's and its transport's, Python's) used per step: with one core per rank,
    communication work that no overlap can hide.
    """

    def pair(values: list[float | None], fmt: str) -> str:
        shown = [fmt.format(v) for v in values if v is not None and not math.isnan(v)]
        return " / ".join(shown) if shown else "-"

    measured = [
        r
        for r in rows
        if r.get("kind") == "scaling"
        and r.get("status") == "ok"
        and r["config"].get("engine") not in ("projection", "spatial")
        and r["config"].get("workers") == 2
    ]
    by_point: dict[tuple, dict[str, dict]] = {}
    for r in measured:
        c = r["config"]
        point = (c["engine"], step_mode_of(r), c["patch_size"])
        by_point.setdefault(point, {})[c.get("compression", "none")] = r
    control = {(s, px): rs.get("none") for (e, s, px), rs in by_point.items() if e == "none"}
    lines = [
        "| engine | step | patch px | efficiency fp32 / fp16 | vs control fp32 / fp16 "
        "| allreduce share fp32 / fp16 | step s fp32 / fp16 | non-compute threads, ms/step "
        "| other CPU, cores |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    order = {"none": 0, "horovod": 1, "tf": 2}
    for (engine, step, px), rs in sorted(
        by_point.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1], kv[0][2])
    ):
        variants = [rs.get(c) for c in ("none", "fp16") if rs.get(c)]
        effs = [r["scaling"].get("efficiency") for r in variants]
        ref = control.get((step, px))
        ref_eff = ref["scaling"].get("efficiency") if ref else None
        rel = [e / ref_eff if e is not None and ref_eff else None for e in effs]
        if engine == "none":
            rel = [None]
        shares = [r["measured"]["allreduce_share"] for r in variants]
        # the most any launch of the point saw (rows before this field: none recorded)
        others = [
            max(r.get("extra", {}).get("launches_other_cpu_cores") or [math.nan]) for r in variants
        ]
        # rows made before the field have none: shown as "-"
        threads_ms = [
            1e3 * r["measured"]["other_thread_cpu_s"]
            if "other_thread_cpu_s" in r["measured"]
            else None
            for r in variants
        ]
        lines.append(
            f"| {engine} | {step} | {px} | {pair([100 * e for e in effs if e], '{:.1f}%')} "
            f"| {pair([100 * v for v in rel if v], '{:.1f}%')} "
            f"| {'-' if engine == 'none' else pair([100 * v for v in shares], '{:.1f}%')} "
            f"| {pair([r['measured']['step_s'] for r in variants], '{:.3f}')} "
            f"| {pair(threads_ms, '{:.0f}')} "
            f"| {pair(others, '{:.2f}')} |"
        )
    return "\n".join(lines)


def spatial_markdown_table(rows: Sequence[dict]) -> str:
    """The measured rows of engine "spatial" as a Markdown table ("" without any): per
    patch size and rank count, the step, the same step without the halo exchange, the
    exchange's exposed time and share, its collectives and bytes per step (the most loaded
    rank's), and the efficiency against the 1-rank step (T1 / (N x TN))."""
    spatial = [
        r
        for r in rows
        if r.get("kind") == "scaling"
        and r.get("status") == "ok"
        and r["config"].get("engine") == "spatial"
    ]
    if not spatial:
        return ""
    lines = [
        "| patch px | ranks | step s | without exchange s | halo s | halo share "
        "| collectives per step | halo MB per step | efficiency |",
        "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in sorted(spatial, key=lambda r: (r["config"]["patch_size"], r["config"]["workers"])):
        c, m = r["config"], r["measured"]
        eff = r["scaling"].get("efficiency")
        lines.append(
            f"| {c['patch_size']} | {c['workers']} | {m['step_s']:.3f} | {m['compute_s']:.3f} "
            f"| {m['halo_s']:.3f} | {100 * m['halo_share']:.1f}% | {m['halo_collectives']} "
            f"| {(m['halo_gather_bytes'] + m['halo_sum_bytes']) / 1e6:.1f} "
            f"| {'-' if eff is None else f'{100 * eff:.1f}%'} |"
        )
    return "\n".join(lines)
