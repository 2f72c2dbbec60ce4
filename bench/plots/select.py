"""Which rows a figure draws and where they sit: loading, deduplication, memory lookups.

No drawing here: every function takes ``histoseg.result/1`` rows and returns numbers, so
what a figure shows can be tested without matplotlib.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from bench import reference
from histoseg.errors import ResultsError
from histoseg.results import config_key, load_rows
from histoseg.scaling.measured import projection_from

GB = 1e9  # decimal gigabytes, as device memories and the study's "25 GB" are quoted

# The keys that decide a step's memory at a given patch size; engine / workers / device / threads
# do not change the per-process peak enough to matter for placing a point, so they are left out.
MEMORY_KEYS = ("backbone", "output_stride", "precision", "remat", "batch_size")


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
    paths = list(paths)
    files = find_results_files(paths)
    if not files:
        shown = ", ".join(str(p) for p in paths)
        raise ResultsError(
            f"no results files (*.json) in {shown}; run a sweep first, e.g. python -m bench.memory"
        )
    return {str(f): load_rows(f) for f in files}


def latest_rows(rows_by_file: Mapping[str, Sequence[dict]]) -> list[dict]:
    """All rows, one per kind + config (the newest ``created`` wins when files overlap)."""
    newest: dict[tuple[str, str], dict] = {}
    for rows in rows_by_file.values():
        for row in rows:
            key = (row.get("kind", ""), config_key(row.get("config", {})))
            old = newest.get(key)
            if old is None or str(row.get("created", "")) >= str(old.get("created", "")):
                newest[key] = row
    return list(newest.values())


def number(value: Any) -> float | None:
    """A finite float, or None for missing / non-numeric / NaN values."""
    if isinstance(value, bool) or value is None:
        return None
    try:
        result = float(value)
    except (TypeError, ValueError):
        return None
    return result if math.isfinite(result) else None


def section(row: dict, name: str) -> dict:
    """A row's ``measured`` / ``predicted`` / ``extra`` ... section, ``{}`` when absent."""
    value = row.get(name)
    return value if isinstance(value, dict) else {}


# ----------------------------------------------------------------------------- memory lookups


def memory_key(config: Mapping[str, Any]) -> tuple:
    """What makes two configs' step memory the same: model, precision, remat, batch, optimizer, size."""
    options = json.dumps(config.get("backbone_options") or {}, sort_keys=True, default=str)
    return (
        *(config.get(k) for k in MEMORY_KEYS),
        config.get("optimizer") or "adam",  # the harness's default optimizer
        options,
        config.get("patch_size"),
    )


def memory_index(rows: Sequence[dict]) -> dict[tuple, dict]:
    """The memory rows by :func:`memory_key`, to place rows of other kinds on a memory axis."""
    return {memory_key(r.get("config", {})): r for r in rows if is_train_memory_row(r)}


def is_train_memory_row(row: Mapping[str, Any]) -> bool:
    """A memory row of a whole train step (``bench.memory --mode infer`` rows measure a
    forward pass alone, ``--spatial-workers`` rows one rank's share of a patch: other
    quantities, never a training run's memory twin)."""
    config = row.get("config", {})
    return (
        row.get("kind") == "memory"
        and config.get("mode", "train") == "train"
        and config.get("spatial_workers", 1) == 1
    )


def peak_bytes_of(row: dict | None, part: str) -> float | None:
    """A row's ``measured`` or ``predicted`` step peak; None when absent or the row did not run."""
    if row is None:
        return None
    if part == "measured" and row.get("status", "ok") != "ok":
        return None
    return number(section(row, part).get("peak_bytes"))


def accuracy_memory(
    row: dict, memory_index: Mapping[tuple, dict]
) -> tuple[float | None, str | None]:
    """Where an accuracy row sits on the memory axis: (peak bytes, "measured" | "predicted").

    Order: the training run's own measured peak, a memory row measured at the same config,
    the row's own prediction, a memory row's prediction.
    """
    config = row.get("config", {})
    twin = memory_index.get(memory_key(config))
    for source, part in (
        (row, "measured"),
        (twin, "measured"),
        (row, "predicted"),
        (twin, "predicted"),
    ):
        value = peak_bytes_of(source, part)
        if value is not None:
            return value, part
    return None, None


def study_memory(
    patch_size_px: int, memory_index: Mapping[tuple, dict]
) -> tuple[float | None, str | None]:
    """histoseg's memory for the study's config at one patch size: the estimate, else a measurement."""
    twin = memory_index.get(memory_key({**reference.STUDY_CONFIG, "patch_size": patch_size_px}))
    for part in ("predicted", "measured"):
        value = peak_bytes_of(twin, part)
        if value is not None:
            return value, part
    return None, None


# ----------------------------------------------------------------------------- scaling rows


def compression_of(row: dict) -> str:
    """The allreduce compression of a scaling row, wherever the sweep recorded it."""
    config, extra = row.get("config", {}), section(row, "extra")
    for source in (config, extra):
        if source.get("compression"):
            return str(source["compression"])
        if "fp16_allreduce" in source:
            return "fp16" if source["fp16_allreduce"] else "none"
    return "none"


def projection_of(row: dict) -> list[tuple[int, float]]:
    """(workers, efficiency) pairs a row carries in ``extra.projection`` (empty when none)."""
    points = []
    for item in section(row, "extra").get("projection") or []:
        workers, efficiency = number(item.get("workers")), number(item.get("efficiency"))
        if workers is not None and efficiency is not None:
            points.append((int(workers), efficiency))
    return sorted(points)


PROJECTION_INPUTS = ("compute_s", "bandwidth_gbps", "latency_s", "workers_per_node", "overhead_s")


def inputs_line(inputs: Mapping[str, Any]) -> str:
    """The projection's inputs as one caption fragment (``compute_s=0.5, ...``)."""
    return ", ".join(
        f"{k}={inputs[k]:.3g}" for k in PROJECTION_INPUTS if isinstance(inputs.get(k), float | int)
    )


def projection_from_model(
    rows: Sequence[dict], patch_size: int, compression: str
) -> tuple[list[tuple[int, float]], str | None]:
    """Ask histoseg.scaling's ring-allreduce model for a curve from measured rows.

    Returns:
        ``(curve, inputs line)``, or ``([], why not)`` when the rows cannot give one. The
        projection is an extra that must never stop the figure, so a failure becomes a note.
    """
    try:
        inputs, tables = projection_from(rows, patch_size=patch_size)
    except Exception as exc:  # the model's own checks (ConfigError) or missing measurements
        return [], f"no projection at {patch_size} px ({exc})"
    table = tables.get("fp16" if compression == "fp16" else "fp32") or []
    curve = sorted((int(r["workers"]), float(r["efficiency"])) for r in table)
    return curve, inputs_line(inputs)
