"""The analytic memory model against TF's allocator, and its scaling rules."""

import json
import statistics
import subprocess
import sys
from unittest import mock

import keras
import numpy as np
import pytest
import tensorflow as tf

from histoseg.memory import estimate as estimate_module
from histoseg.memory.devices import planned_bytes
from histoseg.memory.estimate import (
    CAST_ORDERS,
    CPU_UNTRACKED_BELOW_BYTES,
    cast_orders,
    estimate,
    estimate_model,
    largest_patch,
    model_facts,
    trace_model,
)
from histoseg.memory.graph import MemoryGraph, Op, backward_executor_order
from histoseg.memory.grappler import accumulator_sizes
from histoseg.memory.simulate import simulate_step
from histoseg.models import build_deeplabv3plus
from histoseg.models.layers import conv_bn, separable_conv_bn
from histoseg.train.step import make_optimizer, make_train_step

SIDE, CHANNELS = 64, 64
TENSOR = SIDE * SIDE * CHANNELS * 4  # one float32 feature map: 1 MiB, above the CPU floor
TOLERANCE = 0.01


def _stack(kind):
    inputs = keras.Input((SIDE, SIDE, 3), name="images")
    x = keras.layers.Conv2D(CHANNELS, 3, padding="same", use_bias=False)(inputs)
    for i in range(3):
        if kind == "conv_bn_relu":
            x = conv_bn(x, CHANNELS, 3, name=f"unit{i}")
        else:
            x = separable_conv_bn(x, CHANNELS, 3, dilation_rate=2 if i == 2 else 1, name=f"u{i}")
    x = keras.layers.Conv2D(2, 1, name="logits")(x)
    return keras.Model(inputs, x)


def _measure_small_stack(kind: str) -> dict[str, int]:
    """Activation bytes of one train step of ``_stack(kind)`` here, and their prediction."""
    model = _stack(kind)
    step = make_train_step(model, make_optimizer("adam", 1e-3), memory_device="CPU:0")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8))
    masks = tf.constant(rng.integers(0, 2, (1, SIDE, SIDE), dtype=np.uint8))
    step(images, masks)
    out = step(images, masks)
    return {
        "measured": int(out["bytes_after_forward"]) - int(out["bytes_before_step"]),
        "predicted": estimate_model(model, batch_size=1).activation_bytes,
    }


