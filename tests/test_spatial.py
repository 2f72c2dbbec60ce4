"""Spatial parallelism (histoseg.spatial): the slab/halo arithmetic, and a 2-rank check."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from histoseg.errors import ConfigError
from histoseg.spatial.slabs import (
    conv_rows,
    exchange_plan,
    resize_coordinates,
    resize_rows,
    same_padding,
    slab_rows,
)


def _assemble(global_map: np.ndarray, workers: int, rank: int, plan, fill=0.0) -> np.ndarray:
    """What fetch_rows builds on ``rank``, from numpy slabs (the allgather simulated)."""
    height = len(global_map)
    slabs = [global_map[slice(*slab_rows(height, workers, r))] for r in range(workers)]
    shared = [np.concatenate([s[: plan.top], s[len(s) - plan.bottom :]]) for s in slabs]
    parts = []
    for piece in plan.pieces[rank]:
        if piece.source == "local":
            parts.append(slabs[rank][piece.start : piece.stop])
        elif piece.source == "top":
            parts.append(shared[piece.rank][piece.start : piece.stop])
        elif piece.source == "bottom":
            parts.append(shared[piece.rank][plan.top + piece.start : plan.top + piece.stop])
        else:
            parts.append(np.full(piece.rows, fill))
    return np.concatenate(parts)


@pytest.mark.parametrize("workers", [1, 2, 4, 8])
@pytest.mark.parametrize(
    "kernel, stride, dilation", [(1, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 6), (3, 1, 18)]
)
def test_every_rank_gets_exactly_the_rows_same_padding_reads(workers, kernel, stride, dilation):
    height = 32
    out, needs = conv_rows(
        height, workers, kernel=kernel, stride=stride, dilation=dilation, padding="same"
    )
    assert out == -(-height // stride)
    plan = exchange_plan(height, workers, needs)
    assert plan.top <= height // workers and plan.bottom <= height // workers
    _, before, after = same_padding(height, kernel, stride, dilation)
    padded = np.concatenate([np.zeros(before), np.arange(1.0, height + 1), np.zeros(after)])
    for rank in range(workers):
        start, stop = needs[rank]
        got = _assemble(np.arange(1.0, height + 1), workers, rank, plan)
        np.testing.assert_array_equal(got, padded[start + before : stop + before])
        # the output rows of this slab come out of a "valid" conv over exactly these rows
        first, last = slab_rows(out, workers, rank)
        effective = (kernel - 1) * dilation + 1
        assert (len(got) - effective) // stride + 1 == last - first


def test_resize_rows_match_tensorflow_half_pixel_coordinates():
    lower, upper, lerp = resize_coordinates(8, 32)  # 4x upsampling, as in the decoder
    assert lower[0] == 0 and upper[0] == 0  # clamped at the top edge
    assert (lower[2], upper[2], float(lerp[2])) == (0, 1, 0.125)
    assert upper[-1] == 7
    needs = resize_rows(8, 32, 2)
    assert needs == [(0, 5), (3, 8)]  # one row past each slab boundary
    plan = exchange_plan(8, 2, needs)
    rows = np.arange(8.0)
    for rank in range(2):
        got = _assemble(rows, 2, rank, plan)
        np.testing.assert_array_equal(got, rows[needs[rank][0] : needs[rank][1]])


def test_a_map_that_does_not_split_evenly_is_refused_with_the_fix():
    with pytest.raises(ConfigError, match="multiple of 4"):
        slab_rows(30, 4, 0)


def test_max_pool_border_uses_the_fill_value():
    out, needs = conv_rows(8, 2, kernel=3, stride=2, dilation=1, padding="same")
    plan = exchange_plan(8, 2, needs)
    got = _assemble(np.arange(8.0), 2, 1, plan, fill=-np.inf)
    assert got[-1] == -np.inf and out == 4


class _TwinRank:
    """Rank 0 of 2 in one process: the other rank's boundary rows are this rank's own."""

    rank, size = 0, 2

    def gather_values(self, x, name: str):
        import tensorflow as tf

        return tf.stack([x, x])

    def sum_values(self, x, name: str):
        return x


def test_halo_apply_keeps_the_slab_not_the_extended_rows_and_gets_the_same_gradients():
    import tensorflow as tf

    from histoseg.spatial.halo import fetch_rows, halo_apply

    rows, width, channels = 256, 512, 16  # an 8 MB slab
    _, needs = conv_rows(2 * rows, 2, kernel=3, stride=1, dilation=12, padding="same")
    plan = exchange_plan(2 * rows, 2, needs)
    rng = np.random.default_rng(0)
    x = tf.constant(rng.standard_normal((1, rows, width, channels)).astype(np.float32))
    kernel = tf.constant(rng.standard_normal((3, 1, channels, 4)).astype(np.float32))

    def conv(extended, k):
        return tf.nn.conv2d(extended, k, 1, "VALID", dilations=(12, 1))

    def forward(kept: bool):
        """The bytes the tape holds after the forward pass, and the gradients."""
        before = tf.config.experimental.get_memory_info("CPU:0")["current"]
        with tf.GradientTape() as tape:
            tape.watch([x, kernel])
            if kept:
                y = conv(fetch_rows(x, plan, _TwinRank(), name="t"), kernel)
            else:
                y = halo_apply(x, plan, _TwinRank(), conv, weights=[kernel], name="t")
            held = tf.config.experimental.get_memory_info("CPU:0")["current"] - before
            loss = tf.reduce_sum(y * y)
        return held - y.numpy().nbytes, tape.gradient(loss, [x, kernel])

    kept_bytes, kept_grads = forward(kept=True)
    bytes_, grads = forward(kept=False)
    for got, want in zip(grads, kept_grads, strict=True):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-3)
    row_bytes = width * channels * 4
    assert kept_bytes >= (rows + 24) * row_bytes  # the extended copy: slab + 2 x 12 rows
    # Only both ranks' boundary rows (2 x 24 rows) stay: allocator chunks may round them
    # up (in a process that has run other tests), but not by half a slab.
    assert bytes_ < kept_bytes - rows * row_bytes / 2


def test_single_process_executor_is_the_model():
    """With one rank the executor runs every layer through its own code path (halo-free
    convs with explicit padding, distributed batch norm, pooling, resizing)."""
    import keras
    import tensorflow as tf

    from bench.spatial import grad_errors
    from histoseg.models import build_deeplabv3plus
    from histoseg.spatial import SingleProcess, SpatialExecutor, spatial_gradients

    keras.utils.set_random_seed(0)
    model = build_deeplabv3plus("mobilenetv2", (64, 64, 3), alpha=0.35)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32))
    masks = tf.constant(rng.integers(0, 2, (1, 64, 64)).astype(np.int32))
    loss, logits, grads = spatial_gradients(
        SpatialExecutor(model, SingleProcess()), images, masks, model.trainable_variables
    )
    with tf.GradientTape() as tape:
        want = model(images, training=True)
        want_loss = tf.reduce_mean(
            tf.nn.sparse_softmax_cross_entropy_with_logits(labels=masks, logits=want)
        )
    want_grads = tape.gradient(want_loss, model.trainable_variables)
    assert float(np.max(np.abs(logits - want)) / np.max(np.abs(want))) < 1e-5
    assert grad_errors(grads, want_grads)["rel_grad_l2_error"] < 1e-4
    assert abs(float(loss) - float(want_loss)) < 1e-6


def test_recomputed_blocks_give_the_same_step_and_update_batch_norm_once():
    """A remat model (``full``) through the executor: its blocks are recomputed
    in the backward pass (``sequenced_recompute``) and the gradients and moving statistics
    are the Keras step's, so the recomputation updated no moving statistic again."""
    import keras
    import tensorflow as tf

    from bench.spatial import grad_errors
    from histoseg.models import build_deeplabv3plus
    from histoseg.spatial import SingleProcess, SpatialExecutor, spatial_gradients

    def build():
        keras.utils.set_random_seed(0)
        return build_deeplabv3plus("mobilenetv2", (64, 64, 3), alpha=0.35, remat="full")

    spatial, whole = build(), build()
    rng = np.random.default_rng(0)
    images = tf.constant(rng.uniform(-1, 1, (1, 64, 64, 3)).astype(np.float32))
    masks = tf.constant(rng.integers(0, 2, (1, 64, 64)).astype(np.int32))
    executor = SpatialExecutor(spatial, SingleProcess())

    # eager (the 2-rank check below runs the compiled step with every block recomputed)
    grads = spatial_gradients(executor, images, masks, spatial.trainable_variables)[2]

    def keras_step():
        with tf.GradientTape() as tape:
            logits = whole(images, training=True)
            loss = tf.reduce_mean(
                tf.nn.sparse_softmax_cross_entropy_with_logits(labels=masks, logits=logits)
            )
        return tape.gradient(loss, whole.trainable_variables)

    assert grad_errors(grads, keras_step())["rel_grad_l2_error"] < 1e-4
    pairs = zip(spatial.weights, whole.weights, strict=True)
    moving = [(a, b) for a, b in pairs if "moving" in a.path]
    assert moving
    for a, b in moving:
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-6, err_msg=a.path)


