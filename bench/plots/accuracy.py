"""The memory-vs-accuracy figure: what a larger patch costs and buys, one panel per task.

Each panel holds the budget-sweep rows (``python -m bench.accuracy``) of one task: the
synthetic "local" control, the synthetic "context" task, or real slides. A point is one
patch size of one series (same model, batch, normalisation, pixel budget): its mean mIoU
over the seeds, a bar from the lowest to the highest seed, against the measured peak
memory of that very configuration. Beside it: the Bayes ceiling of the same validation
patches (the best any model seeing one patch can score, synthetic slides only), the
all-background baseline, and the study's published CAMELYON points, placed on the memory
axis with histoseg's number for the study's configuration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib
import numpy as np
from matplotlib.lines import Line2D
from matplotlib.ticker import NullFormatter

from bench import reference
from bench.config import task_of
from bench.plots import caption
from bench.plots.select import GB, accuracy_memory, memory_index, number, section, study_memory
from bench.plots.style import (
    PALETTE,
    REFERENCE_STYLE,
    STYLE,
    PlotOutcome,
    gb_formatter,
    new_figure,
    save,
)

#: Config keys that differ between the runs of one point (averaged over) or that follow
#: from others (steps from the budget; precision and remat as the planner chose them).
POINT_FREE_KEYS = ("seed", "steps", "precision", "remat", "patch_size", "synthetic_task")
#: Config keys a legend names when they differ between the series of a figure.
SERIES_KEYS = (
    "backbone",
    "backbone_options",
    "batch_size",
    "norm",
    "head_filters",
    "tumour_weight",
    "learning_rate",
    "prior_correction",
    "pixel_budget",
    "data",
)
TASK_TITLES = {
    "context": "context task:\nlesions marked only by their margin",
    "local": "local task (control):\ntumour has its own texture",
}


def series_key(config: Mapping[str, Any]) -> str:
    """What the runs of one curve share: the config without seed, size and planner choices."""
    return repr(sorted((k, repr(v)) for k, v in config.items() if k not in POINT_FREE_KEYS))


def series_config(row: Mapping[str, Any]) -> dict[str, Any]:
    """A row's config as its curve knows it: under a per-size learning-rate rule
    (``bench.accuracy --lr-rule side``) each size runs its own rate, so the curve is
    named by the rule (``extra.lr_rule``), not by one size's rate. A row made before the
    prior correction (``histoseg.train.prior``) was scored uncorrected."""
    config = dict(row.get("config", {}))
    config.setdefault("prior_correction", False)
    rule = (row.get("extra") or {}).get("lr_rule")
    if rule:
        config["learning_rate"] = rule.removeprefix("side: ")
    return config


def seed_points(rows: Sequence[dict], memory_index: Mapping[tuple, dict]) -> list[dict]:
    """One entry per patch size of each series: the seeds' mIoU, peaks, ceilings, baselines."""
    groups: dict[tuple[str, str, int], list[dict]] = {}
    for row in rows:
        config = series_config(row)
        key = (task_of(row), series_key(config), int(config.get("patch_size") or 0))
        groups.setdefault(key, []).append(row)
    points = []
    for (task, series, size), members in sorted(groups.items()):
        ious, peaks, ceilings, baselines, sources = [], [], [], [], set()
        for row in members:
            peak, source = accuracy_memory(row, memory_index)
            miou = number(row["metrics"].get("miou"))
            if peak is None or miou is None:
                continue
            ious.append(miou)
            peaks.append(peak)
            sources.add(source)
            ceiling = (row.get("extra") or {}).get("bayes_ceiling") or {}
            if number(ceiling.get("miou")) is not None:
                ceilings.append(float(ceiling["miou"]))
            if number(row["metrics"].get("baseline_miou")) is not None:
                baselines.append(float(row["metrics"]["baseline_miou"]))
        if not ious:
            continue
        points.append(
            {
                "task": task,
                "series": series,
                "config": series_config(members[0]),
                "patch_size": size,
                "peak_gb": float(np.mean(peaks)) / GB,
                "predicted": sources == {"predicted"},
                "miou": ious,
                "ceiling": float(np.mean(ceilings)) if ceilings else None,
                "baseline": float(np.mean(baselines)) if baselines else None,
                "val_patches": members[0]["metrics"].get("val_patches"),
            }
        )
    return points


