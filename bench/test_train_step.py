"""Train-step benchmarks per patch size, with memory figures in ``extra_info``.

Run (not part of the default ``pytest`` run, whose testpaths is tests/ only):
    flock /tmp/histoseg-cpu.lock .venv/bin/python -m pytest bench/test_train_step.py \\
        --benchmark-only --benchmark-json results/benchmarks_train_step.json
    ... --bench-sizes 256 512 1024 --bench-precision mixed_bfloat16 --bench-remat blocks
    pytest-benchmark compare --group-by=param:patch_size

Each round is one compiled train step (forward, loss, gradients, Adam update) on a uint8
batch, after one warm-up step. ``extra_info`` carries the allocator figures read inside the
step (activation, gradient, peak) beside the analytic prediction, and patches/s and
megapixels/s from the median round. All sizes share one process, so the absolute peak may
include buffers of earlier sizes; ``python -m bench.memory`` (a fresh process per config)
gives the authoritative figures.
"""

from __future__ import annotations

import gc

import numpy as np
import pytest

from histoseg.config import StepConfig
from histoseg.models import build_for_step


@pytest.fixture
def bench_config(request, patch_size):
    opt = request.config.getoption
    return StepConfig(
        patch_size=patch_size,
        backbone=opt("--bench-backbone"),
        precision=opt("--bench-precision"),
        remat=opt("--bench-remat"),
        steps=3,
    )


def test_train_step(benchmark, bench_config):
    import keras
    import tensorflow as tf

    from histoseg.memory.estimate import estimate_model
    from histoseg.memory.probe import MemoryProbe
    from histoseg.train.step import make_optimizer, make_train_step

    config = bench_config
    keras.backend.clear_session()
    gc.collect()
    model = build_for_step(config)
    step = make_train_step(model, make_optimizer("adam", 1e-3), memory_device="CPU:0")
    rng = np.random.default_rng(0)
    shape = (config.batch_size, config.patch_size, config.patch_size)
    images = tf.constant(rng.integers(0, 256, (*shape, 3), dtype=np.uint8))
    masks = tf.constant(rng.integers(0, 2, shape, dtype=np.uint8))
    step(images, masks)["loss"].numpy()  # warm-up: trace and build the optimizer state

    probe = MemoryProbe("CPU:0")
    probe.reset_peak()
    reads = {}

    def one_step():
        out = step(images, masks)
        out["loss"].numpy()
        reads.update({k: int(v) for k, v in out.items() if k.startswith("bytes_")})

    benchmark.group = f"train_step {config.backbone} {config.precision} remat {config.remat}"
    benchmark.pedantic(one_step, rounds=config.steps, iterations=1, warmup_rounds=0)
    snapshot = probe.snapshot()
    before = reads["bytes_before_step"]
    predicted = estimate_model(model, batch_size=config.batch_size)
    median_s = benchmark.stats.stats.median
    benchmark.extra_info.update(
        {
            "config": config.as_dict(),
            "activation_bytes": reads["bytes_after_forward"] - before,
            "gradient_bytes": reads["bytes_after_gradients"] - before,
            "before_step_bytes": before,
            "peak_bytes": snapshot.allocator_peak_bytes,
            "peak_delta_bytes": snapshot.allocator_peak_bytes - before,
            "rss_peak_bytes": snapshot.rss_peak_bytes,
            "predicted_activation_bytes": predicted.activation_bytes,
            "predicted_peak_bytes": predicted.peak_bytes,
            "patches_per_s": config.batch_size / median_s,
            "megapixels_per_s": config.megapixels_per_step / median_s,
        }
    )
    assert reads["bytes_after_forward"] > before
