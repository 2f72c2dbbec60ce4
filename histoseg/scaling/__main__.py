"""``python -m histoseg.scaling``: the weak-scaling projection on the command line.

Numbers given as options (``--compute-s``, ``--gradient-bytes``, ``--overhead-s``, ``--cv``)
are used as given; with ``--results`` the rest are read off measured scaling rows
(:mod:`histoseg.scaling.measured`). ``--published`` checks the model against the published
large runs (Horovod's 512 GPUs, Kurth et al.'s 27,360).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from histoseg.cli import ArgumentParser, run_main
from histoseg.errors import ConfigError
from histoseg.results import load_rows
from histoseg.scaling.measured import projection_from, spread_from_rows
from histoseg.scaling.model import (
    DEFAULT_BANDWIDTH_GBPS,
    DEFAULT_LATENCY_S,
    DEFAULT_WORKERS_PER_NODE,
    Network,
    format_projection,
    format_published,
    published_checks,
)
from histoseg.scaling.stragglers import Spread


def main(argv: Sequence[str] | None = None) -> int:
    parser = ArgumentParser(
        prog="python -m histoseg.scaling",
        description="What adding workers buys: a ring-allreduce cost model projecting weak-scaling efficiency.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            "  python -m histoseg.scaling --results results/scaling.json --patch-size 2048\n"
            "  python -m histoseg.scaling --compute-s 20 --gradient-bytes 164.2e6 "
            "--overhead-s 0.002 --cv 0.02 0.015 0.03\n"
            "  python -m histoseg.scaling --published --results results/scaling.json\n"
        ),
    )
    parser.add_argument("--results", help="measured scaling rows (compute time, calibration)")
    parser.add_argument("--patch-size", type=int, default=2048, help="px (default 2048)")
    parser.add_argument("--compute-s", type=float, help="compute time per step, seconds")
    parser.add_argument(
        "--compute-scale",
        type=float,
        default=1.0,
        help="multiply the measured compute time (e.g. <1 for a faster cluster worker)",
    )
    parser.add_argument("--gradient-bytes", type=float, help="fp32 gradient bytes of the model")
    parser.add_argument("--overhead-s", type=float, help="framework cost per allreduce, s")
    parser.add_argument("--bandwidth-gbps", type=float, default=DEFAULT_BANDWIDTH_GBPS)
    parser.add_argument("--latency-us", type=float, default=DEFAULT_LATENCY_S * 1e6)
    parser.add_argument("--workers-per-node", type=int, default=DEFAULT_WORKERS_PER_NODE)
    parser.add_argument("--nodes", type=int, default=256, help="largest node count (256)")
    parser.add_argument("--overlap", type=float, default=0.0, help="hidden allreduce fraction")
    parser.add_argument(
        "--cv",
        type=float,
        nargs="+",
        metavar="CV",
        help="step-time spread of one worker (std/mean), optionally with a band: CV [LOW HIGH] "
        "(default: pooled from --results rows without a collective)",
    )
    parser.add_argument(
        "--published",
        action="store_true",
        help="project the published large runs (Horovod 512 GPUs, Kurth et al. 27,360) "
        "with the spread of --results or --cv, beside their published efficiency",
    )
    args = parser.parse_args(argv)
    if args.cv and len(args.cv) not in (1, 3):
        raise ConfigError("--cv takes CV or CV LOW HIGH")
    spread = Spread.given(*args.cv) if args.cv else None

    rows: list[dict] = []
    if args.results:
        rows = load_rows(args.results)
    if args.published:
        spread = spread or spread_from_rows(rows)
        if spread is None:
            raise ConfigError(
                "--published needs a spread: --results with repeated launches, or --cv"
            )
        print(format_published(spread, published_checks(spread)))
        return 0
    inputs, tables = projection_from(
        rows,
        patch_size=args.patch_size,
        compute_s=args.compute_s,
        compute_scale=args.compute_scale,
        gradient_bytes=args.gradient_bytes,
        overhead_s=args.overhead_s,
        network=Network(args.bandwidth_gbps, args.latency_us * 1e-6, args.workers_per_node),
        max_workers=args.nodes * args.workers_per_node,
        overlap=args.overlap,
        spread=spread,
    )
    print(format_projection(inputs, tables))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
