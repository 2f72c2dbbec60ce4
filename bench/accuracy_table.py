"""The accuracy sweep's tables: one line per run, and each point's spread over its seeds."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from bench.config import task_of


def _run_order(row: Mapping[str, Any]) -> tuple:
    c = row["config"]
    return (task_of(row), c["patch_size"], c.get("seed") or 0)


def summary_table(rows: Sequence[dict]) -> str:
    """The sweep's rows as a fixed-width table, one line per run (task, size, seed)."""
    header = (
        f"{'task':>8} {'patch px':>8} {'seed':>4} {'steps':>6} {'Mpx seen':>8} {'precision/remat':>22} {'peak GB':>8} "
        f"{'pred GB':>8} {'accuracy':>8} {'mIoU':>7} {'AUC':>7} {'val':>5} {'wall s':>7}  status"
    )
    lines = [header, "-" * len(header)]
    for row in sorted(rows, key=_run_order):
        c, m = row["config"], row.get("metrics", {})
        measured, predicted, extra = (
            row.get("measured", {}),
            row.get("predicted", {}),
            row.get("extra", {}),
        )

        def num(value, fmt):
            return format(value, fmt) if isinstance(value, int | float) else "-"

        lines.append(
            f"{task_of(row):>8} {c['patch_size']:>8} {c.get('seed', '-'):>4} {c.get('steps', 0):>6} {extra.get('pixels_seen', 0) / 1e6:>8.0f} "
            f"{c['precision'] + '/' + c['remat']:>22} "
            f"{num(measured.get('peak_bytes', 0) / 1e9 if measured.get('peak_bytes') else None, '.2f'):>8} "
            f"{num(predicted.get('peak_bytes', 0) / 1e9 if predicted.get('peak_bytes') else None, '.2f'):>8} "
            f"{num(m.get('accuracy'), '.4f'):>8} {num(m.get('miou'), '.4f'):>7} {num(m.get('auc'), '.4f'):>7} "
            f"{num(m.get('val_patches'), 'd'):>5} {num(extra.get('wall_s'), '.0f'):>7}  "
            + (row["status"] if row["status"] == "ok" else f"{row['status']}: {row.get('reason')}")
        )
    return "\n".join(lines)


def seed_summary(rows: Sequence[dict], *, markdown: bool = False) -> str:
    """One line per (task, patch size) over the ok runs: mean and range over seeds of mIoU
    and tumour IoU, beside the Bayes ceiling and all-background mIoU of the same validation
    patches, the validation patch count and the mean allocator peak; then the same runs' mIoU
    with and without the prior correction (``histoseg.train.prior``; the first mIoU is the
    one the sweep applied), where their rows keep both."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for row in rows:
        if row.get("status") == "ok" and "miou" in row.get("metrics", {}):
            groups.setdefault((task_of(row), int(row["config"]["patch_size"])), []).append(row)
    head = [
        "task", "patch px", "steps", "seeds", "mIoU mean (range)", "tumour IoU mean (range)",
        "Bayes ceiling mIoU", "all-background mIoU", "val. patches", "peak GB",
        "prior-corrected mIoU", "uncorrected mIoU",
    ]  # fmt: skip
    lines = [head]
    for (task, size), members in sorted(groups.items()):
        metrics = [r["metrics"] for r in members]
        ceilings = {
            f"{r['extra']['bayes_ceiling']['miou']:.3f}"
            for r in members
            if "bayes_ceiling" in r.get("extra", {})
        }
        peaks = [
            r["measured"]["peak_bytes"] for r in members if r.get("measured", {}).get("peak_bytes")
        ]
        scorings = [_scorings(r) for r in members]
        lines.append(
            [
                task,
                str(size),
                str(members[0]["config"].get("steps", "-")),
                str(len(members)),
                _spread([m["miou"] for m in metrics]),
                _spread([m["iou_tumour"] for m in metrics if "iou_tumour" in m]),
                "/".join(sorted(ceilings)) or "-",
                "/".join(
                    sorted({f"{m['baseline_miou']:.3f}" for m in metrics if "baseline_miou" in m})
                )
                or "-",
                "/".join(sorted({str(m.get("val_patches", "-")) for m in metrics})),
                f"{statistics.mean(peaks) / 1e9:.2f}" if peaks else "-",
                _spread([s["corrected"] for s in scorings if "corrected" in s]),
                _spread([s["uncorrected"] for s in scorings if "uncorrected" in s]),
            ]
        )
    if markdown:
        rule = ["---"] * len(head)
        return "\n".join("| " + " | ".join(cells) + " |" for cells in [head, rule, *lines[1:]])
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    return "\n".join(
        "  ".join(cell.rjust(w) for cell, w in zip(line, widths, strict=True)) for line in lines
    )


def _scorings(row: Mapping[str, Any]) -> dict[str, float]:
    """A row's mIoU with ("corrected") and without ("uncorrected") the prior correction, as
    far as it holds them: the scoring it applied is its headline mIoU (rows of the first
    corrected sweeps kept only the other one in ``extra``)."""
    correction = (row.get("extra") or {}).get("prior_correction") or {}
    found = {k: correction[k]["miou"] for k in ("corrected", "uncorrected") if k in correction}
    if "prior_correction" in row.get("config", {}):
        applied = "corrected" if row["config"]["prior_correction"] else "uncorrected"
        found.setdefault(applied, row["metrics"]["miou"])
    return found


def _spread(values: Sequence[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.mean(values):.3f} ({min(values):.3f}-{max(values):.3f})"
