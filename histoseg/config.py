"""The one config type: what a train step is and where it runs, validated once.

:class:`StepConfig` goes from each command line to the config section of every results row
(memory, accuracy, scaling and training rows), so the same fact has the same key in all of
them. It imports no TensorFlow, so a sweep can be planned and checked before any work.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from typing import Any

from histoseg.cli import finite_float
from histoseg.errors import ConfigError

# Mirrors of histoseg.models' registries, kept here so that expanding a sweep does not import
# TensorFlow; tests/memory/test_memory_units.py checks that they agree.
BACKBONES = ("xception65", "mobilenetv2", "resnet50")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
REMAT_MODES = ("none", "blocks", "full")
#: The normalisation of every conv block: a model option (``backbone_options`` "norm"),
#: "batch" when absent.
NORMS = ("batch", "frozen", "group")
DEVICES = ("cpu", "gpu")
ENGINES = ("none", "horovod", "tf")
OPTIMIZERS = ("adam", "sgd")
#: "train": a train step (forward, loss, gradients, update); "infer": a forward pass only
#: (``training=False``), as ``histoseg.infer`` runs the model over a slide.
MODES = ("train", "infer")
#: The Keras backend a step runs on: "tensorflow" (compiled step, TensorFlow's allocators)
#: or "torch" (eager PyTorch, its CPU allocator or CUDA caching allocator).
BACKENDS = ("tensorflow", "torch")
#: The widest MobileNetV2 width multiplier accepted: Keras ships 0.35 to 1.4, and past a few
#: the network is no longer "mobile".
MAX_ALPHA = 4.0
#: Channels of DeepLabV3+'s ASPP and decoder in the paper (``--head-filters``' default).
#: Behind a narrow backbone (MobileNetV2 width 0.35) this head does 88% of the
#: multiply-adds, the decoder's stride-4 separable convs most of them; 64 channels train a
#: patch about twice as fast (docs/context-task.md).
HEAD_FILTERS = 256
#: The ``--alpha`` option's type: one line naming the option and the range on a bad value.
parse_alpha = finite_float(0, MAX_ALPHA, lo_open=True)


def default_threads() -> int:
    """All cores this process may run on (the default thread count of a config)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def thread_env(threads: int | None) -> dict[str, str]:
    """Environment that gives a process ``threads`` compute threads (empty for None).

    TensorFlow reads ``TF_NUM_INTRAOP_THREADS`` and oneDNN reads ``OMP_NUM_THREADS`` at
    start-up, so this must be in the environment before TensorFlow is imported. Inter-op
    parallelism stays at 1: the executor runs one op at a time, so workers never
    oversubscribe the cores and a step's allocations come in the same order every run.
    """
    if threads is None:
        return {}
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ConfigError(f"threads must be an integer >= 1, got {threads!r}")
    return {
        "OMP_NUM_THREADS": str(threads),
        "TF_NUM_INTRAOP_THREADS": str(threads),
        "TF_NUM_INTEROP_THREADS": "1",
        "HISTOSEG_THREADS": str(threads),
    }


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """One train step: what is trained, at which size, on what, with how many threads.

    Every harness (memory, accuracy, scaling) and ``histoseg.train`` writes the config
    section of its rows from :meth:`as_dict`, so the same fact has the same key in every
    row kind; each adds only the keys of its own kind (docs/architecture.md).

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
        steps: Steps to run (the memory harness: timed steps after the warm-up step); not
            part of the config's identity, so :meth:`as_dict` leaves it out.
        optimizer: "adam" (two slots per weight) or "sgd" (momentum: one slot); a train
            step without one gets "adam". An inference pass builds no optimizer: None.
        backbone_options: Extra backbone keyword arguments as sorted ``(name, value)`` pairs,
            e.g. ``(("alpha", 0.35),)`` for a narrow MobileNetV2.
        mode: "train" (a train step) or "infer" (a forward pass with ``training=False``:
            no optimizer, and no recomputation, which only changes a backward pass).
        backend: Keras's backend, "tensorflow" or "torch" (train steps only so far).
        spatial_workers: Ranks one patch is cut across (``histoseg.spatial``: horizontal
            slabs, halo exchange); 1 = the whole patch in one process. Above 1 the patch
            must be a multiple of ``spatial_workers x output_stride`` px, and the step is
            a TensorFlow train step in float32 or mixed_bfloat16, any remat mode (what the
            spatial executor runs: it has no loss scaling for mixed_float16). With engine
            "horovod", ``workers`` blocks of ``spatial_workers`` ranks train side by side.
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
    optimizer: str | None = None
    backbone_options: tuple[tuple[str, Any], ...] = ()
    mode: str = "train"
    backend: str = "tensorflow"
    spatial_workers: int = 1

    def __post_init__(self) -> None:
        for name in (
            "patch_size",
            "batch_size",
            "output_stride",
            "threads",
            "workers",
            "steps",
            "spatial_workers",
        ):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.patch_size % self.output_stride:
            raise ConfigError(
                f"patch_size {self.patch_size} px is not a multiple of the output stride "
                f"{self.output_stride}"
            )
        self._check_mode()
        self._check_spatial()
        choices = {
            "backbone": BACKBONES,
            "precision": PRECISIONS,
            "remat": REMAT_MODES,
            "device": DEVICES,
            "engine": ENGINES,
            "optimizer": OPTIMIZERS if self.mode == "train" else (None,),
            "backend": BACKENDS if self.mode == "train" else ("tensorflow",),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} is not one of {', '.join(allowed)}"
                )
        object.__setattr__(
            self, "backbone_options", tuple(sorted(tuple(p) for p in self.backbone_options))
        )
        alpha = dict(self.backbone_options).get("alpha")
        if alpha is not None and not (
            isinstance(alpha, (int, float)) and 0 < alpha <= MAX_ALPHA  # NaN fails both
        ):
            raise ConfigError(f"alpha must be a finite number in (0, {MAX_ALPHA:g}], got {alpha!r}")

    def _check_mode(self) -> None:
        """The mode is known; a train step gets Adam by default; an inference pass takes
        neither an optimizer nor recomputation (refused, not ignored: a row must not claim
        what its pass did not use)."""
        if self.mode not in MODES:
            raise ConfigError(f"mode {self.mode!r} is not one of {', '.join(MODES)}")
        if self.mode == "train" and self.optimizer is None:
            object.__setattr__(self, "optimizer", "adam")
        elif self.mode == "infer" and self.optimizer is not None:
            raise ConfigError(
                f"optimizer {self.optimizer!r}: an inference pass (mode infer) builds no optimizer"
            )
        if self.mode == "infer" and self.backend != "tensorflow":
            raise ConfigError(
                f"backend {self.backend!r}: forward passes (mode infer) run on the tensorflow "
                "backend only so far"
            )
        if self.mode == "infer" and self.remat != "none":
            raise ConfigError(
                f"remat {self.remat!r}: recomputation only changes a backward pass; an "
                "inference pass (mode infer) takes remat none"
            )

    def _check_spatial(self) -> None:
        """A patch cut across ranks: every slab the same height, and only what the spatial
        executor runs (refused here, before any work, not after a launch of N ranks)."""
        n = self.spatial_workers
        if n == 1:
            return
        if self.patch_size % (n * self.output_stride):
            raise ConfigError(
                f"patch_size {self.patch_size} px cannot be cut into {n} slabs: it must be a "
                f"multiple of spatial_workers x output stride ({n * self.output_stride})"
            )
        wanted = {
            "mode": ("train",),
            "backend": ("tensorflow",),
            "precision": ("float32", "mixed_bfloat16"),
        }
        for name, values in wanted.items():
            if getattr(self, name) not in values:
                raise ConfigError(
                    f"{name} {getattr(self, name)!r} with spatial_workers {n}: the spatial "
                    f"executor runs {name} {' or '.join(map(repr, values))} only so far"
                )
        if self.engine not in ("none", "horovod") or (self.engine == "none" and self.workers != 1):
            raise ConfigError(
                f"engine {self.engine!r} x {self.workers} workers with spatial_workers {n}: "
                "spatial parallelism composes with data parallelism under engine 'horovod' "
                "only (blocks of spatial_workers ranks, one per worker)"
            )

    @property
    def megapixels_per_step(self) -> float:
        """Input pixels per step, in millions."""
        return self.batch_size * self.patch_size**2 / 1e6

    @property
    def tf_device(self) -> str:
        """The TensorFlow device name whose allocator the probe reads ("CPU:0" / "GPU:0")."""
        return "GPU:0" if self.device == "gpu" else "CPU:0"

    @property
    def backbone_kwargs(self) -> dict[str, Any]:
        """The backbone options as keyword arguments of ``histoseg.models``' builders."""
        return dict(self.backbone_options)

    def as_dict(self) -> dict[str, Any]:
        """The config section of a results row (docs/architecture.md's keys; ``steps`` left out).

        ``optimizer`` always and ``backbone_options`` when set are added, since both change
        the memory a step needs. An inference pass adds ``mode`` ("infer") and has
        ``optimizer`` None; a train step's row has no ``mode`` key, so every train row keeps
        the identity it had before modes existed. Likewise ``backend`` is there only when
        it is "torch", and ``spatial_workers`` only above 1.
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
        if self.mode != "train":
            d["mode"] = self.mode
        if self.backend != "tensorflow":
            d["backend"] = self.backend
        if self.spatial_workers != 1:
            d["spatial_workers"] = self.spatial_workers
        return d

    def to_json(self) -> str:
        """The config as JSON, including ``steps`` (what ``bench.worker --config`` reads)."""
        d = self.as_dict()
        d["steps"] = self.steps
        return json.dumps(d, sort_keys=True)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> StepConfig:
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
    def from_json(cls, text: str) -> StepConfig:
        """Parse :meth:`to_json` output."""
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"config is not JSON ({exc.msg}): {text[:80]!r}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a JSON object, got {text[:80]!r}")
        return cls.from_dict(data)

    def replace(self, **changes: Any) -> StepConfig:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)
