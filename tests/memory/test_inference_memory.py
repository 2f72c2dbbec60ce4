"""The forward-pass (inference) memory model: its rules on toy models, counted by hand, and
one small config measured in a fresh worker against its prediction."""

from __future__ import annotations

import pytest

keras = pytest.importorskip("keras")

from histoseg.config import StepConfig  # noqa: E402
from histoseg.memory.graph import Op, executor_order  # noqa: E402
from histoseg.memory.inference import (  # noqa: E402
    atrous_buffers,
    estimate_inference_model,
    inference_facts,
    simulate_inference,
)

SIDE = 32


def _toy(dtype: str = "float32"):
    """image (32 x 32 x 3) -> 3x3 conv (8) -> batch norm -> ReLU -> 1x1 conv (16)."""
    L = keras.layers
    images = keras.Input((SIDE, SIDE, 3), dtype="float32")
    x = L.Conv2D(8, 3, padding="same", use_bias=False, dtype=dtype, name="conv1")(images)
    x = L.BatchNormalization(dtype=dtype, name="bn1")(x)
    x = L.ReLU(dtype=dtype, name="relu1")(x)
    x = L.Conv2D(16, 1, use_bias=False, dtype=dtype, name="conv2")(x)
    return keras.Model(images, x)


def test_a_float32_pass_frees_each_output_after_its_last_consumer():
    facts = inference_facts(_toy())
    pixels = SIDE * SIDE
    # image 12 KB; conv1's 32 KB output (batch norm and ReLU write into it); conv2's
    # 64 KB output while conv1's is still alive: the peak; then the 4 KB probabilities.
    sim = simulate_inference(facts, batch_size=1, untracked_below_bytes=0)
    assert sim["requested_pass_peak_bytes"] == pixels * 8 * 4 + pixels * 16 * 4
    two = simulate_inference(facts, batch_size=2, untracked_below_bytes=0)
    assert two["requested_pass_peak_bytes"] == 2 * sim["requested_pass_peak_bytes"]
    # the allocator counts whole chunks: never less than the bytes requested
    assert sim["allocator_peak_bytes"] - sim["allocator_before_bytes"] >= 98304


def test_a_mixed_precision_pass_counted_by_hand():
    facts = inference_facts(_toy("mixed_bfloat16"))
    pixels = SIDE * SIDE
    copies = (3 * 3 * 3 * 8 + 8 * 16) * 2  # both kernels cast to bfloat16 at the start
    assert sum(b for op in facts.graph.ops for b in op.weight_copy_sizes) == copies
    # conv2's bfloat16 logits are cast to float32 before the softmax: that cast, beside
    # the logits, is the peak (the batch norm's float32 working copy, 32 KB, comes earlier)
    logits, logits_f32 = pixels * 16 * 2, pixels * 16 * 4
    assert facts.logits_cast_bytes == logits_f32
    sim = simulate_inference(facts, batch_size=1, untracked_below_bytes=0, cast_order=None)
    assert sim["requested_pass_peak_bytes"] == logits + logits_f32
    # before that: copies + image + its bfloat16 cast, then conv1's output and the norm
    image, cast = pixels * 3 * 4, pixels * 3 * 2
    assert copies + image + cast < logits + logits_f32


def test_cpu_buffers_under_256_kib_are_not_counted():
    facts = inference_facts(_toy())
    estimate = estimate_inference_model(facts, batch_size=1, device="cpu")
    assert estimate.requested_activation_bytes == 0  # every buffer of the toy is small
    gpu = estimate_inference_model(facts, batch_size=1, device="gpu")
    assert gpu.requested_activation_bytes == SIDE * SIDE * (8 + 16) * 4
    assert gpu.peak_bytes >= gpu.requested_peak_bytes


def test_the_executor_runs_a_chain_to_its_end_and_the_last_ready_sibling_first():
    def op(name, ins, outs):
        return Op(name, "conv", ins, outs, [], (0, 0.0, 0.0), None)

    # src makes t1, which feeds a (-> a2) and b; the join needs both branches
    ops = [
        op("src", [0], [1]),
        op("a", [1], [2]),
        op("b", [1], [3]),
        op("a2", [2], [4]),
        op("join", [3, 4], [5]),
    ]
    order = [ops[i].name for i in executor_order(ops, [0])]
    assert order == ["src", "b", "a", "a2", "join"]


def test_atrous_depthwise_buffers_follow_space_to_batch():
    layer = keras.layers.DepthwiseConv2D(3, dilation_rate=2, padding="same")
    layer.build((None, 16, 16, 4))
    copy, out = atrous_buffers(layer, (None, 16, 16, 4), 4)
    assert copy == 20 * 20 * 4 * 4  # 16 + (3 - 1) * 2, a multiple of the rate
    assert out == 2 * 2 * (10 - 2) * (10 - 2) * 4 * 4  # rate^2 blocks of the valid output


def test_a_model_with_recomputed_blocks_is_refused():
    from histoseg.errors import ConfigError
    from histoseg.models import build_deeplabv3plus

    model = build_deeplabv3plus("mobilenetv2", (64, 64, 3), remat="blocks", alpha=0.35)
    with pytest.raises(ConfigError, match="remat none"):
        inference_facts(model)


def test_a_small_forward_pass_measured_in_a_fresh_worker_is_predicted():
    """One inference config measured in its own process: the prediction within 5%."""
    from bench.memory_runs import run_worker

    config = StepConfig(
        patch_size=128,
        backbone="mobilenetv2",
        backbone_options=(("alpha", 0.35),),
        mode="infer",
        steps=1,
    )
    row = run_worker(config, timeout_s=300)
    assert row["status"] == "ok", row.get("reason")
    assert row["config"]["mode"] == "infer" and row["config"]["optimizer"] is None
    measured, predicted = row["measured"], row["predicted"]
    assert "optimizer_bytes" not in measured and "gradient_bytes" not in measured
    assert measured["peak_bytes"] == measured["before_step_bytes"] + measured["activation_bytes"]
    assert predicted["peak_bytes"] == pytest.approx(measured["peak_bytes"], rel=0.05)
    assert predicted["weights_bytes"] == measured["weights_bytes"]
