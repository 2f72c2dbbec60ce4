"""The tf.data pipeline: patch lists -> (image uint8 [B,P,P,3], mask uint8 [B,P,P]) batches.

Reads run in parallel on tf.data's threads: OpenSlide decodes JPEG tiles with the GIL
released, and each process opens every slide once (handles are cached; OpenSlide is
thread-safe), so a patch costs one region read and one polygon fill. Images stay uint8 all
the way; :func:`normalize` turns them into floats at the model's edge.

Example:
    >>> refs = load_patches("patches.csv")
    >>> ds = make_dataset(shard(refs, rank, size), batch_size=2, augment=True)
    >>> images, masks = next(iter(ds))
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np
import tensorflow as tf

from histoseg import errors
from histoseg.errors import ConfigError, HistosegError
from histoseg.wsi.annotations import Annotations
from histoseg.wsi.patches import PatchRef, load_patches
from histoseg.wsi.slide import Slide, open_slide

_lock = threading.Lock()
_slides: dict[str, Slide] = {}
_annotations: dict[str | None, Annotations] = {}
_owner_pid = os.getpid()


def _check_fork() -> None:
    """Forget handles inherited through fork: OpenSlide handles are per process."""
    global _owner_pid
    if os.getpid() != _owner_pid:
        _slides.clear()
        _annotations.clear()
        _owner_pid = os.getpid()


def cached_slide(path: str) -> Slide:
    """The process-wide open handle of a slide (opened on first use)."""
    with _lock:
        _check_fork()
        slide = _slides.get(path)
        if slide is None:
            slide = _slides[path] = open_slide(path)
        return slide


def cached_annotations(path: str | None) -> Annotations:
    """The parsed annotations of an XML (None: no tumour), parsed once per process."""
    with _lock:
        _check_fork()
        annotations = _annotations.get(path)
        if annotations is None:
            annotations = _annotations[path] = Annotations.from_xml(path)
        return annotations


def close_cached() -> None:
    """Close every cached slide handle (tests, long-lived processes)."""
    with _lock:
        for slide in _slides.values():
            slide.close()
        _slides.clear()
        _annotations.clear()


def read_patch(ref: PatchRef) -> tuple[np.ndarray, np.ndarray]:
    """Image (P, P, 3) uint8 RGB and mask (P, P) uint8 (0 background, 1 tumour) of a patch."""
    slide = cached_slide(ref.slide_path)
    downsample = slide.level_downsamples[ref.level]
    size = (ref.patch_size, ref.patch_size)
    image = slide.read_region((ref.x, ref.y), ref.level, size)
    mask = cached_annotations(ref.annotations_path).rasterize(
        ref.region_level0(downsample), downsample, size_px=size
    )
    return image, mask


def augment_patch(image: np.ndarray, mask: np.ndarray, code: int) -> tuple[np.ndarray, np.ndarray]:
    """One of the 8 flips/90-degree rotations (``code`` % 8), the same for image and mask."""
    k, flip = code % 4, (code // 4) % 2
    if flip:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if k:
        image, mask = np.rot90(image, k), np.rot90(mask, k)
    return np.ascontiguousarray(image), np.ascontiguousarray(mask)


def normalize(image: tf.Tensor) -> tf.Tensor:
    """uint8 RGB -> float32 in [-1, 1], the input scale of the DeepLab backbones."""
    return tf.cast(image, tf.float32) / 127.5 - 1.0


def _check_sources(refs: Sequence[PatchRef]) -> None:
    """Open every slide and parse every XML once, up front: a missing or unreadable file is
    a SlideError/AnnotationError here, not an opaque error from inside tf.data later."""
    levels: dict[str, int] = {}
    for ref in refs:
        levels[ref.slide_path] = max(levels.get(ref.slide_path, 0), ref.level)
    for path, level in levels.items():
        cached_slide(path).check_level(level)
    for path in {ref.annotations_path for ref in refs}:
        cached_annotations(path)


def make_dataset(
    patch_refs: Sequence[PatchRef] | str | Path,
    batch_size: int,
    *,
    shuffle: bool = True,
    seed: int = 0,
    augment: bool = False,
    repeat: bool = True,
    num_parallel_reads: int = tf.data.AUTOTUNE,
    drop_remainder: bool = True,
) -> tf.data.Dataset:
    """A dataset of ``(image uint8 [B,P,P,3], mask uint8 [B,P,P])`` batches.

    Args:
        patch_refs: PatchRefs (all of one patch size) or a CSV patch list.
        batch_size: patches per batch.
        shuffle: reshuffle the patch order every epoch (deterministic for ``seed``).
        seed: seed of the shuffle and the augmentation.
        augment: random flips and 90-degree rotations, same for image and mask.
        repeat: cycle forever (training); False stops after one pass.
        num_parallel_reads: concurrent patch reads (default: tf.data picks).
        drop_remainder: drop a last, smaller batch so every batch has a static shape.

    Raises:
        ConfigError: empty list, mixed patch sizes, bad batch size.
        SlideError, AnnotationError: a slide or XML of the list is missing or unreadable.
    """
    if isinstance(patch_refs, (str, Path)):
        patch_refs = load_patches(patch_refs)
    refs = list(patch_refs)
    if not refs:
        raise ConfigError("make_dataset needs at least one patch; the patch list is empty")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    sizes = sorted({r.patch_size for r in refs})
    if len(sizes) != 1:
        raise ConfigError(f"all patches of a dataset must have one patch size, got {sizes}")
    if drop_remainder and not repeat and len(refs) < batch_size:
        raise ConfigError(
            f"{len(refs)} patches make no full batch of {batch_size} (drop_remainder=True)"
        )
    patch_px = sizes[0]
    _check_sources(refs)

    def load(index: np.ndarray, code: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        image, mask = read_patch(refs[int(index)])
        if augment:
            image, mask = augment_patch(image, mask, int(code))
        return image, mask

    def load_tf(index: tf.Tensor, code: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, mask = tf.numpy_function(load, [index, code], [tf.uint8, tf.uint8], stateful=False)
        image.set_shape((patch_px, patch_px, 3))
        mask.set_shape((patch_px, patch_px))
        return image, mask

    ds = tf.data.Dataset.range(len(refs))
    if shuffle:
        ds = ds.shuffle(len(refs), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()
    codes = tf.data.Dataset.random(seed=seed).map(lambda r: tf.math.floormod(r, 8))
    ds = tf.data.Dataset.zip((ds, codes))
    ds = ds.map(load_tf, num_parallel_calls=num_parallel_reads, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.AUTOTUNE)


# A HistosegError raised inside tf.numpy_function (a corrupt tile, a bad XML) reaches the
# consumer of the dataset as a tf.errors.OpError whose message holds "SlideError: <text>"
# among TensorFlow's node names and the Python traceback; this finds that line again.
_WRAPPED_ERROR_RE = re.compile(r"\b([A-Z]\w*Error): ([^\n]+)")


def unwrap_histoseg_error(exc: tf.errors.OpError) -> HistosegError | None:
    """The project error wrapped in a TensorFlow error from a dataset read, or None.

    Args:
        exc: what TensorFlow raised while producing a batch.

    Returns:
        A new error of the same HistosegError subclass with the original one-line message
        (naming the slide or XML file), or None when ``exc`` wraps no project error.
    """
    for name, message in _WRAPPED_ERROR_RE.findall(exc.message or ""):
        cls = getattr(errors, name, None)
        if isinstance(cls, type) and issubclass(cls, HistosegError):
            return cls(message.strip())
    return None


def iterate_batches(batches: Iterable[tuple[tf.Tensor, tf.Tensor]]) -> Iterator[tuple]:
    """Iterate over ``batches`` (a make_dataset dataset or iterator) with readable errors.

    A slide or annotation error raised while reading a patch is re-raised as that
    HistosegError (one line through ``histoseg.cli.run_main``) instead of TensorFlow's
    wrapped error with a traceback; other TensorFlow errors propagate unchanged.
    """
    iterator = iter(batches)
    while True:
        try:
            batch = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as exc:
            error = unwrap_histoseg_error(exc)
            if error is None:
                raise
            raise error from exc
        yield batch
