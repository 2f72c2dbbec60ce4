"""Measured memory: the allocator, RSS and NVML probes."""

import pytest
import tensorflow as tf

from histoseg.memory.devices import nvml_memory
from histoseg.memory.probe import MemoryProbe, allocator_info, rss_bytes, rss_peak_bytes


def test_cpu_allocator_counts_a_large_tensor_and_its_peak():
    probe = MemoryProbe("CPU:0")
    probe.reset_peak()
    before = probe.snapshot().allocator_current_bytes or 0
    kept = tf.fill([1024, 1024], 1.0) + 0.0  # 4 MiB, above the small-buffer floor
    after = probe.snapshot()
    assert after.allocator_current_bytes - before >= 4 * 2**20
    assert after.allocator_peak_bytes >= after.allocator_current_bytes
    assert allocator_info("CPU:0")["current"] >= 4 * 2**20
    del kept


def test_rss_peak_is_at_least_current_rss():
    # RSS first: the peak only grows, so a peak read after it is at least as large (the
    # other way round, TensorFlow's threads may grow RSS between the two reads)
    now = rss_bytes()
    assert rss_peak_bytes() >= now > 0
    snapshot = MemoryProbe("CPU:0").snapshot()
    assert snapshot.gpu_used_bytes is None
    assert set(snapshot.as_dict()) >= {"rss_bytes", "rss_peak_bytes", "allocator_peak_bytes"}


@pytest.mark.gpu
@pytest.mark.skipif(
    not tf.config.list_physical_devices("GPU"), reason="no GPU visible to TensorFlow here"
)
def test_gpu_allocator_and_nvml_see_a_tensor():
    with tf.device("GPU:0"):
        kept = tf.fill([1024, 1024], 1.0) + 0.0
    snapshot = MemoryProbe("GPU:0").snapshot()
    assert snapshot.allocator_current_bytes >= 4 * 2**20
    assert snapshot.gpu_used_bytes is not None and snapshot.gpu_used_bytes > 0
    assert nvml_memory(0)["total"] > 0
    del kept
