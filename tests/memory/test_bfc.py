"""The BFC allocator model: its rules, and a replay of TensorFlow's own allocator trace."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from histoseg.memory.bfc import FIRST_REGION_BYTES, BFCAllocator, rounded_bytes

MiB = 1 << 20


def test_requests_round_up_to_256_bytes():
    assert rounded_bytes(1) == 256
    assert rounded_bytes(256) == 256
    assert rounded_bytes(257) == 512


def test_a_chunk_under_twice_the_request_is_handed_out_whole():
    bfc = BFCAllocator()
    # "a" gets a whole 4 MiB region (4 MiB is under twice 3 MiB); "wall" a second region,
    # which it splits, leaving a free 3 MiB rest.
    assert bfc.allocate("a", 3 * MiB) == 4 * MiB
    assert bfc.allocate("wall", 1 * MiB) == 1 * MiB
    # Best fit is that 3 MiB rest, under twice 2 MiB: handed out whole.
    assert bfc.allocate("b", 2 * MiB) == 3 * MiB
    assert bfc.in_use_bytes == 8 * MiB
    assert bfc.requested_bytes == 6 * MiB


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


def test_a_rest_of_128_mib_or_more_is_split_off_however_the_sizes_compare():
    bfc = BFCAllocator()
    bfc.allocate("a", 300 * MiB)  # a 512 MiB region: its 212 MiB rest is split off
    assert bfc.in_use_bytes == 300 * MiB
    bfc.allocate("b", 200 * MiB)  # the 212 MiB rest: 12 MiB left over, not split
    assert bfc.in_use_bytes == 512 * MiB


def test_a_freed_chunk_merges_with_both_neighbours():
    bfc = BFCAllocator()
    for key in ("a", "b", "c", "d"):  # 512 KiB each: the first 2 MiB region, full
        bfc.allocate(key, MiB // 2)
    for key in ("a", "c", "b"):  # "b" joins "a" before it and "c" after it
        bfc.free(key)
    reserved = bfc.reserved_bytes
    assert bfc.allocate("e", 3 * MiB // 2) == 3 * MiB // 2
    assert bfc.reserved_bytes == reserved


def test_zero_bytes_get_no_chunk():
    bfc = BFCAllocator()
    assert bfc.allocate("a", 0) == 0
    assert "a" not in bfc and bfc.in_use_bytes == 0


def test_the_memory_limit_is_kept():
    bfc = BFCAllocator(memory_limit_bytes=8 * MiB)
    bfc.allocate("a", 6 * MiB)
    with pytest.raises(MemoryError):
        bfc.allocate("b", 4 * MiB)


def test_rename_keeps_the_chunk():
    bfc = BFCAllocator()
    bfc.allocate("a", 1 * MiB)
    bfc.rename("a", "b")
    assert "b" in bfc and "a" not in bfc
    assert bfc.free("b") == 1 * MiB


#: A small remat model, trained in a fresh process under TensorFlow's profiler from the first
#: allocation on (``python -m bench.worker --allocator-events``).
_TRACED_CONFIG = {
    "patch_size": 128,
    "batch_size": 2,
    "backbone": "mobilenetv2",
    "backbone_options": {"alpha": 0.35},
    "remat": "blocks",
    "threads": 1,
    "steps": 1,
}


def test_replaying_tensorflows_trace_gives_every_request_the_chunk_tensorflow_gave(tmp_path):
    """A fresh process builds and trains a small remat model under TensorFlow's profiler;
    every allocation and free of its CPU allocator, from the first, is replayed through
    the model: each request must get a chunk of the size TensorFlow gave it, and the
    running totals must agree at every event."""
    out = tmp_path / "events.json"
    command = [sys.executable, "-m", "bench.worker", "--config", json.dumps(_TRACED_CONFIG)]
    root = Path(__file__).resolve().parents[2]  # where ``bench`` imports from
    subprocess.run([*command, "--allocator-events", str(out)], check=True, timeout=300, cwd=root)
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


@pytest.mark.parametrize(
    ("remat", "precision"),
    [("none", "float32"), ("blocks", "float32"), ("blocks", "mixed_bfloat16")],
)
def test_the_replayed_step_is_the_simulated_step(remat, precision):
    """The allocator replay sees the very buffers the request count sees: same bytes
    requested at the peak, nothing of the step left behind, the chunks' waste on top."""
    from histoseg.memory.bfc import BFCAllocator
    from histoseg.memory.estimate import _facts_for, simulate_step

    facts = _facts_for("mobilenetv2", 128, 16, precision, remat, (("alpha", 0.35),), 2)
    bfc = BFCAllocator()
    bfc.allocate("held before the step", 5 * MiB)
    held = bfc.in_use_bytes
    bfc.reset_peak()
    sim = simulate_step(facts.graph, batch_size=2, untracked_below_bytes=0, allocator=bfc)
    assert bfc.peak_requested_bytes == 5 * MiB + sim["peak_delta_bytes"]
    assert bfc.requested_bytes == 5 * MiB and bfc.in_use_bytes == held
    assert sim["allocator_peak_bytes"] >= bfc.peak_requested_bytes
    plain = simulate_step(facts.graph, batch_size=2)
    assert plain["peak_delta_bytes"] == sim["peak_delta_bytes"]
    assert plain["activation_bytes"] == sim["activation_bytes"]


def test_the_docstring_example_holds():
    import doctest

    import histoseg.memory.bfc

    assert doctest.testmod(histoseg.memory.bfc).failed == 0