def _draw_series(ax, pts: list[dict], color: str) -> None:
    """Mean mIoU per size with its seed range, the ceiling and the baseline of the same pixels."""
    pts = sorted(pts, key=lambda p: p["patch_size"])
    xs = [p["peak_gb"] for p in pts]
    means = [float(np.mean(p["miou"])) for p in pts]
    low = [m - min(p["miou"]) for m, p in zip(means, pts, strict=True)]
    high = [max(p["miou"]) - m for m, p in zip(means, pts, strict=True)]
    ax.errorbar(xs, means, yerr=[low, high], color=color, lw=1.4, marker="o", ms=6, capsize=4)
    for x, p in zip(xs, pts, strict=True):
        ax.plot([x] * len(p["miou"]), p["miou"], ls="none", marker=".", ms=4, color=color)
        label = f"{p['patch_size']} px, n={len(p['miou'])}"
        ax.annotate(
            label,
            (x, min(p["miou"])),
            textcoords="offset points",
            xytext=(6, -12),
            fontsize=8,
            color=color,
        )
    ceiling = [(x, p["ceiling"]) for x, p in zip(xs, pts, strict=True) if p["ceiling"] is not None]
    if ceiling:
        ax.plot(*zip(*ceiling, strict=True), ls="--", marker="^", ms=6, color=color, lw=1.0)
    base = [(x, p["baseline"]) for x, p in zip(xs, pts, strict=True) if p["baseline"] is not None]
    if base:
        ax.plot(*zip(*base, strict=True), ls=":", marker="x", ms=6, color=color, lw=1.0)


def _draw_study(ax, memory_index: Mapping[tuple, dict]) -> bool:
    """The study's published mIoU per patch size at histoseg's memory for the study's config;
    False when no memory row places them."""
    drawn = False
    for dataset, table in reference.PUBLISHED.items():
        xy = []
        for size in reference.STUDY_PATCH_SIZES_PX:
            peak, _source = study_memory(size, memory_index)
            if peak is not None:
                xy.append((peak / GB, table[size]["miou"], size))
        if not xy:
            continue
        style = REFERENCE_STYLE[dataset]
        ax.plot(
            [x for x, _, _ in xy],
            [y for _, y, _ in xy],
            ls=":",
            lw=1.0,
            marker=style["marker"],
            color=style["color"],
            markerfacecolor="white",
            ms=6,
        )
        if dataset == "CAMELYON16":
            for x, y, size in xy:
                ax.annotate(
                    f"{size}",
                    (x, y),
                    textcoords="offset points",
                    xytext=(-4, 7),
                    fontsize=7,
                    color=style["color"],
                    ha="right",
                )
        drawn = True
    return drawn


def _legend_handles(series: Mapping[str, str], has_study: bool) -> list[Line2D]:
    handles = [
        Line2D([], [], color=color, marker="o", label=label) for label, color in series.items()
    ]
    grey = "#333333"
    handles += [
        Line2D(
            [], [], color=grey, marker="o", label="mean over seeds; bar: lowest to highest seed"
        ),
        Line2D([], [], color=grey, marker="^", ls="--", label="Bayes ceiling, same val. patches"),
        Line2D([], [], color=grey, marker="x", ls=":", label="all-background prediction"),
    ]
    if has_study:
        for dataset, style in REFERENCE_STYLE.items():
            handles.append(
                Line2D(
                    [],
                    [],
                    color=style["color"],
                    marker=style["marker"],
                    ls=":",
                    markerfacecolor="white",
                    label=f"{dataset} (study, published; memory: histoseg estimate)",
                )
            )
    return handles


