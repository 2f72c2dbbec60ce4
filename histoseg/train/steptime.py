"""Time N train steps of one DeepLabV3+ configuration on random data; report memory too.

Prints the median step time after a warm-up step, the allocator's bytes before the step
and after the forward pass (read inside the compiled step), and the allocator's peak over
the timed steps (stats reset after the warm-up).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence

from histoseg.cli import ArgumentParser, int_in_range, positive_int, run_main
from histoseg.config import HEAD_FILTERS
from histoseg.errors import OutOfMemoryError

# Below 32 px the stride-32 features vanish; above 16384 px no accelerator holds one step.
MIN_PATCH_PX = 32
MAX_PATCH_PX = 16384

EPILOG = """Examples:
  python -m histoseg.train.steptime --backbone xception65 --patch-size 512 --batch-size 1 \\
      --precision float32 --remat blocks --steps 5
  python -m histoseg.train.steptime --backbone mobilenetv2 --alpha 0.35 --patch-size 128 --json

A configuration whose predicted step peak (histoseg.memory.estimate) does not fit the
device's free memory is refused before anything is built, unless --force.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    from histoseg.models.cli_options import add_model_arguments
    from histoseg.train.step import OPTIMIZERS

    parser = ArgumentParser(
        prog="python -m histoseg.train.steptime",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--patch-size",
        type=int_in_range(MIN_PATCH_PX, MAX_PATCH_PX),
        default=512,
        help=f"square patch side in px ({MIN_PATCH_PX} to {MAX_PATCH_PX})",
    )
    parser.add_argument("--batch-size", type=positive_int, default=1)
    parser.add_argument("--optimizer", default="adam", choices=OPTIMIZERS)
    parser.add_argument(
        "--steps", type=positive_int, default=5, help="timed steps after one warm-up step"
    )
    parser.add_argument("--seed", type=int_in_range(0, 2**32 - 1), default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--force", action="store_true", help="run even when the step is predicted not to fit"
    )
    return parser.parse_args(argv)


def check_fit(args: argparse.Namespace, device: str) -> None:
    """Refuse a configuration whose predicted step peak does not fit ``device`` ("cpu" or
    "gpu") now: an out-of-memory kill would end the process without a word.

    Raises:
        OutOfMemoryError: with the prediction and the free memory, unless ``--force``.
    """
    from histoseg.memory.devices import fit_problem
    from histoseg.memory.estimate import estimate

    predicted = estimate(
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        backbone=args.backbone,
        output_stride=args.output_stride,
        precision=args.precision,
        remat=args.remat,
        optimizer=args.optimizer,
        device=device,
        backbone_options={
            **({} if args.alpha is None else {"alpha": args.alpha}),
            **({} if args.head_filters == HEAD_FILTERS else {"head_filters": args.head_filters}),
        },
        num_classes=args.num_classes,
    )
    problem = fit_problem(predicted.peak_bytes, device)
    if problem is not None:
        raise OutOfMemoryError(
            f"{args.backbone} at {args.patch_size} px, batch {args.batch_size}, "
            f"{args.precision}, remat {args.remat}: {problem} (--force runs it anyway)"
        )


def run(args: argparse.Namespace) -> dict:
    """Build the configuration, run warm-up + ``args.steps`` steps, return the figures."""
    import keras
    import numpy as np
    import tensorflow as tf

    from histoseg.memory.probe import allocator_info
    from histoseg.models import build_deeplabv3plus
    from histoseg.train.step import make_optimizer, make_train_step

    kwargs = {} if args.alpha is None else {"alpha": args.alpha}
    gpu = bool(tf.config.list_physical_devices("GPU"))
    if not args.force:
        check_fit(args, "gpu" if gpu else "cpu")
    keras.utils.set_random_seed(args.seed)
    model = build_deeplabv3plus(
        args.backbone,
        (args.patch_size, args.patch_size, 3),
        args.num_classes,
        args.output_stride,
        args.precision,
        args.remat,
        head_filters=args.head_filters,
        **kwargs,
    )
    device = "GPU:0" if gpu else "CPU:0"
    step = make_train_step(
        model, make_optimizer(args.optimizer), num_classes=args.num_classes, memory_device=device
    )
    rng = np.random.default_rng(args.seed)
    shape = (args.batch_size, args.patch_size, args.patch_size)
    images = tf.constant(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    masks = tf.constant(rng.integers(0, args.num_classes, shape, dtype=np.int32))

    start = time.perf_counter()
    float(step(images, masks)["loss"])
    warmup_s = time.perf_counter() - start
    tf.config.experimental.reset_memory_stats(device)
    times, losses, reads = [], [], []
    for _ in range(args.steps):
        start = time.perf_counter()
        out = step(images, masks)
        losses.append(float(out["loss"]))  # blocks until the step is done
        times.append(time.perf_counter() - start)
        reads.append({k: int(v) for k, v in out.items() if k != "loss"})
    peak = allocator_info(device)["peak"]
    before = max(r["bytes_before_step"] for r in reads)
    after_forward = max(r["bytes_after_forward"] for r in reads)
    pixels = args.batch_size * args.patch_size**2
    return {
        "config": {k: v for k, v in vars(args).items() if k not in ("json", "verbose")},
        "device": device,
        "params": int(sum(np.prod(v.shape) for v in model.trainable_weights)),
        "warmup_s": warmup_s,
        "step_s_median": statistics.median(times),
        "step_s": times,
        "loss": losses,
        "bytes_before_step": before,
        "bytes_after_forward": after_forward,
        "activation_bytes": after_forward - before,
        "activation_bytes_per_px": (after_forward - before) / pixels,
        "bytes_after_gradients": max(r["bytes_after_gradients"] for r in reads),
        "peak_bytes": peak,
    }


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    if args.json:
        print(json.dumps(result))
        return 0
    c = result["config"]
    print(
        f"{c['backbone']} {c['patch_size']} px x{c['batch_size']} OS{c['output_stride']} "
        f"{c['precision']} remat={c['remat']} {c['optimizer']} head {c['head_filters']} ch "
        f"on {result['device']} "
        f"({result['params']:,} params)"
    )
    print(f"  median step time     {result['step_s_median']:.3f} s over {c['steps']} steps")
    print(f"  bytes before step    {result['bytes_before_step'] / 1e6:10.1f} MB")
    print(f"  bytes after forward  {result['bytes_after_forward'] / 1e6:10.1f} MB")
    print(
        f"  activation bytes     {result['activation_bytes'] / 1e6:10.1f} MB "
        f"({result['activation_bytes_per_px']:.0f} B/px)"
    )
    print(f"  step peak            {result['peak_bytes'] / 1e6:10.1f} MB")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
