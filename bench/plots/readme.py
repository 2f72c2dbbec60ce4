"""Generate ``results/README.md``: what each results file measured, the command that made it, where.

The README is generated from the rows themselves (their ``kind``, ``config``, ``status``,
``machine`` and ``extra.command``), so it cannot drift from the files it describes. Sweeps
record their command line with :func:`histoseg.cli.command_line` in each row's
``extra["command"]``.

Examples:
    python -m bench.results_readme                  # rewrite results/README.md
    python -m bench.results_readme --results results/ --out /tmp/README.md
"""

from __future__ import annotations

import argparse
import os
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from bench.plots.caption import machine_label
from bench.plots.select import load_results
from histoseg.cli import ArgumentParser
from histoseg.results import atomic_write_text

#: The figures, in the order they are drawn and listed.
PLOT_NAMES = ("memory_vs_accuracy", "memory_vs_patch_size", "weak_scaling")

PLOTS_COMMAND = "python -m bench.plots --results results/ --out results/"

WHAT_KIND_MEASURES = {
    "memory": "training-step memory (weights, optimizer state, activations, gradients, allocator "
    "peak; predicted beside measured) and step throughput",
    "scaling": "weak scaling: throughput per worker, efficiency and allreduce time against workers",
    "accuracy": "validation pixel accuracy, mIoU and ROC AUC after training each patch size on the "
    "same budget of pixels seen",
}
PLOT_CAPTIONS = {
    "memory_vs_accuracy": "per task (local control, context), validation mIoU (mean over seeds, "
    "bar from lowest to highest) against the measured peak training memory of each patch size, "
    "with the Bayes ceiling, the all-background baseline and the study's published "
    "CAMELYON16/17 points",
    "memory_vs_patch_size": "measured and predicted step peak per precision / remat mode, with "
    "16 / 24 / 80 GB device lines",
    "weak_scaling": "weak-scaling efficiency and throughput against workers, measured and projected",
}


def _range(values: Sequence[object]) -> str:
    numbers = sorted({v for v in values if isinstance(v, int | float) and not isinstance(v, bool)})
    if not numbers:
        return ""
    return " ".join(f"{n:g}" for n in numbers)


def describe_file(path: str | os.PathLike[str], rows: Sequence[dict], relative_to: Path) -> str:
    """One Markdown list item for a results file: what, how many, the command, the machine."""
    rel = os.path.relpath(path, relative_to)
    csv = Path(path).with_suffix(".csv")
    name = f"`{rel}`" + (f" (+ `{os.path.relpath(csv, relative_to)}`)" if csv.exists() else "")
    if not rows:
        return f"- {name}: empty (no rows)."
    kinds = Counter(r.get("kind", "?") for r in rows)
    statuses = Counter(r.get("status", "?") for r in rows)
    what = "; ".join(_what(k, rows) for k in sorted(kinds))
    counts = ", ".join(f"{n} {s}" for s, n in sorted(statuses.items()))
    configs = [r.get("config", {}) for r in rows]
    details = []
    sizes = _range([c.get("patch_size") for c in configs])
    if sizes:
        details.append(f"patch sizes {sizes} px")
    for key in ("backbone", "precision", "remat", "engine"):
        values = sorted({str(c[key]) for c in configs if c.get(key) is not None})
        if values:
            details.append(f"{key} {'/'.join(values)}")
    workers = _range([c.get("workers") for c in configs])
    if workers and "scaling" in kinds:
        details.append(f"workers {workers}")
    commands = sorted(
        {
            str(r["extra"]["command"])
            for r in rows
            if isinstance(r.get("extra"), dict) and r["extra"].get("command")
        }
    )
    command = (
        "Made by " + "; ".join(f"`{c}`" for c in commands)
        if commands
        else "Command not recorded in the rows"
    )
    machines = "; ".join(sorted({machine_label(r.get("machine")) for r in rows}))
    headline = _accuracy_headline(rows)
    return (
        f"- {name}: {what}. {len(rows)} row{'s' if len(rows) != 1 else ''} ({counts}); "
        f"{', '.join(details)}.{headline} {command}. Machine: {machines}."
    )