def test_the_halo_traffic_of_a_step_is_read_off_its_trace():
    """``halo_traffic`` traces a step with ``NoExchange`` (no Horovod, nothing run): the
    same collectives at every patch size and rank count; a rank's boundary rows grow with
    the patch's width, the stacked halo gradients with the ranks too."""
    from histoseg.models import build_deeplabv3plus
    from histoseg.spatial.traffic import halo_traffic

    def traffic(px, ranks):
        return halo_traffic(build_deeplabv3plus("mobilenetv2", (px, px, 3), alpha=0.35), ranks)

    small, large = traffic(128, 2), traffic(256, 4)
    assert small["collectives"] == large["collectives"] > 50
    assert (small["rank"], large["rank"]) == (0, 1)  # an inner rank where there is one
    assert large["gather_bytes"] > 1.8 * small["gather_bytes"]  # twice as wide
    assert large["sum_bytes"] > 3 * small["sum_bytes"]  # and twice the ranks


def _horovodrun_missing() -> bool:
    from histoseg.errors import EngineUnavailableError
    from histoseg.train.launch import horovodrun_path

    try:
        horovodrun_path()  # beside this Python (the venv is not on PATH in CI) or on PATH
    except EngineUnavailableError:
        return True
    return False


@pytest.mark.skipif(_horovodrun_missing(), reason="horovodrun (Horovod) not installed")
def test_two_ranks_compute_the_single_rank_step():
    """2 ranks under horovodrun, the partitioned step compiled as training runs it (at
    64 px the stride-2 stem leaves the last rank reading no gathered rows: the case that
    hung a compiled step), float64 so that float32 rounding (which this tiny model at
    initialisation amplifies to percent-level gradient differences) does not hide a
    partitioning error; see docs/spatial.md. With every block recomputed (remat full), so
    the recomputations' halo exchanges and moments run across the ranks too."""
    command = [
        sys.executable, "-m", "bench.spatial", "--check", "--workers", "2", "--size", "64",
        "--backbone", "mobilenetv2", "--alpha", "0.35", "--dtype", "float64", "--compiled",
        "--remat", "full",
    ]  # fmt: skip
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result["workers"] == 2
    assert result["compiled"] is True
    assert result["max_rel_logit_error"] < 1e-4
    assert result["max_rel_grad_error"] < 1e-3
    assert result["ok"] is True


