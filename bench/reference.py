"""The study's published validation figures (CAMELYON16 / CAMELYON17), to plot beside ours.

Source: the research poster this project grows from ("training semantic segmentation for
whole-slide histopathology images with ever larger patches"), its table of validation results
by patch size. The figures are the study's, copied digit for digit; nothing here was measured
by histoseg.

The study trained DeepLabV3+ with the modified aligned Xception backbone, output stride 16,
two classes, at batch size 1 on 24 GB GPUs and a CPU cluster. It states only one memory
figure: about 25 GB for one 2048 x 2048 patch in training. Plots therefore place these points
on a memory axis with histoseg's own estimate for :data:`STUDY_CONFIG`, labelled as such.
"""

from __future__ import annotations

SOURCE = (
    "study poster (DeepLabV3+ on CAMELYON16/17 with growing patch sizes), "
    "its published mIoU and memory tables"
)

#: The configuration the study trained, in the names of a results row's ``config``.
STUDY_CONFIG: dict[str, object] = {
    "backbone": "xception65",
    "output_stride": 16,
    "precision": "float32",
    "batch_size": 1,
    "remat": "none",
    "optimizer": "adam",  # they used Adam or SGD; Adam's two slots make it the larger of the two
}

#: The one memory figure the study states: one 2048 px patch, batch 1, in training.
STUDY_PEAK_BYTES_AT_2048_PX = 25 * 10**9

#: Validation metrics per data set and patch size (px), as in the study's tables.
PUBLISHED: dict[str, dict[int, dict[str, float]]] = {
    "CAMELYON16": {
        256: {"accuracy": 0.7756, "miou": 0.6086, "auc": 0.7459, "val_patches": 560},
        704: {"accuracy": 0.9313, "miou": 0.8647, "auc": 0.9259, "val_patches": 160},
        1024: {"accuracy": 0.9453, "miou": 0.9167, "auc": 0.9537, "val_patches": 92},
        2048: {"accuracy": 0.9410, "miou": 0.9231, "auc": 0.9578, "val_patches": 70},
    },
    "CAMELYON17": {
        256: {"accuracy": 0.7982, "miou": 0.6489, "auc": 0.7812, "val_patches": 552},
        704: {"accuracy": 0.9364, "miou": 0.8734, "auc": 0.9344, "val_patches": 180},
        1024: {"accuracy": 0.9566, "miou": 0.9102, "auc": 0.9560, "val_patches": 104},
        2048: {"accuracy": 0.9502, "miou": 0.9268, "auc": 0.9643, "val_patches": 76},
    },
}

#: The patch sizes (px) the study trained, smallest first.
STUDY_PATCH_SIZES_PX: tuple[int, ...] = (256, 704, 1024, 2048)
