"""The BFC allocator model: its rules, and a replay of TensorFlow's own allocator trace."""

import json
import subprocess
import sys
import textwrap

import pytest

from histoseg.memory.bfc import FIRST_REGION_BYTES, BFCAllocator, rounded_bytes

MiB = 1 << 20


def test_requests_round_up_to_256_bytes():
    assert rounded_bytes(1) == 256
    assert rounded_bytes(256) == 256
    assert rounded_bytes(257) == 512


def test_a_chunk_under_twice_the_request_is_handed_out_whole():
    bfc = BFCAllocator()
    bfc.allocate("a", 3 * MiB)
    bfc.allocate("wall", 1 * MiB)  # keeps "a"'s chunk from merging with the region's rest
    bfc.free("a")
    assert bfc.allocate("b", 2 * MiB) == 3 * MiB
    assert bfc.in_use_bytes == 4 * MiB
    assert bfc.requested_bytes == 3 * MiB


def test_a_chunk_of_twice_the_request_is_split():
    bfc = BFCAllocator()
    bfc.allocate("a", 4 * MiB)  # fills its region (2 MiB doubled) exactly
    bfc.free("a")
    assert bfc.allocate("b", 2 * MiB) == 2 * MiB
    assert bfc.allocate("c", 2 * MiB) == 2 * MiB  # the split-off rest


def test_best_fit_takes_the_smallest_free_chunk_that_fits():
    bfc = BFCAllocator()
    for key, size in (("big", 6), ("w1", 1), ("small", 3), ("w2", 1)):
        bfc.allocate(key, size * MiB)
    bfc.free("big")
    bfc.free("small")
    assert bfc.allocate("x", 2 * MiB) == 3 * MiB


def test_freed_neighbours_merge():
    bfc = BFCAllocator()
    for key in ("a", "b"):  # the first region, 2 MiB, in two
        bfc.allocate(key, 1 * MiB)
    bfc.allocate("wall", 1 * MiB)  # a second region
    bfc.free("a")
    bfc.free("b")
    # One 2 MiB chunk now: a 2 MiB request fits without a new region.
    reserved = bfc.reserved_bytes
    assert bfc.allocate("c", 2 * MiB) == 2 * MiB
    assert bfc.reserved_bytes == reserved


def test_regions_start_at_2_mib_and_double():
    bfc = BFCAllocator()
    bfc.allocate("a", FIRST_REGION_BYTES)
    bfc.allocate("b", 1 * MiB)  # the first region is full: a second, twice as big
    assert bfc.reserved_bytes == FIRST_REGION_BYTES * 3


def test_peak_and_reset():
    bfc = BFCAllocator()
    bfc.allocate("a", 1 * MiB)
    bfc.allocate("b", 1 * MiB)
    bfc.free("b")
    assert bfc.peak_bytes == 2 * MiB
    bfc.reset_peak()
    assert bfc.peak_bytes == 1 * MiB


def test_rename_keeps_the_chunk():
    bfc = BFCAllocator()
    bfc.allocate("a", 1 * MiB)
    bfc.rename("a", "b")
    assert "b" in bfc and "a" not in bfc
    assert bfc.free("b") == 1 * MiB


_TRACE_SCRIPT = textwrap.dedent(
    """
    import json, sys, tempfile
    from bench.worker import allocator_events, configure_threads
    configure_threads(1)
    import tensorflow as tf
    from histoseg.models import build_deeplabv3plus
    from histoseg.train.step import make_optimizer, make_train_step
    logdir = tempfile.mkdtemp()
    options = tf.profiler.experimental.ProfilerOptions(host_tracer_level=3)
    tf.profiler.experimental.start(logdir, options=options)
    with tf.device("CPU:0"):
        model = build_deeplabv3plus("mobilenetv2", (128, 128, 3), alpha=0.35, remat="blocks")
        step = make_train_step(model, make_optimizer("adam", 1e-3))
        images = tf.zeros([2, 128, 128, 3], tf.uint8)
        masks = tf.ones([2, 128, 128], tf.uint8)
        for _ in range(2):
            step(images, masks)["loss"].numpy()
    tf.profiler.experimental.stop()
    json.dump(allocator_events(logdir), open(sys.argv[1], "w"))
    """
)


def test_replaying_tensorflows_trace_gives_every_request_the_chunk_tensorflow_gave(tmp_path):
    """A fresh process builds and trains a small remat model under TensorFlow's profiler;
    every allocation and free of its CPU allocator, from the first, is replayed through
    the model: each request must get a chunk of the size TensorFlow gave it, and the
    running totals must agree at every event."""
    out = tmp_path / "events.json"
    subprocess.run([sys.executable, "-c", _TRACE_SCRIPT, str(out)], check=True, timeout=300)
    events = json.loads(out.read_text())
    allocs = [s for kind, s in events if kind == "MemoryAllocation"]
    assert len(allocs) > 100
    assert {s["allocator_name"] for _, s in events} == {"mklcpu"}
    # The trace must start with an empty allocator for a replay from scratch.
    assert allocs[0]["bytes_allocated"] == allocs[0]["allocation_bytes"]
    bfc = BFCAllocator()
    wasted = 0
    for kind, stats in events:
        if kind == "MemoryAllocation":
            chunk = bfc.allocate(stats["addr"], stats["requested_bytes"])
            assert chunk == stats["allocation_bytes"], stats
            wasted += chunk != rounded_bytes(stats["requested_bytes"])
        else:
            bfc.free(stats["addr"])
        assert bfc.in_use_bytes == stats["bytes_allocated"], stats
    # The replay must have exercised the rule that matters: whole chunks handed out.
    assert wasted > 0, "no request got a larger chunk; the trace tests nothing"


@pytest.mark.parametrize("remat", ["none", "blocks"])
def test_estimate_counts_chunks_at_least_the_requests(remat):
    from histoseg.memory.estimate import estimate

    e = estimate(
        patch_size=128, backbone="mobilenetv2", backbone_options={"alpha": 0.35}, remat=remat
    )
    assert e.activation_bytes >= e.requested_activation_bytes > 0
    assert e.peak_bytes >= e.requested_peak_bytes > 0
