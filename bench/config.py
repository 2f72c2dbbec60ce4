"""One point of a benchmark sweep: the frozen record every harness run is keyed by."""

from __future__ import annotations

import dataclasses
import itertools
import json
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from histoseg.errors import ConfigError

# Mirrors of histoseg.models' registries, kept here so that expanding a sweep does not import
# TensorFlow; tests/memory/test_memory_units.py checks that they agree.
BACKBONES = ("xception65", "mobilenetv2", "resnet50")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
REMAT_MODES = ("none", "blocks", "full")
DEVICES = ("cpu", "gpu")
ENGINES = ("none", "horovod", "tf")
OPTIMIZERS = ("adam", "sgd")


def default_threads() -> int:
    """All cores this process may run on (the default thread count of a config)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    """One sweep point: what is trained, at which size, on what, with how many threads.

    Args:
        patch_size: Side of the square input patch in pixels.
        batch_size: Patches per step.
        backbone: Backbone name known to ``histoseg.models`` ("xception65", "mobilenetv2", ...).
        output_stride: Encoder output stride (8 or 16).
        precision: "float32", "mixed_bfloat16" or "mixed_float16".
        remat: Recomputation mode: "none", "blocks" (backbone blocks) or "full" (also the
            ASPP branches and decoder).
        device: "cpu" or "gpu".
        threads: TensorFlow intra-op threads (and OpenMP threads).
        engine: Distributed engine ("none" for one process).
        workers: Number of training processes.
        steps: Timed steps after the warm-up step (not part of the config's identity).
        optimizer: "adam" (two slots per weight) or "sgd" (momentum: one slot).
        backbone_options: Extra backbone keyword arguments as sorted ``(name, value)`` pairs,
            e.g. ``(("alpha", 0.35),)`` for a narrow MobileNetV2.
    """

    patch_size: int = 512
    batch_size: int = 1
    backbone: str = "xception65"
    output_stride: int = 16
    precision: str = "float32"
    remat: str = "none"
    device: str = "cpu"
    threads: int = dataclasses.field(default_factory=default_threads)
    engine: str = "none"
    workers: int = 1
    steps: int = 3
    optimizer: str = "adam"
    backbone_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("patch_size", "batch_size", "output_stride", "threads", "workers", "steps"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.patch_size % self.output_stride:
            raise ConfigError(
                f"patch_size {self.patch_size} px is not a multiple of the output stride "
                f"{self.output_stride}"
            )
        choices = {
            "backbone": BACKBONES,
            "precision": PRECISIONS,
            "remat": REMAT_MODES,
            "device": DEVICES,
            "engine": ENGINES,
            "optimizer": OPTIMIZERS,
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        object.__setattr__(
            self, "backbone_options", tuple(sorted(tuple(p) for p in self.backbone_options))
        )

    @property
    def megapixels_per_step(self) -> float:
        """Input pixels per step, in millions."""
        return self.batch_size * self.patch_size**2 / 1e6

    @property
    def tf_device(self) -> str:
        """The TensorFlow device name whose allocator the probe reads ("CPU:0" / "GPU:0")."""
        return "GPU:0" if self.device == "gpu" else "CPU:0"

    def as_dict(self) -> dict[str, Any]:
        """The config section of a results row (docs/architecture.md's keys; ``steps`` left out).

        ``optimizer`` always and ``backbone_options`` when set are added, since both change
        the memory a step needs.
        """
        d = {
            "patch_size": self.patch_size,
            "batch_size": self.batch_size,
            "backbone": self.backbone,
            "output_stride": self.output_stride,
            "precision": self.precision,
            "remat": self.remat,
            "device": self.device,
            "threads": self.threads,
            "engine": self.engine,
            "workers": self.workers,
            "optimizer": self.optimizer,
        }
        if self.backbone_options:
            d["backbone_options"] = dict(self.backbone_options)
        return d

    def to_json(self) -> str:
        """The config as JSON, including ``steps`` (what ``bench.worker --config`` reads)."""
        d = self.as_dict()
        d["steps"] = self.steps
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BenchConfig:
        """Rebuild a config from :meth:`as_dict` / :meth:`to_json` output.

        Raises:
            ConfigError: an unknown key or a bad value.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(
                f"unknown config key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        data = dict(data)
        options = data.get("backbone_options")
        if isinstance(options, Mapping):
            data["backbone_options"] = tuple(options.items())
        elif options is not None:
            data["backbone_options"] = tuple(tuple(p) for p in options)
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> BenchConfig:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not JSON ({exc.msg}): {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {text[:80]!r}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> BenchConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def expand_sweep(base: BenchConfig, **axes: Sequence[Any] | None) -> list[BenchConfig]:
    """Every combination of the given axes applied to ``base`` (the sweep as configs).

    ``expand_sweep(BenchConfig(), patch_size=[256, 512], batch_size=[1, 2])`` gives four
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
) -> list[BenchConfig]:
    """``count`` configs drawn from the whole config space, the same for the same seed.

    Each categorical axis (backbone, MobileNetV2 width, output stride, optimizer,
    precision, remat mode) is drawn as a shuffled repetition of its values, so every value
    appears about equally often and every pair of axes is mixed at random; patch size and
    batch size are drawn freely, batch size capped so a step sees at most
    ``max_megapixels`` (small steps measure in seconds). The memory model is judged on
    such draws, so that it cannot be fitted to a fixed list.
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
    configs = []
    for i in range(count):
        pick = {name: values[i] for name, values in axes.items()}
        alpha = pick.pop("alpha")
        options = (("alpha", alpha),) if pick["backbone"] == "mobilenetv2" and alpha != 1.0 else ()
        size = rng.choice(list(sizes_px))
        most = max(1, min(max_batch_size, int(max_megapixels * 1e6 // size**2)))
        configs.append(
            BenchConfig(
                patch_size=size,
                batch_size=rng.randint(1, most),
                backbone_options=options,
                steps=steps,
                **pick,
            )
        )
    return configs
