"""The train step under Keras's PyTorch backend, and its memory replayed on fake tensors.

PyTorch runs a step eagerly and frees a tensor's storage the moment the last tensor, view or
saved-for-backward reference to it goes, so what a step holds at any moment follows from
the program itself and from what autograd saves; there is no graph optimiser in between.
:func:`replay` therefore predicts a step by running it: the very step the harness measures
(:func:`train_step`), on PyTorch's fake tensors (``FakeTensorMode``: shapes, dtypes, views
and autograd, without memory or arithmetic), following every storage from the op that
makes it to the moment it is released (a weak reference on the storage, which PyTorch
keeps alive exactly as long as the storage). Nothing is fitted and no per-layer table is
kept, so the replay holds for any backbone, stride, precision, remat mode, optimizer, batch
and patch size the model builds with, in seconds, for patches no machine here could run.

What it counts is what the ops ask the allocator for. A kernel's own scratch no fake
tensor shows; on the CPU the convolutions' is probed by running each one for real at small
sizes (:mod:`histoseg.memory.kernel_scratch`), and the sum is what PyTorch's profiler
reports. The CUDA caching allocator counts each block rounded up to a multiple of
:data:`CUDA_BLOCK_BYTES` (the replay rounds too), may hand a large request up to 1 MiB more
(an unsplit remainder of a cached segment) and allocates cuDNN workspaces inside
convolutions, neither of which the replay sees: on a GPU it is a lower bound until a GPU
run has checked it (docs/torch-backend.md).

This module needs Keras on its torch backend: call :func:`torch_backend` before anything
imports Keras in the process (``bench.memory`` and ``bench.worker`` do, for backend "torch").
"""

from __future__ import annotations

import dataclasses
import os
import sys
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from histoseg.config import StepConfig
from histoseg.errors import EngineUnavailableError

#: The CUDA caching allocator rounds every request up to a multiple of 512 bytes.
CUDA_BLOCK_BYTES = 512


def torch_backend(device: str = "cpu"):
    """Select Keras's torch backend on ``device`` ("cpu" or "gpu") before Keras is imported,
    and return ``torch``. Keras puts its tensors on a GPU wherever one is visible unless
    told otherwise; the replay and a CPU config must run on the CPU even there.

    Raises:
        EngineUnavailableError: PyTorch is not installed, or Keras was already imported
            with another backend in this process.
    """
    keras = sys.modules.get("keras")
    if keras is not None and keras.backend.backend() != "torch":
        raise EngineUnavailableError(
            f"Keras is already loaded with the {keras.backend.backend()} backend; a torch "
            "config runs in its own process"
        )
    try:
        import torch
    except ImportError:
        raise EngineUnavailableError(
            "PyTorch is not installed; `bash scripts/setup.sh` installs its CPU build "
            "(HISTOSEG_TORCH=0 skips it)"
        ) from None
    from histoseg.startup import verbose

    if not verbose():  # PyTorch's profiler (the CPU measurement, the kernel probes) logs
        os.environ.setdefault("KINETO_LOG_LEVEL", "6")  # each start and stop at level 4
    os.environ["KERAS_BACKEND"] = "torch"
    os.environ["KERAS_TORCH_DEVICE"] = "cuda" if device == "gpu" else "cpu"
    from histoseg.models import torch_tree_fix

    torch_tree_fix.apply()
    return torch


def build_training(config: StepConfig, num_classes: int = 2, *, batch: bool = True):
    """The config's model, its optimizer (built: slots allocated) and one fixed synthetic
    uint8 batch (None, None without ``batch``) on the config's device."""
    torch = torch_backend(config.device)
    import keras

    from histoseg.models import build_for_step

    # Seeded for the step's sake, not the weights' (their values change no figure here);
    # keras.utils.set_random_seed would import TensorFlow wherever it is installed.
    torch.manual_seed(0)
    model = build_for_step(config, num_classes)
    if config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(1e-3)
    else:
        optimizer = keras.optimizers.SGD(1e-3, momentum=0.9)
    optimizer.build(model.trainable_variables)
    if not batch:
        return model, optimizer, None, None
    shape = (config.batch_size, config.patch_size, config.patch_size)
    generator = torch.Generator(device="cpu").manual_seed(0)
    images = torch.randint(0, 256, (*shape, 3), dtype=torch.uint8, generator=generator)
    masks = torch.randint(0, num_classes, shape, dtype=torch.uint8, generator=generator)
    device = "cuda" if config.device == "gpu" else "cpu"
    return model, optimizer, images.to(device), masks.to(device)


def train_step(model, optimizer, images, masks, mark: Callable[[str], None] = lambda _: None):
    """One train step as ``histoseg.train.step`` runs it (uint8 patches scaled to [-1, 1],
    pixel-wise softmax cross-entropy in float32, the optimizer's update), under Keras's
    torch backend. ``mark("forward")`` is called once the loss exists and
    ``mark("gradients")`` once every weight gradient does: where the harness reads the
    allocator (and where the replay reads its live bytes)."""
    import torch

    trainable = model.trainable_variables
    inputs = images.float() / 127.5 - 1.0
    logits = model(inputs, training=True)
    # Classes last in Keras; PyTorch's cross-entropy wants them second.
    loss = torch.nn.functional.cross_entropy(logits.float().permute(0, 3, 1, 2), masks.long())
    mark("forward")
    loss.backward()
    mark("gradients")
    optimizer.apply([v.value.grad for v in trainable], trainable)
    for v in trainable:
        v.value.grad = None