def _in_fresh_process(measure: str, arg: str) -> dict[str, int]:
    """``_MEASURES[measure](arg)``, run in a fresh Python process (this file as a script)."""
    out = subprocess.run(
        [sys.executable, __file__, measure, arg],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


# The estimate replays a fresh process through the allocator model, so the step is
# measured in a fresh process too: in the pytest process the allocator holds whatever
# earlier tests left and places chunks otherwise (up to 7% off for the separable stack).
# In fresh processes both stacks matched to the byte (7,340,032 and 15,728,640 bytes).
@pytest.mark.parametrize("kind", ["conv_bn_relu", "separable_atrous"])
def test_estimate_matches_the_allocator_on_small_stacks(kind):
    figures = _in_fresh_process("stack", kind)
    assert figures["measured"] > 5 * TENSOR
    assert figures["predicted"] == pytest.approx(figures["measured"], rel=TOLERANCE)


def test_small_buffers_are_not_counted_on_the_cpu_but_are_on_a_gpu():
    cpu = estimate(patch_size=64, backbone="mobilenetv2", backbone_options={"alpha": 0.35})
    gpu = estimate(
        patch_size=64, backbone="mobilenetv2", backbone_options={"alpha": 0.35}, device="gpu"
    )
    assert CPU_UNTRACKED_BELOW_BYTES == 256 * 1024
    assert gpu.activation_bytes > cpu.activation_bytes


def _mnv2(**kwargs):
    return estimate(backbone="mobilenetv2", device="gpu", **kwargs)


def test_activations_scale_with_pixels_and_batch():
    small, big = _mnv2(patch_size=128), _mnv2(patch_size=256)
    # Not quite 4x: the padding of atrous convs' space-to-batch copies does not scale.
    assert 3.3 < big.requested_activation_bytes / small.requested_activation_bytes <= 4.0
    double = _mnv2(patch_size=128, batch_size=2)
    assert double.requested_activation_bytes == 2 * small.requested_activation_bytes
    # What the allocator counts adds its chunk waste, which follows no such rule.
    assert 1.8 < double.activation_bytes / small.activation_bytes < 2.2
    assert big.weights_bytes == small.weights_bytes


def test_recomputation_and_bfloat16_keep_less():
    plain = _mnv2(patch_size=256)
    assert _mnv2(patch_size=256, remat="blocks").activation_bytes < 0.6 * plain.activation_bytes
    assert _mnv2(patch_size=256, precision="mixed_bfloat16").activation_bytes < (
        plain.activation_bytes
    )


def test_optimizer_state_follows_the_optimizer_type():
    adam, sgd = _mnv2(patch_size=64), _mnv2(patch_size=64, optimizer="sgd")
    assert adam.optimizer_bytes == 2 * sgd.optimizer_bytes
    assert adam.gradient_bytes <= adam.weights_bytes


def test_under_loss_scaling_sgd_holds_no_early_update_buffer():
    # bfloat16: SGD's momentum product depends on its state only and runs at the step's
    # start, held to the update. float16: the update runs inside the loss scale's
    # finite-gradients conditional (allocator trace: made after the backward pass).
    def state_and_early(precision):
        def peak(optimizer):
            return _mnv2(patch_size=64, precision=precision, optimizer=optimizer)

        sgd, plain = peak("sgd"), peak("sgd_nomomentum")
        return (sgd.requested_peak_bytes - plain.requested_peak_bytes) / sgd.optimizer_bytes

    assert state_and_early("mixed_bfloat16") == pytest.approx(2.0, rel=1e-3)
    assert state_and_early("mixed_float16") == pytest.approx(1.0, rel=1e-3)


def test_under_loss_scaling_each_gradient_holds_a_bool_per_element_until_the_update():
    # The loss scale's finite check (IsFinite on each gradient) keeps a bool map per
    # weight until the one reduction that reads them all (allocator trace, float16 step).
    conv = Op(
        "conv",
        "conv",
        inputs=[0],
        outputs=[1],
        saved=[0],
        temp_bytes=(0, 0, 0),
        block=None,
        param_sizes=(4000,),
        grad_sizes=(2000,),
    )

    def peak(loss_scaled):
        graph = MemoryGraph(
            tensor_bytes={0: 10, 1: 10},
            ops=[conv],
            inputs=[0],
            outputs=[1],
            loss_scaled=loss_scaled,
        )
        return simulate_step(graph)["peak_delta_bytes"]

    assert peak(True) - peak(False) == 1000


def test_largest_patch_is_the_last_size_that_fits():
    budget = 300_000_000
    best = largest_patch(budget, backbone="mobilenetv2", device="gpu")
    assert best is not None and best % 16 == 0
    assert planned_bytes(_mnv2(patch_size=best).peak_bytes) <= budget
    assert planned_bytes(_mnv2(patch_size=best + 16).peak_bytes) > budget


def _upsampling_stack(side):
    """conv/BN/ReLU twice, then a bilinear upsampling x2 and float32 logits."""
    from histoseg.models.layers import ResizeBilinear

    inputs = keras.Input((side, side, 3), name="images")
    x = keras.layers.Conv2D(CHANNELS, 3, padding="same", use_bias=False)(inputs)
    x = conv_bn(x, CHANNELS, 3, name="unit0")
    x = conv_bn(x, CHANNELS, 3, name="unit1")
    x = ResizeBilinear(2 * side, 2 * side, name="up")(x)
    x = keras.layers.Conv2D(2, 1, name="logits", dtype="float32")(x)
    return keras.Model(inputs, x)


def _measure_constants(precision: str) -> dict[str, int]:
    """CPU allocator bytes the first step of the upsampling stack leaves, and the model's
    constant bytes for it."""
    keras.mixed_precision.set_dtype_policy(precision)
    try:
        model = _upsampling_stack(SIDE)
    finally:
        keras.mixed_precision.set_dtype_policy("float32")
    step = make_train_step(model, make_optimizer("adam", 1e-3), memory_device="CPU:0")
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (1, SIDE, SIDE, 3), dtype=np.uint8))
    masks = tf.constant(rng.integers(0, 2, (1, 2 * SIDE, 2 * SIDE), dtype=np.uint8))
    before = tf.config.experimental.get_memory_info("CPU:0")["current"]
    step(images, masks)
    left = tf.config.experimental.get_memory_info("CPU:0")["current"] - before
    return {"left": left, "predicted": estimate_model(model, batch_size=1).constant_bytes}


