"""The words on and under a figure: machine and config lines, legend labels, notes on rows
that did not run, and the wrapped caption."""

from __future__ import annotations

import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from bench.plots.select import GB, number

CAPTION_WIDTH_CHARS = 150


def machine_label(machine: Mapping[str, Any] | None, *, commit: bool = True) -> str:
    """One short line naming a row's machine: CPU, cores, RAM, GPU, TF and torch versions, commit."""
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
    if versions.get("torch"):
        parts.append(f"torch {versions['torch']}")
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


def wrap(lines: Sequence[str]) -> str:
    """Caption lines wrapped to the figure's width, continuation lines indented."""
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


def status_item(row: dict, what: str) -> tuple[str, str, str]:
    """``(what, status, reason)`` of a row that did not run, for :func:`compact_notes`."""
    return what, str(row.get("status", "?")), str(row.get("reason") or "no reason recorded")


def status_note(row: dict, what: str) -> str:
    """One note for a row that did not run."""
    reason = row.get("reason") or "no reason recorded"
    return f"{what}: {row.get('status', '?')} — {reason}"


def label_part(key: str, value: Any) -> str:
    """One config value as a legend reads it."""
    if key == "pixel_budget" and number(value):
        return f"{float(value):.2g} px seen per size"
    if key == "batch_size":
        return f"batch {value}"
    if key == "tumour_weight":
        return f"tumour weight {value:g}"
    if key == "head_filters":
        return f"head {value} ch"
    if key == "prior_correction":
        return "prior-corrected" if value else "uncorrected"
    if key == "learning_rate":  # a rate, or a per-size rule ("0.001 x px / 256")
        return f"lr {float(value):g}" if number(value) else f"lr {value}"
    if isinstance(value, Mapping):
        return ", ".join(f"{k}={v}" for k, v in sorted(value.items()))
    return str(value)


def series_label(config: Mapping[str, Any], keys: Sequence[str]) -> str:
    """A series' legend entry: its values of ``keys``, in order."""
    parts = [label_part(k, config.get(k)) for k in keys if config.get(k) not in (None, {}, "")]
    return ", ".join(parts) or "histoseg"


def varying_keys(configs: Sequence[Mapping[str, Any]], candidates: Sequence[str]) -> list[str]:
    """The ``candidates`` whose value differs between ``configs``."""
    return [k for k in candidates if len({repr(c.get(k)) for c in configs}) > 1]
