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
from collections.abc import Iterable, Mapping, Sequence

from histoseg.errors import ConfigError

#: The figures a calibration extrapolates (bytes, as measured rows name them).
CALIBRATED_FIGURES = ("activation_bytes", "peak_bytes")
#: The phases of a train step whose peaks an allocator trace gives (``phase_peak_bytes``).
STEP_PHASES = ("forward", "backward", "update")


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


def peak_from_activations(spatial_workers: int, remat: str) -> bool:
    """Whether a config's step peak is predicted as its fitted activations plus what it
    held beyond them (:func:`held_beyond_activations`) rather than by a fit of the peak.

    True for a patch cut across ranks without recomputation: its peak comes after the
    forward pass, and the rest does not grow with the patch. With recomputation the peak
    comes in the backward pass, while a block is recomputed, and that grows with the
    patch as the activations do; its peak is fitted as they are.
    """
    return spatial_workers > 1 and remat == "none"


def calibrated_prediction(
    measured: Mapping[int, Mapping[str, int]],
    patch_size_px: int,
    *,
    peak_from_activations: bool = False,
) -> dict[str, object]:
    """The calibrated route's ``predicted`` section for ``patch_size_px``.

    Args:
        measured: The ``measured`` section of each calibration row, by its patch size
            (same config otherwise).
        patch_size_px: The patch to predict.
        peak_from_activations: Predict the peak as the fitted activations plus what the
            step held beyond them at the calibration sizes (:func:`held_beyond_activations`;
            see :func:`peak_from_activations`), not from a fit of the peak.

    Returns:
        ``activation_bytes`` and ``peak_bytes`` read off the fits, ``method``
        ("calibrated"), the sizes it was fitted on and each fit's largest residual. When
        every section carries ``phase_peak_bytes`` (an allocator trace's peak of each
        phase: ``bench.memory --allocator-trace``), the peak is the largest of the phases'
        peaks, each fitted on its own (:func:`phase_peak_prediction`).
    """
    out: dict[str, object] = {
        "method": "calibrated",
        "calibration_sizes_px": sorted(measured),
    }
    for figure in CALIBRATED_FIGURES:
        fit = fit_area([(p, int(m[figure])) for p, m in measured.items()])
        out[figure] = fit.at(patch_size_px)
        out[f"{figure.removesuffix('_bytes')}_fit_residual"] = round(fit.max_residual, 5)
    if peak_from_activations:
        out["peak_bytes"] = out["activation_bytes"] + held_beyond_activations(measured.values())
        out["peak_method"] = "activations + the most held beyond them at the calibration sizes"
    elif all(m.get("phase_peak_bytes") for m in measured.values()):
        out.update(phase_peak_prediction(measured, patch_size_px))
    return out


def phase_peak_prediction(
    measured: Mapping[int, Mapping[str, object]], patch_size_px: int
) -> dict[str, object]:
    """The step peak at ``patch_size_px`` as the largest of its phases' fitted peaks.

    A step's peak is the highest of its forward pass's, backward pass's and update's, and
    each of those is affine in patch area on its own. Which phase is highest changes with
    the patch: at small patches a phase that grows slowly can top the backward pass that
    grows fastest (xception65 bfloat16 ``full`` peaks in the forward pass at 256 px and in
    the backward pass from 384 px), so a single fit of the step peaks over small patches
    mixes two slopes and reads the patch that does not fit low. Fitting each phase and
    taking the largest at the target does not.
    """
    fits = {
        phase: fit_area([(p, int(m["phase_peak_bytes"][phase])) for p, m in measured.items()])
        for phase in STEP_PHASES
    }
    at = {phase: fit.at(patch_size_px) for phase, fit in fits.items()}
    phase = max(at, key=at.__getitem__)
    return {
        "peak_bytes": at[phase],
        "peak_fit_residual": round(fits[phase].max_residual, 5),
        "peak_method": "the largest of the forward, backward and update peaks, each fitted in area",
        "peak_phase": phase,
        "phase_peak_bytes": at,
    }


def held_beyond_activations(measured: Iterable[Mapping[str, int]]) -> int:
    """The most a step held at its peak beyond its activations, over measured sections.

    What a rank holds besides its slab's activations is weights, gradients, optimizer
    state, Horovod's fusion buffer and the constants TensorFlow folds into the step: none
    of it grows with the patch, but it moves by tens of MB from one size to the next
    (which constants are folded depends on their size), so an affine fit of the peak over
    a few small sizes reads that jitter as a slope. Activations are fitted smoothly.
    """
    return max(int(m["peak_bytes"]) - int(m["activation_bytes"]) for m in measured)


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


def fit_slabs(points: Sequence[tuple[int, int, int]], *, largest: int = 2) -> SlabFit:
    """Least-squares :class:`SlabFit` through ``(patch_size_px, spatial_workers, bytes)``
    measurements of one config at two or more rank counts (N >= 2) and patch sizes.

    Only the ``largest`` patch sizes of each rank count are fitted: small slabs are in
    another regime (xception65 at 256 px over 2 ranks: 4-row maps at stride 16, whose
    step peaks come in the gradient sum, not after the forward pass), and it is large
    patches the fit is asked about.

    Raises:
        ConfigError: fewer than three points, or all at one rank count or one patch size.
    """
    import numpy as np

    points = [(int(p), int(n), int(b)) for p, n, b in points if n >= 2]
    kept = {
        n: sorted({p for p, m, _ in points if m == n})[-largest:] for n in {m for _, m, _ in points}
    }
    points = [q for q in points if q[0] in kept[q[1]]]
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
    measured: Sequence[tuple[int, int, Mapping[str, int]]],
    patch_size_px: int,
    spatial_workers: int,
    *,
    peak_from_activations: bool = True,
) -> dict[str, object]:
    """The ``predicted`` section of a patch cut across ranks, read off :func:`fit_slabs`.

    Args:
        measured: ``(patch_size_px, spatial_workers, measured section)`` of the same
            config at other sizes and rank counts.
        patch_size_px, spatial_workers: The config to predict.
        peak_from_activations: ``peak_bytes`` as the activations plus the most held beyond
            them in the rows fitted (:func:`held_beyond_activations`); False: the slab law
            fitted to the peaks (:func:`peak_from_activations` says which).

    Returns:
        ``activation_bytes`` and ``peak_bytes`` of the most loaded rank, ``method``
        ("slab_law"), the rank counts and sizes fitted and the fits' largest residual.

    Raises:
        ConfigError: too few points (:func:`fit_slabs`).
    """
    fit = fit_slabs([(p, n, m["activation_bytes"]) for p, n, m in measured])
    fitted = [m for p, n, m in measured if n in fit.fitted_workers and p in fit.fitted_sizes_px]
    activations = fit.at(patch_size_px, spatial_workers)
    out: dict[str, object] = {
        "method": "slab_law",
        "activation_bytes": activations,
        "activation_fit_residual": round(fit.max_residual, 5),
        "fitted_workers": list(fit.fitted_workers),
        "fitted_sizes_px": list(fit.fitted_sizes_px),
    }
    if peak_from_activations:
        out["peak_bytes"] = activations + held_beyond_activations(fitted)
        out["peak_method"] = "activations + the most held beyond them in the rows fitted"
    else:
        peak = fit_slabs([(p, n, m["peak_bytes"]) for p, n, m in measured])
        out["peak_bytes"] = peak.at(patch_size_px, spatial_workers)
        out["peak_fit_residual"] = round(peak.max_residual, 5)
    return out