@pytest.mark.parametrize("precision", ["float32", "mixed_bfloat16"])
def test_constants_of_the_compiled_step_match_what_the_first_step_leaves(precision):
    # Under mixed precision the resize's clip gradient has a zeros_like that Grappler folds
    # into a float32 constant of the resize's output (4 MiB here); float32 has none above
    # the CPU allocator's floor. In a fresh process, as bench.memory measures: a process
    # that had run tests/infer/test_infer.py first left 1 MiB more (5242880 bytes).
    figures = _in_fresh_process("constants", precision)
    left, predicted = figures["left"], figures["predicted"]
    expected = 4 * (2 * SIDE) ** 2 * CHANNELS if precision == "mixed_bfloat16" else 0
    assert predicted == expected
    assert left == pytest.approx(predicted, abs=64 * 1024)


def _diamond():
    """A branch "b1-b2-b3" and a 1x1 "side" from "a", joined by a concatenation."""
    conv = keras.layers.Conv2D
    inputs = keras.Input((16, 16, 3))
    a = conv(8, 3, padding="same", name="a")(inputs)
    deep = conv(8, 3, padding="same", name="b3")(
        conv(8, 3, padding="same", name="b2")(conv(8, 3, padding="same", name="b1")(a))
    )
    side = conv(8, 1, name="side")(a)
    model = keras.Model(inputs, keras.layers.Concatenate(name="join")([deep, side]))
    return model


def test_ops_run_in_the_order_they_become_ready_not_in_keras_depth_order():
    # A branch that leaves early and joins late (DeepLabV3+'s low-level decoder branch):
    # Keras lists it by depth, next to the join; TensorFlow's executor runs it as soon as
    # its input exists, and what is alive together follows that order.
    names = [op.name for op in trace_model(_diamond()).ops]
    assert names == ["a", "b1", "side", "b2", "b3", "join"]


def test_backward_runs_each_chain_back_to_its_start_before_a_sibling():
    # The diamond above: the backward pass starts at the join; "b3" (the later of the two
    # ops made ready) runs its chain back to "b1" before "side"; "a" waits for both.
    ops = trace_model(_diamond()).ops
    order = [ops[i].name for i in backward_executor_order(ops)]
    assert order == ["join", "b3", "b2", "b1", "side", "a"]


def test_an_atrous_backward_holds_three_space_to_batch_buffers_at_once():
    # Read off the allocator trace of resnet50 at output stride 8: the output gradient in
    # space-to-batch layout, the input gradient in that layout (as large as the saved
    # copy) and the input gradient brought back, alive together.
    inputs = keras.Input((32, 32, 256))
    outputs = keras.layers.DepthwiseConv2D(3, padding="same", dilation_rate=12, name="atrous")(
        inputs
    )
    (op,) = [op for op in trace_model(keras.Model(inputs, outputs)).ops if op.name == "atrous"]
    saved_copy = 60 * 60 * 256 * 4  # 32 + 2 x 12 rows and columns, padded to 5 x 12
    output_grad = 36 * 36 * 256 * 4  # 32 padded to 3 x 12
    input_grad = 32 * 32 * 256 * 4
    nbytes, forward, backward = op.temp_bytes
    assert nbytes == saved_copy and forward == 0
    assert nbytes * backward == pytest.approx(saved_copy + output_grad + input_grad)


def _two_blocks_and_a_wide_backward(first_block_keeps_its_output: bool) -> MemoryGraph:
    """Block "A" makes tensor 1; block "B" reads it; "wide", outside both blocks and run
    backward between them, has a large backward buffer."""
    keep = [1] if first_block_keeps_its_output else [0]  # a ReLU keeps its output
    ops = [
        Op("a", "relu", inputs=[0], outputs=[1], saved=keep, temp_bytes=(0, 0, 0), block="A"),
        Op("wide", "conv", inputs=[0], outputs=[4], saved=[0], temp_bytes=(5000, 0, 1), block=None),
        Op("b", "conv", inputs=[1], outputs=[2], saved=[1], temp_bytes=(0, 0, 0), block="B"),
        Op(
            "head",
            "conv",
            inputs=[2, 4],
            outputs=[3],
            saved=[2, 4],
            temp_bytes=(0, 0, 0),
            block=None,
        ),
    ]
    sizes = {0: 16, 1: 1000, 2: 100, 3: 10, 4: 10}
    return MemoryGraph(tensor_bytes=sizes, ops=ops, inputs=[0], outputs=[3])


