"""The memory-vs-patch-size figure: measured and predicted step peak, one colour per
precision / remat mode, against the device sizes users train on."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib
from matplotlib.lines import Line2D

from bench.plots import caption
from bench.plots.select import GB, is_train_memory_row, peak_bytes_of
from bench.plots.style import (
    DEVICE_MEMORIES_GB,
    PALETTE,
    STYLE,
    PlotOutcome,
    gb_formatter,
    log2_axis,
    new_figure,
    save,
)

SERIES_KEYS = ("backbone", "batch_size", "output_stride", "device", "precision", "remat")
#: series (legend label) -> {"measured" | "predicted": [(patch size px, peak bytes)]}
Series = dict[str, dict[str, list[tuple[int, float]]]]


def drawn_rows(rows: Sequence[dict], notes: list[str]) -> list[dict]:
    """The memory rows this figure draws; what it leaves out is added to ``notes``."""
    memory_rows = [r for r in rows if is_train_memory_row(r)]
    infer_rows = sum(r.get("kind") == "memory" for r in rows) - len(memory_rows)
    if infer_rows:
        notes.append(f"{infer_rows} rows of a forward pass alone (--mode infer) left out")
    # One framework per plot: rows of Keras's torch backend have their own allocator and
    # tensors kept, and would read as TensorFlow rows here.
    torch_rows = [r for r in memory_rows if r["config"].get("backend") == "torch"]
    if len(torch_rows) < len(memory_rows):
        memory_rows = [r for r in memory_rows if r not in torch_rows]
        if torch_rows:
            notes.append(
                f"{len(torch_rows)} rows of Keras's torch backend left out "
                "(docs/torch-backend.md draws them as a table)"
            )
    # A random draw (bench.memory --sample) scatters single points over the whole config
    # space: not curves over patch size (docs/memory-harness.md tables them).
    drawn = [r for r in memory_rows if (r.get("extra") or {}).get("draw")]
    if drawn:
        memory_rows = [r for r in memory_rows if r not in drawn]
        notes.append(f"{len(drawn)} rows of a random draw (bench.memory --sample) left out")
    # Batch 1 only, where there is any: more batch sizes make the plot unreadable, and
    # memory per patch is near-linear in the batch (the table in results/ has them all).
    batch_one = [r for r in memory_rows if r.get("config", {}).get("batch_size") == 1]
    if batch_one and len(batch_one) < len(memory_rows):
        notes.append(
            f"{len(memory_rows) - len(batch_one)} rows of batch size > 1 left out "
            "(python -m bench.memory --show lists them)"
        )
        memory_rows = batch_one
    return memory_rows


def group_series(
    memory_rows: Sequence[dict], label_keys: Sequence[str], notes: list[str]
) -> Series:
    """Each row's measured and predicted peak under its series' label; rows without either
    (and rows that did not run) become notes, the ones that did not run first."""
    series: Series = {}
    not_run: list[tuple[str, str, str]] = []
    for row in memory_rows:
        config = row.get("config", {})
        size = config.get("patch_size")
        label = caption.series_label(config, label_keys)
        entry = series.setdefault(label, {"measured": [], "predicted": []})
        measured = peak_bytes_of(row, "measured")
        predicted = peak_bytes_of(row, "predicted")
        if measured is not None:
            entry["measured"].append((size, measured))
        if predicted is not None:
            entry["predicted"].append((size, predicted))
        if row.get("status", "ok") != "ok":
            not_run.append(caption.status_item(row, f"{size} px, {label}"))
        elif measured is None and predicted is None:
            notes.append(f"{size} px, {label}: no peak_bytes measured or predicted")
    notes[:0] = caption.compact_notes(not_run)
    return series


def draw_memory_vs_patch_size(rows: Sequence[dict], out_dir: Path) -> PlotOutcome:
    """Measured and predicted step peak against patch size, one colour per precision / remat mode."""
    outcome = PlotOutcome("memory_vs_patch_size")
    if not any(is_train_memory_row(r) for r in rows):
        outcome.notes.append("no memory rows (kind 'memory'); run python -m bench.memory")
        return outcome
    memory_rows = drawn_rows(rows, outcome.notes)
    varying = caption.varying_keys([r.get("config", {}) for r in memory_rows], SERIES_KEYS)
    label_keys = [k for k in SERIES_KEYS if k in varying or k in ("precision", "remat")]
    series = group_series(memory_rows, label_keys, outcome.notes)
    if not any(s["measured"] or s["predicted"] for s in series.values()):
        outcome.notes.insert(0, "memory rows hold no peak_bytes to draw")
        return outcome

    with matplotlib.rc_context(STYLE):
        fig = new_figure(9.5, 5.6)
        ax = fig.subplots()
        handles = _draw_series(ax, series)
        _draw_axes(ax, series)
        fig.legend(
            handles=handles + _marker_handles(),
            loc="outside right upper",
            frameon=False,
            title=", ".join(k.replace("_size", "").replace("_", " ") for k in label_keys),
        )
        lines = [
            "step peak = allocator peak over one whole training step after a warm-up step "
            "(measured) or histoseg's analytic estimate (predicted); 1 GB = 10^9 bytes.",
            caption.config_line(memory_rows, varied=("patch_size", *label_keys)),
            caption.machines_line(memory_rows),
        ]
        lines += [f"missing: {n}" for n in outcome.notes]
        outcome.paths = save(fig, out_dir, outcome.name, caption.wrap(lines))
    return outcome


def _draw_series(ax, series: Series) -> list[Line2D]:
    """One colour per series: predicted as a larger ring, measured on top as a dot, so that
    agreement reads as a bullseye. Returns the colour legend's handles."""
    handles = []
    for i, (label, entry) in enumerate(sorted(series.items())):
        color = PALETTE[i % len(PALETTE)]
        for kind, ls, face, ms in (("predicted", "--", "white", 9), ("measured", "-", color, 5)):
            pts = sorted(entry[kind])
            if pts:
                ax.plot(
                    [s for s, _ in pts],
                    [b / GB for _, b in pts],
                    ls=ls,
                    marker="o",
                    ms=ms,
                    color=color,
                    markerfacecolor=face,
                    markeredgewidth=1.4,
                    lw=1.5,
                )
        handles.append(Line2D([], [], color=color, lw=6, label=label))
    return handles


