"""One size of the accuracy sweep in a fresh process: ``python -m bench.accuracy --worker
SPEC`` trains and evaluates it through ``histoseg.train`` and prints one JSON line; the parent
passes the worker's progress through and turns a crash or an out-of-memory kill into a row."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
from pathlib import Path

from bench.isolated import run_isolated
from histoseg.config import HEAD_FILTERS, thread_env
from histoseg.errors import HistosegError

#: What the worker keeps of the training run's own row (the rest is rebuilt by the sweep).
KEPT_EXTRA = (
    "train_slides",
    "val_slides",
    "train_patches",
    "peak_learning_rate",
    "warmup_steps",
    "schedule",
    "bayes_ceiling",
    "prior_correction",
)


def train_and_evaluate(config: dict, data: dict) -> dict:
    """Train one config for ``config["steps"]`` steps through ``histoseg.train`` and validate it.

    Runs in the worker process (fresh per size). The memory figure is the TF allocator's
    peak over the whole run (training steps, then validation, which needs less), read after
    the run, plus the process's peak RSS.

    Returns:
        ``{"metrics": {...}, "measured": {...}, "extra": {...}}`` for the size's row.
    """
    os.environ.update(thread_env(int(config["threads"])))
    import tensorflow as tf

    from histoseg.memory.probe import allocator_info, rss_peak_bytes
    from histoseg.train.engines import get_engine
    from histoseg.train.loop import run
    from histoseg.train.options import TrainOptions

    tf.config.threading.set_intra_op_parallelism_threads(int(config["threads"]))
    tf.config.threading.set_inter_op_parallelism_threads(1)
    run_dir = Path(data["run_dir"]) / f"{config['patch_size']}px"
    if run_dir.exists():  # a fresh run per size: never resume another run's checkpoint
        shutil.rmtree(run_dir)
    options = TrainOptions(
        slides=data.get("slides"),
        annotations=data.get("annotations"),
        data=data.get("data"),
        synthetic_task=data.get("synthetic_task") or "local",
        synthetic_dir=data.get("synthetic_dir") or "data/synthetic",
        synthetic_slides=int(data.get("synthetic_slides") or 6),
        synthetic_size_px=tuple(data.get("synthetic_size_px") or (8000, 6000)),
        val_fraction=float(data.get("val_fraction") or 1 / 3),
        patch_size=int(config["patch_size"]),
        batch_size=int(config["batch_size"]),
        max_val_patches=int(data.get("max_val_patches") or 0) or None,
        backbone=config["backbone"],
        alpha=(config.get("backbone_options") or {}).get("alpha"),
        output_stride=int(config["output_stride"]),
        precision=config["precision"],
        remat=config["remat"],
        norm=config.get("norm", "batch"),
        head_filters=int(config.get("head_filters", HEAD_FILTERS)),
        tumour_weight=float(config.get("tumour_weight", 1.0)),
        tumor_ratio=float(config.get("tumor_ratio", 0.5)),
        prior_correction=bool(config.get("prior_correction", False)),
        warmup_steps=config.get("warmup_steps"),
        optimizer=config["optimizer"],
        learning_rate=float(config["learning_rate"]),
        steps=int(config["steps"]),
        run_dir=str(run_dir),
        checkpoint_every=0,
        log_every=max(1, int(config["steps"]) // 20),
        seed=int(config["seed"]),
        threads=int(config["threads"]),
        progress=True,
    )
    device = "GPU:0" if config.get("device") == "gpu" else "CPU:0"
    allocator_info(device)  # the peak is read after training: fail now if it cannot be
    engine = get_engine("none").init()
    try:
        row = run(options, engine)
    finally:
        engine.shutdown()
    measured = dict(row.get("measured", {}))
    measured["peak_bytes"] = allocator_info(device)["peak"]
    measured["rss_peak_bytes"] = rss_peak_bytes()
    extra = {k: row["extra"][k] for k in KEPT_EXTRA if k in row.get("extra", {})}
    extra["peak_bytes_scope"] = "TF allocator peak over the whole run (training, then validation)"
    return {"metrics": row["metrics"], "measured": measured, "extra": extra}


def worker_main(spec_json: str) -> int:
    """``--worker SPEC``: train and evaluate one size, print its status line on stdout.

    An out-of-memory or a histoseg error is a status line too (exit 0); anything else
    propagates (a traceback on stderr, a non-zero exit), and the sweep records its last line.
    """
    spec = json.loads(spec_json)
    os.environ.update(thread_env(int(spec["config"]["threads"])))
    try:
        # stdout carries only the result line; anything the run prints goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = train_and_evaluate(spec["config"], spec["data"])
    except HistosegError as exc:
        kind = "oom" if type(exc).__name__ == "OutOfMemoryError" else "error"
        print(json.dumps({"status": kind, "reason": str(exc)}), flush=True)
        return 0
    except Exception as exc:  # ResourceExhaustedError and friends, without importing TF here
        if "ResourceExhausted" in type(exc).__name__ or "OOM" in str(exc)[:200]:
            print(
                json.dumps({"status": "oom", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}),
                flush=True,
            )
            return 0
        raise
    print(json.dumps({"status": "ok", **result}, default=float), flush=True)
    return 0


def run_worker(spec: dict, *, timeout_s: float | None = None) -> dict:
    """Run one size in a fresh ``python -m bench.accuracy --worker`` process
    (:func:`bench.isolated.run_isolated`), its stderr (training progress) passed through.

    Returns:
        ``{"status": ..., "reason"?: ..., "metrics"?: ..., "measured"?: ..., "extra"?: ...}``.
    """
    command = [sys.executable, "-m", "bench.accuracy", "--worker", json.dumps(spec)]
    return run_isolated(command, timeout_s=timeout_s, echo_stderr=True)
