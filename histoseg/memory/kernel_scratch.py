"""What a CPU convolution kernel allocates inside itself, which fake tensors cannot show.

A replay on fake tensors (:mod:`histoseg.memory.torch_replay`) sees every tensor an op
returns, but not the buffers a kernel allocates and frees while it runs. On the CPU,
oneDNN's convolution kernels do allocate such buffers through PyTorch's allocator (reorders
into blocked layouts, scratchpads): the weight-gradient kernel of a 1x1 convolution from 256
channels at 120 x 120 took 7.95 MiB in bfloat16 and 0.02 MiB in float32 (PyTorch's profiler
on torch 2.13.0+cpu), enough to move a small bfloat16 step's peak by 5%.

:class:`KernelScratch` measures it the way the harness measures a step: it runs the op for
real, under PyTorch's profiler, on random tensors with the op's own dtypes, channels,
kernel, strides, dilations and memory formats at two small spatial sizes, batch 1, and
extrapolates linearly in the input's height x width. Not in the batch: the kernels work
image by image (resnet50 at batch 4, 64 x 64 maps: the logits' weight-gradient scratch was
2.29 MiB, one image's share of the 7.95 MiB at 120 x 120). One pair of runs per distinct
convolution, cached; transposed convolutions are not probed (the model has none).

A map no larger than the larger probe is run as it is, at its own batch, height and width:
that run costs no more than a probe, and below the probes the linear fit is no guide
(mobilenetv2's bfloat16 depthwise weight gradient at 3 x 960 x 8 x 8 took 4.2 MiB where the
fit from 16 and 32 px said 18.5, and 10.4 MiB at 3 x 576 x 8 x 8, as the fit said).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

#: Spatial sizes (px) of the two real runs a convolution's scratch is extrapolated from.
PROBE_SIZES_PX = (16, 32)


def allocated_totals(prof) -> list[tuple[str, int]]:
    """A finished CPU profile's allocator totals in time order, in bytes above the level at
    which the profile began: ``("", bytes)`` after each allocation or free, and
    ``(name, bytes)`` for each range named ``histoseg::<name>``
    (``torch.profiler.record_function``).

    The profiler's ``Total Allocated`` is a running total kept across a process's
    profiles, moved only by what happens while one runs (a tensor allocated in one profile
    and freed outside any stays counted), so each profile is read from its own start.
    """
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "trace.json"
        prof.export_chrome_trace(str(path))
        events = json.loads(path.read_text())["traceEvents"]
    events.sort(key=lambda e: float(e.get("ts", 0)))
    totals, total, start = [], 0, None
    for event in events:
        name = event.get("name", "")
        if name == "[memory]":
            if start is None:
                start = int(event["args"]["Total Allocated"]) - int(event["args"]["Bytes"])
            total = int(event["args"]["Total Allocated"]) - start
            totals.append(("", total))
        elif name.startswith("histoseg::"):
            totals.append((name.split("::", 1)[1], total))
    return totals


class KernelScratch:
    """``scratch(func, args)``: the bytes the CPU kernel of ``func`` (a convolution or its
    backward, as a dispatch mode sees them) allocates beyond its outputs, for its args'
    sizes; 0 for any other op."""

    def __init__(self, torch):
        self._torch = torch
        self._ops = {
            torch.ops.aten.convolution.default: False,
            torch.ops.aten.convolution_backward.default: True,
        }
        self._fits: dict[tuple, tuple[float, float]] = {}
        self._exact: dict[tuple, int] = {}

    def __call__(self, func, args) -> int:
        backward = self._ops.get(func)
        if backward is None:
            return 0
        x, weight = (args[1], args[2]) if backward else (args[0], args[1])
        geometry = args[4:10] if backward else args[3:9]  # stride ... groups
        if geometry[3] or x.ndim != 4:  # transposed, or not 2-D
            return 0
        absent = tuple(a is None for a in args[:3])
        key = (
            func,
            x.dtype,
            tuple(weight.shape),
            absent,
            _formats(self._torch, args),
            repr(args[3:]),
        )
        area = x.shape[2] * x.shape[3]
        if area <= max(PROBE_SIZES_PX) ** 2:  # as small as a probe: run it as it is
            exact = (*key, tuple(x.shape))
            if exact not in self._exact:
                self._exact[exact] = self._run(func, args, backward, x.shape[0], x.shape[2:])
            return self._exact[exact]
        if key not in self._fits:
            self._fits[key] = self._fit(func, args, backward)
        a, b = self._fits[key]
        # Per image: at batch 4 the logits' weight-gradient kernel took one image's scratch.
        return max(0, round(a + b * area))

    def _fit(self, func, args, backward: bool) -> tuple[float, float]:
        y1, y2 = (self._run(func, args, backward, 1, (s, s)) for s in PROBE_SIZES_PX)
        a1, a2 = (s * s for s in PROBE_SIZES_PX)
        b = (y2 - y1) / (a2 - a1)
        return y1 - b * a1, b

    def _run(self, func, args, backward: bool, batch: int, hw: tuple[int, int]) -> int:
        """Scratch bytes of one real run of ``func`` on ``batch`` x C x ``hw`` inputs."""
        torch = self._torch
        from torch.profiler import ProfilerActivity, profile
        from torch.utils._python_dispatch import _disable_current_modes

        with _disable_current_modes():  # real tensors, outside the fake mode
            tensors = _real_inputs(torch, args, backward, batch, hw)
            func(*tensors, *args[3:])  # first call: oneDNN's primitive caches
            with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
                outputs = func(*tensors, *args[3:])
            flat = outputs if isinstance(outputs, (tuple, list)) else (outputs,)
            kept = sum(t.untyped_storage().nbytes() for t in flat if isinstance(t, torch.Tensor))
        peak = max((total for _, total in allocated_totals(prof)), default=0)
        return max(0, peak - kept)


def _real_inputs(torch, args, backward: bool, batch: int, hw: tuple[int, int]) -> list[Any]:
    """Random real tensors for a convolution (or its backward) with ``args``' dtypes,
    channels, kernel and memory formats, on ``batch`` x C x ``hw`` inputs."""
    if backward:
        grad, x, weight = args[:3]
        stride, padding, dilation = args[4:7]
        out_hw = [
            (size + 2 * p - d * (k - 1) - 1) // s + 1
            for size, p, d, k, s in zip(
                hw, padding, dilation, weight.shape[2:], stride, strict=True
            )
        ]
        return [
            _like(torch, grad, (batch, grad.shape[1], *out_hw)),
            _like(torch, x, (batch, x.shape[1], *hw)),
            _like(torch, weight, tuple(weight.shape)),
        ]
    x, weight, bias = args[:3]
    return [
        _like(torch, x, (batch, x.shape[1], *hw)),
        _like(torch, weight, tuple(weight.shape)),
        None if bias is None else _like(torch, bias, tuple(bias.shape)),
    ]


def _formats(torch, args) -> tuple[bool, ...]:
    """Which tensor arguments are channels-last (the kernel path depends on it)."""
    return tuple(
        a.is_contiguous(memory_format=torch.channels_last) and not a.is_contiguous()
        for a in args
        if isinstance(a, torch.Tensor) and a.ndim == 4
    )


def _like(torch, like: Any, shape: tuple[int, ...]):
    """A real random tensor of ``shape`` with ``like``'s dtype and memory format."""
    t = torch.randn(shape).to(like.dtype)
    if len(shape) == 4 and like.is_contiguous(memory_format=torch.channels_last):
        t = t.contiguous(memory_format=torch.channels_last)
    return t
