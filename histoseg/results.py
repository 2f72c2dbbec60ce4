"""The one results-row schema ("histoseg.result/1") and its atomic JSON/CSV files.

Every figure histoseg or its harness produces travels as a row (see docs/architecture.md): the
config that made it, what was measured and predicted, the status, and the machine it ran
on. The memory, scaling and accuracy harnesses, the training CLI, the plots and the CI
regression all read and write rows through this module, so there is no second schema.
"""

from __future__ import annotations

import csv
import datetime as _dt
import functools
import io
import json
import os
import platform
import subprocess
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from histoseg.errors import ResultsError
from histoseg.files import atomic_outputs

SCHEMA = "histoseg.result/1"
KINDS = ("memory", "scaling", "accuracy")
STATUSES = ("ok", "oom", "skipped", "error")
_SECTIONS = ("measured", "predicted", "metrics", "scaling", "extra")


def make_row(
    kind: str,
    config: Mapping[str, Any],
    *,
    status: str = "ok",
    reason: str | None = None,
    measured: Mapping[str, Any] | None = None,
    predicted: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    scaling: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    machine: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Build one results row; sections that do not apply (``None``) are left out.

    Args:
        kind: "memory", "scaling" or "accuracy".
        config: the sweep point (patch_size, batch_size, backbone, ...).
        status: "ok", "oom", "skipped" or "error"; anything but "ok" needs a reason.
        reason: why the row is not "ok".
        measured, predicted, metrics, scaling, extra: the row's sections.
        machine: machine info; defaults to :func:`machine_info` of this process.

    Returns:
        A JSON-ready dict.
    """
    if kind not in KINDS:
        raise ResultsError(f"row kind {kind!r} is not one of {', '.join(KINDS)}")
    if status not in STATUSES:
        raise ResultsError(f"row status {status!r} is not one of {', '.join(STATUSES)}")
    if status != "ok" and not reason:
        raise ResultsError(f"a row with status {status!r} needs a reason")
    row: dict[str, Any] = {"schema": SCHEMA, "kind": kind, "status": status}
    if reason:
        row["reason"] = str(reason)
    row["config"] = dict(config)
    sections = {
        "measured": measured,
        "predicted": predicted,
        "metrics": metrics,
        "scaling": scaling,
        "extra": extra,
    }
    for name, section in sections.items():
        if section is not None:
            row[name] = dict(section)
    row["machine"] = dict(machine) if machine is not None else machine_info()
    row["created"] = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    return row


def config_key(config: Mapping[str, Any]) -> str:
    """A stable string naming a config: the same sweep point always gets the same key."""
    return json.dumps(dict(config), sort_keys=True, separators=(",", ":"), default=str)


def row_key(row: Mapping[str, Any]) -> str:
    """The identity of a row within a results file: its kind and its config."""
    return f"{row.get('kind')}|{config_key(row.get('config', {}))}"


def step_mode_of(row: Mapping[str, Any]) -> str:
    """The train-step mode a training or scaling row ran (``config.step``).

    Rows without it predate the modes and ran the three-call ("separate") step.
    """
    return str(row.get("config", {}).get("step", "separate"))


def merge_rows(old: Iterable[Mapping[str, Any]], new: Iterable[Mapping[str, Any]]) -> list[dict]:
    """Rows of ``old`` and ``new``; a new row replaces an old one with the same kind and config.

    Order is kept: old rows first (replaced in place), then rows only ``new`` has.
    """
    merged: dict[str, dict] = {row_key(r): dict(r) for r in old}
    for r in new:
        merged[row_key(r)] = dict(r)
    return list(merged.values())


def validate_row(row: Any, where: str = "row") -> dict[str, Any]:
    """Check that ``row`` is a histoseg.result/1 row; raise ResultsError naming ``where``."""
    if not isinstance(row, dict):
        raise ResultsError(f"{where}: expected a JSON object, got {type(row).__name__}")
    schema = row.get("schema")
    if schema != SCHEMA:
        raise ResultsError(f"{where}: schema {schema!r} is not {SCHEMA!r}")
    if row.get("kind") not in KINDS:
        raise ResultsError(f"{where}: kind {row.get('kind')!r} is not one of {', '.join(KINDS)}")
    if row.get("status") not in STATUSES:
        raise ResultsError(
            f"{where}: status {row.get('status')!r} is not one of {', '.join(STATUSES)}"
        )
    if not isinstance(row.get("config"), dict):
        raise ResultsError(f"{where}: missing the 'config' object")
    return row


def load_rows(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read a results file (a JSON list of rows), checking every row's schema.

    Raises:
        ResultsError: the file is missing, is not JSON, is not a list, or holds a row of
            another schema; the message names the file and the row.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ResultsError(f"{path}: no such results file") from None
    except OSError as exc:
        raise ResultsError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ResultsError(f"{path}: not JSON ({exc.msg} at line {exc.lineno})") from None
    if not isinstance(data, list):
        raise ResultsError(f"{path}: expected a JSON list of {SCHEMA} rows")
    return [upgrade_row(validate_row(r, f"{path} row {i}")) for i, r in enumerate(data)]


def upgrade_row(row: dict[str, Any]) -> dict[str, Any]:
    """``row`` with the config keys that :class:`histoseg.config.StepConfig` writes today.

    Two facts had other keys in rows written before every harness wrote its config from
    ``StepConfig``: training and scaling rows named a MobileNetV2's width ``config.alpha``
    (now ``config.backbone_options.alpha``), and scaling rows of a measured step left out
    ``config.optimizer`` (their rank worker always trained with Adam). Reading such a file
    upgrades its rows in memory, so a resumed sweep matches them to the points it plans.
    """
    config = row["config"]
    if "alpha" in config:
        alpha = config.pop("alpha")
        if alpha is not None:
            config["backbone_options"] = {**config.get("backbone_options", {}), "alpha": alpha}
    if row["kind"] == "scaling" and config.get("engine") != "projection":
        config.setdefault("optimizer", "adam")
    return row


def load_rows_if_exists(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Like :func:`load_rows`, but an absent file is an empty list (a sweep's first run)."""
    return load_rows(path) if Path(path).exists() else []


def flatten(row: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten nested dicts into dotted names (``config.patch_size``) for CSV."""
    flat: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, f"{name}."))
        elif isinstance(value, (list, tuple)):
            flat[name] = json.dumps(value, default=str)
        else:
            flat[name] = value
    return flat


def write_rows(
    path: str | os.PathLike, rows: Iterable[Mapping[str, Any]], *, force: bool = False
) -> Path:
    """Write rows atomically as a JSON list at ``path`` and a flattened CSV beside it.

    Both files are written to temporary files in the same folder and renamed over the
    targets only once both are complete, so a crash or a full disk never leaves half a
    results file behind, nor a CSV that disagrees with its JSON. A JSON or CSV already
    there that histoseg did not write is refused unless ``force`` (see
    :func:`check_results_path`).

    Raises:
        ResultsError: a foreign file in the way, or the write failed (the message says
            the previous files are unchanged).

    Returns:
        The JSON path.
    """
    path = check_results_path(path, force=force)
    rows = [validate_row(dict(r), f"row {i}") for i, r in enumerate(rows)]
    path.parent.mkdir(parents=True, exist_ok=True)
    flat = [flatten(r) for r in rows]
    columns: list[str] = []
    for f in flat:
        columns.extend(c for c in f if c not in columns)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(flat)
    _atomic_write_texts(
        {
            path: json.dumps(rows, indent=2, default=str) + "\n",
            path.with_suffix(".csv"): buf.getvalue(),
        }
    )
    return path


def check_results_path(path: str | os.PathLike, *, force: bool = False) -> Path:
    """Refuse, before any work, a results path whose JSON or companion CSV is not ours.

    A file is histoseg's when it is a JSON list of :data:`SCHEMA` rows, or a CSV whose
    header starts with the row's first columns (``schema,kind,status``) or is empty.
    Anything else (the user's own ``side.csv`` beside ``side.json``) is refused unless
    ``force``; a folder in the way is refused always.

    Returns:
        ``path`` as a Path.
    """
    path = Path(path)
    if path.suffix != ".json":
        raise ResultsError(f"{path}: results files end in .json (a .csv is written beside it)")
    for target, ours in ((path, _is_results_json), (path.with_suffix(".csv"), _is_results_csv)):
        if target.is_dir():
            raise ResultsError(f"{target} is a directory; give another results path")
        if target.exists() and not force and not ours(target):
            raise ResultsError(
                f"{target} exists and is not a {SCHEMA} results file; refusing to replace "
                "it (move it away, or pass --force)"
            )
    return path


def _is_results_json(path: Path) -> bool:
    try:
        load_rows(path)
    except ResultsError:
        return False
    return True


def _is_results_csv(path: Path) -> bool:
    try:
        with path.open(encoding="utf-8") as f:
            header = f.readline()
            rest = f.read(1)
    except (OSError, UnicodeDecodeError):
        return False
    return header.startswith("schema,kind,status") or (header.strip() == "" and not rest)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and an atomic rename.

    The file gets the mode a plain ``open(path, "w")`` gives a new file, 0666 less the
    user's umask (0644 under the usual 022), not the temporary file's 0600, so results
    stay readable to the user's group and to a web server.

    Raises:
        ResultsError: the write failed (full disk, read-only folder); ``path`` is as it was.
    """
    _atomic_write_texts({Path(path): text})


def _atomic_write_texts(texts: Mapping[Path, str]) -> None:
    """Write the files together (:func:`histoseg.files.atomic_outputs`): all or none."""
    target = next(iter(texts))
    try:
        with atomic_outputs(list(texts)) as temps:
            for target, tmp in zip(texts, temps, strict=True):
                _write_all(tmp, texts[target].encode("utf-8"))
    except OSError as exc:
        target = next((t for t in texts if os.fspath(t) == exc.filename), target)
        before = "the previous file is unchanged" if target.exists() else "nothing was written"
        raise ResultsError(f"{target}: not written ({exc.strerror or exc}); {before}") from None


def _write_all(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
    finally:
        os.close(fd)


@functools.lru_cache(maxsize=1)
def machine_info() -> dict[str, Any]:
    """What this process runs on: CPU, cores, RAM, GPU, library versions and git commit.

    Imports of TensorFlow and friends are looked up without importing them (importing
    TensorFlow takes seconds and would fix its thread settings too early).
    """
    import psutil

    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "ram_bytes": psutil.virtual_memory().total,
        "gpu": _gpu_info(),
        "hostname": platform.node(),
        "versions": {
            "python": platform.python_version(),
            "tensorflow": _version("tensorflow"),
            "keras": _version("keras"),
            "horovod": _version("horovod"),
            "torch": _version("torch"),
            "openslide": _version("openslide-python"),
            "histoseg": _version("histoseg"),
        },
        "commit": _git_commit(),
    }


def _version(dist: str) -> str | None:
    from importlib import metadata

    for name in (dist, f"{dist}-cpu") if dist == "tensorflow" else (dist,):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _gpu_info() -> list[dict[str, Any]] | None:
    """GPUs seen by NVML (name, memory, driver), or None where there is no NVIDIA GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVML raises its own error types when no driver is present
        return None
    try:
        driver = pynvml.nvmlSystemGetDriverVersion()
        gpus = []
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            gpus.append(
                {
                    "name": pynvml.nvmlDeviceGetName(handle),
                    "memory_bytes": pynvml.nvmlDeviceGetMemoryInfo(handle).total,
                    "driver": driver,
                }
            )
        return gpus or None
    finally:
        pynvml.nvmlShutdown()


def _git_commit() -> str | None:
    """The commit of the histoseg checkout, with '+dirty' when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no", "--", "histoseg", "bench"],
            cwd=root,
            capture_output=True,
            text=True,
            timeout=5,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{commit}+dirty" if dirty else commit
