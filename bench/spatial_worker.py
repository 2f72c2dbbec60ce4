"""Measure ONE train step whose patch is cut across ranks; print its results row as JSON.

``python -m bench.spatial_worker --config '{"patch_size": 256, "spatial_workers": 2, ...}'``
is ``bench.worker`` for a config with ``spatial_workers`` N above 1: it starts itself as N
ranks under ``horovodrun -np N -H localhost:N --gloo`` (each with the config's threads
shared out), and every rank runs the compiled spatial train step
(:func:`histoseg.spatial.make_spatial_train_step`) on its slab of the same synthetic patch:
one warm-up step, then ``steps`` measured ones. Rank 0 gathers every rank's figures and
writes the row; the launcher prints it as its last stdout line, as ``bench.worker`` does.

The ``measured`` figures are those of the rank with the largest allocator peak (what a
device per rank must hold; the ranks differ by their halo rows), with every rank's in
``extra.per_rank``. They mean what ``bench.worker``'s mean, per rank: ``activation_bytes``
(allocator bytes after the forward pass and loss less before the step), ``gradient_bytes``
(after this rank's gradients, before they are summed over the ranks), ``peak_bytes`` (the
allocator's peak over a step, everything held included: weights, optimizer state, Horovod's
buffers). ``step_s`` is the slowest rank's median.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import step_rates
from bench.isolated import worker_env
from bench.worker import configure_tensorflow, synthetic_batch, timed_steps, variable_bytes
from histoseg.cli import ArgumentParser, run_main
from histoseg.config import StepConfig, thread_env
from histoseg.errors import ConfigError
from histoseg.results import make_row

#: The figures every rank reports, in this order (gathered to rank 0 as one int64 vector).
RANK_FIGURES = ("activation_bytes", "gradient_bytes", "peak_bytes", "before_step_bytes")


def rank_threads(config: StepConfig) -> int:
    """Compute threads per rank: the config's threads shared out over its ranks."""
    return max(1, config.threads // config.spatial_workers)


def measure_rank(config: StepConfig, num_classes: int = 2) -> dict[str, Any] | None:
    """Run ``config``'s spatial step as this rank; rank 0 returns the ``measured`` section
    and ``extra.per_rank`` (under ``"_per_rank"``), the other ranks None."""
    import tensorflow as tf

    from histoseg.memory.probe import MemoryProbe
    from histoseg.models import build_for_step
    from histoseg.spatial import HorovodComm, SpatialExecutor, make_spatial_train_step, slab_rows
    from histoseg.train.step import make_optimizer

    configure_tensorflow(config.replace(threads=rank_threads(config)))
    comm = HorovodComm()
    if comm.size != config.spatial_workers:
        raise ConfigError(
            f"spatial_workers {config.spatial_workers} but horovodrun started {comm.size} ranks"
        )
    device = config.tf_device
    probe = MemoryProbe(device)
    with tf.device(device):
        model = build_for_step(config, num_classes)
        comm.broadcast_variables(model.variables)
        optimizer = make_optimizer(config.optimizer, 1e-3)
        step = make_spatial_train_step(
            SpatialExecutor(model, comm), optimizer, memory_device=device
        )
        start, stop = slab_rows(config.patch_size, comm.size, comm.rank)
        images, masks = synthetic_batch(config, num_classes, slice(start, stop))
        step(images, masks)["loss"].numpy()  # warm-up: trace, build, first allocations
        times, mine = timed_steps(step, images, masks, config.steps, probe)
        mine_vector = tf.constant([[mine[k] for k in RANK_FIGURES]], tf.int64)
        gathered = comm.gather_values(mine_vector, "spatial_worker.figures").numpy()
        step_times = comm.gather_values(
            tf.constant([sorted(times)[(len(times) - 1) // 2]], tf.float64),
            "spatial_worker.times",
        ).numpy()
    if comm.rank != 0:
        return None
    per_rank = {k: [int(v) for v in gathered[:, 0, i]] for i, k in enumerate(RANK_FIGURES)}
    worst = max(range(comm.size), key=lambda r: per_rank["peak_bytes"][r])
    figures = {k: per_rank[k][worst] for k in RANK_FIGURES}
    slowest = float(step_times.max())
    return {
        "weights_bytes": variable_bytes(model.weights),
        "optimizer_bytes": variable_bytes(optimizer.variables),
        **figures,
        "rss_peak_bytes": probe.snapshot().rss_peak_bytes,
        **step_rates(config, [slowest], figures["activation_bytes"], figures["peak_bytes"]),
        "_per_rank": {"rank_of_measured": worst, **per_rank},
    }


def run_rank(config: StepConfig) -> dict[str, Any] | None:
    """This rank's part of the row: rank 0 the whole row (an "oom" row on an allocator
    failure), the others None."""
    import tensorflow as tf

    try:
        measured = measure_rank(config)
    except tf.errors.ResourceExhaustedError as exc:
        first = (str(exc).strip().splitlines() or ["OOM"])[0][:200]
        return make_row("memory", config.as_dict(), status="oom", reason=f"out of memory: {first}")
    if measured is None:
        return None
    per_rank = measured.pop("_per_rank")
    extra = {
        "steps": config.steps,
        "image_dtype": "uint8",
        "mask_dtype": "uint8",
        "threads_per_rank": rank_threads(config),
        "per_rank": per_rank,
    }
    return make_row("memory", config.as_dict(), measured=measured, extra=extra)


def launch(config: StepConfig, argv: Sequence[str]) -> dict[str, Any]:
    """Run this worker as ``config.spatial_workers`` ranks under ``horovodrun``; return
    rank 0's row, or a row naming why there is none."""
    from histoseg.train.launch import horovodrun_command

    with tempfile.TemporaryDirectory(prefix="bench-spatial-worker-") as tmp:
        result = Path(tmp) / "row.json"
        command = horovodrun_command(
            config.spatial_workers,
            [sys.executable, "-m", "bench.spatial_worker", *argv, "--result-file", str(result)],
        )
        env = worker_env()
        env.update(thread_env(rank_threads(config)))
        try:
            # In this process's group (not a session of its own, as run_process would
            # start it): the sweep ends a timed-out worker by killing its group, and
            # horovodrun and the ranks must go with it.
            finished = subprocess.run(command, env=env, capture_output=True, check=False)
        except FileNotFoundError:
            return make_row(
                "memory",
                config.as_dict(),
                status="error",
                reason="horovodrun not found: install Horovod (scripts/build_horovod.sh)",
            )
        if result.exists():
            return json.loads(result.read_text())
    output = (finished.stdout + finished.stderr).decode("utf-8", "replace")
    # horovodrun reports a rank the kernel's out-of-memory killer ended as exit code 137
    oom = "status code 137" in output or "ResourceExhausted" in output
    lines = [line for line in output.replace("\r", "\n").splitlines() if line.strip()]
    return make_row(
        "memory",
        config.as_dict(),
        status="oom" if oom else "error",
        reason=f"horovodrun exited with {finished.returncode}: {(lines or ['no output'])[-1][:300]}",
    )


def main(argv: Sequence[str] | None = None) -> int:
    from histoseg.spatial import under_horovod

    argv = list(sys.argv[1:] if argv is None else argv)
    parser = ArgumentParser(
        prog="python -m bench.spatial_worker",
        description="Measure one spatially parallel config (spatial_workers > 1); print its row.",
        epilog=(
            "Examples:\n"
            "  python -m bench.spatial_worker --config "
            '\'{"patch_size": 256, "spatial_workers": 2, "backbone": "mobilenetv2"}\''
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--config", required=True, help="the config as JSON (StepConfig keys)")
    parser.add_argument("--result-file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    config = StepConfig.from_json(args.config)
    if config.spatial_workers < 2:
        raise ConfigError("spatial_workers is 1: measure this config with python -m bench.worker")
    if under_horovod():
        row = run_rank(config)
        if row is not None and args.result_file is not None:
            args.result_file.write_text(json.dumps(row, default=str) + "\n")
        return 0
    os.environ.update(thread_env(rank_threads(config)))
    row = launch(config, argv)
    sys.stdout.write(json.dumps(row, default=str) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
