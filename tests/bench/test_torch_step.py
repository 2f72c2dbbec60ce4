"""bench.torch_step: the model's train step under Keras's PyTorch backend.

Each case runs the command in its own process: the rest of the suite has Keras loaded with
TensorFlow, and a process picks its Keras backend once.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.memory.devices import nvml_memory

ROOT = Path(__file__).resolve().parents[2]
TORCH = importlib.util.find_spec("torch") is not None
TINY = ["--backbone", "mobilenetv2", "--backbone-option", "alpha=0.35", "--steps", "2"]


def _torch_cuda() -> bool:
    if not TORCH:
        return False
    out = subprocess.run(
        [sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
        capture_output=True,
        text=True,
    )
    return out.stdout.strip() == "True"


def _run(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("KERAS_BACKEND", None)
    return subprocess.run(
        [sys.executable, "-m", "bench.torch_step", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )


@pytest.mark.skipif(TORCH, reason="PyTorch is installed here")
def test_without_torch_says_so_in_one_line(tmp_path):
    out = _run("--sizes", "128", "--out", str(tmp_path / "t.json"))
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "error: PyTorch is not installed; bench.torch_step runs where PyTorch is (the "
        "TensorFlow harness is python -m bench.memory)"
    ]
    assert not (tmp_path / "t.json").exists()


def test_show_prints_the_committed_gpu_rows_without_torch():
    out = _run("--show", "--out", str(ROOT / "results" / "memory_torch_gpu.json"))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["patch", "batch", "mode", "model"]
    row = ["2048", "1", "train", "xception65", "os16", "adam", "float32", "none", "gpu", "ok"]
    assert any(line.split()[:10] == row for line in lines)


@pytest.mark.skipif(not TORCH, reason="needs PyTorch (not a project dependency)")
def test_a_cpu_step_runs_under_the_torch_backend(tmp_path):
    """The same step on the CPU: weights and optimizer state, no allocator figures (the
    CUDA allocator's statistics are what this harness reads)."""
    out_path = tmp_path / "torch.json"
    out = _run("--device", "cpu", "--sizes", "64", *TINY, "--out", str(out_path))
    assert out.returncode == 0, out.stderr[-2000:]
    (row,) = json.loads(out_path.read_text())
    assert row["status"] == "ok" and row["extra"]["backend"] == "torch"
    m = row["measured"]
    assert m["weights_bytes"] > 0 and m["optimizer_bytes"] > m["weights_bytes"]
    assert m["peak_bytes"] is None and len(m["step_times_s"]) == 2


@pytest.mark.gpu
@pytest.mark.skipif(not _torch_cuda(), reason="needs PyTorch with a CUDA GPU")
def test_gpu_step_memory_scales_with_patch_area(tmp_path):
    out_path = tmp_path / "torch.json"
    out = _run("--sizes", "128", "256", *TINY, "--out", str(out_path))
    assert out.returncode == 0, out.stderr[-2000:]
    rows = {r["config"]["patch_size"]: r for r in json.loads(out_path.read_text())}
    assert set(rows) == {128, 256}
    for row in rows.values():
        assert row["status"] == "ok" and row["extra"]["backend"] == "torch"
        m = row["measured"]
        resident = m["weights_bytes"] + m["optimizer_bytes"]
        assert m["peak_bytes"] >= resident + m["activation_bytes"]
        assert m["reserved_peak_bytes"] >= m["peak_bytes"]
        assert m["gpu_used_bytes"] >= m["peak_bytes"]
        assert row["predicted"]["peak_bytes"] > 0
        assert row["machine"]["gpu"], "NVML should name the GPU in machine info"
    # Activations grow with the patch area: 4x the pixels, 4x the bytes (+-15%: the
    # image-pooling branch and BN statistics do not grow).
    ratio = rows[256]["measured"]["activation_bytes"] / rows[128]["measured"]["activation_bytes"]
    assert 3.4 < ratio < 4.6


@pytest.mark.gpu
@pytest.mark.skipif(nvml_memory(0) is None, reason="NVML sees no GPU here")
def test_nvml_reports_the_card():
    info = nvml_memory(0)
    assert info["total"] > 0 and 0 <= info["used"] <= info["total"]
    assert info["free"] <= info["total"]
