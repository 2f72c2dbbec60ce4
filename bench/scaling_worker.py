"""One rank of a bench.scaling launch: build the model, train a fixed batch of its own, time
every step (and the same step without its collective), probe the allreduce alone, and write
``rank<r>.json``; and the launcher's summary of a launch from its ranks' records.

Engine "spatial" (:func:`spatial_worker_main`) is one patch cut across the ranks instead:
every rank trains its slab of the same patches, and the step is timed again without the
halo exchange (:class:`histoseg.spatial.comm.NoExchange`)."""

from __future__ import annotations

import json
import os
import statistics
import time
from pathlib import Path
from typing import Any

#: Buffer sizes (bytes) at which each rank times one allreduce on its own.
PROBE_BYTES = (1 << 16, 1 << 20, 1 << 22, 1 << 24)


def _pin_and_set_threads(spec: dict[str, Any]) -> list[int] | None:
    """Pin this rank to its own block of cores (as the study pinned one process per
    socket) and size TensorFlow's thread pools; done before TensorFlow starts its pools so
    that every one of its threads inherits the pinning. Returns the cores (None unpinned)."""
    threads = int(spec["threads"])
    from histoseg.train.launch import local_rank_from_env, pin_to_cores

    cores = pin_to_cores(local_rank_from_env(), threads) if spec.get("pin", True) else None
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    return cores


def _seeded_model(spec: dict[str, Any]):
    """The spec's DeepLabV3+ (seed 0, so every rank starts from the same weights)."""
    import keras

    from histoseg.models import build_deeplabv3plus

    keras.utils.set_random_seed(0)
    size_px = int(spec["patch_size"])
    kwargs = {"alpha": spec["alpha"]} if spec.get("alpha") is not None else {}
    return build_deeplabv3plus(spec["backbone"], (size_px, size_px, 3), **kwargs)


def worker_main(spec: dict[str, Any]) -> int:
    """One rank: build the model, train a fixed batch, time each step, write rank<r>.json."""
    cores = _pin_and_set_threads(spec)
    import numpy as np
    import tensorflow as tf

    from histoseg.train.engines import get_engine

    engine = get_engine(spec["engine"]).init()
    from histoseg.train.distributed import DistributedStep, all_variables, gradient_bytes
    from histoseg.train.engines.selfcheck import global_batch
    from histoseg.train.step import make_optimizer

    size_px = int(spec["patch_size"])
    model = _seeded_model(spec)
    step = DistributedStep(
        model,
        make_optimizer("adam", 1e-4),
        engine,
        compression=spec["compression"],
        step_mode=spec["step"],
    )
    engine.broadcast_variables(all_variables(model, step.optimizer))
    # this rank's fixed patches: weak scaling keeps the work per worker constant
    # independent "none" processes are all rank 0 of 1; the launcher numbers them
    rank = engine.rank if engine.size > 1 else int(os.environ.get("HISTOSEG_LOCAL_RANK", "0"))
    images, masks = global_batch(rank, int(spec["batch_size"]), size_px, seed=99)
    images, masks = tf.constant(images), tf.constant(masks)
    times, threads_before = [], None
    for i in range(int(spec["warmup"]) + int(spec["steps"])):
        if i == int(spec["warmup"]):
            threads_before = thread_cpu_s()
        t = step(images, masks)
        if i >= int(spec["warmup"]):
            times.append(t)
    thread_cpu = _per_step(threads_before, thread_cpu_s(), len(times))
    local = _local_steps(step, engine, images, masks, int(spec["warmup"]), int(spec["steps"]))
    engine.barrier()  # probes time the collective alone, with the ranks in step
    probe = _allreduce_probe(engine) if engine.size > 1 else {}
    engine.barrier()
    record = {
        "rank": rank,
        "size": engine.size,
        "step_mode": step.step_mode,
        "compute_s": [t.compute_s for t in times],
        "allreduce_s": [t.allreduce_s for t in times],
        "apply_s": [t.apply_s for t in times],
        "step_s": [t.step_s for t in times],
        "local_step_s": local,
        "loss": [t.loss for t in times],
        "gradient_bytes": gradient_bytes(model),
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "allreduce_probe": probe,
        "horovod_cycle_time_ms": os.environ.get("HOROVOD_CYCLE_TIME"),
        "cores": cores,
        "cpu_s": _own_cpu_s(),
        "thread_cpu_s_per_step": thread_cpu,
    }
    out = Path(spec["out_dir"]) / f"rank{rank}.json"
    out.write_text(json.dumps(record))
    engine.shutdown()
    return 0


