"""The slowest of N workers: the straggler term of the weak-scaling projection.

A synchronous data-parallel step ends when the last worker's gradients are in, so it costs
the slowest worker's compute, not the average worker's. The model draws each worker's
compute time per step as ``compute_s * (1 + cv * Z)``, Z standard normal, independent
across workers, so the step waits

    E[max over N workers] = compute_s * (1 + cv * e_N),  e_N = E[max of N standard normals]

``e_N`` is the exact order statistic, integrated numerically (:func:`expected_max_normal`:
``N x phi(x) Phi(x)^(N-1)`` over a fine grid, Phi^(N-1) taken through scipy's ``log_ndtr``);
the familiar ``sqrt(2 ln N)`` is the leading term of its growth and overstates it by 16% at
N = 512 (3.53 against 3.04) and by 10% at 27,360 (4.52 against 4.09), so it is not used.
The same formula holds whether the spread is drawn anew every step (jitter) or once per
worker (a slow node): either way the expected slowest of N is ``e_N`` spreads above the mean.

The spread comes from the rows ``bench.scaling`` already writes
(:func:`histoseg.scaling.measured.spread_from_rows` reads them, :func:`pooled_spread` pools):
each point is launched ``--repeats`` times as fresh processes and every launch's median step
time is kept in ``extra.launches_step_s``. In rows without a collective (one worker, or the
no-communication control, engine ``none``) those launches differ only by the state of the
machine they ran on, the nearest this machine has to N nodes of one cluster differing from
each other. Their relative spread is pooled over the rows (``sum((x / row mean - 1)^2) /
sum(n - 1)``), and the band is its chi-square interval (90% by default): a cv that three
launches per row can only pin down to about +-30%. What the rows do not hold is the spread of
single steps inside a launch (each launch keeps its median over steps only), so jitter
faster than a launch is not in the band (docs/cluster.md, where the projection is wrong).

:data:`PUBLISHED` holds the two published large runs the projection is checked against, each
with what was published and what is assumed, stated apart, and a third it is known to miss
(shown by ``python -m histoseg.scaling --published``, not held to the check).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable, Sequence
from typing import Any

from histoseg.errors import ConfigError

#: Confidence of the spread band (two-sided chi-square interval of the pooled cv).
DEFAULT_CONFIDENCE = 0.90


@functools.lru_cache(maxsize=256)
def expected_max_normal(n: int) -> float:
    """E[max of ``n`` independent standard normals] (0 for one; exact to ~1e-9).

    Integrates ``x * n * phi(x) * Phi(x)^(n-1)`` on a grid of 0.0005 over [-9, 12]
    (the integrand is negligible outside it for any n up to 10^9).
    """
    if n < 1:
        raise ConfigError(f"workers must be >= 1, got {n}")
    if n == 1:
        return 0.0
    import numpy as np
    from scipy.integrate import trapezoid
    from scipy.special import log_ndtr

    x = np.linspace(-9.0, 12.0, 42001)
    log_pdf = -0.5 * x * x - 0.5 * math.log(2.0 * math.pi)
    density = n * np.exp(log_pdf + (n - 1) * log_ndtr(x))
    return float(trapezoid(x * density, x))


def straggler_factor(workers: int, cv: float) -> float:
    """Expected slowest compute of ``workers`` over the mean compute: ``1 + cv * e_N``."""
    if cv < 0:
        raise ConfigError(f"the spread (cv) must be >= 0, got {cv}")
    return 1.0 + cv * expected_max_normal(workers)


@dataclasses.dataclass(frozen=True)
class Spread:
    """The spread of per-worker step time the straggler term draws from.

    Attributes:
        cv: central coefficient of variation (standard deviation / mean).
        low, high: the band (both equal ``cv`` when the spread is given, not measured).
        source: where it comes from, in words.
        rows: measured rows pooled (0 when given).
        dof: degrees of freedom of the pooled estimate (0 when given).
    """

    cv: float
    low: float
    high: float
    source: str
    rows: int = 0
    dof: int = 0

    def __post_init__(self) -> None:
        if not 0 <= self.low <= self.cv <= self.high:
            raise ConfigError(f"spread band must hold 0 <= low <= cv <= high, got {self}")

    @classmethod
    def given(cls, cv: float, low: float | None = None, high: float | None = None) -> Spread:
        """A stated spread (an assumption, not a measurement)."""
        low = cv if low is None else low
        high = cv if high is None else high
        return cls(cv, low, high, "given (--cv)")

    def as_inputs(self) -> dict[str, Any]:
        """The spread as projection inputs (printed and stored with the rows)."""
        return {
            "straggler_cv": self.cv,
            "straggler_cv_low": self.low,
            "straggler_cv_high": self.high,
            "straggler_cv_source": self.source,
            "straggler_expected_max": "exact normal order statistic E[max of N]",
        }


def pooled_spread(
    launch_times_s: Iterable[Sequence[float]], source: str, confidence: float = DEFAULT_CONFIDENCE
) -> Spread | None:
    """The relative spread of repeated measurements, pooled over groups, with its band.

    Each group holds the step times of one configuration launched several times; a group
    counts with ``len - 1`` degrees of freedom (``sum((x / group mean - 1)^2) / sum(n - 1)``)
    and the band is the pooled cv's two-sided chi-square interval at ``confidence``. None
    when no group holds two positive times. ``source`` says, in words, what was pooled.
    """
    squares, dof, used = 0.0, 0, 0
    for group in launch_times_s:
        times = [float(s) for s in group if float(s) > 0]
        if len(times) < 2:
            continue
        mean = sum(times) / len(times)
        squares += sum((s / mean - 1.0) ** 2 for s in times)
        dof += len(times) - 1
        used += 1
    if not dof:
        return None
    from scipy.stats import chi2

    cv = math.sqrt(squares / dof)
    tail = (1.0 - confidence) / 2.0
    return Spread(
        cv,
        cv * math.sqrt(dof / chi2.ppf(1.0 - tail, dof)),
        cv * math.sqrt(dof / chi2.ppf(tail, dof)),
        f"{source}, pooled ({dof} dof), {100 * confidence:.0f}% chi-square band",
        rows=used,
        dof=dof,
    )


@dataclasses.dataclass(frozen=True)
class PublishedRun:
    """A published large data-parallel run, as the projection is fed it.

    ``published`` lists what the source states; ``assumed`` what the check had to supply.
    """

    name: str
    source: str
    workers: int
    workers_per_node: int
    efficiency: float  # published weak-scaling efficiency at ``workers``
    compute_s: float  # one worker's step, seconds
    parameters: float  # trainable parameters (fp32 gradients: 4 bytes each)
    bandwidth_gbps: float  # per node
    latency_s: float  # per ring hop
    overlap_window: float  # share of a step the allreduce can run beside compute
    published: tuple[str, ...]
    assumed: tuple[str, ...]
    #: False for a run the model is known to miss (shown, not held to the 5-point check)
    checked: bool = True


PUBLISHED = (
    PublishedRun(
        name="Horovod, ResNet-101, 512 GPUs",
        source="horovod/horovod README and docs/benchmarks.rst (Sergeev & Del Balso 2018, "
        "arXiv:1802.05799): 128 servers x 4 Pascal GPUs, RoCE 25 Gbit/s",
        workers=512,
        workers_per_node=4,
        efficiency=0.90,
        compute_s=64 / 119.4,
        parameters=44.5e6,
        bandwidth_gbps=25.0,
        latency_s=5e-6,
        overlap_window=2.0 / 3.0,
        published=(
            "90% scaling efficiency at 512 GPUs (ResNet-101 and Inception V3)",
            "128 servers x 4 Pascal GPUs, RoCE-capable 25 Gbit/s network",
            "single GPU, batch 64: 119.4 images/s (the first README's table, uber/horovod "
            "2017: 4 servers x 4 Pascal GPUs, RoCE 25 Gbit/s) -> 0.536 s per step",
            "Horovod allreduces gradients while the backward pass runs (tensor fusion)",
        ),
        assumed=(
            "ResNet-101: 44.5 M parameters (the standard count; fp32 gradients 178 MB)",
            "the 512-GPU run's GPUs step as fast as that table's; any step over 0.18 s gives "
            "the same projection (the allreduce stays hidden)",
            "the 4 GPUs of a server sit next to each other in the ring (NCCL), 5 us per hop",
            "the allreduce can hide behind the backward pass, 2/3 of a step",
        ),
    ),
    PublishedRun(
        name="Kurth et al., DeepLabv3+, 27,360 GPUs",
        source="Kurth et al. 2018, Exascale Deep Learning for Climate Analytics, SC18 "
        "(arXiv:1810.01993), Summit",
        workers=27360,
        workers_per_node=6,
        efficiency=0.907,
        compute_s=1.3,
        parameters=43.7e6,
        bandwidth_gbps=200.0,
        latency_s=1e-6,
        overlap_window=1.0,
        published=(
            "90.7% parallel efficiency at 27,360 V100 GPUs, single precision, "
            "325.8 PF/s sustained (11.9 TF/s per GPU)",
            "Summit: 4,560 nodes x 6 V100, dual-rail EDR InfiniBand (2 x 100 Gb/s per node)",
            "gradient lag: a step applies the previous step's reduced gradients, so the "
            "allreduce runs beside the whole next step",
        ),
        assumed=(
            "DeepLabv3+ as in the authors' code (azrael417/ClimDeepLearn, deeplab_model.py: "
            "ResNet-50 v2 encoder, 16 input channels, ASPP 256, deconvolution decoder): "
            "43.7 M parameters, counted here",
            "step 1.3 s: one 768 x 1152 x 16 sample per GPU, ~15 TF per training sample "
            "(estimated here from the architecture) at the published 11.9 TF/s per GPU; any "
            "step over 0.07 s gives the same projection (the lagged allreduce stays hidden)",
            "a flat ring with a node's 6 GPUs adjacent, 1 us per hop (the run used a "
            "hierarchical allreduce; the ring's latency term is the more pessimistic)",
        ),
    ),
    PublishedRun(
        name="Horovod, VGG-16, 512 GPUs (a known miss)",
        source="the same Horovod benchmark: 68% scaling efficiency for VGG-16",
        workers=512,
        workers_per_node=4,
        efficiency=0.68,
        compute_s=64 / 130.9,
        parameters=138.4e6,
        bandwidth_gbps=25.0,
        latency_s=5e-6,
        overlap_window=2.0 / 3.0,
        published=(
            "68% scaling efficiency at 512 GPUs",
            "single GPU, batch 64: 130.9 images/s -> 0.489 s per step",
        ),
        assumed=(
            "VGG-16: 138.4 M parameters (fp32 gradients 553 MB); network and overlap as for "
            "ResNet-101",
        ),
        checked=False,
    ),
)
