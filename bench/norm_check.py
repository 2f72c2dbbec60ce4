"""``python -m bench.norm_check``: did a run learn, and does its normalisation let it show?

Trains one model on synthetic slides as ``histoseg.train`` does (same sampler, schedule and
step), then scores the same weights several ways and prints one table:

- ``train batches, training mode``: the last 50 training batches, predicted right after
  their step with training-mode normalisation. High here means the model learned.
- ``validation, inference mode``: held-out patches as ``histoseg.train`` validates them,
  with batch norm's moving statistics.
- ``validation, after recalibration``: the same after re-estimating those statistics over
  20 training batches (``--bn-recalibration-batches``).
- ``validation, per-patch statistics``: held-out patches one at a time in training mode,
  i.e. batch norm with each patch's own moments, as the model was trained at batch 1.

A model that learned but scores near zero in inference mode, and well with per-patch
statistics, fails because of its normalisation, not its data, sampler or learning rate.

Example:
    python -m bench.norm_check --batch-size 1 --patch-size 256 --steps 400 --norm batch
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Sequence
from typing import Any

from histoseg.cli import ArgumentParser, run_main
from histoseg.config import MAX_ALPHA, parse_alpha
from histoseg.errors import ConfigError
from histoseg.train.cli import NORMS, SYNTHETIC_TASKS, default_synthetic_dir

LAST_TRAIN_BATCHES = 50
RECALIBRATION_BATCHES = 20


def _scores(confusion: Any) -> dict[str, float]:
    from histoseg.train.metrics import accuracy_from_confusion, iou_per_class

    return {
        "accuracy": accuracy_from_confusion(confusion),
        "iou_tumour": float(iou_per_class(confusion)[1]),
        "predicted_tumour": float(confusion[:, 1].sum() / max(1, confusion.sum())),
    }


def _confusion(model: Any, batches: Iterable, training: bool) -> Any:
    import numpy as np
    import tensorflow as tf

    from histoseg.models.layers import prepare_images
    from histoseg.train.metrics import confusion_matrix

    predict = tf.function(lambda x: tf.argmax(model(prepare_images(x), training=training), -1))
    confusion = np.zeros((2, 2), dtype=np.int64)
    for images, masks in batches:
        confusion += confusion_matrix(masks.numpy(), predict(images).numpy())
    return confusion


def check(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Train as described by ``args`` and score the weights the four ways (module docstring)."""
    import keras
    import numpy as np
    import tensorflow as tf

    from histoseg.data import iterate_batches, make_dataset
    from histoseg.models import build_deeplabv3plus
    from histoseg.models.layers import prepare_images
    from histoseg.train.distributed import DistributedStep
    from histoseg.train.engines import get_engine
    from histoseg.train.metrics import confusion_matrix
    from histoseg.train.options import TrainOptions
    from histoseg.train.schedule import WarmupSchedule
    from histoseg.train.slides import train_and_val_slides, training_patches, validation_patches
    from histoseg.train.step import make_optimizer
    from histoseg.train.validation import recalibrate_batch_norm
    from histoseg.wsi.synth import parse_size

    options = TrainOptions(
        synthetic_task=args.synthetic_task,
        synthetic_dir=args.synthetic_dir or default_synthetic_dir(args.synthetic_task),
        synthetic_size_px=parse_size(args.synthetic_size),
        patch_size=args.patch_size,
        batch_size=args.batch_size,
        steps=args.steps,
        max_val_patches=args.max_val_patches,
        progress=False,
    )
    engine = get_engine("none").init()
    train_slides, val_slides = train_and_val_slides(options, engine)
    train_refs = training_patches(options, train_slides, args.steps * args.batch_size, args.seed)
    val_refs = validation_patches(options, val_slides)
    keras.utils.set_random_seed(args.seed)
    backbone_kwargs = {"alpha": args.alpha} if args.alpha is not None else {}
    model = build_deeplabv3plus(
        args.backbone, (args.patch_size,) * 2 + (3,), norm=args.norm, **backbone_kwargs
    )
    optimizer = make_optimizer("adam", args.learning_rate)
    warmup = min(100, args.steps // 10)
    optimizer.learning_rate = WarmupSchedule(args.learning_rate, args.steps, warmup, "poly")
    step = DistributedStep(model, optimizer, engine)
    train = make_dataset(train_refs, args.batch_size, shuffle=True, seed=args.seed, augment=True)
    batches = iterate_batches(train)
    predict = tf.function(lambda x: tf.argmax(model(prepare_images(x), training=True), -1))
    last = np.zeros((2, 2), dtype=np.int64)
    for i in range(args.steps):
        images, masks = next(batches)
        step(images, masks)
        if i >= args.steps - LAST_TRAIN_BATCHES:
            last += confusion_matrix(masks.numpy(), predict(images).numpy())

    def validation(batch_size: int) -> Any:
        return make_dataset(val_refs, batch_size, shuffle=False, repeat=False, drop_remainder=False)

    rows = {
        "train batches, training mode": _scores(last),
        "validation, inference mode": _scores(
            _confusion(model, validation(args.batch_size), False)
        ),
    }
    weights = model.get_weights()
    if recalibrate_batch_norm(model, iter(train), engine, RECALIBRATION_BATCHES):
        confusion = _confusion(model, validation(args.batch_size), False)
        rows["validation, after recalibration"] = _scores(confusion)
    model.set_weights(weights)  # training-mode calls below update batch norm's averages
    rows["validation, per-patch statistics"] = _scores(_confusion(model, validation(1), True))
    return rows


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.norm_check",
        description=__doc__.splitlines()[0],
        epilog="Examples:\n"
        "  python -m bench.norm_check --batch-size 1 --steps 400 --norm batch\n"
        "  python -m bench.norm_check --batch-size 1 --steps 400 --norm group\n",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--norm", choices=NORMS, default="batch", help="(default batch)")
    parser.add_argument("--batch-size", type=int, default=1, help="(default 1)")
    parser.add_argument("--patch-size", type=int, default=256, help="px (default 256)")
    parser.add_argument("--steps", type=int, default=400, help="(default 400)")
    parser.add_argument("--backbone", default="mobilenetv2", help="(default mobilenetv2)")
    parser.add_argument(
        "--alpha", type=parse_alpha, help=f"mobilenetv2 width multiplier, in (0, {MAX_ALPHA:g}]"
    )
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--synthetic-task", choices=SYNTHETIC_TASKS, default="local")
    parser.add_argument("--synthetic-dir", help="(default: the task's folder under data/)")
    parser.add_argument("--synthetic-size", default="8000x6000", help="WIDTHxHEIGHT px")
    parser.add_argument("--max-val-patches", type=int, default=64, help="(default 64)")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for name in ("batch_size", "steps", "max_val_patches"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.patch_size < 16 or args.patch_size % 16:
        raise ConfigError(f"--patch-size {args.patch_size} must be a multiple of 16")
    rows = check(args)
    print(f"{'scored on':<34} {'accuracy':>8} {'tumour IoU':>10} {'predicted tumour':>16}")
    for name, row in rows.items():
        print(
            f"{name:<34} {row['accuracy']:>8.4f} {row['iou_tumour']:>10.4f} "
            f"{row['predicted_tumour']:>16.4f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