def spatial_worker_main(spec: dict[str, Any]) -> int:
    """One rank of engine "spatial": the compiled spatial train step on this rank's slab of
    the same patches (one rank: the executor on the whole patch), timed; then the same
    step with the halo exchange and moment reductions left out, timed as well; the
    collectives the step's trace built (``HorovodComm.traffic``); ``rank<r>.json``."""
    cores = _pin_and_set_threads(spec)
    import numpy as np
    import tensorflow as tf

    from histoseg.spatial import SpatialExecutor, make_spatial_train_step, slab_rows
    from histoseg.spatial.comm import HorovodComm, NoExchange, SingleProcess, under_horovod
    from histoseg.train.distributed import gradient_bytes
    from histoseg.train.engines.selfcheck import global_batch
    from histoseg.train.step import make_optimizer

    comm = HorovodComm() if under_horovod() else SingleProcess()
    size_px = int(spec["patch_size"])
    model = _seeded_model(spec)
    if comm.size > 1:
        comm.broadcast_variables(model.variables)
        comm.traffic = []
    images, masks = global_batch(0, int(spec["batch_size"]), size_px, seed=99)
    start, stop = slab_rows(size_px, comm.size, comm.rank)
    images, masks = tf.constant(images[:, start:stop]), tf.constant(masks[:, start:stop])
    warmup, steps = int(spec["warmup"]), int(spec["steps"])

    def timed(step) -> tuple[list[float], list[float]]:
        times, losses = [], []
        for i in range(warmup + steps):
            clock = time.perf_counter()
            loss = float(step(images, masks)["loss"])
            if i >= warmup:
                times.append(time.perf_counter() - clock)
                losses.append(loss)
        return times, losses

    step = make_spatial_train_step(SpatialExecutor(model, comm), make_optimizer("adam", 1e-4))
    times, losses = timed(step)
    traffic = getattr(comm, "traffic", None) or []  # the step's trace, nothing after it
    comm.traffic = None
    local: list[float] = []
    if comm.size > 1:
        quiet = NoExchange(comm.rank, comm.size)
        step = make_spatial_train_step(SpatialExecutor(model, quiet), make_optimizer("adam", 1e-4))
        comm.sum_values(tf.zeros([1]), "spatial_worker.barrier").numpy()  # ranks in step
        local = timed(step)[0]
    record = {
        "rank": comm.rank,
        "size": comm.size,
        "step_mode": "spatial",
        "step_s": times,
        "local_step_s": local,
        "loss": losses,
        "gradient_bytes": gradient_bytes(model),
        "parameters": int(sum(np.prod(v.shape) for v in model.trainable_variables)),
        "halo_collectives": len(traffic),
        "halo_gather_bytes": sum(t["bytes"] or 0 for t in traffic if t["kind"] == "gather"),
        "halo_sum_bytes": sum(t["bytes"] or 0 for t in traffic if t["kind"] == "sum"),
        "cores": cores,
        "cpu_s": _own_cpu_s(),
    }
    out = Path(spec["out_dir"]) / f"rank{comm.rank}.json"
    out.write_text(json.dumps(record))
    return 0


def _local_steps(step, engine, images, masks, warmup: int, steps: int) -> list[float]:
    """The same compiled step without its collective, on every rank at once (as the
    no-communication control runs): overlapped step time minus this one is the
    communication the overlapped step still exposes. Empty where there is none."""
    local: list[float] = []
    if step.step_mode == "overlap" and engine.size > 1:
        engine.barrier()
        for i in range(warmup + steps):
            seconds = step.local_step(images, masks)
            if i >= warmup:
                local.append(seconds)
    return local


