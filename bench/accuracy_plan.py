"""How each patch size of the accuracy sweep is trained: the steps that show the same pixel
budget, the learning rate, and the precision and recomputation predicted to fit the memory
budget."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from histoseg.errors import ConfigError, HistosegError
from histoseg.memory.devices import format_bytes, planned_bytes

#: ``--lr-rule side`` scales the learning rate with the patch side against this patch.
LR_REFERENCE_PX = 256
LR_RULES = ("fixed", "side")


def learning_rate_at(args: Any, patch_size: int) -> float:
    """The learning rate a size trains with: ``--learning-rate`` (rule "fixed"), or that
    times ``patch_size / 256`` (rule "side": the square root of the patch area against a
    256 px patch). At a fixed pixel budget a patch of 4x the area takes 4x fewer steps,
    each averaging 4x the pixels' gradients; the larger step keeps what the run can move
    from shrinking with the step count."""
    if getattr(args, "lr_rule", "fixed") == "side":
        return args.learning_rate * patch_size / LR_REFERENCE_PX
    return args.learning_rate


def steps_for_budget(pixel_budget: float, batch_size: int, patch_size_px: int) -> int:
    """Training steps that show ``pixel_budget`` pixels at this batch and patch size (at least 1)."""
    if not pixel_budget > 0:
        raise ConfigError(f"pixel budget must be > 0, got {pixel_budget!r}")
    if batch_size < 1 or patch_size_px < 1:
        raise ConfigError(
            f"batch size and patch size must be >= 1, got {batch_size}, {patch_size_px}"
        )
    return max(1, round(pixel_budget / (batch_size * patch_size_px**2)))


@dataclasses.dataclass(frozen=True)
class SizePlan:
    """How one patch size will be trained, or why it will not be."""

    patch_size: int
    steps: int
    precision: str
    remat: str
    predicted_peak_bytes: int | None
    run: bool
    reason: str | None = None


def plan_size(
    patch_size: int,
    *,
    steps: int,
    precision: str,
    remat: str,
    memory_budget_bytes: int | None,
    allow_remat: bool,
    allow_bf16: bool,
    predict: Callable[[int, str, str], int | None],
) -> SizePlan:
    """Pick the first of (as asked, + block remat, + bf16, + both) predicted to fit the budget.

    A candidate fits when its predicted peak plus the planning band
    (:func:`histoseg.memory.devices.planned_bytes`, the same band the fit check and the
    largest-patch search use) is within the budget.

    Args:
        patch_size: Patch side, px.
        steps: Training steps for this size.
        precision, remat: What the user asked for.
        memory_budget_bytes: What a step may use; None = no limit known (run as asked).
        allow_remat: May switch remat "none" to "blocks".
        allow_bf16: May switch precision "float32" to "mixed_bfloat16".
        predict: ``predict(patch_size, precision, remat) -> step peak bytes`` (None when
            the model cannot predict it).

    Returns:
        The plan; ``run`` is False with a reason when nothing allowed is predicted to fit.
    """
    candidates = [(precision, remat)]
    if allow_remat and remat == "none":
        candidates.append((precision, "blocks"))
    if allow_bf16 and precision == "float32":
        candidates.append(("mixed_bfloat16", remat))
        if allow_remat and remat == "none":
            candidates.append(("mixed_bfloat16", "blocks"))
    tried = []
    for cand_precision, cand_remat in candidates:
        peak = predict(patch_size, cand_precision, cand_remat)
        if memory_budget_bytes is None or peak is None:
            return SizePlan(patch_size, steps, cand_precision, cand_remat, peak, run=True)
        if planned_bytes(peak) <= memory_budget_bytes:
            return SizePlan(patch_size, steps, cand_precision, cand_remat, peak, run=True)
        band = planned_bytes(peak) - peak
        tried.append(
            f"{cand_precision}/remat {cand_remat}: {format_bytes(peak)} + {format_bytes(band)} band"
        )
    hints = [
        flag
        for flag, allowed in (("--allow-remat", allow_remat), ("--allow-bf16", allow_bf16))
        if not allowed
    ]
    reason = f"predicted peak + error band > {format_bytes(memory_budget_bytes)} budget ({'; '.join(tried)})"
    if hints:
        reason += f"; {' / '.join(hints)} may make it fit"
    first_peak = predict(patch_size, precision, remat)
    return SizePlan(patch_size, steps, precision, remat, first_peak, run=False, reason=reason)


def estimate_predictor(
    backbone: str, batch_size: int, output_stride: int, optimizer: str, options: dict
):
    """A ``predict(patch, precision, remat)`` over histoseg's analytic memory model."""
    from histoseg.memory.estimate import estimate  # TensorFlow: imported only when planning

    def predict(patch_size: int, precision: str, remat: str) -> int | None:
        try:
            return int(
                estimate(
                    patch_size=patch_size,
                    batch_size=batch_size,
                    backbone=backbone,
                    output_stride=output_stride,
                    precision=precision,
                    remat=remat,
                    optimizer=optimizer,
                    backbone_options=options,
                ).peak_bytes
            )
        except HistosegError:
            raise
        except Exception:  # an estimate the model cannot make must not stop the sweep
            return None

    return predict
