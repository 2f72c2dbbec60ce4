"""Benchmark sweeps as :class:`~histoseg.config.StepConfig` points: the grid a command line
asks for, random draws from the whole config space, and a point's throughput figures."""

from __future__ import annotations

import itertools
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from histoseg.config import BACKBONES, OPTIMIZERS, PRECISIONS, REMAT_MODES, StepConfig
from histoseg.errors import ConfigError


def expand_sweep(base: StepConfig, **axes: Sequence[Any] | None) -> list[StepConfig]:
    """Every combination of the given axes applied to ``base`` (the sweep as configs).

    ``expand_sweep(StepConfig(), patch_size=[256, 512], batch_size=[1, 2])`` gives four
    configs, patch size varying slowest. Axes given as ``None`` or empty keep ``base``'s value.
    """
    names = [n for n, values in axes.items() if values]
    value_lists: list[Iterable[Any]] = [list(dict.fromkeys(axes[n])) for n in names]
    return [
        base.replace(**dict(zip(names, combo, strict=True)))
        for combo in itertools.product(*value_lists)
    ]


#: Width multipliers a sampled MobileNetV2 takes (1.0 is the default network).
SAMPLED_MOBILENET_ALPHAS = (1.0, 0.5, 0.35)


def sample_configs(
    count: int,
    seed: int,
    *,
    sizes_px: Sequence[int] = tuple(range(128, 513, 32)),
    max_batch_size: int = 4,
    max_megapixels: float = 0.27,
    steps: int = 1,
    norms: Sequence[str] = ("batch",),
) -> list[StepConfig]:
    """``count`` configs drawn from the whole config space, the same for the same seed.

    Each categorical axis (backbone, MobileNetV2 width, output stride, optimizer,
    precision, remat mode) is drawn as a shuffled repetition of its values, so every value
    appears about equally often and every pair of axes is mixed at random; patch size and
    batch size are drawn freely, batch size capped so a step sees at most
    ``max_megapixels`` (small steps measure in seconds). The memory model is judged on
    such draws, so that it cannot be fitted to a fixed list.

    ``norms``: the normalisations drawn (the model option "norm"), stratified as the
    other axes but from a stream of their own, so that a seed draws the same configs
    otherwise whatever ``norms`` holds (and with batch norm alone, as before norms were
    drawn).
    """
    import random

    if count < 1:
        raise ConfigError(f"sample count must be a positive integer, got {count!r}")
    rng = random.Random(seed)

    def stratified(values: Sequence[Any]) -> list[Any]:
        drawn = [values[i % len(values)] for i in range(count)]
        rng.shuffle(drawn)
        return drawn

    axes = {
        "backbone": stratified(BACKBONES),
        "alpha": stratified(SAMPLED_MOBILENET_ALPHAS),
        "output_stride": stratified((8, 16)),
        "optimizer": stratified(OPTIMIZERS),
        "precision": stratified(PRECISIONS),
        "remat": stratified(REMAT_MODES),
    }
    drawn_norms = [norms[i % len(norms)] for i in range(count)]
    random.Random(f"norm-{seed}").shuffle(drawn_norms)
    configs = []
    for i in range(count):
        pick = {name: values[i] for name, values in axes.items()}
        alpha = pick.pop("alpha")
        options = (("alpha", alpha),) if pick["backbone"] == "mobilenetv2" and alpha != 1.0 else ()
        if drawn_norms[i] != "batch":
            options = (*options, ("norm", drawn_norms[i]))
        size = rng.choice(list(sizes_px))
        most = max(1, min(max_batch_size, int(max_megapixels * 1e6 // size**2)))
        configs.append(
            StepConfig(
                patch_size=size,
                batch_size=rng.randint(1, most),
                backbone_options=options,
                steps=steps,
                **pick,
            )
        )
    return configs


def task_of(row: Mapping[str, Any]) -> str:
    """The task a row measured: its synthetic task, else its data (real slides)."""
    config = row.get("config", {})
    if config.get("synthetic_task"):
        return str(config["synthetic_task"])
    data = str(config.get("data") or "synthetic")
    return "local" if data.startswith("synthetic") else data


def step_rates(config: StepConfig, times: list[float], activation: int, peak: int) -> dict:
    """Step time (median), throughput and bytes per patch and per megapixel: the figures
    every measured section shares (train steps and forward passes, on either backend)."""
    step_s = statistics.median(times)
    patches, megapixels = config.batch_size, config.megapixels_per_step
    return {
        "step_s": step_s,
        "step_times_s": times,
        "patches_per_s": patches / step_s,
        "megapixels_per_s": megapixels / step_s,
        "activation_bytes_per_patch": activation / patches,
        "peak_bytes_per_patch": peak / patches,
        "activation_bytes_per_megapixel": activation / megapixels,
        "peak_bytes_per_megapixel": peak / megapixels,
    }