def _draw_axes(ax, series: Series) -> None:
    """Log axes, the device-memory lines, labels and title."""
    sizes = [size for s in series.values() for pts in s.values() for size, _ in pts]
    peaks_gb = [b / GB for s in series.values() for pts in s.values() for _, b in pts]
    ax.set_yscale("log")
    for gb, text in DEVICE_MEMORIES_GB:
        ax.axhline(gb, color="#666666", lw=0.9, ls=(0, (6, 3)), zorder=0)
        ax.annotate(
            text,
            (0.01, gb),
            xycoords=("axes fraction", "data"),
            textcoords="offset points",
            xytext=(0, 3),
            fontsize=8,
            color="#444444",
        )
    ax.set_ylim(min(peaks_gb) / 1.6, max(*peaks_gb, DEVICE_MEMORIES_GB[-1][0]) * 1.6)
    log2_axis(ax, sizes)
    ax.yaxis.set_major_formatter(gb_formatter())
    ax.set_xlabel("patch size (px per side, log scale)")
    ax.set_ylabel("step peak memory (GB, log scale)")
    ax.set_title("Training-step peak memory vs patch size")


def _marker_handles() -> list[Line2D]:
    return [
        Line2D(
            [], [], color="#333333", ls="-", marker="o", ms=5, label="measured (allocator peak)"
        ),
        Line2D(
            [],
            [],
            color="#333333",
            ls="--",
            marker="o",
            ms=9,
            markerfacecolor="white",
            label="predicted (analytic model)",
        ),
    ]
