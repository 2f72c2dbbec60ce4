"""Memory sizes: parse "24GB" / "80GiB", format bytes, and ask how much a device has free."""

from __future__ import annotations

import re

from histoseg.errors import ConfigError

_UNITS = {
    "": 1,
    "B": 1,
    "K": 10**3,
    "KB": 10**3,
    "M": 10**6,
    "MB": 10**6,
    "G": 10**9,
    "GB": 10**9,
    "T": 10**12,
    "TB": 10**12,
    "KIB": 2**10,
    "MIB": 2**20,
    "GIB": 2**30,
    "TIB": 2**40,
}
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*$")


def parse_size(text: str | int | float) -> int:
    """Bytes in a size written like ``"24GB"``, ``"80GiB"``, ``"512 MB"`` or ``1e9``.

    GB, MB, KB are powers of ten (how card vendors write memory); GiB, MiB, KiB powers of two.

    Raises:
        ConfigError: the text is not a size.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0:
            raise ConfigError(f"memory size must not be negative, got {text!r}")
        return int(text)
    match = _SIZE.match(str(text))
    unit = match.group(2).upper() if match else None
    if not match or unit not in _UNITS:
        raise ConfigError(
            f"cannot read memory size {text!r}; write a number with a unit such as "
            "24GB, 80GiB or 512MB"
        )
    return round(float(match.group(1)) * _UNITS[unit])


def format_bytes(n: float | None, unit: str = "GB") -> str:
    """``24800000000 -> "24.8 GB"`` (decimal units, as :func:`parse_size` reads them)."""
    if n is None:
        return "-"
    scale = {"GB": 1e9, "MB": 1e6, "KB": 1e3}[unit]
    value = n / scale
    return f"{value:.1f} {unit}" if abs(value) >= 1 or unit != "GB" else f"{n / 1e6:.0f} MB"


def available_bytes(device: str) -> int | None:
    """Memory a new process could use on ``device`` now, or None when it has none.

    CPU: psutil's available RAM (free + reclaimable cache). GPU: NVML's free memory of GPU 0
    (None when NVML sees no GPU).
    """
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().available)
    if device == "gpu":
        free = nvml_memory(0)
        return None if free is None else free["free"]
    raise ConfigError(f"device {device!r} is not one of cpu, gpu")


#: Process memory beyond the allocator peak on the CPU: libraries, the traced graph and
#: malloc caching (docs/memory-harness.md has the measurement it covers).
CPU_PROCESS_OVERHEAD_BYTES = 1_500_000_000


#: The relative part of the band every memory prediction is planned with (the share of the
#: predicted peak a measurement may exceed it by).
PEAK_ERROR_BAND = 0.05

#: The absolute part of the band: bytes TensorFlow's BFC allocator may hand out beyond
#: what the step requests. BFC gives a request a whole free chunk when the chunk is under
#: twice the request, and which chunks are free depends on the order of the step's frees,
#: which the estimate does not replay exactly. On steps of a few hundred megabytes this
#: waste is a larger share than on big ones (docs/memory-harness.md, "The planning band").
CHUNK_WASTE_ALLOWANCE_BYTES = 96 * 2**20


def planned_bytes(peak_bytes: int) -> int:
    """The bytes to plan for a predicted peak: the peak, plus :data:`PEAK_ERROR_BAND` of it,
    plus :data:`CHUNK_WASTE_ALLOWANCE_BYTES`. tests/memory/test_error_band.py holds every
    measured row in results/ to it, tests/memory/test_random_configs.py a fresh random
    draw per run."""
    return round(peak_bytes * (1 + PEAK_ERROR_BAND)) + CHUNK_WASTE_ALLOWANCE_BYTES


def fit_problem(peak_bytes: int, device: str, processes: int = 1) -> str | None:
    """Why a train step predicted to peak at ``peak_bytes`` cannot run on ``device`` now.

    Compares the peak plus its error band (:func:`planned_bytes`; plus
    :data:`CPU_PROCESS_OVERHEAD_BYTES` on the CPU), times ``processes`` (the ranks of a
    patch cut across ranks, all on this machine), with :func:`available_bytes`.

    Returns:
        A reason such as ``"predicted 26.5 GB (+1.3 GB error band, +1.5 GB process
        overhead) > 21.9 GB free"`` (``"2 ranks x predicted ..."``), or None when it
        should fit.
    """
    free = available_bytes(device)
    if free is None:
        return f"no {device.upper()} memory information (NVML sees no GPU)"
    band = planned_bytes(peak_bytes) - peak_bytes
    overhead = CPU_PROCESS_OVERHEAD_BYTES if device == "cpu" else 0
    if processes * (peak_bytes + band + overhead) > free:
        extra = f" (+{format_bytes(band)} error band"
        extra += f", +{format_bytes(overhead)} process overhead)" if overhead else ")"
        ranks = f"{processes} ranks x " if processes > 1 else ""
        return f"{ranks}predicted {format_bytes(peak_bytes)}{extra} > {format_bytes(free)} free"
    return None


def total_bytes(device: str) -> int | None:
    """Total memory of ``device`` (RAM on CPU, GPU 0 on GPU), or None when absent."""
    if device == "cpu":
        import psutil

        return int(psutil.virtual_memory().total)
    if device == "gpu":
        info = nvml_memory(0)
        return None if info is None else info["total"]
    raise ConfigError(f"device {device!r} is not one of cpu, gpu")


def nvml_memory(index: int = 0) -> dict[str, int] | None:
    """NVML's view of GPU ``index``: {"total", "free", "used"} bytes, or None without a GPU."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:  # NVMLError_* when there is no driver or no GPU
        return None
    try:
        if index >= pynvml.nvmlDeviceGetCount():
            return None
        info = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(index))
        return {"total": int(info.total), "free": int(info.free), "used": int(info.used)}
    finally:
        pynvml.nvmlShutdown()


def tensorflow_sees_gpu() -> bool:
    """Whether TensorFlow lists a GPU (without creating a context or taking its memory)."""
    import tensorflow as tf

    return bool(tf.config.list_physical_devices("GPU"))


def cpu_computes_bfloat16() -> bool:
    """Whether this CPU has bfloat16 instructions (AVX-512 BF16 or AMX-BF16, read from
    /proc/cpuinfo; True where that cannot be read). Without them TensorFlow and PyTorch
    emulate bfloat16 convolutions, more than ten times slower than float32."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            flags = cpuinfo.read()
    except OSError:
        return True
    return "avx512_bf16" in flags or "amx_bf16" in flags
