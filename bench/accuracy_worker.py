"""One size of the accuracy sweep in a fresh process: ``python -m bench.accuracy --worker
SPEC`` trains and evaluates it through ``histoseg.train`` and prints one JSON line; the parent
passes the worker's progress through and turns a crash or an out-of-memory kill into a row."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from histoseg.errors import HistosegError

#: Exit code of a worker whose training ran out of memory (an allocator error, not a kill).
OOM_EXIT_CODE = 75


def configure_threads(threads: int) -> None:
    """Pin the thread pools before TensorFlow starts (one process per size, fixed threads)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ.setdefault("TF_NUM_INTEROP_THREADS", "1")


#: What the worker keeps of the training run's own row (the rest is rebuilt by the sweep).
KEPT_EXTRA = (
    "train_slides",
    "val_slides",
    "train_patches",
    "peak_learning_rate",
    "warmup_steps",
    "schedule",
    "bayes_ceiling",
)


def train_and_evaluate(config: dict, data: dict) -> dict:
    """Train one config for ``config["steps"]`` steps through ``histoseg.train`` and validate it.

    Runs in the worker process (fresh per size). The memory figure is the TF allocator's
    peak over the whole run (training steps, then validation, which needs less), read after
    the run, plus the process's peak RSS.

    Returns:
        ``{"metrics": {...}, "measured": {...}, "extra": {...}}`` for the size's row.
    """
    configure_threads(int(config["threads"]))
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
        tumour_weight=float(config.get("tumour_weight", 1.0)),
        tumor_ratio=float(config.get("tumor_ratio", 0.5)),
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
    engine = get_engine("none").init()
    try:
        row = run(options, engine)
    finally:
        engine.shutdown()
    device = "GPU:0" if config.get("device") == "gpu" else "CPU:0"
    measured = dict(row.get("measured", {}))
    measured["peak_bytes"] = allocator_info(device)["peak"]
    measured["rss_peak_bytes"] = rss_peak_bytes()
    extra = {k: row["extra"][k] for k in KEPT_EXTRA if k in row.get("extra", {})}
    extra["peak_bytes_scope"] = "TF allocator peak over the whole run (training, then validation)"
    return {"metrics": row["metrics"], "measured": measured, "extra": extra}


def worker_main(spec_json: str) -> int:
    """``--worker SPEC``: train and evaluate one size, print one JSON line on stdout."""
    spec = json.loads(spec_json)
    configure_threads(int(spec["config"]["threads"]))
    try:
        # stdout carries only the result line; anything the run prints goes to stderr
        with contextlib.redirect_stdout(sys.stderr):
            result = train_and_evaluate(spec["config"], spec["data"])
    except HistosegError as exc:
        kind = "oom" if type(exc).__name__ == "OutOfMemoryError" else "error"
        print(json.dumps({"status": kind, "reason": str(exc)}), flush=True)
        return OOM_EXIT_CODE if kind == "oom" else 1
    except Exception as exc:  # ResourceExhaustedError and friends, without importing TF here
        if "ResourceExhausted" in type(exc).__name__ or "OOM" in str(exc)[:200]:
            print(
                json.dumps({"status": "oom", "reason": f"{type(exc).__name__}: {str(exc)[:300]}"}),
                flush=True,
            )
            return OOM_EXIT_CODE
        raise
    print(json.dumps({"status": "ok", **result}, default=float), flush=True)
    return 0


def run_worker(spec: dict, *, timeout_s: float | None = None) -> dict:
    """Run one size in a fresh ``python -m bench.accuracy --worker`` process.

    The worker's stderr (training progress) is passed through; its last lines become the
    reason when it fails. A process killed by the kernel's OOM killer (SIGKILL) is an "oom".

    Returns:
        ``{"status": ..., "reason"?: ..., "metrics"?: ..., "measured"?: ..., "extra"?: ...}``.
    """
    command = [sys.executable, "-m", "bench.accuracy", "--worker", json.dumps(spec)]
    tail = b""
    started = time.monotonic()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE) as proc:
        assert proc.stderr is not None and proc.stdout is not None
        # Pass the worker's stderr through as it comes (progress bars end lines with \r, so
        # reading by lines would hold them back), keeping its tail for a failure's reason.
        while chunk := os.read(proc.stderr.fileno(), 4096):
            sys.stderr.buffer.write(chunk)
            sys.stderr.flush()
            tail = (tail + chunk)[-4000:]
            if timeout_s and time.monotonic() - started > timeout_s:
                proc.kill()
        stdout = proc.stdout.read().decode("utf-8", "replace")
        returncode = proc.wait()
    lines = [
        line.strip() for line in tail.decode("utf-8", "replace").replace("\r", "\n").splitlines()
    ]
    lines = [line for line in lines if line]
    last = next((line for line in reversed(stdout.splitlines()) if line.startswith("{")), None)
    if last is not None:
        result = json.loads(last)
        if result.get("status") == "ok" and returncode == 0:
            return result
        if result.get("status") in ("oom", "error"):
            return result
    if returncode in (-9, 137):
        return {
            "status": "oom",
            "reason": "worker killed by SIGKILL (the kernel's out-of-memory killer?)",
        }
    why = lines[-1] if lines else "no output"
    return {"status": "error", "reason": f"worker exited with {returncode}: {why}"}
