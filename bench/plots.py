"""Draw the harness's three pictures from results rows: memory vs accuracy, memory vs patch size, weak scaling.

Every figure is drawn from ``histoseg.result/1`` rows only (never from numbers typed in),
saved as PNG and SVG, titled, with units on the axes and a caption under the plot that names
the config, the machine(s) and whatever is missing (a failed or skipped row, a point that
could not be placed). A figure with no data at all is not written.

Exit status of ``python -m bench.plots``: 0 when at least one figure was drawn, 1 when there
were rows but none a figure could use, 2 (one line on stderr) when the results cannot be read
(no results file, or a file of another schema).

Examples:
    python -m bench.plots                       # read results/*.json, write results/*.png|svg
    python -m bench.plots --results results/ --out /tmp/plots
    python -m bench.plots --results results/accuracy.json results/memory.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import textwrap
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

# No display anywhere: plots are files. Set before anything can pull in an interactive backend.
matplotlib.use("Agg")

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, NullFormatter

from bench import reference
from histoseg.cli import ArgumentParser, run_main
from histoseg.errors import ResultsError

PLOT_NAMES = ("memory_vs_accuracy", "memory_vs_patch_size", "weak_scaling")
GB = 1e9  # decimal gigabytes, as device memories and the study's "25 GB" are quoted

#: Okabe-Ito colours: distinguishable with the common colour-vision deficiencies.
PALETTE = ("#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#000000", "#F0E442")
REFERENCE_STYLE = {
    "CAMELYON16": {"color": "#555555", "marker": "s"},
    "CAMELYON17": {"color": "#999999", "marker": "D"},
}
DEVICE_MEMORIES_GB = (
    (16, "16 GB device (e.g. V100 16 GB)"),
    (24, "24 GB device (study's Titan RTX)"),
    (80, "80 GB device (A100 / H100)"),
)
STYLE = {
    "font.size": 10,
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "legend.fontsize": 9,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "axes.grid": True,
    "grid.alpha": 0.3,
    "grid.linewidth": 0.6,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "svg.hashsalt": "histoseg",  # stable SVG ids, so re-drawing unchanged rows changes no file
    "svg.fonttype": "none",
}
METRICS = (("accuracy", "pixel accuracy"), ("miou", "mIoU"), ("auc", "ROC AUC"))
CAPTION_WIDTH_CHARS = 150


@dataclass
class PlotOutcome:
    """What happened to one figure: the files written (none when not drawn) and what is missing."""

    name: str
    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def drawn(self) -> bool:
        return bool(self.paths)


# ----------------------------------------------------------------------------- loading


def find_results_files(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Expand folders to their top-level ``*.json`` files (``baseline/`` is CI's, not a sweep's)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files.extend(sorted(p for p in path.glob("*.json") if p.is_file()))
        elif path.is_file():
            files.append(path)
        else:
            raise ResultsError(
                f"results path {str(path)!r} does not exist (give a folder or a .json file)"
            )
    return files


def load_results(paths: Iterable[str | os.PathLike[str]]) -> dict[str, list[dict]]:
    """Load every results file under ``paths`` with the one schema's loader.

    Returns:
        ``{file path: rows}`` in file order.

    Raises:
        ResultsError: no results file found, or a file holds rows of another schema.
    """
    from histoseg.results import load_rows

    paths = list(paths)
    files = find_results_files(paths)
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise ResultsError(
            f"no results files (*.json) in {shown}; run a sweep first, e.g. python -m bench.memory"
        )
    return {str(f): load_rows(f) for f in files}


def _all_rows(rows_by_file: Mapping[str, Sequence[dict]]) -> list[dict]:
    """All rows, one per kind + config (the newest ``created`` wins when files overlap)."""
    from histoseg.results import config_key

    newest: dict[tuple[str, str], dict] = {}
    for rows in rows_by_file.values():
        for row in rows:
            key = (row.get("kind", ""), config_key(row.get("config", {})))
            old = newest.get(key)
            if old is None or str(row.get("created", "")) >= str(old.get("created", "")):
                newest[key] = row
    return list(newest.values())


# ----------------------------------------------------------------------------- captions


def machine_label(machine: Mapping[str, Any] | None, *, commit: bool = True) -> str:
    """One short line naming a row's machine: CPU, cores, RAM, GPU, TF version, commit."""
    if not machine:
        return "unknown machine"
    parts = [str(machine.get("cpu") or "unknown CPU")]
    if machine.get("cores"):
        parts.append(f"{machine['cores']} cores")
    if machine.get("ram_bytes"):
        parts.append(f"{machine['ram_bytes'] / GB:.0f} GB RAM")
    gpus = machine.get("gpu") or []
    for gpu in gpus if isinstance(gpus, list) else [gpus]:
        parts.append(f"GPU {gpu.get('name', '?') if isinstance(gpu, Mapping) else gpu}")
    versions = machine.get("versions") or {}
    if versions.get("tensorflow"):
        parts.append(f"TF {versions['tensorflow']}")
    if commit and machine.get("commit"):
        parts.append(f"commit {str(machine['commit'])[:10]}")
    return ", ".join(parts)