@pytest.mark.skipif(_horovodrun_missing(), reason="horovodrun (Horovod) not installed")
def test_the_memory_harness_measures_each_rank_of_a_patch_cut_in_two(tmp_path):
    """``bench.memory --spatial-workers 2``: two ranks under horovodrun run the compiled
    spatial train step; the row keeps every rank's figures, reports the most loaded one,
    and a rank holds clearly less of the forward pass than the whole patch's step does.
    In mixed_bfloat16, whose maps Horovod's ops do not take (sent as their bits), where
    the CPU computes bfloat16; in float32 where it emulates it (ten times slower)."""
    from bench.memory import main, predict
    from histoseg.config import StepConfig
    from histoseg.memory.devices import cpu_computes_bfloat16
    from histoseg.results import load_rows

    precision = "mixed_bfloat16" if cpu_computes_bfloat16() else "float32"
    out = tmp_path / "spatial.json"
    argv = ["--backbone", "mobilenetv2", "--backbone-option", "alpha=0.35", "--sizes", "128"]
    argv += ["--precision", precision, "--spatial-workers", "2", "--steps", "1"]
    argv += ["--quiet", "--out", str(out)]
    assert main(argv) == 0
    (row,) = load_rows(out)
    assert row["status"] == "ok", row.get("reason")
    assert row["config"]["spatial_workers"] == 2 and "predicted" not in row
    per_rank, measured = row["extra"]["per_rank"], row["measured"]
    assert len(per_rank["peak_bytes"]) == 2
    assert measured["peak_bytes"] == max(per_rank["peak_bytes"])
    whole = StepConfig(patch_size=128, backbone="mobilenetv2", precision=precision)
    whole = predict(whole.replace(**_ALPHA))
    assert max(per_rank["activation_bytes"]) < 0.75 * whole["activation_bytes"]


_ALPHA = {"backbone_options": (("alpha", 0.35),)}