def test_a_block_output_its_own_member_keeps_dies_with_its_last_reader_outside():
    # Allocator trace of a float32 ``full`` step: the first pass's copy of a block's output
    # that one of its members keeps (a ReLU's) dies once the next block's backward pass has
    # read it; the recomputation makes it again. So it is not alive during "wide".
    def peak(keeps):
        return simulate_step(_two_blocks_and_a_wide_backward(keeps))["peak_delta_bytes"]

    assert peak(True) == peak(False)


def _accumulators_mib(backbone, patch_size_px, output_stride=16, remat="none", batch_size=1):
    model = build_deeplabv3plus(
        backbone,
        (patch_size_px, patch_size_px, 3),
        num_classes=2,
        output_stride=output_stride,
        remat=remat,
    )
    graph = trace_model(model)
    return sorted(b / 2**20 for b in accumulator_sizes(graph, batch_size, step_peak_bytes=2**40))


def test_grapplers_accumulator_at_output_stride_16_is_the_decoder_norms_input():
    # Allocator trace of xception65 512 px float32: one 16 MiB ``AddN_*/tmp_var_zeros``,
    # the float32 input of the decoder's last batch norm (128 x 128 x 256).
    assert _accumulators_mib("xception65", 512) == [16.0]


def test_grapplers_accumulators_at_output_stride_8_are_in_aspp():
    # Allocator traces at output stride 8, float32: xception65 384 px made four of 18 MiB
    # (the three atrous depthwise norms' inputs and the sum of ASPP's five input
    # gradients, 48 x 48 x 2048); resnet50 448 px four of 24.5 MiB and the low-level
    # feature's three-term sum, 12.25 MiB (112 x 112 x 256).
    assert _accumulators_mib("xception65", 384, output_stride=8) == [18.0] * 4
    assert _accumulators_mib("resnet50", 448, output_stride=8) == [12.25] + [24.5] * 4


def _branches_joined(output_bytes: int, recomputed: bool = False) -> MemoryGraph:
    """ "a" feeds "side" and "deep" (whose backward pass has a large buffer); "join" reads
    both: a concatenation when ``output_bytes`` is the sum of their sizes (110). With
    ``recomputed``, each branch is a remat block of its own."""
    ops = [
        Op("a", "conv", inputs=[0], outputs=[1], saved=[0], temp_bytes=(0, 0, 0), block=None),
        Op("deep", "conv", inputs=[1], outputs=[2], saved=[1], temp_bytes=(5000, 0, 1), block=None),
        Op("side", "conv", inputs=[1], outputs=[3], saved=[1], temp_bytes=(0, 0, 0), block=None),
        Op("join", "free", inputs=[2, 3], outputs=[4], saved=[], temp_bytes=(0, 0, 0), block=None),
    ]
    if recomputed:
        ops[1].block, ops[2].block = "deep", "side"
    sizes = {0: 16, 1: 100, 2: 100, 3: 10, 4: output_bytes}
    return MemoryGraph(tensor_bytes=sizes, ops=ops, inputs=[0], outputs=[4])


def test_a_concatenations_gradient_lives_until_its_last_branch_has_started():
    # Allocator trace of resnet50 480 px at output stride 8: the executor slices ASPP's
    # concatenation gradient (17.6 MiB) for one branch at a time and runs that branch to its
    # end first, so the gradient is alive during the rate-36 branch's large backward buffers.
    # Here "deep" runs last: "join"'s gradient (110 bytes) is alive during its buffer; a
    # join that is not a concatenation hands its gradient on at once.
    def peak(output_bytes, recomputed=False):
        return simulate_step(_branches_joined(output_bytes, recomputed))["peak_delta_bytes"]

    assert peak(110) - peak(111) >= 109
    # Recomputed branches order their own backward passes (trace of mobilenetv2 ``full``:
    # the gradient is dead before the last branch's): the join hands its gradient on.
    assert abs(peak(110, recomputed=True) - peak(111, recomputed=True)) <= 1