def machines_line(rows: Sequence[dict]) -> str:
    """The machine(s) and code commit(s) behind ``rows``, flagging rows from different hardware."""
    labels = sorted({machine_label(r.get("machine"), commit=False) for r in rows})
    commits = sorted({str((r.get("machine") or {}).get("commit"))[:10] for r in rows} - {"None"})
    made = f"; commit{'s' if len(commits) > 1 else ''} {', '.join(commits)}" if commits else ""
    if len(labels) == 1:
        return f"machine: {labels[0]}{made}"
    # Never mix machines silently: say so in the caption itself.
    return (
        f"rows from {len(labels)} machines (not directly comparable): " + "; ".join(labels) + made
    )


def config_line(rows: Sequence[dict], *, varied: Sequence[str] = ()) -> str:
    """The config keys all rows share, then the keys that vary across the plotted rows."""
    configs = [r.get("config", {}) for r in rows]
    keys = sorted({k for c in configs for k in c})
    shared, varies = [], []
    for key in keys:
        values = {repr(c.get(key)) for c in configs}
        if len(values) == 1 and key not in varied:
            value = configs[0].get(key)
            if value is not None:
                shared.append(f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}")
        else:
            varies.append(key)
    line = "config: " + (", ".join(shared) or "-")
    if varies:
        line += "; varies: " + ", ".join(varies)
    return line


def _caption(lines: Sequence[str]) -> str:
    wrapped: list[str] = []
    for line in lines:
        wrapped.extend(textwrap.wrap(line, CAPTION_WIDTH_CHARS, subsequent_indent="    ") or [""])
    return "\n".join(wrapped)


def compact_notes(items: Sequence[tuple[str, str, str]]) -> list[str]:
    """Notes for rows that did not run, one per distinct (status, reason), naming which rows.

    Args:
        items: ``(what, status, reason)`` per row, e.g. ``("2048 px", "skipped", "...")``.
    """
    groups: dict[tuple[str, str], list[str]] = {}
    for what, status, reason in items:
        groups.setdefault((status, reason), []).append(what)
    notes = []
    for (status, reason), whats in groups.items():
        if len(whats) == 1:
            notes.append(f"{whats[0]}: {status} — {reason}")
        elif len(whats) <= 4:
            notes.append(f"{'; '.join(whats)}: {status} — {reason}")
        else:
            notes.append(f"{len(whats)} configs ({whats[0]} ... {whats[-1]}): {status} — {reason}")
    return notes


def _status_item(row: dict, what: str) -> tuple[str, str, str]:
    return what, str(row.get("status", "?")), str(row.get("reason") or "no reason recorded")


def _status_note(row: dict, what: str) -> str:
    reason = row.get("reason") or "no reason recorded"
    return f"{what}: {row.get('status', '?')} — {reason}"


# ----------------------------------------------------------------------------- figure helpers


def _new_figure(width_in: float, height_in: float) -> Figure:
    return Figure(figsize=(width_in, height_in), layout="constrained", dpi=100)


