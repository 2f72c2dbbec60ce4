"""Draw the harness's three pictures from results rows: memory vs accuracy, memory vs patch size, weak scaling.

Every figure is drawn from ``histoseg.result/1`` rows only (never from numbers typed in),
saved as PNG and SVG, titled, with units on the axes and a caption under the plot that names
the config, the machine(s) and whatever is missing (a failed or skipped row, a point that
could not be placed). A figure with no data at all is not written.

The package runs one way: :mod:`~bench.plots.select` picks and places rows (no drawing),
:mod:`~bench.plots.caption` words them, :mod:`~bench.plots.style` looks and saves; one
module per figure draws; :mod:`~bench.plots.readme` describes the folder.

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
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.plots.accuracy import draw_memory_vs_accuracy
from bench.plots.memory import draw_memory_vs_patch_size
from bench.plots.readme import PLOT_NAMES, check_plot_folder, write_readme
from bench.plots.scaling import draw_weak_scaling
from bench.plots.select import latest_rows, load_results
from bench.plots.style import PlotOutcome
from histoseg.cli import ArgumentParser, check_output_folder

__all__ = [
    "PLOT_NAMES",
    "PlotOutcome",
    "check_plot_folder",
    "draw_all",
    "load_results",
    "main",
    "report_lines",
]


def draw_all(
    rows_by_file: Mapping[str, Sequence[dict]],
    out_dir: str | os.PathLike[str],
    *,
    force: bool = False,
) -> list[PlotOutcome]:
    """Draw every figure the rows allow into ``out_dir``; figures without data are not written.

    Args:
        rows_by_file: ``{results file: rows}``, as :func:`load_results` returns.
        out_dir: folder for ``<name>.png`` and ``<name>.svg``.
        force: replace figure files of those names that bench.plots did not draw (else
            they are refused before anything is drawn; see :func:`check_plot_folder`).

    Returns:
        One :class:`PlotOutcome` per figure, in :data:`PLOT_NAMES` order.

    Example:
        >>> outcomes = draw_all(load_results(["results"]), "results")  # doctest: +SKIP
    """
    check_plot_folder(out_dir, readme=False, force=force)
    rows = latest_rows(rows_by_file)
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
    parser.add_argument(
        "--force",
        action="store_true",
        help="replace a README.md or figure files in --out that bench.plots did not write",
    )
    args = parser.parse_args(argv)

    rows_by_file = load_results(args.results)
    first = Path(args.results[0])
    out_dir = Path(args.out) if args.out else (first if first.is_dir() else first.parent)
    check_output_folder(out_dir, option="--out")
    check_plot_folder(out_dir, readme=not args.no_readme, force=args.force)
    outcomes = draw_all(rows_by_file, out_dir, force=args.force)
    for line in report_lines(outcomes):
        print(line)
    if not args.no_readme:
        print(f"README: wrote {write_readme(out_dir, rows_by_file, force=args.force)}")
    return 0 if any(o.drawn for o in outcomes) else 1
