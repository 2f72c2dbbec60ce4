"""``python -m bench.spatial``: is the spatially parallel step the single-rank step?

``--check`` builds DeepLabV3+ on every rank with the same weights (rank 0's, broadcast),
cuts one random patch into ``--workers`` horizontal slabs, runs the forward and backward
pass of the mean pixel cross-entropy through :class:`histoseg.spatial.SpatialExecutor`
(halo exchange, global batch-norm moments and image pooling, gradients summed over the
ranks), then runs the whole model on the whole patch on rank 0 and prints one JSON line:

- ``max_rel_logit_error``: max |spatial - whole| over the logits / max |whole logit|;
- ``max_rel_grad_error``: the largest, over the weight tensors, of max |spatial - whole|
  / max(max |whole|, 1e-3 x the largest whole gradient of any tensor). The floor keeps
  tensors whose gradient is zero up to rounding (the beta of a batch norm that another
  batch norm follows) from dividing rounding noise by rounding noise;
  ``grad_tensors_at_floor`` counts them. ``rel_grad_l2_error`` is the L2 error over all
  gradients together;
- the bounds of issue 16 (logits 1e-4, gradients 1e-3) and whether both hold (``ok``);
- per rank, the CPU allocator's peak above its level before the step, for the spatial
  step and (rank 0) the whole step, both in eager mode.

With ``--workers`` above 1 outside ``horovodrun`` it launches itself under
``horovodrun -np N -H localhost:N --gloo``. Every map's height must be a multiple of the
number of ranks: the size must be a multiple of ``workers x output stride``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

from histoseg.cli import ArgumentParser, run_main
from histoseg.config import parse_alpha
from histoseg.errors import ConfigError
from histoseg.train.launch import horovodrun_command

EPILOG = """Examples:
  python -m bench.spatial --check --workers 2 --size 128 --backbone mobilenetv2 --alpha 0.35
  python -m bench.spatial --check --workers 2 --size 512 --backbone xception65
  python -m bench.spatial --check --workers 2 --size 64 --dtype float64 --compiled
  python -m bench.spatial --check --workers 2 --size 64 --dtype float64 --compiled --remat full
  horovodrun -np 4 -H localhost:4 --gloo python -m bench.spatial --check --workers 4 --size 512
