"""``python -m bench.cores``: does this machine's speed scale over its cores?

Weak scaling on one machine can only be as good as the machine: N workers share its memory
bandwidth and caches. This runs two single-threaded kernels, first in one process, then in
N processes at once (each pinned to its own core), and prints the per-process rate and
N-process efficiency for each:

- ``copy``: a streaming copy of a 64 MiB array (memory-bandwidth bound), in GB/s moved
  (bytes read + written);
- ``matmul``: a 1024 x 1024 float32 matrix product (compute bound), in products per second.

A copy efficiency well below the matmul one says that memory-bound parts of a train step
(batch norm, activations, element-wise ops) will slow down when workers share the machine,
whatever the distributed engine does.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import time
from collections.abc import Sequence

from histoseg.cli import ArgumentParser, run_main
from histoseg.errors import ConfigError

EPILOG = """Examples:
  python -m bench.cores                  # 1 process, then one per core
  python -m bench.cores --processes 2 --seconds 8
"""


def _kernel(name: str, seconds: float, core: int | None, out: mp.Queue) -> None:
    """Run kernel ``name`` for ``seconds`` on ``core``; put (name, rate) on ``out``."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[variable] = "1"
    if core is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {core})
    import numpy as np

    if name == "copy":
        src = np.random.default_rng(0).random(8 * 2**20)  # 64 MiB of float64
        dst = np.empty_like(src)
        work, per_call = lambda: np.copyto(dst, src), 2 * src.nbytes / 1e9
    else:
        a = np.random.default_rng(0).random((1024, 1024), dtype=np.float32)
        work, per_call = lambda: a @ a, 1.0
    work()  # first touch, library warm-up
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        work()
        calls += 1
    out.put((name, calls * per_call / (time.perf_counter() - start)))


def measure(kernel: str, processes: int, seconds: float) -> list[float]:
    """Per-process rates of ``kernel`` run by ``processes`` processes at once."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else []
    ctx = mp.get_context("spawn")  # fresh interpreters: thread settings apply before numpy
    out = ctx.Queue()
    procs = [
        ctx.Process(
            target=_kernel, args=(kernel, seconds, cores[i] if i < len(cores) else None, out)
        )
        for i in range(processes)
    ]
    for p in procs:
        p.start()
    rates = [out.get()[1] for _ in procs]
    for p in procs:
        p.join()
    return rates


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m bench.cores",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    default_n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2
    parser.add_argument("--processes", type=int, default=default_n, help="N (default: cores)")
    parser.add_argument("--seconds", type=float, default=5.0, help="per measurement")
    args = parser.parse_args(argv)
    if args.processes < 2 or args.seconds <= 0:
        raise ConfigError(
            f"--processes must be >= 2 and --seconds > 0, got {args.processes}, {args.seconds}"
        )
    units = {"copy": "GB/s", "matmul": "products/s"}
    print(
        f"{'kernel':<8} {'unit':<11} {'1 process':>10} {f'{args.processes} at once, each':>18} {'efficiency':>11}"
    )
    for kernel, unit in units.items():
        alone = measure(kernel, 1, args.seconds)[0]
        together = measure(kernel, args.processes, args.seconds)
        mean = sum(together) / len(together)
        print(f"{kernel:<8} {unit:<11} {alone:>10.1f} {mean:>18.1f} {mean / alone:>11.1%}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
