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
    """``bytes = intercept_bytes + bytes_per_px * P ** 2 + bytes_per_row_px * P`` for one
    figure at a square patch of side P (``bytes_per_row_px`` is 0 unless a halo is fitted)."""

    intercept_bytes: float
    bytes_per_px: float
    #: Largest |fit - measurement| / measurement over the points fitted (0 for as many
    #: points as terms).
    max_residual: float
    bytes_per_row_px: float = 0.0

    def at(self, patch_size_px: int) -> int:
        """The fitted bytes at a square patch of ``patch_size_px``."""
        p = patch_size_px
        return round(self.intercept_bytes + self.bytes_per_px * p * p + self.bytes_per_row_px * p)


def fit_area(points: Sequence[tuple[int, int]], *, halo: bool = False) -> AreaFit:
    """Least-squares fit of bytes against patch area through ``(patch_size_px, bytes)``.

    With ``halo`` (a patch cut into slabs across ranks) the fit has a term linear in the
    side too: a rank keeps its neighbours' boundary rows, a fixed number of rows per layer
    each as wide as the patch. That term needs a third patch size.

    Raises:
        ConfigError: fewer distinct patch sizes than the fit has terms.
    """
    import numpy as np

    sizes = sorted({p for p, _ in points})
    terms = 3 if halo else 2
    if len(sizes) < terms:
        what = "a calibration of a patch cut across ranks" if halo else "a calibration"
        raise ConfigError(
            f"{what} needs measurements at {('two', 'three')[terms - 2]} or more patch sizes, "
            f"got {sizes or 'none'}"
        )
    side = np.array([float(p) for p, _ in points])
    ys = np.array([float(b) for _, b in points])
    columns = [np.ones_like(side), side**2] + ([side] if halo else [])
    coef, *_ = np.linalg.lstsq(np.stack(columns, axis=1), ys, rcond=None)
    fit = AreaFit(
        intercept_bytes=float(coef[0]),
        bytes_per_px=float(coef[1]),
        max_residual=0.0,
        bytes_per_row_px=float(coef[2]) if halo else 0.0,
    )
    residual = max(abs(fit.at(int(p)) - y) / y for p, y in zip(side, ys, strict=True) if y)
    return dataclasses.replace(fit, max_residual=float(residual))


def calibrated_prediction(
    measured: Mapping[int, Mapping[str, int]], patch_size_px: int, *, halo: bool = False
) -> dict[str, object]:
    """The calibrated route's ``predicted`` section for ``patch_size_px``.

    Args:
        measured: The ``measured`` section of each calibration row, by its patch size
            (same config otherwise).
        patch_size_px: The patch to predict.
        halo: The config cuts the patch across ranks: fit a halo term too (:func:`fit_area`).

    Returns:
        ``activation_bytes`` and ``peak_bytes`` read off the fits, ``method``
        ("calibrated"), the sizes it was fitted on and each fit's largest residual.
    """
    out: dict[str, object] = {
        "method": "calibrated",
        "calibration_sizes_px": sorted(measured),
    }
    for figure in CALIBRATED_FIGURES:
        fit = fit_area([(p, int(m[figure])) for p, m in measured.items()], halo=halo)
        out[figure] = fit.at(patch_size_px)
        out[f"{figure.removesuffix('_bytes')}_fit_residual"] = round(fit.max_residual, 5)
    return out


def halo_sides(spatial_workers: int) -> int:
    """Neighbours the most loaded rank exchanges halo rows with: none for a whole patch,
    one for 2 ranks (both at an edge of the patch), two for an inner rank of 3 or more."""
    return 0 if spatial_workers == 1 else 1 if spatial_workers == 2 else 2


@dataclasses.dataclass(frozen=True)
class SlabFit:
    """Per-rank bytes of a patch of side P cut across N ranks (N >= 2):
    ``intercept_bytes + bytes_per_px * P^2 / N + bytes_per_halo_px * sides(N) * P``.

    Each rank holds its slab's share of every feature map (``P^2 / N``), the rows its
    neighbours share with it (a fixed number of rows per layer, each as wide as the
    patch, from one neighbour or two: :func:`halo_sides`), and what every rank holds
    whole: weights, gradients, optimizer state, Horovod's fusion buffer.
    """

    intercept_bytes: float
    bytes_per_px: float
    bytes_per_halo_px: float
    #: Largest |fit - measurement| / measurement over the points fitted.
    max_residual: float
    #: The rank counts and patch sizes it was fitted on.
    fitted_workers: tuple[int, ...]
    fitted_sizes_px: tuple[int, ...]

    def at(self, patch_size_px: int, spatial_workers: int) -> int:
        """The fitted bytes of the most loaded rank."""
        p, n = patch_size_px, spatial_workers
        return round(
            self.intercept_bytes
            + self.bytes_per_px * p * p / n
            + self.bytes_per_halo_px * halo_sides(n) * p
        )


def fit_slabs(points: Sequence[tuple[int, int, int]]) -> SlabFit:
    """Least-squares :class:`SlabFit` through ``(patch_size_px, spatial_workers, bytes)``
    measurements of one config at two or more rank counts (N >= 2) and patch sizes.

    Raises:
        ConfigError: fewer than three points, or all at one rank count or one patch size.
    """
    import numpy as np

    points = [(int(p), int(n), int(b)) for p, n, b in points if n >= 2]
    workers = sorted({n for _, n, _ in points})
    sizes = sorted({p for p, _, _ in points})
    if len(points) < 3 or len(workers) < 2 or len(sizes) < 2:
        raise ConfigError(
            "a slab fit needs measured rows at two or more rank counts above 1 and two or "
            f"more patch sizes, got rank counts {workers or 'none'} and sizes {sizes or 'none'}"
        )
    p = np.array([q for q, _, _ in points], float)
    n = np.array([m for _, m, _ in points], float)
    sides = np.array([halo_sides(m) for _, m, _ in points], float)
    ys = np.array([b for _, _, b in points], float)
    design = np.stack([np.ones_like(p), p * p / n, sides * p], axis=1)
    coef, *_ = np.linalg.lstsq(design, ys, rcond=None)
    fit = SlabFit(*(float(c) for c in coef), 0.0, tuple(workers), tuple(sizes))
    residual = max(abs(fit.at(q, m) - y) / y for q, m, y in points if y)
    return dataclasses.replace(fit, max_residual=float(residual))


def slab_law_prediction(
    points: Mapping[str, Sequence[tuple[int, int, int]]], patch_size_px: int, spatial_workers: int
) -> dict[str, object]:
    """The ``predicted`` section of a patch cut across ranks, read off :func:`fit_slabs`.

    Args:
        points: For each of :data:`CALIBRATED_FIGURES`, ``(patch_size_px,
            spatial_workers, bytes)`` of the same config measured at other sizes and rank
            counts.
        patch_size_px, spatial_workers: The config to predict.

    Returns:
        ``activation_bytes`` and ``peak_bytes`` of the most loaded rank, ``method``
        ("slab_law"), the rank counts and sizes fitted and each fit's largest residual.

    Raises:
        ConfigError: too few points (:func:`fit_slabs`).
    """
    out: dict[str, object] = {"method": "slab_law"}
    for figure in CALIBRATED_FIGURES:
        fit = fit_slabs(points[figure])
        out[figure] = fit.at(patch_size_px, spatial_workers)
        out[f"{figure.removesuffix('_bytes')}_fit_residual"] = round(fit.max_residual, 5)
        out["fitted_workers"] = list(fit.fitted_workers)
        out["fitted_sizes_px"] = list(fit.fitted_sizes_px)
    return out