def _allreduce_probe(engine) -> dict[str, float]:
    """Median seconds of one allreduce per buffer size of :data:`PROBE_BYTES` (first of
    four dropped)."""
    import tensorflow as tf

    probe = {}
    for nbytes in PROBE_BYTES:
        buf = [tf.ones([nbytes // 4], tf.float32)]
        samples = []
        for _ in range(4):
            t0 = time.perf_counter()
            out = engine.allreduce_gradients(buf)
            out[0].numpy()
            samples.append(time.perf_counter() - t0)
        probe[str(nbytes)] = statistics.median(samples[1:])
    return probe


def _own_cpu_s() -> float:
    """CPU seconds this process has used so far, all its threads."""
    import resource

    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


#: TensorFlow names the threads of its inter-op pool, where the step's kernels run with one
#: intra-op thread, "tf_Compute"; the rest of a rank's threads are the engine's (Horovod's
#: background thread, Gloo's or gRPC's transport threads) and Python's main thread.
COMPUTE_THREAD_PREFIX = "tf_Compute"


def thread_cpu_s() -> dict[str, float] | None:
    """CPU seconds this process's threads have used: ``{"compute": .., "other": ..}``.

    On one core per rank the communication's own CPU work (fusion copies, sums, socket I/O,
    the engine's polling) runs on the compute core, so an overlapped step cannot hide it:
    "other" is what it costs. None where /proc/self/task is not there (not Linux).
    """
    totals = {"compute": 0.0, "other": 0.0}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    try:
        tids = os.listdir("/proc/self/task")
    except OSError:
        return None
    for tid in tids:
        try:
            name = Path(f"/proc/self/task/{tid}/comm").read_text().strip()
            # fields after the ")" that closes the name: utime and stime are the 12th, 13th
            fields = Path(f"/proc/self/task/{tid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # a thread that ended between the listing and the read
            continue
        kind = "compute" if name.startswith(COMPUTE_THREAD_PREFIX) else "other"
        totals[kind] += (int(fields[11]) + int(fields[12])) / tick
    return totals


def _per_step(
    before: dict[str, float] | None, after: dict[str, float] | None, steps: int
) -> dict[str, float] | None:
    """CPU seconds per step of each kind of thread between two :func:`thread_cpu_s` reads."""
    if before is None or after is None or steps < 1:
        return None
    # a thread that ended in between takes its time with it: never report less than zero
    return {k: max(0.0, after[k] - before[k]) / steps for k in after}


# ----------------------------------------------------------------------------- launcher side
#: What ``allreduce_s`` is in each step mode (kept in ``measured.allreduce_timing``).
ALLREDUCE_TIMING = {
    "separate": "the collective, timed around the call between gradients and update",
    "overlap": "exposed: overlapped step minus the same ranks' step without the collective",
}


def summarise(records: list[dict[str, Any]], batch_size: int, patch_size: int) -> dict[str, Any]:
    """Measured figures of one launch from its ranks' records (medians over steps).

    ``allreduce_s`` is the step time the communication costs. A separate step times its
    collective around the call. An overlapped step cannot (the collective runs inside the
    compiled step, beside the backward pass): there it is the exposed communication, the
    overlapped step time minus the same ranks' time for the same compiled step without
    the collective (``local_step_s``), clamped at zero; the unclamped difference is kept
    as ``allreduce_exposed_s`` (launch-to-launch noise can make it slightly negative).
    ``compute_s`` is then the step without the collective, update included.
    ``compute_thread_cpu_s`` / ``other_thread_cpu_s``: CPU a rank's compute threads and its
    other threads (engine, transport, Python) used per timed step, mean over ranks.
    ``per_rank_step_s`` is each rank's median step, ``per_rank_steps_s`` each rank's timed
    steps in order.
    """
    med = statistics.median
    ranks = sorted(records, key=lambda r: r["rank"])
    # ranks step in lockstep; the slowest rank's median sets the pace
    step_s = max(med(r["step_s"]) for r in records)
    mode = records[0].get("step_mode", "separate")
    extra: dict[str, Any] = {"allreduce_timing": ALLREDUCE_TIMING[mode]}
    if mode == "overlap":
        local = [r["local_step_s"] for r in records if r.get("local_step_s")]
        # one worker (or the no-communication control) has no collective: all is compute
        compute_s = max(med(steps) for steps in local) if local else step_s
        exposed_s = step_s - compute_s
        allreduce_s = max(0.0, exposed_s)
        apply_s = None
        extra["allreduce_exposed_s"] = exposed_s
        if local:
            extra["local_step_s"] = compute_s
    else:
        compute_s = max(med(r["compute_s"]) for r in records)
        allreduce_s = med([med(r["allreduce_s"]) for r in records])
        apply_s = med([med(r["apply_s"]) for r in records])
    workers = len(records)
    per_worker = batch_size / step_s
    threads = [r["thread_cpu_s_per_step"] for r in records if r.get("thread_cpu_s_per_step")]
    if len(threads) == len(records):
        # what a rank's compute threads and its other threads used per timed step (mean)
        extra["compute_thread_cpu_s"] = statistics.fmean(t["compute"] for t in threads)
        extra["other_thread_cpu_s"] = statistics.fmean(t["other"] for t in threads)
    probe: dict[str, float] = {}
    for r in records:
        for b, s in r.get("allreduce_probe", {}).items():
            probe[b] = max(probe.get(b, 0.0), s)
    return {
        "step_s": step_s,
        "compute_s": compute_s,
        "allreduce_s": allreduce_s,
        "apply_s": apply_s,
        "allreduce_share": allreduce_s / step_s,
        "patches_per_s": per_worker * workers,
        "megapixels_per_s": per_worker * workers * patch_size**2 / 1e6,
        "gradient_bytes": records[0]["gradient_bytes"],
        "parameters": records[0]["parameters"],
        "allreduce_probe": probe,
        "per_rank_step_s": [med(r["step_s"]) for r in ranks],
        # every timed step of every rank: the step-to-step spread a launch's median hides
        "per_rank_steps_s": [list(r["step_s"]) for r in ranks],
        **extra,
    }


#: What ``halo_s`` of a spatial row is (kept in ``measured.halo_timing``).
HALO_TIMING = (
    "exposed: the step minus the same ranks' step with the halo exchange and moment "
    "reductions left out (histoseg.spatial.comm.NoExchange)"
)


def summarise_spatial(
    records: list[dict[str, Any]], batch_size: int, patch_size: int
) -> dict[str, Any]:
    """Measured figures of one launch of engine "spatial" (medians over steps).

    The ranks train the same ``batch_size`` patches together, so ``patches_per_s`` is the
    launch's, not per rank. ``halo_s`` is the spatial communication the step exposes: the
    slowest rank's median step minus the slowest rank's median step without it
    (``compute_s``; the gradient sum over the ranks is in both), clamped at zero, the
    unclamped difference kept as ``halo_exposed_s``. ``halo_collectives`` and the bytes
    put into them per step (``halo_gather_bytes``, ``halo_sum_bytes``; the traffic of
    :func:`histoseg.spatial.traffic.halo_traffic`) are the most loaded rank's, from the
    trace of its step.
    """
    med = statistics.median
    ranks = sorted(records, key=lambda r: r["rank"])
    step_s = max(med(r["step_s"]) for r in records)
    local = [r["local_step_s"] for r in records if r.get("local_step_s")]
    compute_s = max(med(steps) for steps in local) if local else step_s
    exposed_s = step_s - compute_s
    most = max(records, key=lambda r: r["halo_gather_bytes"] + r["halo_sum_bytes"])
    return {
        "step_s": step_s,
        "compute_s": compute_s,
        "halo_s": max(0.0, exposed_s),
        "halo_exposed_s": exposed_s,
        "halo_share": max(0.0, exposed_s) / step_s,
        "halo_timing": HALO_TIMING,
        "halo_collectives": most["halo_collectives"],
        "halo_gather_bytes": most["halo_gather_bytes"],
        "halo_sum_bytes": most["halo_sum_bytes"],
        "patches_per_s": batch_size / step_s,
        "megapixels_per_s": batch_size * patch_size**2 / 1e6 / step_s,
        "gradient_bytes": records[0]["gradient_bytes"],
        "parameters": records[0]["parameters"],
        "per_rank_step_s": [med(r["step_s"]) for r in ranks],
        "per_rank_steps_s": [list(r["step_s"]) for r in ranks],
    }