def _what(kind: str, rows: Sequence[dict]) -> str:
    if kind == "accuracy" and not any(
        r.get("config", {}).get("pixel_budget") for r in rows if r.get("kind") == "accuracy"
    ):
        return "validation pixel accuracy, mIoU and ROC AUC of a training run (python -m histoseg.train)"
    return WHAT_KIND_MEASURES.get(kind, f"kind {kind!r}")


def _accuracy_headline(rows: Sequence[dict]) -> str:
    """ " Validation: 256 px mIoU 0.48 / AUC 0.55 (all-background mIoU 0.49); ..." for ok rows."""
    parts = []

    def order(row: dict) -> tuple:
        c = row.get("config", {})
        return (str(c.get("synthetic_task", "")), c.get("seed") or 0, c.get("patch_size", 0))

    for row in sorted(rows, key=order):
        m = row.get("metrics") or {}
        if row.get("kind") != "accuracy" or row.get("status") != "ok" or "miou" not in m:
            continue
        c = row["config"]
        where = f"{c['synthetic_task']} " if c.get("synthetic_task") else ""
        seed = f" seed {c['seed']}" if "pixel_budget" in c and "seed" in c else ""
        part = f"{where}{c.get('patch_size')} px{seed}: mIoU {m['miou']:.3f}, AUC {m.get('auc', float('nan')):.3f}"
        if "baseline_miou" in m:
            part += f" (all-background mIoU {m['baseline_miou']:.3f})"
        parts.append(part)
    return f" Validation: {'; '.join(parts)}." if parts else ""


def render_readme(
    out_dir: str | os.PathLike[str], rows_by_file: Mapping[str, Sequence[dict]]
) -> str:
    """The README text for ``out_dir`` describing ``rows_by_file`` and embedding the plots found there."""
    out = Path(out_dir)
    lines = [
        "# Results",
        "",
        "Generated by `python -m bench.results_readme` (also at the end of `python -m bench.plots` "
        "and of each sweep) from the rows in this folder: do not edit by hand. Every row follows "
        "the `histoseg.result/1` schema (see docs/architecture.md); each JSON file has a CSV beside it with "
        "dotted column names.",
        "",
        "## Files",
        "",
    ]
    for path in sorted(rows_by_file):
        lines.append(describe_file(path, rows_by_file[path], out))
    lines += [
        "",
        "## Plots",
        "",
        f"Drawn from the rows above by `{PLOTS_COMMAND}`; each also as SVG.",
        "",
    ]
    drawn = [name for name in PLOT_NAMES if (out / f"{name}.png").exists()]
    for name in PLOT_NAMES:
        if name in drawn:
            lines += [
                f"### {name}",
                "",
                f"{PLOT_CAPTIONS[name]} ([SVG]({name}.svg)).",
                "",
                f"![{name}]({name}.png)",
                "",
            ]
        else:
            lines += [f"### {name}", "", "Not drawn yet: no rows of the kind it needs.", ""]
    return "\n".join(lines).rstrip() + "\n"


def write_readme(
    out_dir: str | os.PathLike[str], rows_by_file: Mapping[str, Sequence[dict]] | None = None
) -> Path:
    """Write ``<out_dir>/README.md`` atomically; loads ``out_dir``'s rows when none are given.

    Returns:
        The README's path.
    """
    out = Path(out_dir)
    if rows_by_file is None:
        rows_by_file = load_results([out])
    rows_by_file = dict(rows_by_file)
    baseline = out / "baseline"
    if baseline.is_dir() and any(baseline.glob("*.json")):
        for path, rows in load_results([baseline]).items():
            rows_by_file.setdefault(path, rows)
    text = render_readme(out, rows_by_file)
    out.mkdir(parents=True, exist_ok=True)
    target = out / "README.md"
    atomic_write_text(target, text)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m bench.results_readme",
        description="Regenerate the results folder's README.md from its rows and plots.",
        epilog="Examples:\n  python -m bench.results_readme\n  python -m bench.results_readme --results results/",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--results", default="results", help="results folder (default: results/)")
    args = parser.parse_args(argv)
    print(f"wrote {write_readme(args.results)}")
    return 0