"""
LOGIT_BOUND = 1e-4
GRAD_BOUND = 1e-3
GRAD_FLOOR = 1e-3


def _relative(got, want) -> float:
    import numpy as np

    return float(np.max(np.abs(got - want)) / max(float(np.max(np.abs(want))), 1e-30))


def grad_errors(got: Sequence, want: Sequence) -> dict:
    """``max_rel_grad_error`` and friends (module docstring) of ``got`` against ``want``."""
    import numpy as np

    got = [np.asarray(g, np.float64) for g in got]
    want = [np.asarray(w, np.float64) for w in want]
    scale = max(float(np.max(np.abs(w))) for w in want)
    floor = GRAD_FLOOR * scale
    worst, at_floor = 0.0, 0
    for g, w in zip(got, want, strict=True):
        own = float(np.max(np.abs(w)))
        at_floor += own < floor
        worst = max(worst, float(np.max(np.abs(g - w))) / max(own, floor, 1e-30))
    squared = sum(float(np.sum((g - w) ** 2)) for g, w in zip(got, want, strict=True))
    total = sum(float(np.sum(w**2)) for w in want)
    return {
        "max_rel_grad_error": worst,
        "grad_tensors_at_floor": int(at_floor),
        "rel_grad_l2_error": (squared / max(total, 1e-300)) ** 0.5,
    }


def _peak_above(before: int) -> int:
    from histoseg.memory.probe import allocator_info

    return allocator_info("CPU:0")["peak"] - before


def _reset_memory() -> int:
    from histoseg.memory.probe import allocator_info, reset_allocator_peak

    reset_allocator_peak("CPU:0")
    return allocator_info("CPU:0")["current"]


def _whole_step(model, images, masks):
    import tensorflow as tf

    with tf.GradientTape() as tape:
        logits = model(images, training=True)
        loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=masks, logits=logits)
        )
    return loss, logits, tape.gradient(loss, model.trainable_variables)


def build_model(args: argparse.Namespace):
    """The model of ``args``, seeded; with ``--dtype float64`` every layer in float64.

    float64 is not one of the builder's precisions (it is no use for training); here it
    takes float32 rounding out of the comparison, so that what is left is the partitioning.
    """
    from unittest import mock

    import keras

    from histoseg.models import build_deeplabv3plus
    from histoseg.models.deeplabv3plus import builder

    keras.utils.set_random_seed(args.seed)
    kwargs = {"alpha": args.alpha} if args.backbone == "mobilenetv2" else {}
    kwargs["remat"] = args.remat
    kwargs["norm"] = args.norm
    shape = (args.size, args.size, 3)
    if args.dtype != "float64":
        return build_deeplabv3plus(
            args.backbone, shape, num_classes=args.classes, precision=args.dtype, **kwargs
        )
    with mock.patch.object(builder, "PRECISIONS", (*builder.PRECISIONS, "float64")):
        model = build_deeplabv3plus(
            args.backbone, shape, num_classes=args.classes, precision="float64", **kwargs
        )
    model.get_layer("logits_upsample").dtype_policy = keras.DTypePolicy("float64")
    return model


def rounding_baseline(model, images, masks, want_logits, want_grads) -> dict:
    """The same errors between two whole steps whose inputs differ by float32 rounding.

    The input is multiplied by ``1 + e`` with ``e`` normal of standard deviation 2**-24
    (half a float32 ulp): what float32 rounding alone moves the logits and gradients by.
    """
    import numpy as np
    import tensorflow as tf

    noise = np.random.default_rng(1).standard_normal(images.shape) * 2.0**-24
    _, logits, grads = _whole_step(
        model, tf.constant((images * (1 + noise)).astype(images.dtype)), masks
    )
    return {
        "baseline_rel_logit_error": _relative(logits.numpy(), want_logits),
        **{
            f"baseline_{k}": v
            for k, v in grad_errors([g.numpy() for g in grads], want_grads).items()
            if k != "grad_tensors_at_floor"
        },
    }


def check(args: argparse.Namespace) -> dict | None:
    """Run the comparison on this rank; rank 0 returns the result, other ranks None."""
    import numpy as np
    import tensorflow as tf

    from histoseg.spatial import (
        HorovodComm,
        SingleProcess,
        SpatialExecutor,
        gather_rows,
        slab_rows,
        spatial_gradients,
    )

    comm = HorovodComm() if args.workers > 1 else SingleProcess()
    if comm.size != args.workers:
        raise ConfigError(f"--workers {args.workers} but horovodrun started {comm.size} ranks")
    model = build_model(args)
    if comm.size > 1:
        comm.broadcast_variables(model.variables)
    rng = np.random.default_rng(args.seed)
    images = rng.uniform(-1, 1, (args.batch, args.size, args.size, 3)).astype(np.float32)
    masks = rng.integers(0, args.classes, (args.batch, args.size, args.size)).astype(np.int32)
    masks_whole = tf.constant(masks)
    start, stop = slab_rows(args.size, comm.size, comm.rank)
    executor = SpatialExecutor(model, comm)
    slab_images, slab_masks = tf.constant(images[:, start:stop]), tf.constant(masks[:, start:stop])

    def step(images, masks):
        return spatial_gradients(executor, images, masks, model.trainable_variables)

    if args.compiled:
        step = tf.function(step)
        step(slab_images, slab_masks)  # trace: the measured call below runs the graph
    before = _reset_memory()
    clock = time.perf_counter()
    loss, logits, grads = step(slab_images, slab_masks)
    spatial_seconds = time.perf_counter() - clock
    spatial_peak = _peak_above(before)
    logits = gather_rows(comm, logits).numpy()
    peaks = comm.gather_values(tf.constant([spatial_peak], tf.int64), "spatial.peaks")
    if comm.rank != 0:
        return None
    before = _reset_memory()
    clock = time.perf_counter()
    want_loss, want_logits, want_grads = _whole_step(model, tf.constant(images), masks_whole)
    whole_seconds = time.perf_counter() - clock
    want_logits, want_grads = want_logits.numpy(), [g.numpy() for g in want_grads]
    peak = _peak_above(before)
    logit_error = _relative(logits, want_logits)
    errors = grad_errors([g.numpy() for g in grads], want_grads)
    return {
        "backbone": args.backbone,
        "dtype": args.dtype,
        "remat": args.remat,
        "norm": args.norm,
        "size": args.size,
        "workers": comm.size,
        "batch": args.batch,
        "compiled": args.compiled,
        "max_rel_logit_error": logit_error,
        **errors,
        "ok": logit_error <= LOGIT_BOUND and errors["max_rel_grad_error"] <= GRAD_BOUND,
        "rel_loss_error": abs(float(loss) - float(want_loss)) / abs(float(want_loss)),
        "logit_bound": LOGIT_BOUND,
        "grad_bound": GRAD_BOUND,
        "spatial_step_s": round(spatial_seconds, 2),
        "whole_step_s": round(whole_seconds, 2),
        "spatial_peak_bytes_per_rank": [int(p) for p in peaks.numpy().ravel()],
        "whole_peak_bytes": peak,
        **(
            rounding_baseline(model, images, masks_whole, want_logits, want_grads)
            if args.baseline
            else {}
        ),
    }


def _launch(args: argparse.Namespace, argv: Sequence[str]) -> int:
    """Run this command under ``horovodrun`` with ``--workers`` ranks; print rank 0's line."""
    with tempfile.TemporaryDirectory(prefix="bench-spatial-") as tmp:
        result = os.path.join(tmp, "result.json")
        command = horovodrun_command(
            args.workers,
            [sys.executable, "-m", "bench.spatial", *argv, "--result-file", result],
        )
        try:
            done = subprocess.run(command, stdout=subprocess.DEVNULL, check=False)
        except FileNotFoundError as exc:
            raise ConfigError(
                "horovodrun not found: install Horovod (scripts/build_horovod.sh)"
            ) from exc
        if done.returncode or not os.path.exists(result):
            raise ConfigError(f"horovodrun exited with {done.returncode}: {' '.join(command)}")
        with open(result) as f:
            print(f.read().strip())
    return 0


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.spatial",
        description=__doc__.splitlines()[0].split(": ", 1)[1],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--check", action="store_true", help="compare with the whole model")
    parser.add_argument("--workers", type=int, default=2, help="ranks = slabs (default 2)")
    parser.add_argument("--size", type=int, default=128, help="patch size in px (default 128)")
    parser.add_argument(
        "--backbone", default="mobilenetv2", choices=("mobilenetv2", "xception65", "resnet50")
    )
    parser.add_argument(
        "--alpha", type=parse_alpha, default=0.35, help="mobilenetv2 width, in (0, 4] (0.35)"
    )
    parser.add_argument("--classes", type=int, default=2, help="logit channels (default 2)")
    parser.add_argument("--batch", type=int, default=1, help="patches per step (default 1)")
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float64", "mixed_bfloat16"),
        help="float64: every layer in float64, to see the partitioning without float32 rounding",
    )
    parser.add_argument(
        "--remat",
        default="none",
        choices=("none", "blocks", "full"),
        help="recompute blocks in the backward pass, in both steps (default none)",
    )
    parser.add_argument(
        "--norm",
        default="batch",
        choices=("batch", "frozen", "group"),
        help="normalisation of every conv block, in both steps (default batch)",
    )
    parser.add_argument(
        "--baseline",
        action="store_true",
        help="also report a whole step against a whole step on float32-rounded input",
    )
    parser.add_argument(
        "--compiled",
        action="store_true",
        help="run the partitioned step as one tf.function (as training does), not eagerly",
    )
    parser.add_argument("--seed", type=int, default=0, help="weights, patch and masks")
    parser.add_argument("--result-file", help=argparse.SUPPRESS)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = _parser().parse_args(argv)
    if not args.check:
        raise ConfigError("nothing to do: pass --check (see --help)")
    if args.workers < 1 or args.size % (16 * args.workers):
        raise ConfigError(
            f"--size {args.size} must be a multiple of 16 x --workers ({16 * args.workers})"
        )
    from histoseg.spatial import under_horovod

    if args.workers > 1 and not under_horovod():
        return _launch(args, argv)
    if args.workers > 1:
        import tensorflow as tf

        local = int(os.environ.get("HOROVOD_LOCAL_SIZE", "1"))
        threads = max(1, (os.cpu_count() or 1) // local)
        tf.config.threading.set_intra_op_parallelism_threads(threads)
    result = check(args)
    if result is None:
        return 0
    line = json.dumps(result)
    if args.result_file:
        with open(args.result_file, "w") as f:
            f.write(line + "\n")
    else:
        print(line)
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
