"""Start N local workers: tf.distribute workers with TF_CONFIG, or Horovod through horovodrun.

``python -m histoseg.train.launch --engine tf -n 2 -- python -m histoseg.train --engine tf``
starts two workers on free localhost ports, each with its own ``TF_CONFIG`` and its share of
the cores; ``--engine horovod`` runs the same command under ``horovodrun --gloo``. On a
cluster the scheduler starts the workers instead (see docs/cluster.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

from histoseg.cli import ArgumentParser, run_main
from histoseg.config import thread_env
from histoseg.errors import ConfigError, EngineUnavailableError

# Environment variables that fix a worker's thread pools before TensorFlow starts.
THREAD_VARIABLES = ("OMP_NUM_THREADS", "TF_NUM_INTRAOP_THREADS")


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports free on ``host`` right now (the OS picks them).

    The sockets are held open until all ports are chosen so the OS never hands out one
    twice; a port can still be taken by someone else before the worker binds it (rare).
    """
    sockets = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind((host, 0))
            sockets.append(s)
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def tf_config(workers: Sequence[str], index: int) -> str:
    """The ``TF_CONFIG`` JSON of worker ``index`` in a cluster of ``workers`` (host:port)."""
    if not 0 <= index < len(workers):
        raise ConfigError(f"worker index {index} is outside 0..{len(workers) - 1}")
    return json.dumps(
        {"cluster": {"worker": list(workers)}, "task": {"type": "worker", "index": index}}
    )


def default_threads_per_worker(workers: int) -> int:
    """Cores of this machine split evenly among ``workers`` (at least 1 each)."""
    return max(1, (os.cpu_count() or 1) // max(1, workers))


def launch_tf_workers(
    num_workers: int,
    command: Sequence[str],
    *,
    threads_per_worker: int | None = None,
    env: Mapping[str, str] | None = None,
    log_dir: str | os.PathLike | None = None,
    timeout_s: float | None = None,
) -> list[int]:
    """Run ``command`` as ``num_workers`` tf.distribute workers on localhost; wait for all.

    Worker 0's output goes to this process's stdout/stderr; the others' to
    ``log_dir/worker-<i>.log`` (a temporary folder when not given, kept on failure).
    When one worker fails the others are stopped, since a collective would wait on it
    forever.

    Args:
        num_workers: how many processes.
        command: the program each worker runs, e.g. ``[sys.executable, "-m", "histoseg.train",
            "--engine", "tf"]``.
        threads_per_worker: compute threads of each worker (None: leave the environment).
        env: extra environment for every worker.
        log_dir: where workers 1..N-1 write their output.
        timeout_s: stop all workers after this many seconds (None: no limit).

    Returns:
        The exit code of each worker, in rank order.
    """
    if num_workers < 1:
        raise ConfigError(f"number of workers must be >= 1, got {num_workers}")
    if not command:
        raise ConfigError("no command to launch")
    ports = free_ports(num_workers)
    workers = [f"127.0.0.1:{p}" for p in ports]
    log_path = Path(log_dir) if log_dir else Path(tempfile.mkdtemp(prefix="histoseg-workers-"))
    log_path.mkdir(parents=True, exist_ok=True)
    procs: list[subprocess.Popen] = []
    with contextlib.ExitStack() as stack:
        try:
            for index in range(num_workers):
                worker_env = dict(os.environ)
                worker_env.update(thread_env(threads_per_worker))
                worker_env.update(env or {})
                worker_env["TF_CONFIG"] = tf_config(workers, index)
                worker_env["HISTOSEG_LOCAL_RANK"] = str(index)
                out = None
                if index > 0:
                    log_file = log_path / f"worker-{index}.log"
                    out = stack.enter_context(log_file.open("w", encoding="utf-8"))
                procs.append(
                    subprocess.Popen(
                        list(command),
                        env=worker_env,
                        stdout=out,
                        stderr=subprocess.STDOUT if out else None,
                    )
                )
            return _wait_all(procs, timeout_s, log_path)
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()


def _wait_all(procs: list[subprocess.Popen], timeout_s: float | None, log_path: Path) -> list[int]:
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes):
            return [int(c) for c in codes]
        failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
        timed_out = deadline is not None and time.monotonic() > deadline
        if failed or timed_out:
            for p in procs:
                if p.poll() is None:
                    p.terminate()
            for p in procs:
                try:
                    p.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait()
            why = "timed out" if timed_out else f"worker {failed[0]} exited {codes[failed[0]]}"
            print(
                f"launch: {why}; stopped the others; logs of workers 1.. in {log_path}",
                file=sys.stderr,
            )
            return [int(p.returncode) for p in procs]
        time.sleep(0.2)


