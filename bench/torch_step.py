"""``python -m bench.torch_step``: the train step's memory and time under Keras's PyTorch backend.

The main harness (``python -m bench.memory``) reads TensorFlow's allocator. Many GPU
machines have PyTorch and no TensorFlow; histoseg's model is backend-neutral Keras 3, so
this runs the same DeepLabV3+ and the same step as ``histoseg.train.step`` (uint8 patches
scaled to [-1, 1], pixel-wise softmax cross-entropy in float32, Adam or SGD with momentum)
with ``KERAS_BACKEND=torch``, and reads PyTorch's CUDA caching allocator:

- ``activation_bytes``: ``torch.cuda.memory_allocated()`` after the loss minus before the
  step; ``gradient_bytes``: after ``backward()`` minus before the step;
- ``peak_bytes``: ``torch.cuda.max_memory_allocated()`` over the timed steps (weights and
  optimizer state included); ``reserved_peak_bytes``: the most the caching allocator held;
- ``gpu_used_bytes``: NVML's "used" for the whole card after the steps;
- ``step_s`` (median, the GPU synchronised), ``patches_per_s``, ``megapixels_per_s``.

Each row carries the analytic estimate for the GPU (``histoseg.memory.estimate``) beside
the measurement. That model's rules say which tensors *TensorFlow's* kernels keep for the
backward pass; PyTorch's autograd keeps its own set, so here the comparison shows how far
the TensorFlow-calibrated model carries to another framework, not an acceptance test.

Configs run one after another in this process (PyTorch's out-of-memory error is
recoverable: the config becomes an "oom" row and the sweep goes on). Rows are written
atomically after every config; configs already in ``--out`` are skipped unless ``--force``.
On a machine without CUDA the command says so and exits 2 (``--device cpu`` runs the same
step on the CPU for a smoke test: times only, PyTorch keeps no CPU allocator statistics).
"""

from __future__ import annotations

import argparse
import gc
import os
import re
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.config import expand_sweep
from bench.memory_args import parse_backbone_options
from bench.memory_table import summary_table
from histoseg.cli import ArgumentParser, command_line, run_main
from histoseg.config import BACKBONES, PRECISIONS, REMAT_MODES, StepConfig
from histoseg.errors import ConfigError, EngineUnavailableError
from histoseg.memory.devices import format_bytes
from histoseg.results import config_key, load_rows_if_exists, make_row, merge_rows, write_rows

#: Terminal colour codes Keras puts into the messages of errors it re-raises.
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
DEFAULT_OUT = Path("results/memory_torch_gpu.json")

EPILOG = """\
Examples:
  python -m bench.torch_step --sizes 512 1024 2048 --precision float32 mixed_bfloat16 \\
      --remat none blocks
  python -m bench.torch_step --sizes 128 --backbone mobilenetv2 --backbone-option alpha=0.35 \\
      --out /tmp/t.json
  python -m bench.torch_step --sizes 128 --backbone mobilenetv2 --device cpu --out /tmp/t.json
"""