def draw_memory_vs_accuracy(rows: Sequence[dict], out_dir: Path) -> PlotOutcome:
    """mIoU against measured peak memory, one panel per task, from budget-sweep rows."""
    outcome = PlotOutcome("memory_vs_accuracy")
    accuracy_rows = [r for r in rows if r.get("kind") == "accuracy"]
    swept = [r for r in accuracy_rows if r.get("config", {}).get("pixel_budget")]
    if not swept:
        swept = accuracy_rows  # no budget sweep at all: draw the single runs there are
    elif len(swept) < len(accuracy_rows):
        # Single training runs (no budget) are other experiments; they would blur the trade.
        outcome.notes.append(
            f"{len(accuracy_rows) - len(swept)} accuracy row(s) without a pixel budget "
            "(single training runs) not drawn"
        )
    ok = []
    for row in swept:
        if row.get("status", "ok") == "ok" and section(row, "metrics"):
            ok.append(row)
        else:
            outcome.notes.append(caption.status_note(row, f"{row['config'].get('patch_size')} px"))
    index = memory_index(rows)
    points = seed_points(ok, index)
    if not points:
        outcome.notes.insert(
            0, "no accuracy row (kind 'accuracy', status ok) to place; run python -m bench.accuracy"
        )
        return outcome
    tasks = sorted({p["task"] for p in points}, key=lambda t: (t != "local", t != "context", t))
    configs = [p["config"] for p in points]
    varying = caption.varying_keys(configs, SERIES_KEYS)
    labels: dict[str, str] = {}
    for p in points:
        keys = list(dict.fromkeys(["backbone", *varying, "pixel_budget"]))
        labels.setdefault(p["series"], caption.series_label(p["config"], keys))
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(sorted(labels))}
    with matplotlib.rc_context(STYLE):
        fig = new_figure(5.2 * len(tasks) + 3.6, 5.0)
        axes = fig.subplots(1, len(tasks) + 1, squeeze=False)[0]
        has_study = False
        for ax, task in zip(axes, tasks, strict=False):
            for series in sorted(labels):
                pts = [p for p in points if p["task"] == task and p["series"] == series]
                if pts:
                    _draw_series(ax, pts, colors[series])
            has_study = _draw_study(ax, index) or has_study
            ax.set_xscale("log")
            ax.xaxis.set_major_formatter(gb_formatter())
            ax.xaxis.set_minor_formatter(NullFormatter())
            ax.set_xlabel("measured peak training memory (GB, log scale)")
            ax.set_ylabel("validation mIoU (0-1)")
            ax.set_ylim(0.3, 1.02)
            ax.set_title(TASK_TITLES.get(task, f"real slides: {task}"))
        legend_ax = axes[-1]
        legend_ax.axis("off")
        handles = _legend_handles({labels[s]: colors[s] for s in sorted(labels)}, has_study)
        legend_ax.legend(handles=handles, loc="center", frameon=False, fontsize=8)
        missing = [
            size for size in reference.STUDY_PATCH_SIZES_PX if study_memory(size, index)[0] is None
        ]
        if missing:
            outcome.notes.append(
                f"study's points at {', '.join(map(str, missing))} px omitted: no histoseg "
                "memory row for their config (xception65, float32, batch 1) to place them; "
                "make one with: python -m bench.memory --predict-only --backbone xception65 "
                "--sizes 256 704 1024 2048"
            )
        fig.suptitle("What a larger patch costs (memory) and buys (mIoU)", fontsize=12)
        outcome.paths = save(
            fig, out_dir, outcome.name, caption.wrap(_caption_lines(ok, outcome.notes))
        )
    return outcome


def _caption_lines(rows: Sequence[dict], notes: Sequence[str]) -> list[str]:
    seeds = sorted({r["config"].get("seed") for r in rows}, key=lambda s: (s is None, s))
    walls = [number((r.get("extra") or {}).get("wall_s")) for r in rows]
    wall_s = sum(w for w in walls if w is not None)
    lines = [
        "x: TF allocator peak over the whole training run of that configuration, mean over seeds; "
        f"y: validation mIoU over held-out slides, seeds {', '.join(map(str, seeds))}; "
        f"{len(rows)} runs, {wall_s / 60:.0f} min of training and validation in all.",
        caption.config_line(rows, varied=("patch_size", "steps", "seed")),
        caption.machines_line(rows),
        f"study points: {reference.SOURCE}; their memory is histoseg's number for their config.",
    ]
    return lines + [f"missing: {n}" for n in notes]