def _save(fig: Figure, out_dir: Path, name: str, caption: str) -> list[Path]:
    """Put the caption under the plot and write PNG + SVG atomically (a reader never sees half a file)."""
    fig.text(0.0, 0.0, caption, ha="left", va="top", fontsize=8, color="#333333", wrap=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for ext, kwargs in (("png", {"dpi": 150}), ("svg", {"metadata": {"Date": None}})):
        target = out_dir / f"{name}.{ext}"
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=f".{ext}", dir=out_dir)
        os.close(fd)
        try:
            fig.savefig(tmp, format=ext, bbox_inches="tight", pad_inches=0.15, **kwargs)
            os.replace(tmp, target)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        written.append(target)
    return written


def _log2_patch_axis(ax, sizes: Iterable[int]) -> None:
    sizes = sorted(set(sizes))
    ax.set_xscale("log", base=2)
    ax.set_xticks(sizes)
    ax.set_xticklabels([str(s) for s in sizes])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([], minor=True)


def _gb_formatter():
    return FuncFormatter(lambda v, _pos: f"{v:g}")


def _num(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _section(row: dict, name: str) -> dict:
    value = row.get(name)
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------- memory lookups

# The keys that decide a step's memory at a given patch size; engine / workers / device / threads
# do not change the per-process peak enough to matter for placing a point, so they are left out.
MEMORY_KEYS = ("backbone", "output_stride", "precision", "remat", "batch_size")


def memory_key(config: Mapping[str, Any]) -> tuple:
    """What makes two configs' step memory the same: model, precision, remat, batch, optimizer, size."""
    options = config.get("backbone_options") or {}
    if not options and config.get("alpha") is not None:
        # histoseg.train rows name the width as config.alpha, memory rows as backbone_options
        options = {"alpha": config["alpha"]}
    options = json.dumps(options, sort_keys=True, default=str)
    return (
        *(config.get(k) for k in MEMORY_KEYS),
        config.get("optimizer") or "adam",  # the harness's default optimizer
        options,
        config.get("patch_size"),
    )


def _memory_index(rows: Sequence[dict]) -> dict[tuple, dict]:
    return {memory_key(r.get("config", {})): r for r in rows if r.get("kind") == "memory"}


def _peak_from(row: dict | None, section: str) -> float | None:
    if row is None:
        return None
    if section == "measured" and row.get("status", "ok") != "ok":
        return None
    return _num(_section(row, section).get("peak_bytes"))


def accuracy_memory(
    row: dict, memory_index: Mapping[tuple, dict]
) -> tuple[float | None, str | None]:
    """Where an accuracy row sits on the memory axis: (peak bytes, "measured" | "predicted").

    Order: the training run's own measured peak, a memory row measured at the same config,
    the row's own prediction, a memory row's prediction.
    """
    config = row.get("config", {})
    twin = memory_index.get(memory_key(config))
    for source, section in (
        (row, "measured"),
        (twin, "measured"),
        (row, "predicted"),
        (twin, "predicted"),
    ):
        value = _peak_from(source, section)
        if value is not None:
            return value, section
    return None, None


def study_memory(
    patch_size_px: int, memory_index: Mapping[tuple, dict]
) -> tuple[float | None, str | None]:
    """histoseg's memory for the study's config at one patch size: the estimate, else a measurement."""
    twin = memory_index.get(memory_key({**reference.STUDY_CONFIG, "patch_size": patch_size_px}))
    for section in ("predicted", "measured"):
        value = _peak_from(twin, section)
        if value is not None:
            return value, section
    return None, None


# ----------------------------------------------------------------------------- memory vs accuracy


def _label_part(key: str, value: Any) -> str:
    """One config value as a legend reads it."""
    if key == "pixel_budget" and _num(value):
        return f"{float(value):.2g} px seen per size"
    if key == "batch_size":
        return f"batch {value}"
    if key == "tumour_weight":
        return f"tumour weight {value:g}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def _series_label(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    parts = [_label_part(k, config.get(k)) for k in keys if config.get(k) not in (None, {}, "")]
    return ", ".join(parts) or "histoseg"


def _varying_keys(configs: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> list[str]:
    return [k for k in candidates if len({repr(c.get(k)) for c in configs}) > 1]


def draw_memory_vs_accuracy(rows: Sequence[dict], out_dir: Path) -> PlotOutcome:
    """mIoU against measured peak memory per task (:mod:`bench.accuracy_plot`)."""
    from bench.accuracy_plot import draw_memory_vs_accuracy as draw

    return draw(rows, out_dir)


# ----------------------------------------------------------------------------- memory vs patch size


def draw_memory_vs_patch_size(rows: Sequence[dict], out_dir: Path) -> PlotOutcome:
    """Measured and predicted step peak against patch size, one colour per precision / remat mode."""
    outcome = PlotOutcome("memory_vs_patch_size")
    memory_rows = [r for r in rows if r.get("kind") == "memory"]
    if not memory_rows:
        outcome.notes.append("no memory rows (kind 'memory'); run python -m bench.memory")
        return outcome
    # One framework per plot: rows of bench.torch_step (Keras on PyTorch) have their own
    # allocator and tensors kept, and would read as TensorFlow GPU rows here.
    torch_rows = [r for r in memory_rows if (r.get("extra") or {}).get("backend") == "torch"]
    if len(torch_rows) < len(memory_rows):
        memory_rows = [r for r in memory_rows if r not in torch_rows]
        if torch_rows:
            outcome.notes.append(
                f"{len(torch_rows)} rows of Keras's torch backend left out "
                "(docs/torch-backend.md draws them as a table)"
            )
    # Batch 1 only, where there is any: more batch sizes make the plot unreadable, and
    # memory per patch is near-linear in the batch (the table in results/ has them all).
    batch_one = [r for r in memory_rows if r.get("config", {}).get("batch_size") == 1]
    if batch_one and len(batch_one) < len(memory_rows):
        outcome.notes.append(
            f"{len(memory_rows) - len(batch_one)} rows of batch size > 1 left out "
            "(python -m bench.memory --show lists them)"
        )
        memory_rows = batch_one

    series_keys = ("backbone", "batch_size", "output_stride", "device", "precision", "remat")
    varying = _varying_keys([r.get("config", {}) for r in memory_rows], series_keys)
    label_keys = [k for k in series_keys if k in varying or k in ("precision", "remat")]
    series: dict[str, dict[str, list[tuple[int, float]]]] = {}
    not_run: list[tuple[str, str, str]] = []
    for row in memory_rows:
        config = row.get("config", {})
        size = config.get("patch_size")
        label = _series_label(config, label_keys)
        entry = series.setdefault(label, {"measured": [], "predicted": []})
        measured = _peak_from(row, "measured")
        predicted = _peak_from(row, "predicted")
        if measured is not None:
            entry["measured"].append((size, measured))
        if predicted is not None:
            entry["predicted"].append((size, predicted))
        if row.get("status", "ok") != "ok":
            not_run.append(_status_item(row, f"{size} px, {label}"))
        elif measured is None and predicted is None:
            outcome.notes.append(f"{size} px, {label}: no peak_bytes measured or predicted")
    outcome.notes[:0] = compact_notes(not_run)

    if not any(s["measured"] or s["predicted"] for s in series.values()):
        outcome.notes.insert(0, "memory rows hold no peak_bytes to draw")
        return outcome

    sizes = [size for s in series.values() for pts in s.values() for size, _ in pts]
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(9.5, 5.6)
        ax = fig.subplots()
        handles = []
        for i, (label, entry) in enumerate(sorted(series.items())):
            color = PALETTE[i % len(PALETTE)]
            # Predicted first as a larger ring, measured on top as a dot: agreement reads as a bullseye.
            for kind, ls, face, ms in (
                ("predicted", "--", "white", 9),
                ("measured", "-", color, 5),
            ):
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
        _log2_patch_axis(ax, sizes)
        ax.yaxis.set_major_formatter(_gb_formatter())
        ax.set_xlabel("patch size (px per side, log scale)")
        ax.set_ylabel("step peak memory (GB, log scale)")
        ax.set_title("Training-step peak memory vs patch size")
        handles += [
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
        fig.legend(
            handles=handles,
            loc="outside right upper",
            frameon=False,
            title=", ".join(k.replace("_size", "").replace("_", " ") for k in label_keys),
        )
        caption = [
            "step peak = allocator peak over one whole training step after a warm-up step "
            "(measured) or histoseg's analytic estimate (predicted); 1 GB = 10^9 bytes.",
            config_line(memory_rows, varied=("patch_size", *label_keys)),
            machines_line(memory_rows),
        ]
        caption += [f"missing: {n}" for n in outcome.notes]
        outcome.paths = _save(fig, out_dir, outcome.name, _caption(caption))
    return outcome


# ----------------------------------------------------------------------------- weak scaling


def compression_of(row: dict) -> str:
    """The allreduce compression of a scaling row, wherever the sweep recorded it."""
    config, extra = row.get("config", {}), _section(row, "extra")
    for source in (config, extra):
        if source.get("compression"):
            return str(source["compression"])
        if "fp16_allreduce" in source:
            return "fp16" if source["fp16_allreduce"] else "none"
    return "none"


def projection_of(row: dict) -> list[tuple[int, float]]:
    """(workers, efficiency) pairs a row carries in ``extra.projection`` (empty when none)."""
    points = []
    for item in _section(row, "extra").get("projection") or []:
        workers, efficiency = _num(item.get("workers")), _num(item.get("efficiency"))
        if workers is not None and efficiency is not None:
            points.append((int(workers), efficiency))
    return sorted(points)


def projection_from_model(
    rows: Sequence[dict], patch_size: int, compression: str
) -> tuple[list[tuple[int, float]], str | None]:
    """Ask histoseg.scaling's ring-allreduce model for a curve from measured rows.

    Returns:
        ``(curve, inputs line)``, or ``([], why not)`` when the rows cannot give one. The
        projection is an extra that must never stop the figure, so a failure becomes a note.
    """
    from histoseg import scaling

    try:
        inputs, tables = scaling.projection_from(rows, patch_size=patch_size)
    except Exception as exc:  # the model's own checks (ConfigError) or missing measurements
        return [], f"no projection at {patch_size} px ({exc})"
    table = tables.get("fp16" if compression == "fp16" else "fp32") or []
    curve = sorted((int(r["workers"]), float(r["efficiency"])) for r in table)
    shown = ("compute_s", "bandwidth_gbps", "latency_s", "workers_per_node", "overhead_s")
    line = ", ".join(
        f"{k}={inputs[k]:.3g}" for k in shown if isinstance(inputs.get(k), float | int)
    )
    return curve, line


def _engine_label(engine: str, compression: str) -> str:
    """Legend text of one (engine, compression) line of the weak-scaling plot."""
    if engine == "none":  # bench.scaling's control: N processes that never communicate
        return "no communication (independent processes)"
    kind = "uncompressed" if compression == "none" else f"{compression}-compressed"
    return f"{engine}, {kind} allreduce"


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
    measured_rows = [r for r in scaling_rows if r not in projection_rows]
    # One train-step mode per figure (bench.scaling --step): the default where measured.
    from bench.scaling import step_mode_of as step_of
    from histoseg.train.engines.base import DEFAULT_STEP_MODE

    modes = sorted({step_of(r) for r in measured_rows})
    shown_mode = DEFAULT_STEP_MODE if DEFAULT_STEP_MODE in modes or not modes else modes[0]
    other_modes = [r for r in measured_rows if step_of(r) != shown_mode]
    measured_rows = [r for r in measured_rows if step_of(r) == shown_mode]

    # (engine, compression, size) -> [(workers, efficiency, throughput per worker)]
    points: dict[tuple, list[tuple[int, float | None, float | None]]] = {}
    not_run: list[tuple[str, str, str]] = []
    for row in measured_rows:
        config = row.get("config", {})
        key = (str(config.get("engine", "?")), compression_of(row), config.get("patch_size"))
        what = f"{key[0]}, {key[1]}, {key[2]} px, {config.get('workers', '?')} workers"
        if row.get("status", "ok") != "ok":
            not_run.append(_status_item(row, what))
            continue
        scaling = _section(row, "scaling")
        workers = _num(config.get("workers"))
        efficiency, per_worker = (
            _num(scaling.get("efficiency")),
            _num(scaling.get("throughput_per_worker")),
        )
        if workers is not None and (efficiency is not None or per_worker is not None):
            points.setdefault(key, []).append((int(workers), efficiency, per_worker))
    outcome.notes[:0] = compact_notes(not_run)
    # One worker has nothing to compress: its point starts every compression's line.
    for (engine, _compression, size), pts in points.items():
        if not any(w == 1 for w, *_ in pts):
            for (e2, _c2, s2), other in list(points.items()):
                single = [p for p in other if p[0] == 1]
                if e2 == engine and s2 == size and single:
                    pts.append(single[0])
                    break

    curves: dict[tuple, list[tuple[int, float]]] = {}  # (label, compression) -> curve
    projection_inputs: list[str] = []
    if projection_rows:
        for row in projection_rows:
            config = row.get("config", {})
            curve = projection_of(row)
            if curve:
                label = f"projection, {config.get('patch_size')} px, {compression_of(row).replace('none', 'fp32')} allreduce"
                curves[(label, compression_of(row))] = curve
                inputs = _section(row, "extra").get("inputs")
                if isinstance(inputs, Mapping):
                    shown = (
                        "compute_s",
                        "bandwidth_gbps",
                        "latency_s",
                        "workers_per_node",
                        "overhead_s",
                    )
                    parts = [
                        f"{k}={inputs[k]:.3g}"
                        for k in shown
                        if isinstance(inputs.get(k), int | float)
                    ]
                    if parts:
                        projection_inputs.append(f"{label} inputs: {', '.join(parts)}")
    else:
        for row in measured_rows:
            curve = projection_of(row)
            config = row.get("config", {})
            key = (
                f"projection, {config.get('engine')}, {config.get('patch_size')} px, {compression_of(row)}",
                compression_of(row),
            )
            if curve and len(curve) > len(curves.get(key, [])):
                curves[key] = curve
        if not curves:
            for engine, compression, size in points:
                same_engine = [
                    r for r in measured_rows if r.get("config", {}).get("engine") == engine
                ]
                if size is None:
                    continue
                curve, line = projection_from_model(same_engine, int(size), compression)
                if curve:
                    label = f"projection, {engine}, {size} px, {compression}"
                    curves[(label, compression)] = curve
                    if line:
                        projection_inputs.append(f"{label} inputs: {line}")

    if not points and not curves:
        outcome.notes.insert(0, "scaling rows hold no measured efficiency/throughput or projection")
        return outcome

    combos = sorted({(e, c) for e, c, _ in points})
    colour_of = {combo: PALETTE[i % len(PALETTE)] for i, combo in enumerate(combos)}
    sizes = sorted({s for _, _, s in points if s is not None})
    marker_of = {s: "osD^v<>"[i % 7] for i, s in enumerate(sizes)}
    workers_seen = [w for pts in points.values() for w, *_ in pts]
    workers_seen += [w for curve in curves.values() for w, _ in curve]
    with matplotlib.rc_context(STYLE):
        fig = _new_figure(12.5, 4.8)
        ax_eff, ax_tp = fig.subplots(1, 2)
        for (engine, compression, size), pts in sorted(points.items(), key=lambda kv: str(kv[0])):
            color, marker = colour_of[(engine, compression)], marker_of.get(size, "o")
            pts = sorted(set(pts))
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
                    [w for w, _ in tput],
                    [t for _, t in tput],
                    marker=marker,
                    ms=7,
                    lw=1.5,
                    color=color,
                )
                base = dict(tput).get(1)
                if base:
                    ideal = sorted({w for w, _ in tput})
                    ax_tp.plot(ideal, [base * w for w in ideal], ls=":", lw=1.0, color="#999999")
        for (label, compression), curve in sorted(curves.items()):
            ax_eff.plot(
                [w for w, _ in curve],
                [e * 100 for _, e in curve],
                ls="--",
                lw=1.6,
                color="#444444" if compression == "fp16" else "#AAAAAA",
                label=label,
            )
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
        measured_workers = [w for pts in points.values() for w, *_ in pts]
        _log2_patch_axis(ax_eff, [*workers_seen, 1])
        _log2_patch_axis(ax_tp, [*measured_workers, 1])
        for ax in (ax_eff, ax_tp):
            ax.set_xlabel("workers (processes, log scale)")
        ax_eff.set_ylabel("weak-scaling efficiency (%)")
        ax_eff.set_ylim(0, 110)
        ax_eff.set_title("Efficiency = throughput(N) / (N x throughput(1))")
        ax_tp.set_ylabel("throughput, all workers (patches/s)")
        ax_tp.set_title("Throughput (grey dotted: ideal linear)")
        handles = [
            Line2D(
                [],
                [],
                color=colour_of[c],
                lw=6,
                label=_engine_label(*c),
            )
            for c in combos
        ]
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
            Line2D(
                [], [], color="#444444" if c == "fp16" else "#AAAAAA", ls="--", lw=1.6, label=label
            )
            for (label, c) in sorted(curves)
        ]
        fig.legend(handles=handles, loc="outside right upper", frameon=False)
        fig.suptitle("Weak scaling: fixed patches per worker", fontsize=12)
        plotted = measured_rows or projection_rows
        caption = [
            "weak scaling: every worker trains the same patches per step; total throughput = "
            "scaling.throughput_per_worker x workers; the 1-worker point (no allreduce) starts every "
            "compression's line. Dashed: the ring-allreduce projection (a model, not a measurement).",
            config_line(
                plotted, varied=("workers", "engine", "patch_size", "threads", "compression")
            ),
            machines_line(plotted),
            *projection_inputs,
        ]
        if other_modes:
            caption.append(
                f"train step: {shown_mode}; {len(other_modes)} row(s) of other step modes "
                f"({', '.join(m for m in modes if m != shown_mode)}) not drawn (see the CSV)"
            )
        caption += [f"missing: {n}" for n in outcome.notes]
        outcome.paths = _save(fig, out_dir, outcome.name, _caption(caption))
    return outcome


# ----------------------------------------------------------------------------- entry points


def draw_all(
    rows_by_file: Mapping[str, Sequence[dict]], out_dir: str | os.PathLike[str]
) -> list[PlotOutcome]:
    """Draw every figure the rows allow into ``out_dir``; figures without data are not written.

    Args:
        rows_by_file: ``{results file: rows}``, as :func:`load_results` returns.
        out_dir: folder for ``<name>.png`` and ``<name>.svg``.

    Returns:
        One :class:`PlotOutcome` per figure, in :data:`PLOT_NAMES` order.

    Example:
        >>> outcomes = draw_all(load_results(["results"]), "results")  # doctest: +SKIP
    """
    rows = _all_rows(rows_by_file)
    out = Path(out_dir)
    return [
        draw_memory_vs_accuracy(rows, out),
        draw_memory_vs_patch_size(rows, out),
        draw_weak_scaling(rows, out),
    ]


def report_lines(outcomes: Sequence[PlotOutcome]) -> list[str]:
    """One line per figure (written or not, and why), then one line per missing item."""
    lines = []
    for outcome in outcomes:
        if outcome.drawn:
            lines.append(f"{outcome.name}: wrote " + ", ".join(str(p) for p in outcome.paths))
            lines += [f"  missing: {note}" for note in outcome.notes]
        else:
            lines.append(f"{outcome.name}: not drawn — " + ("; ".join(outcome.notes) or "no data"))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m bench.plots",
        description="Draw memory_vs_accuracy, memory_vs_patch_size and weak_scaling (PNG + SVG) "
        "from histoseg.result/1 rows, and refresh the results README.",
        epilog="Examples:\n  python -m bench.plots\n  python -m bench.plots --results results/ --out /tmp/plots\n"
        "Exit status: 0 if at least one figure was drawn, 1 if none could be, 2 on unreadable results.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--results",
        nargs="+",
        default=["results"],
        metavar="PATH",
        help="results folders (top-level *.json) or files (default: results/)",
    )
    parser.add_argument(
        "--out", default=None, help="output folder (default: the first --results folder)"
    )
    parser.add_argument(
        "--no-readme", action="store_true", help="do not regenerate <out>/README.md"
    )
    args = parser.parse_args(argv)

    rows_by_file = load_results(args.results)
    first = Path(args.results[0])
    out_dir = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    outcomes = draw_all(rows_by_file, out_dir)
    for line in report_lines(outcomes):
        print(line)
    if not args.no_readme:
        from bench.results_readme import write_readme

        print(f"README: wrote {write_readme(out_dir, rows_by_file)}")
    return 0 if any(o.drawn for o in outcomes) else 1


if __name__ == "__main__":
    raise SystemExit(run_main(main))
