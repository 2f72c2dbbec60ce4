"""The memory model judged on a configuration drawn at random on every run.

Each run draws one train step from the whole config space (every backbone, MobileNetV2
width, normalisation, output stride, optimizer, remat mode, batch 1-4) at a small patch
size, measures it
in a fresh worker, and holds the prediction to the promise the fit check and
``--device-memory`` make: the measured step peak fits the planned bytes (the prediction
plus its band, :func:`histoseg.memory.devices.planned_bytes`). The tighter goal, every
figure within 5%, does not hold on such draws yet (docs/memory-harness.md, "The planning
band"), so it is not asserted here.

The draw changes every run so that the rules cannot be fitted to a fixed list; the seed is
in every failure message, and ``HISTOSEG_MEMORY_SEED=<seed> pytest`` replays it.
mixed_float16 is left out here: this CPU has no float16 kernels, and an emulated float16
step of even 128 px takes minutes (``python -m bench.memory --sample`` draws it).
"""

from __future__ import annotations

import os
import random

from bench.config import sample_configs
from bench.memory import predict, run_worker
from histoseg.config import NORMS
from histoseg.memory.devices import planned_bytes

SEED = int(os.environ.get("HISTOSEG_MEMORY_SEED") or random.SystemRandom().randrange(10**6))
SIZES_PX = tuple(range(64, 161, 32))


def _draw(seed: int):
    """The first float32 or bfloat16 config of the draw for ``seed`` (small, batch 1-4)."""
    for config in sample_configs(16, seed, sizes_px=SIZES_PX, max_megapixels=0.06, norms=NORMS):
        if config.precision != "mixed_float16":
            return config
    raise AssertionError(f"seed {seed}: no float32 or bfloat16 config in 16 draws")


def test_a_random_config_fits_its_planned_bytes():
    config = _draw(SEED)
    where = f"seed {SEED} (HISTOSEG_MEMORY_SEED={SEED} replays it): {config.to_json()}"
    row = run_worker(config, timeout_s=600)
    assert row["status"] == "ok", f"{where}: {row.get('reason')}"
    measured, predicted = row["measured"], predict(config)
    peak = measured["peak_bytes"]
    assert peak <= planned_bytes(predicted["peak_bytes"]), (
        f"{where}: step peak {peak} B above planned {planned_bytes(predicted['peak_bytes'])} B"
    )
