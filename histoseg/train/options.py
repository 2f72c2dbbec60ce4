"""The options of one training run (:class:`TrainOptions`), filled by the CLI from its flags."""

from __future__ import annotations

import dataclasses
from typing import Any

from histoseg.config import HEAD_FILTERS, StepConfig, default_threads
from histoseg.train.engines.base import DEFAULT_STEP_MODE


@dataclasses.dataclass
class TrainOptions:
    """Everything one training run needs; the CLI fills it from its flags.

    ``learning_rate`` is per worker: the run's peak rate is ``learning_rate * workers`` unless
    ``scale_lr`` is False (the linear scaling rule for a global batch ``workers`` times larger).
    With ``spatial_workers`` N above 1 a worker (a data-parallel replica) is a block of N
    ranks that cut each of its patches into N slabs.
    """

    slides: str | None = None
    annotations: str | None = None
    data: str | None = None  # "camelyon16=DIR" or "camelyon17=DIR" (histoseg.wsi.camelyon)
    synthetic_task: str = "local"
    synthetic_dir: str = "data/synthetic"
    synthetic_slides: int = 6
    synthetic_size_px: tuple[int, int] = (8000, 6000)
    # The slides' own seed, apart from the training seed: runs with different training
    # seeds train on the same synthetic slides (and share one folder of them).
    synthetic_seed: int = 0
    split: str = "auto"
    val_fraction: float = 1 / 3
    val_centres: tuple[int, ...] = ()
    patch_size: int = 256
    level: int = 0
    min_tissue: float = 0.5
    tumor_ratio: float | None = 0.5
    tumour_weight: float = 1.0
    batch_size: int = 2
    max_val_patches: int | None = 64
    backbone: str = "xception65"
    alpha: float | None = None
    output_stride: int = 16
    precision: str = "float32"
    remat: str = "none"
    norm: str = "batch"
    head_filters: int = HEAD_FILTERS
    optimizer: str = "adam"
    learning_rate: float = 1e-3
    momentum: float = 0.9
    schedule: str = "poly"
    warmup_steps: int | None = None
    scale_lr: bool = True
    steps: int | None = 100
    epochs: float | None = None
    fp16_allreduce: bool = False
    # ranks each patch is cut across (histoseg.spatial); the world is blocks of this many
    spatial_workers: int = 1
    step_mode: str = DEFAULT_STEP_MODE
    run_dir: str = "runs/train"
    checkpoint_every: int = 50
    resume: str | None = None
    results: str | None = None
    log_every: int = 10
    seed: int = 0
    threads: int | None = None
    progress: bool = True
    bn_recalibration_batches: int = 20
    # validate (and let inference score) the prior-corrected probability (histoseg.train.prior)
    prior_correction: bool = False
    # the command line the run was started with, kept in its results row (None: not known)
    command: str | None = None

    def step_config(self, *, device: str, engine: str, workers: int) -> StepConfig:
        """The run's train step as the one config type every results row is written from."""
        return StepConfig(
            patch_size=self.patch_size,
            batch_size=self.batch_size,
            backbone=self.backbone,
            output_stride=self.output_stride,
            precision=self.precision,
            remat=self.remat,
            device=device,
            threads=self.threads or default_threads(),
            engine=engine,
            workers=workers,
            optimizer=self.optimizer,
            backbone_options=() if self.alpha is None else (("alpha", self.alpha),),
            spatial_workers=self.spatial_workers,
        )

    def row_config(
        self, *, device: str, engine: str, workers: int, step_mode: str, steps: int
    ) -> dict[str, Any]:
        """The config section of the run's row: the step's keys, then training's own.

        Keys that only some runs set (the synthetic task and seed, norm, loss weighting,
        sampler ratio) appear only when not the default, so rows made before those options
        existed keep their identity. ``prior_correction`` is always there, so that rows
        made before it (scored uncorrected) never pass for corrected ones.
        """
        config = self.step_config(device=device, engine=engine, workers=workers).as_dict()
        config.update(
            compression="fp16" if self.fp16_allreduce else "none",
            step=step_mode,
            learning_rate=self.learning_rate,
            steps=steps,
            data=self.data or self.slides or "synthetic",
            seed=self.seed,
            prior_correction=self.prior_correction,
        )
        synthetic = not (self.slides or self.data)
        if synthetic and self.synthetic_seed:
            config["synthetic_seed"] = self.synthetic_seed
        if synthetic and self.synthetic_task != "local":
            config["synthetic_task"] = self.synthetic_task
        for key, default in (
            ("norm", "batch"),
            ("head_filters", HEAD_FILTERS),
            ("tumour_weight", 1.0),
            ("tumor_ratio", 0.5),
        ):
            if getattr(self, key) != default:
                config[key] = getattr(self, key)
        return config
