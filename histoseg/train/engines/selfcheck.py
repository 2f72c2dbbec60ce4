"""Check an engine end to end: N ranks must train exactly like one worker given the whole batch.

Each rank builds the same small DeepLabV3+ from a *different* seed (so the initial broadcast
has something to fix), takes its slice of a fixed global batch every step, and trains a few
steps through :class:`histoseg.train.distributed.DistributedStep` in either step mode (``--step``).
It writes what the comparison needs to ``--out/rank<r>.npz``: the final weights, the loss of
every step averaged over the ranks, how far an fp16-compressed allreduce of real gradients
lands from the fp32 one, and how the overlapped step's graph holds its collectives.

Batch normalisation runs in inference mode (moving statistics) here on purpose: in training
mode each rank normalises with the statistics of its own slice, so N ranks would compute
different (equally valid) gradients than one worker with the whole batch, and the equality
under test would not hold by design, not by bug.

Run it on a cluster before a long job:
``horovodrun -np 4 -H a:2,b:2 python -m histoseg.train.engines.selfcheck --engine horovod``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histoseg.cli import ArgumentParser, run_main
from histoseg.errors import ConfigError
from histoseg.train.engines import ENGINE_NAMES, get_engine


def global_batch(
    step: int, size: int, patch_size: int, seed: int = 1234
) -> tuple[np.ndarray, np.ndarray]:
    """The whole batch of ``step``: uint8 images and 0/1 masks with a tumour-like blob each."""
    rng = np.random.default_rng([seed, step])
    images = rng.integers(0, 256, size=(size, patch_size, patch_size, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:patch_size, 0:patch_size]
    masks = np.zeros((size, patch_size, patch_size), dtype=np.uint8)
    for i in range(size):
        cy, cx = rng.uniform(0.2, 0.8, size=2) * patch_size
        radius = rng.uniform(0.1, 0.35) * patch_size
        blob = (yy - cy) ** 2 + (xx - cx) ** 2 < radius**2
        masks[i][blob] = 1
        images[i][blob] //= 2  # darker where the "tumour" is, so there is something to learn
    return images, masks


def fp16_bound(grads_per_rank_mean_abs: np.ndarray) -> np.ndarray:
    """Largest error fp16 compression may add to an averaged gradient, elementwise.

    Casting each rank's value to float16 (relative error 2^-11 each), summing in float16
    (another 2^-11 of the sum) and scaling: at most 2^-10 of the mean absolute value, plus
    2^-23 for values in float16's subnormal range (spacing 2^-24, three roundings).
    """
    return 2.0**-10 * grads_per_rank_mean_abs + 2.0**-23


def collective_ops(step, images, masks) -> tuple[int, int]:
    """(collective ops, those with a control input) in the overlapped step's graph.

    A control input would make a collective wait for an earlier op to finish rather than
    only for its gradient, serialising the communication (tf.function adds such edges
    between stateful ops in program order). Zero and zero outside "overlap" mode.
    """
    if step.step_mode != "overlap":
        return 0, 0
    graph = step._overlapped.get_concrete_function(images, masks).graph
    ops = [
        op
        for op in graph.get_operations()
        if op.type.startswith(("HorovodAllreduce", "CollectiveReduce"))
    ]
    return len(ops), sum(1 for op in ops if op.control_inputs)


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m histoseg.train.engines.selfcheck",
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=(
            "Examples:\n"
            "  python -m histoseg.train.engines.selfcheck --engine none --out /tmp/ref\n"
            "  horovodrun -np 2 -H localhost:2 --gloo python -m histoseg.train.engines.selfcheck"
            " --engine horovod --out /tmp/hvd\n"
            "  python -m histoseg.train.launch --engine tf -n 2 -- python -m "
            "histoseg.train.engines.selfcheck --engine tf --out /tmp/tf\n"
        ),
    )
    parser.add_argument("--engine", choices=ENGINE_NAMES, default="none")
    parser.add_argument("--out", required=True, help="folder for rank<r>.npz")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4, help="patches per step, all ranks")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    parser.add_argument("--learning-rate", type=float, default=0.05)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--step",
        choices=("overlap", "separate"),
        help="step mode of histoseg.train.distributed.DistributedStep (default: its default)",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    engine = get_engine(args.engine)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    engine.init()
    rank, size = engine.rank, engine.size
    if args.global_batch % size:
        raise ConfigError(f"--global-batch {args.global_batch} does not split over {size} ranks")
    per_rank = args.global_batch // size

    import keras

    from histoseg.models import build_deeplabv3plus
    from histoseg.train.distributed import DistributedStep, all_variables
    from histoseg.train.step import make_optimizer

    keras.utils.set_random_seed(1 + rank)  # deliberately different until the broadcast
    model = build_deeplabv3plus("mobilenetv2", (args.patch_size, args.patch_size, 3), alpha=0.35)
    optimizer = make_optimizer(args.optimizer, args.learning_rate)
    step = DistributedStep(model, optimizer, engine, bn_training=False, step_mode=args.step)
    engine.broadcast_variables(all_variables(model, step.optimizer), root_rank=0)

    # fp16 compression on this rank's real gradients at the initial weights
    images, masks = global_batch(0, args.global_batch, args.patch_size)
    mine = slice(rank * per_rank, (rank + 1) * per_rank)
    _, grads = step._gradients(images[mine], masks[mine])
    grads = [g for g in grads if g is not None]
    full = engine.allreduce_gradients(grads, compression="none")
    half = engine.allreduce_gradients(grads, compression="fp16")
    mean_abs = engine.allreduce_gradients([tf.abs(g) for g in grads], compression="none")
    ratios = [
        float(np.max(np.abs(h.numpy() - f.numpy()) / fp16_bound(m.numpy())))
        for f, h, m in zip(full, half, mean_abs, strict=True)
    ]
    max_diff = max(
        float(np.max(np.abs(h.numpy() - f.numpy()))) for f, h in zip(full, half, strict=True)
    )

    losses = []
    for s in range(args.steps):
        images, masks = global_batch(s, args.global_batch, args.patch_size)
        times = step(images[mine], masks[mine])
        # mean over ranks of equal-sized slices = the loss of the whole batch
        total = engine.allreduce_sum([tf.constant([times.loss], tf.float64)])[0]
        losses.append(float(total.numpy()[0]) / size)
    engine.barrier()
    ops, chained = collective_ops(step, images[mine], masks[mine])

    _write_rank(
        Path(args.out),
        rank,
        losses=np.array(losses),
        size=np.array(size),
        fp16_max_ratio=np.array(max(ratios)),
        fp16_max_abs_diff=np.array(max_diff),
        step_mode=np.array(step.step_mode),
        trainable_variables=np.array(len(model.trainable_variables)),
        collective_ops=np.array(ops),
        chained_collective_ops=np.array(chained),
        **{f"w{i:04d}": v.numpy() for i, v in enumerate(model.variables)},
    )
    if engine.is_chief:
        print(
            f"selfcheck {args.engine} ({step.step_mode} step): {size} rank(s), losses {np.round(losses, 6).tolist()}, "
            f"fp16 allreduce error <= {max(ratios):.3f} x fp16 rounding bound",
            file=sys.stdout,
        )
    engine.shutdown()
    return 0


def _write_rank(out: Path, rank: int, **arrays: np.ndarray) -> None:
    """This rank's figures and weights as ``rank<r>.npz``, renamed into place when whole."""
    from histoseg.files import atomic_output

    out.mkdir(parents=True, exist_ok=True)
    with atomic_output(out / f"rank{rank}.npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


if __name__ == "__main__":
    raise SystemExit(run_main(main))
