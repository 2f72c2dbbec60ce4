"""Keras's torch backend in the memory harness: each step measured and replayed.

The rest of the suite has Keras loaded with TensorFlow, and a process picks its Keras
backend once, so every torch step here runs in a process of its own (``bench.memory``,
which replays the config on fake tensors and measures it in a ``bench.worker``, or a small
script).

The CPU case draws its config at random on every run (every backbone, width, stride,
optimizer, precision, remat mode and batch 1-4, at a small patch) and holds the replay to
5% of the measured activations and step peak; the seed is in every failure message, and
``HISTOSEG_MEMORY_SEED=<seed> pytest`` replays it.
"""

from __future__ import annotations

import importlib.util
import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from bench.config import sample_configs
from histoseg.memory.devices import cpu_computes_bfloat16, nvml_memory

ROOT = Path(__file__).resolve().parents[2]
TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(
    not TORCH, reason="PyTorch is not installed (bash scripts/setup.sh installs its CPU build)"
)
SEED = int(os.environ.get("HISTOSEG_MEMORY_SEED") or random.SystemRandom().randrange(10**6))
TINY = ["--backbone", "mobilenetv2", "--backbone-option", "alpha=0.35", "--steps", "2"]


def _python(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if k != "KERAS_BACKEND"}
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        env={**clean, **(env or {})},
        cwd=ROOT,
        timeout=600,
    )


def _torch_cuda() -> bool:
    if not TORCH:
        return False
    out = _python("-c", "import torch; print(torch.cuda.is_available())")
    return out.stdout.strip() == "True"


def test_without_torch_the_torch_backend_is_one_line(tmp_path):
    """PyTorch hidden from the process (as if not installed): one line, exit 2, no file."""
    (tmp_path / "sitecustomize.py").write_text('import sys\nsys.modules["torch"] = None\n')
    out_path = tmp_path / "t.json"
    out = _python(
        "-m", "bench.memory", "--backend", "torch", "--sizes", "64", "--out", str(out_path),
        env={"PYTHONPATH": f"{tmp_path}{os.pathsep}{ROOT}"},
    )  # fmt: skip
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "error: PyTorch is not installed; `bash scripts/setup.sh` installs its CPU build "
        "(HISTOSEG_TORCH=0 skips it)"
    ]
    assert not out_path.exists()


def test_show_prints_the_committed_gpu_rows_without_torch():
    out = _python("-m", "bench.memory", "--show", "--out", "results/memory_torch_gpu.json")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].split()[:4] == ["patch", "batch", "mode", "model"]
    row = ["2048", "1", "train", "xception65", "os16", "adam", "float32", "none", "gpu", "ok"]
    assert any(line.split()[:10] == row for line in lines)


def _draw(seed: int):
    """The first config of the draw for ``seed`` that this CPU runs in seconds, on the torch
    backend: float32, or bfloat16 where the CPU computes it (float16 convolutions take
    minutes even at 128 px)."""
    kept = ("float32", "mixed_bfloat16") if cpu_computes_bfloat16() else ("float32",)
    for config in sample_configs(32, seed, sizes_px=(64, 96, 128), max_megapixels=0.04):
        if config.precision in kept:
            return config.replace(backend="torch", steps=1)
    raise AssertionError(f"seed {seed}: no {' or '.join(kept)} config in 32 draws")


def _sweep_args(config) -> list[str]:
    """``bench.memory`` options that sweep exactly ``config``."""
    options = [f"--backbone-option={k}={v}" for k, v in config.backbone_options]
    return [
        "--backend", "torch", "--sizes", str(config.patch_size),
        "--batch-sizes", str(config.batch_size), "--backbone", config.backbone, *options,
        "--output-stride", str(config.output_stride), "--precision", config.precision,
        "--remat", config.remat, "--optimizer", config.optimizer, "--steps", "1", "--quiet",
    ]  # fmt: skip


@needs_torch
def test_a_random_torch_step_is_replayed_within_5_percent(tmp_path):
    config = _draw(SEED)
    where = f"seed {SEED} (HISTOSEG_MEMORY_SEED={SEED} replays it): {config.to_json()}"
    out_path = tmp_path / "torch.json"
    out = _python("-m", "bench.memory", *_sweep_args(config), "--out", str(out_path))
    assert out.returncode == 0, f"{where}: {out.stderr[-2000:]}"
    (row,) = json.loads(out_path.read_text())
    assert row["status"] == "ok", f"{where}: {row.get('reason')}"
    assert row["config"] == config.as_dict(), where
    measured, predicted = row["measured"], row["predicted"]
    assert predicted["method"] == "replay"
    for figure in ("activation_bytes", "peak_bytes"):
        error = predicted[figure] / measured[figure] - 1
        assert abs(error) <= 0.05, f"{where}: {figure} predicted {error:+.1%} off"