@dataclasses.dataclass(frozen=True)
class TorchStepMemory:
    """A torch-backend train step's memory, as a results row's ``predicted`` section; the
    figures mean what the harness's measured ones do (``bench.worker``)."""

    weights_bytes: int
    optimizer_bytes: int
    before_step_bytes: int
    activation_bytes: int
    gradient_bytes: int
    peak_bytes: int

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "method": "replay"}


def _live_storages(torch, block_bytes: int, scratch=None):
    """A dispatch mode that counts the bytes of every storage an op returns until the
    storage is released; ``track`` adds tensors made outside it (weights, the batch).
    ``scratch(func, args)``, if given, is what the op's kernel allocates inside itself:
    alive, with the op's outputs, only while it runs."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    class LiveStorages(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.live = self.peak = 0
            self.tracking = False
            self._refs: dict[int, Any] = {}

        def track(self, tensors: Iterable[Any]) -> None:
            for t in tensors:
                if not isinstance(t, torch.Tensor):
                    continue
                storage = t.untyped_storage()
                key = id(storage)
                if key in self._refs:
                    continue
                nbytes = -(-storage.nbytes() // block_bytes) * block_bytes
                self.live += nbytes
                self.peak = max(self.peak, self.live)
                self._refs[key] = weakref.ref(storage, self._released(key, nbytes))

        def _released(self, key: int, nbytes: int):
            def release(_ref) -> None:
                self.live -= nbytes
                self._refs.pop(key, None)

            return release

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func is torch.ops.aten._local_scalar_dense.default:
                # A tensor read into Python (SGD's learning rate as ``alpha``): a fake
                # tensor has no value, and the step's memory does not depend on it.
                return False if args[0].dtype == torch.bool else 1
            out = func(*args, **(kwargs or {}))
            if func is torch.ops.aten.native_batch_norm.default and out[1].dtype != torch.float32:
                # The CPU kernel keeps the saved mean and inverse std in float32 whatever
                # the input's type (torch 2.13.0+cpu; the CUDA kernel's, its accumulation
                # type, is assumed the same, unchecked without a GPU); the fake (meta)
                # kernel gives them the input's type.
                out = (out[0], out[1].float(), out[2].float())
            if self.tracking:
                self.track(tree_leaves(out))
                if scratch is not None:
                    self.peak = max(self.peak, self.live + scratch(func, args))
            return out

    return LiveStorages()


def storage_bytes(tensors: Iterable[Any]) -> int:
    """Bytes of the storages behind ``tensors`` (each counted once per tensor)."""
    return int(sum(t.untyped_storage().nbytes() for t in tensors))


def replay(config: StepConfig, num_classes: int = 2) -> TorchStepMemory:
    """Predict ``config``'s torch-backend train step by running it on fake tensors (see the
    module docstring): a warm-up step, then one step whose live storage bytes are followed.

    The model is built for real on the CPU (its weights are initialised, a few seconds for
    Xception-65) and every variable is then swapped for a fake one of the same shape and
    dtype; the batch is fake from the start, so the replay needs no memory for the patch.
    """
    torch = torch_backend()
    import keras
    from torch._subclasses.fake_tensor import FakeTensorMode

    # The kernels' scratch (probed on the CPU) can depend on their thread count.
    torch.set_num_threads(config.threads)
    # Built on the CPU, whatever the config's device: what the step allocates does not
    # depend on where it runs, beyond the allocator's rounding and the kernels' scratch.
    model, optimizer, _, _ = build_training(config.replace(device="cpu"), num_classes, batch=False)
    variables = [*model.variables, *optimizer.variables]
    weights_bytes = storage_bytes(v.value for v in model.weights)
    optimizer_bytes = storage_bytes(v.value for v in optimizer.variables)
    from histoseg.memory.kernel_scratch import KernelScratch

    # A GPU's kernels (cuDNN's workspaces) would need the GPU to be probed.
    block, scratch = (
        (CUDA_BLOCK_BYTES, None) if config.device == "gpu" else (1, KernelScratch(torch))
    )
    reads: dict[str, int] = {}
    with FakeTensorMode(allow_non_fake_inputs=True):
        for v in variables:
            # Swapped in place of the real values: Keras's assignments copy into them.
            v._value = torch.nn.Parameter(
                torch.empty(v._value.shape, dtype=v._value.dtype),
                requires_grad=v._value.requires_grad,
            )
        shape = (config.batch_size, config.patch_size, config.patch_size)
        images = torch.empty((*shape, 3), dtype=torch.uint8)
        masks = torch.zeros(shape, dtype=torch.uint8)
        live = _live_storages(torch, block, scratch)
        with live:
            train_step(model, optimizer, images, masks)  # warm-up, as the harness runs it
            live.track([v.value for v in variables] + [images, masks])
            before = live.peak = live.live
            live.tracking = True
            train_step(model, optimizer, images, masks, lambda at: reads.update({at: live.live}))
    del model, optimizer, variables
    keras.backend.clear_session()
    return TorchStepMemory(
        weights_bytes=weights_bytes,
        optimizer_bytes=optimizer_bytes,
        before_step_bytes=before,
        activation_bytes=reads["forward"] - before,
        gradient_bytes=reads["gradients"] - before,
        peak_bytes=live.peak,
    )
