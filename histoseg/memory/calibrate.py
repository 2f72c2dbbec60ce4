"""The measured route to a memory prediction: fit small patches, extrapolate in patch area.

A fully convolutional network's feature maps all scale with the input's area, so what a
train step keeps for its backward pass is affine in the patch area: a constant part
(weights, optimizer state, the pooled ASPP branch, per-channel batch-norm moments) and a
part per pixel. Measure the real step at two or three patch sizes that fit the device in
hand, fit ``bytes = intercept + slope * P^2`` by least squares, and read the fit at the
patch that does not fit. Unlike the analytic estimate (:mod:`histoseg.memory.estimate`)
this needs no rule for the backend, device or allocator: it inherits them from the
measurements. What it cannot see is anything that is not affine in area, e.g. an
allocator's rounding at sizes far from the measured ones; the fit's residuals on the
measured points are reported so that such a departure shows.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

from histoseg.errors import ConfigError

#: The figures a calibration extrapolates (bytes, as measured rows name them).
CALIBRATED_FIGURES = ("activation_bytes", "peak_bytes")


@dataclasses.dataclass(frozen=True)
class AreaFit:
    """``bytes = intercept_bytes + bytes_per_px * patch_size_px ** 2`` for one figure."""

    intercept_bytes: float
    bytes_per_px: float
    #: Largest |fit - measurement| / measurement over the points fitted (0 for two points).
    max_residual: float

    def at(self, patch_size_px: int) -> int:
        """The fitted bytes at a square patch of ``patch_size_px``."""
        return round(self.intercept_bytes + self.bytes_per_px * patch_size_px**2)


def fit_area(points: Sequence[tuple[int, int]]) -> AreaFit:
    """Least-squares fit of bytes against patch area through ``(patch_size_px, bytes)``.

    Raises:
        ConfigError: fewer than two distinct patch sizes.
    """
    sizes = sorted({p for p, _ in points})
    if len(sizes) < 2:
        raise ConfigError(
            f"a calibration needs measurements at two or more patch sizes, got {sizes or 'none'}"
        )
    xs = [float(p * p) for p, _ in points]
    ys = [float(b) for _, b in points]
    n = len(xs)
    mean_x, mean_y = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / sxx
    intercept = mean_y - slope * mean_x
    residual = max(abs(intercept + slope * x - y) / y for x, y in zip(xs, ys, strict=True) if y)
    return AreaFit(intercept_bytes=intercept, bytes_per_px=slope, max_residual=residual)


def calibrated_prediction(
    measured: Mapping[int, Mapping[str, int]], patch_size_px: int
) -> dict[str, object]:
    """The calibrated route's ``predicted`` section for ``patch_size_px``.

    Args:
        measured: The ``measured`` section of each calibration row, by its patch size
            (same config otherwise).
        patch_size_px: The patch to predict.

    Returns:
        ``activation_bytes`` and ``peak_bytes`` read off the fits, ``method``
        ("calibrated"), the sizes it was fitted on and each fit's largest residual.
    """
    out: dict[str, object] = {
        "method": "calibrated",
        "calibration_sizes_px": sorted(measured),
    }
    for figure in CALIBRATED_FIGURES:
        fit = fit_area([(p, int(m[figure])) for p, m in measured.items()])
        out[figure] = fit.at(patch_size_px)
        out[f"{figure.removesuffix('_bytes')}_fit_residual"] = round(fit.max_residual, 5)
    return out