@needs_torch
def test_no_tensor_of_a_remat_step_waits_for_the_garbage_collector():
    """Under remat every recomputed activation is freed by reference counting alone: with
    the collector off, a step leaves no tensor in a reference cycle (it left hundreds, and
    under remat the step's peak then depended on when the collector ran)."""
    script = textwrap.dedent(
        """
        import gc
        from histoseg.config import StepConfig
        from histoseg.memory.torch_replay import build_training, torch_backend, train_step
        torch = torch_backend()
        config = StepConfig(patch_size=64, backbone="xception65", remat="full", steps=1)
        model, optimizer, images, masks = build_training(config)
        train_step(model, optimizer, images, masks)
        gc.collect()
        gc.disable()
        gc.set_debug(gc.DEBUG_SAVEALL)
        train_step(model, optimizer, images, masks)
        gc.collect()
        print(sum(isinstance(o, torch.Tensor) for o in gc.garbage))
        """
    )
    out = _python("-c", script)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-1] == "0", "tensors left in reference cycles"


@needs_torch
def test_a_convolutions_scratch_is_extrapolated_from_two_small_runs():
    """oneDNN's bfloat16 weight-gradient kernel allocates a scratch buffer that no fake
    tensor shows; probed at 16 and 32 px, it is predicted at 96 px within 10%. On a CPU
    without AVX-512 the kernel takes no scratch, and the probe must find none."""
    script = textwrap.dedent(
        """
        import torch
        from torch.profiler import ProfilerActivity, profile
        from histoseg.memory.kernel_scratch import KernelScratch, allocated_totals
        backward = torch.ops.aten.convolution_backward.default

        def args(size):
            def tensor(*shape):
                t = torch.randn(*shape).to(torch.bfloat16)
                return t.contiguous(memory_format=torch.channels_last)
            x, grad, w = tensor(1, 256, size, size), tensor(1, 2, size, size), tensor(2, 256, 1, 1)
            return grad, x, w, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [True, True, False]

        real = args(96)
        backward(*real)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            outputs = backward(*real)
        kept = sum(t.untyped_storage().nbytes() for t in outputs if t is not None)
        measured = max(total for _, total in allocated_totals(prof)) - kept
        print(measured, KernelScratch(torch)(backward, real))
        """
    )
    out = _python("-c", script)
    assert out.returncode == 0, out.stderr[-2000:]
    measured, predicted = (int(v) for v in out.stdout.split()[-2:])
    if measured == 0:  # this CPU's kernel (seen on an AVX2-only AMD EPYC)
        assert predicted == 0, predicted
        return
    assert measured > 1 << 20, "the kernel allocates little scratch: retire the probe?"
    assert abs(predicted / measured - 1) <= 0.10, (predicted, measured)


@needs_torch
def test_fused_torch_batch_norm_is_keras_batch_norm():
    """histoseg's BatchNorm runs PyTorch's fused kernel under the torch backend: the same
    outputs, input and weight gradients and moving statistics as Keras's layer."""
    script = textwrap.dedent(
        """
        import numpy as np
        from histoseg.memory.torch_replay import torch_backend
        torch = torch_backend()
        import keras
        from histoseg.models.layers import BatchNorm
        rng = np.random.default_rng(0)
        x = rng.normal(2.0, 3.0, size=(2, 6, 5, 4)).astype("float32")
        layers = BatchNorm(momentum=0.9), keras.layers.BatchNormalization(momentum=0.9)
        gamma = rng.normal(1.0, 0.1, 4).astype("float32")
        results = []
        for layer in layers:
            layer.build(x.shape)
            layer.gamma.assign(gamma)
            layer.beta.assign(np.arange(4, dtype="float32"))
            t = torch.tensor(x, requires_grad=True)
            y = layer(t, training=True)
            (y**3 * torch.arange(4.0)).sum().backward()
            results.append([y.detach().numpy(), t.grad.numpy(), layer.gamma.value.grad.numpy(),
                            layer.beta.value.grad.numpy(), layer.moving_mean.numpy(),
                            layer.moving_variance.numpy()])
        print(max(float(np.abs(a - b).max() / np.abs(b).max()) for a, b in zip(*results)))
        """
    )
    out = _python("-c", script)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.split()[-1]) < 1e-5


@pytest.mark.gpu
@pytest.mark.skipif(not _torch_cuda(), reason="needs PyTorch with a CUDA GPU")
def test_gpu_steps_are_replayed_within_5_percent(tmp_path):
    out_path = tmp_path / "torch.json"
    out = _python(
        "-m", "bench.memory", "--backend", "torch", "--device", "gpu", "--sizes", "128", "256",
        "--remat", "none", "full", *TINY, "--out", str(out_path),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    rows = json.loads(out_path.read_text())
    assert len(rows) == 4
    for row in rows:
        assert row["status"] == "ok" and row["config"]["backend"] == "torch"
        m, p = row["measured"], row["predicted"]
        assert m["reserved_peak_bytes"] >= m["peak_bytes"]
        assert m["gpu_used_bytes"] >= m["peak_bytes"]
        assert row["machine"]["gpu"], "NVML should name the GPU in machine info"
        assert abs(p["peak_bytes"] / m["peak_bytes"] - 1) <= 0.05, row["config"]


@pytest.mark.gpu
@pytest.mark.skipif(nvml_memory(0) is None, reason="NVML sees no GPU here")
def test_nvml_reports_the_card():
    info = nvml_memory(0)
    assert info["total"] > 0 and 0 <= info["used"] <= info["total"]
    assert info["free"] <= info["total"]
