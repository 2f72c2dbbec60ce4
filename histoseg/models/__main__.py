"""Summarise a DeepLabV3+ configuration: parameters, multiply-adds, output shape.

Input sizes that are not a multiple of the output stride (the DeepLab model zoo's 513 px)
are accepted here: feature maps then take 'same'-padding ceil sizes, as in TF DeepLab.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence

from histoseg.cli import ArgumentParser, int_in_range, run_main

# The smallest input whose stride-32 features are still a pixel; the largest keeps the
# summary (a symbolic build) from asking for absurd shapes.
MIN_INPUT_PX = 32
MAX_INPUT_PX = 65536

EPILOG = """Examples:
  python -m histoseg.models --backbone xception65 --input-size 513 --num-classes 21 --output-stride 16
  python -m histoseg.models --backbone mobilenetv2 --alpha 0.35 --input-size 256 --json
"""


def main(argv: Sequence[str] | None = None) -> int:
    from histoseg.models.cli_options import add_model_arguments

    parser = ArgumentParser(
        prog="python -m histoseg.models",
        description=__doc__.splitlines()[0],
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_arguments(parser)
    parser.add_argument(
        "--input-size",
        type=int_in_range(MIN_INPUT_PX, MAX_INPUT_PX),
        default=513,
        help=f"square input side in px ({MIN_INPUT_PX} to {MAX_INPUT_PX})",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)

    from histoseg.models import build_deeplabv3plus, model_macs

    kwargs = {} if args.alpha is None else {"alpha": args.alpha}
    size = args.input_size
    model = build_deeplabv3plus(
        args.backbone,
        (size, size, 3),
        args.num_classes,
        args.output_stride,
        args.precision,
        args.remat,
        allow_any_size=True,
        head_filters=args.head_filters,
        **kwargs,
    )
    trainable = sum(math.prod(v.shape) for v in model.trainable_weights)
    total = sum(math.prod(v.shape) for v in model.weights)
    summary = {
        "backbone": args.backbone,
        **kwargs,
        "input_size_px": size,
        "num_classes": args.num_classes,
        "output_stride": args.output_stride,
        "precision": args.precision,
        "remat": args.remat,
        "head_filters": args.head_filters,
        "params": trainable,
        "params_total": total,
        "macs": model_macs(model),
        "output_shape": list(model.output_shape),
        "ceil_feature_sizes": size % args.output_stride != 0,
    }
    if args.json:
        print(json.dumps(summary))
        return 0
    print(
        f"DeepLabV3+ {args.backbone} {size}x{size} px, OS{args.output_stride}, "
        f"{args.num_classes} classes, {args.precision}, remat={args.remat}"
    )
    print(f"  parameters     {trainable:,} trainable ({total:,} with batch-norm statistics)")
    print(f"  multiply-adds  {summary['macs'] / 1e9:.2f} G per forward pass")
    print(f"  output shape   {tuple(model.output_shape)}")
    if summary["ceil_feature_sizes"]:
        print(
            f"  note: {size} px is not a multiple of {args.output_stride}; feature maps use ceil sizes"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