def build_parser() -> argparse.ArgumentParser:
    parser = ArgumentParser(
        prog="python -m bench.torch_step",
        description=(
            "Measure DeepLabV3+ train-step memory (PyTorch's CUDA allocator) and time under "
            "Keras's torch backend, beside the analytic prediction; the sweep is the product "
            "of the list-valued options."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--sizes", type=int, nargs="+", default=[512, 1024, 2048], help="patch sizes, px")
    add("--batch-sizes", type=int, nargs="+", default=[1], help="patches per step")
    add("--backbone", nargs="+", default=["xception65"], choices=BACKBONES)
    add("--backbone-option", action="append", default=[], metavar="NAME=VALUE")
    add("--precision", nargs="+", default=["float32"], choices=PRECISIONS)
    add("--remat", nargs="+", default=["none"], choices=REMAT_MODES)
    add("--optimizer", default="adam", choices=("adam", "sgd"))
    add("--device", default="gpu", choices=("gpu", "cpu"), help="cpu: a smoke test, times only")
    add("--steps", type=int, default=3, help="timed steps after the warm-up step (default 3)")
    add("--out", type=Path, default=DEFAULT_OUT, help=f"results JSON (default {DEFAULT_OUT})")
    add("--force", action="store_true", help="re-measure configs already in --out")
    add("--show", action="store_true", help="print the summary table of --out; run nothing")
    return parser


def use_torch_backend():
    """Select Keras's torch backend (before Keras is imported) and return ``torch``.

    Raises:
        EngineUnavailableError: PyTorch is not installed, or Keras was already imported
            with another backend in this process.
    """
    if "keras" in sys.modules and sys.modules["keras"].backend.backend() != "torch":
        raise EngineUnavailableError(
            "Keras is already loaded with the "
            f"{sys.modules['keras'].backend.backend()} backend; run bench.torch_step in its "
            "own process"
        )
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        import torch
    except ImportError:
        raise EngineUnavailableError(
            "PyTorch is not installed; bench.torch_step runs where PyTorch is (the TensorFlow "
            "harness is python -m bench.memory)"
        ) from None
    return torch


def _tensor_bytes(variables) -> int:
    return int(sum(v.value.numel() * v.value.element_size() for v in variables))


def _training_setup(config: StepConfig, num_classes: int, torch: Any, device: Any):
    """The model, its optimizer (built), and one fixed synthetic batch on ``device``."""
    import keras

    from bench.worker import build_model

    keras.utils.set_random_seed(0)
    model = build_model(config, num_classes)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
    optimizer.build(model.trainable_variables)
    shape = (config.batch_size, config.patch_size, config.patch_size)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, num_classes, shape, dtype=torch.uint8, generator=generator)
    return model, optimizer, images.to(device), masks.to(device)


def measure(config: StepConfig, num_classes: int = 2) -> dict[str, Any]:
    """Train ``config`` for 1 + ``steps`` steps under the torch backend; the measured section.

    Also returns the model (for the estimate) under the key ``"_model"``.
    """
    torch = use_torch_backend()
    cuda = config.device == "gpu"
    model, optimizer, images, masks = _training_setup(
        config, num_classes, torch, torch.device("cuda" if cuda else "cpu")
    )
    trainable = model.trainable_variables

    def allocated() -> int | None:
        return int(torch.cuda.memory_allocated()) if cuda else None

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    def step() -> dict[str, int | None]:
        reads = {"bytes_before_step": allocated()}
        inputs = images.float() / 127.5 - 1.0
        logits = model(inputs, training=True)
        # Classes last in Keras; PyTorch's cross-entropy wants them second.
        loss = torch.nn.functional.cross_entropy(logits.float().permute(0, 3, 1, 2), masks.long())
        reads["bytes_after_forward"] = allocated()
        loss.backward()
        reads["bytes_after_gradients"] = allocated()
        optimizer.apply([v.value.grad for v in trainable], trainable)
        for v in trainable:
            v.value.grad = None
        del loss, logits, inputs
        return reads

    step()  # warm-up: optimizer state, cuDNN algorithm choice, the caching allocator's pools
    sync()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    times, reads = [], []
    for _ in range(config.steps):
        start = time.perf_counter()
        reads.append(step())
        sync()
        times.append(time.perf_counter() - start)
    return _measured_section(config, torch, model, optimizer, reads[0], times)


def _measured_section(
    config: StepConfig,
    torch: Any,
    model: Any,
    optimizer: Any,
    first: dict[str, int | None],
    times: list[float],
) -> dict[str, Any]:
    """The row's ``measured`` section from the first measured step's reads and the times."""
    from histoseg.memory.devices import nvml_memory

    cuda = config.device == "gpu"
    step_s = statistics.median(times)
    pixels = config.batch_size * config.patch_size**2

    def delta(key: str) -> int | None:
        return None if first[key] is None else first[key] - first["bytes_before_step"]

    activation = delta("bytes_after_forward")
    peak = int(torch.cuda.max_memory_allocated()) if cuda else None
    nvml = nvml_memory(0) if cuda else None
    return {
        "weights_bytes": _tensor_bytes(model.weights),
        "optimizer_bytes": _tensor_bytes(optimizer.variables),
        "activation_bytes": activation,
        "gradient_bytes": delta("bytes_after_gradients"),
        "peak_bytes": peak,
        "reserved_peak_bytes": int(torch.cuda.max_memory_reserved()) if cuda else None,
        "before_step_bytes": first["bytes_before_step"],
        "gpu_used_bytes": None if nvml is None else nvml["used"],
        "step_s": step_s,
        "step_times_s": times,
        "patches_per_s": config.batch_size / step_s,
        "megapixels_per_s": pixels / 1e6 / step_s,
        "activation_bytes_per_patch": None
        if activation is None
        else activation / config.batch_size,
        "peak_bytes_per_patch": None if peak is None else peak / config.batch_size,
        "_model": model,
    }


def run_config(config: StepConfig, command: str | None = None) -> dict[str, Any]:
    """Measure ``config`` here and return its results row ("oom" rows instead of raising).

    ``command`` (the sweep's command line) is kept in the row's ``extra.command``.
    """
    torch = use_torch_backend()
    from histoseg.memory.estimate import estimate_model

    extra = {
        "backend": "torch",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "gpu_name": torch.cuda.get_device_name(0) if config.device == "gpu" else None,
        "steps": config.steps,
        "mask_dtype": "uint8",
        "image_dtype": "uint8",
    }
    if command:
        extra["command"] = command
    try:
        measured = measure(config)
    except torch.cuda.OutOfMemoryError as exc:
        # Keras wraps the error and puts "Exception encountered when calling ..." first.
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        found = [line for line in lines if "out of memory" in line.lower()]
        reason = _ANSI.sub("", (found or lines or ["CUDA out of memory"])[0])[:200]
        return make_row("memory", config.as_dict(), status="oom", reason=reason, extra=extra)
    finally:
        gc.collect()
        if config.device == "gpu":
            torch.cuda.empty_cache()
    model = measured.pop("_model")
    predicted = estimate_model(
        model, batch_size=config.batch_size, optimizer=config.optimizer, device=config.device
    ).as_dict()
    del model
    import keras

    keras.backend.clear_session()
    return make_row("memory", config.as_dict(), measured=measured, predicted=predicted, extra=extra)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.show:
        rows = load_rows_if_exists(args.out)
        if not rows:
            raise ConfigError(f"{args.out} holds no rows yet; run a sweep first")
        print(summary_table(rows))
        return 0
    if args.steps < 1:
        raise ConfigError(f"--steps must be >= 1, got {args.steps}")
    torch = use_torch_backend()
    if args.device == "gpu" and not torch.cuda.is_available():
        raise EngineUnavailableError(
            "PyTorch sees no CUDA GPU here; use --device cpu for a smoke test"
        )
    base = StepConfig(
        device=args.device,
        threads=1,
        steps=args.steps,
        optimizer=args.optimizer,
        backbone_options=parse_backbone_options(args.backbone_option),
    )
    configs = expand_sweep(
        base,
        backbone=args.backbone,
        precision=args.precision,
        remat=args.remat,
        batch_size=args.batch_sizes,
        patch_size=args.sizes,
    )
    rows = load_rows_if_exists(args.out)
    done = {
        config_key(r["config"])
        for r in rows
        if r.get("status") in ("ok", "oom") and (r.get("extra") or {}).get("backend") == "torch"
    }
    new = []
    for i, config in enumerate(configs, 1):
        key = config_key(config.as_dict())
        label = (
            f"[{i}/{len(configs)}] {config.backbone} {config.patch_size} px x{config.batch_size} "
            f"{config.precision} remat={config.remat}"
        )
        if key in done and not args.force:
            print(f"{label}: already in {args.out}, skipped", file=sys.stderr)
            continue
        row = run_config(config, command=command_line("bench.torch_step", argv))
        new.append(row)
        rows = merge_rows(rows, [row])
        write_rows(args.out, rows)
        peak = (row.get("measured") or {}).get("peak_bytes")
        print(f"{label}: {row['status']} peak {format_bytes(peak)}", file=sys.stderr, flush=True)
    print(summary_table(new or rows))
    print(f"rows written to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(run_main(main))