def test_full_recomputation_puts_grapplers_accumulator_at_the_largest_batch_norm():
    # Allocator traces of xception65 at 512 px, bfloat16: with ``full`` the accumulator is
    # the float32 input of the largest norm (entry flow, 256 x 256 x 128), not the
    # decoder's; under the threshold there is none.
    model = build_deeplabv3plus("xception65", (64, 64, 3), num_classes=2, remat="full")
    graph = trace_model(model)
    norms = [op.temp_bytes[0] for op in graph.ops if op.kind == "batchnorm" and op.needs_backward]
    assert accumulator_sizes(graph, 1, step_peak_bytes=2**40) == [max(norms)]
    assert max(norms) > norms[-1]
    assert accumulator_sizes(graph, 1, step_peak_bytes=2**20) == []


def test_a_small_step_gets_no_accumulator():
    # xception65 256 px float32 ``blocks``: no accumulator at batch 1, one at batch 2
    # (results/memory.json): Grappler's estimate stays under 80% of 256 MiB at batch 1.
    assert _accumulators_mib("xception65", 256, remat="blocks") == []
    assert _accumulators_mib("xception65", 256, remat="blocks", batch_size=2) == [8.0]


def test_float32_batch_norm_makes_one_transient_map_below_float32_two():
    # float32: the variance's squared difference; x * inv is the output itself. Below
    # float32, x * inv is a float32 map before the cast back (allocator traces).
    def bn_forward_count(precision):
        keras.mixed_precision.set_dtype_policy(precision)
        try:
            inputs = keras.Input((8, 8, 4))
            model = keras.Model(inputs, keras.layers.BatchNormalization(name="bn")(inputs))
        finally:
            keras.mixed_precision.set_dtype_policy("float32")
        (op,) = [op for op in trace_model(model).ops if op.name == "bn"]
        return op.temp_bytes[1]

    assert bn_forward_count("float32") == 1.0
    assert bn_forward_count("mixed_bfloat16") == 2.0


def test_mixed_precision_figures_are_the_median_over_fixed_cast_orders():
    model = build_deeplabv3plus(
        "mobilenetv2",
        (128, 128, 3),
        num_classes=2,
        precision="mixed_bfloat16",
        remat="blocks",
        alpha=0.35,
    )
    facts = model_facts(model)
    orders = cast_orders(facts.graph)
    ops = range(len(facts.graph.ops))
    assert len(orders) == CAST_ORDERS and all(sorted(order) == list(ops) for order in orders)
    assert len({tuple(order) for order in orders}) == CAST_ORDERS
    assert cast_orders(facts.graph) == orders, "the same orders every run"

    per_order = []
    for order in orders:
        with mock.patch.object(estimate_module, "cast_orders", lambda graph, o=order: [o]):
            one = estimate_model(facts, batch_size=1, device="gpu")
        per_order.append((one.activation_bytes, one.peak_bytes))
    # Where the copies land changes what the allocator counts...
    assert len({peak for _, peak in per_order}) > 1
    # ...so the estimate gives the median, as the harness does over its repeats.
    both = estimate_model(facts, batch_size=1, device="gpu")
    assert both.activation_bytes == statistics.median_low(a for a, _ in per_order)
    assert both.peak_bytes == statistics.median_low(p for _, p in per_order)


def test_float32_has_no_casts_to_order():
    model = build_deeplabv3plus("mobilenetv2", (64, 64, 3), num_classes=2, alpha=0.35)
    assert cast_orders(model_facts(model).graph) == [None]


_MEASURES = {"stack": _measure_small_stack, "constants": _measure_constants}

if __name__ == "__main__":
    print(json.dumps(_MEASURES[sys.argv[1]](sys.argv[2])))


def test_largest_patch_brackets_and_bisects_when_the_quadratic_guess_is_far_off():
    # A peak linear in the patch side: the area fit from 128 and 256 px guesses far too
    # small for a big budget. The answer is the last multiple of 16 whose planned bytes
    # (peak + 5% + 96 MiB) are under the budget ((9e9 - 96 * 2**20) / 1.05 / 1e6 = 8475 px),
    # and the search gets there in a few dozen estimates, not one per 16 px.
    calls = []

    def fake_estimate(*, patch_size, **config):
        calls.append(patch_size)
        return mock.Mock(peak_bytes=1_000_000 * patch_size)

    with mock.patch.object(estimate_module, "estimate", fake_estimate):
        best = largest_patch(9_000_000_000, backbone="mobilenetv2")
    assert best == 8464
    assert len(calls) < 30, len(calls)
