"""How every figure looks and is saved: palette, rc style, device lines, log-2 axes, and an
atomic PNG + SVG writer. Importing it selects matplotlib's file-only Agg backend."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib

# No display anywhere: plots are files. Set before anything can pull in an interactive backend.
matplotlib.use("Agg")

from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, NullFormatter

from histoseg.files import atomic_output

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


@dataclass
class PlotOutcome:
    """What happened to one figure: the files written (none when not drawn) and what is missing."""

    name: str
    paths: list[Path] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def drawn(self) -> bool:
        return bool(self.paths)


def new_figure(width_in: float, height_in: float) -> Figure:
    """A figure with constrained layout, not attached to any display."""
    return Figure(figsize=(width_in, height_in), layout="constrained", dpi=100)


#: Written into every figure (PNG Software, SVG Creator): how a later run knows the file
#: is its own to replace, and a file of the same name without it is the user's.
MARKER = "histoseg bench.plots"
#: What figures drawn before the marker carry; accepted only beside a README of ours.
LEGACY_MARKERS = {"png": b"Matplotlib version", "svg": b"Matplotlib v"}


def is_our_figure(path: Path, *, legacy: bool = False) -> bool:
    """Whether ``path`` is a PNG or SVG that bench.plots drew (its :data:`MARKER`), or with
    ``legacy``, one Matplotlib drew before the marker existed."""
    ext = path.suffix.lstrip(".").lower()
    try:
        with path.open("rb") as f:
            head = f.read(8192)
    except OSError:
        return False
    if ext == "png" and not head.startswith(b"\x89PNG"):
        return False
    return MARKER.encode() in head or (legacy and LEGACY_MARKERS.get(ext, b"\0") in head)


def save(fig: Figure, out_dir: Path, name: str, caption: str) -> list[Path]:
    """Put the caption under the plot and write PNG + SVG atomically (a reader never sees half
    a file), with the mode a new file gets from the user's umask and :data:`MARKER` in the
    file's metadata."""
    fig.text(0.0, 0.0, caption, ha="left", va="top", fontsize=8, color="#333333", wrap=False)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    creator = f"{MARKER} (Matplotlib {matplotlib.__version__})"
    for ext, kwargs in (
        ("png", {"dpi": 150, "metadata": {"Software": creator}}),
        ("svg", {"metadata": {"Date": None, "Creator": creator}}),
    ):
        target = out_dir / f"{name}.{ext}"
        with atomic_output(target) as tmp:
            fig.savefig(tmp, format=ext, bbox_inches="tight", pad_inches=0.15, **kwargs)
        written.append(target)
    return written


def log2_axis(ax, ticks: Iterable[int]) -> None:
    """A log-2 x axis labelled at exactly ``ticks`` (patch sizes, worker counts)."""
    ticks = sorted(set(ticks))
    ax.set_xscale("log", base=2)
    ax.set_xticks(ticks)
    ax.set_xticklabels([str(s) for s in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks([], minor=True)


def gb_formatter() -> FuncFormatter:
    """Tick labels in plain decimal GB (1, 2.5, 80) on a log axis."""
    return FuncFormatter(lambda v, _pos: f"{v:g}")