def horovodrun_path() -> str:
    """The ``horovodrun`` beside this Python, else on PATH; EngineUnavailableError if none."""
    beside = Path(sys.executable).parent / "horovodrun"
    if beside.exists():
        return str(beside)
    found = shutil.which("horovodrun")
    if found:
        return found
    raise EngineUnavailableError(
        "horovodrun not found beside this Python or on PATH; run scripts/build_horovod.sh"
    )


def horovodrun_command(
    num_workers: int,
    command: Sequence[str],
    *,
    hosts: str | None = None,
    gloo: bool = True,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The ``horovodrun`` command line that runs ``command`` as ``num_workers`` ranks.

    Args:
        num_workers: total ranks (``-np``).
        command: the program each rank runs.
        hosts: Horovod host list, e.g. "node1:2,node2:2" (two ranks per node);
            default ``localhost:<num_workers>``.
        gloo: use Gloo (built in; no MPI needed). False leaves the choice to horovodrun.
        extra_args: further horovodrun options, e.g. ``["--network-interface", "ib0"]``.
    """
    if num_workers < 1:
        raise ConfigError(f"number of workers must be >= 1, got {num_workers}")
    cmd = [horovodrun_path(), "-np", str(num_workers), "-H", hosts or f"localhost:{num_workers}"]
    if gloo:
        cmd.append("--gloo")
    cmd += list(extra_args)
    return cmd + list(command)


def run_horovod(
    num_workers: int,
    command: Sequence[str],
    *,
    threads_per_worker: int | None = None,
    env: Mapping[str, str] | None = None,
    timeout_s: float | None = None,
) -> subprocess.CompletedProcess:
    """Run ``command`` under ``horovodrun --gloo`` on localhost (horovodrun passes the
    environment, thread settings included, on to every rank)."""
    run_env = dict(os.environ)
    run_env.update(thread_env(threads_per_worker))
    run_env.update(env or {})
    return subprocess.run(
        horovodrun_command(num_workers, command),
        env=run_env,
        timeout=timeout_s,
        text=True,
        check=False,
    )


LOCAL_RANK_VARIABLES = (
    "HISTOSEG_LOCAL_RANK",
    "HOROVOD_LOCAL_RANK",
    "OMPI_COMM_WORLD_LOCAL_RANK",
    "MPI_LOCALRANKID",
    "SLURM_LOCALID",
)


def local_rank_from_env() -> int:
    """This process's rank on its host, from whichever launcher started it (0 if none).

    Read before any engine starts, so a process can pin its cores before its threads exist.
    """
    for name in LOCAL_RANK_VARIABLES:
        value = os.environ.get(name, "")
        if value.isdigit():
            return int(value)
    return 0


#: (rank, world size, ranks on this host) variables each launcher sets in the ranks it
#: starts: horovodrun (Gloo or MPI), Open MPI, MPICH and Intel MPI (PMI), MVAPICH, and
#: Slurm's srun. Slurm's world is the job step's (``SLURM_STEP_NUM_TASKS``, set by srun), not
#: the job's: a plain process in a batch script sees ``SLURM_NTASKS`` too, and is one process.
WORLD_VARIABLES = (
    ("HOROVOD_RANK", "HOROVOD_SIZE", "HOROVOD_LOCAL_SIZE"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_SIZE"),
    ("PMI_RANK", "PMI_SIZE", "MPI_LOCALNRANKS"),
    ("MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE", "MV2_COMM_WORLD_LOCAL_SIZE"),
    ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_TASKS_PER_NODE"),
)


def _count(text: str, *, leading: bool = False) -> int | None:
    """The count a launcher variable holds, or None. ``leading``: its leading count (Slurm
    writes ``2(x3)`` for 2 tasks on each of 3 hosts)."""
    digits = (re.match if leading else re.fullmatch)(r"\s*([0-9]+)\s*", text)
    return int(digits.group(1)) if digits else None


def world_from_env(environ: Mapping[str, str] | None = None) -> tuple[int, int, int]:
    """(rank, world size, ranks on this host) from the first launcher whose rank and size
    are set; (0, 1, 1) in a process no launcher started. Ranks on this host fall back to the
    world when the launcher does not say (it only sets default thread counts).

    Raises:
        ConfigError: a rank or size that is not a count, or a rank outside its world (a
            misread world would run slides twice or never).
    """
    environ = os.environ if environ is None else environ
    for rank_name, size_name, local_name in WORLD_VARIABLES:
        if rank_name not in environ or size_name not in environ:
            continue
        rank, size = _count(environ[rank_name]), _count(environ[size_name])
        if rank is None or size is None or not 0 <= rank < size:
            raise ConfigError(
                f"launcher variables {rank_name}={environ[rank_name]!r} "
                f"{size_name}={environ[size_name]!r}: need a whole-number rank below the size"
            )
        on_host = _count(environ.get(local_name, ""), leading=True) or size
        return rank, size, max(1, min(on_host, size))
    return 0, 1, 1


def pin_to_cores(local_rank: int, threads: int) -> list[int] | None:
    """Pin this process to cores ``local_rank*threads .. +threads`` (Linux; else no-op).

    The study pinned each of a node's 2 processes to one socket; on one machine the same idea
    is a disjoint block of cores per worker. Returns the cores, or None where not supported
    or when there are not enough cores.
    """
    if not hasattr(os, "sched_setaffinity"):
        return None
    available = sorted(os.sched_getaffinity(0))
    start = local_rank * threads
    if start + threads > len(available):
        return None
    cores = available[start : start + threads]
    os.sched_setaffinity(0, cores)
    return cores


def exit_status(codes: Sequence[int]) -> int:
    """One exit status for a launch: the first worker that exited with an error, else the
    first killed by a signal (as a shell reports it, 128 + N: the launcher stops the others
    when one fails, so a signal is often its doing, not the cause), else 0."""
    exited = [c for c in codes if c > 0]
    killed = [128 - c for c in codes if c < 0]
    return (exited or killed or [0])[0]


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m histoseg.train.launch",
        description="Run a command as N local workers of the tf or horovod engine.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            "  python -m histoseg.train.launch --engine tf -n 2 -- \\\n"
            "      python -m histoseg.train --engine tf --steps 20\n"
            "  python -m histoseg.train.launch --engine horovod -n 2 -- \\\n"
            "      python -m histoseg.train --engine horovod --fp16-allreduce\n"
        ),
    )
    parser.add_argument(
        "--engine",
        choices=("tf", "horovod", "none"),
        required=True,
        help="tf: tf.distribute workers (TF_CONFIG set); horovod: horovodrun --gloo ranks; "
        "none: independent processes (TF_CONFIG set, unused), a control without collectives",
    )
    parser.add_argument("-n", "--workers", type=int, default=2, help="number of workers")
    parser.add_argument(
        "--threads-per-worker",
        type=int,
        default=None,
        help="compute threads per worker (default: cores // workers)",
    )
    parser.add_argument("--log-dir", default=None, help="where workers 1.. write logs (tf)")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="-- then the worker command")
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        raise ConfigError("give the worker command after --, e.g. -- python -m histoseg.train")
    threads = args.threads_per_worker or default_threads_per_worker(args.workers)
    if args.engine in ("tf", "none"):
        codes = launch_tf_workers(
            args.workers, command, threads_per_worker=threads, log_dir=args.log_dir
        )
        return exit_status(codes)
    return run_horovod(args.workers, command, threads_per_worker=threads).returncode


if __name__ == "__main__":
    raise SystemExit(run_main(main))
