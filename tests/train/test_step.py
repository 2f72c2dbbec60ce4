"""The compiled train step: gradients, remat equivalence, allocator reads, loss scaling."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from histoseg.errors import ConfigError
from histoseg.models import build_deeplabv3plus
from histoseg.train.step import (
    _gradients,
    compute_gradients,
    make_optimizer,
    make_train_step,
    pixel_loss,
    prepare_images,
)

SIZE_PX = 64
TINY = {"alpha": 0.35}


def copy_weights(source: keras.Model, target: keras.Model) -> None:
    """Copy weights leaf layer by leaf layer (remat modes nest blocks differently, not leaves)."""
    leaves = {layer.name: layer for layer in source._flatten_layers() if not layer._layers}
    for layer in target._flatten_layers():
        if not layer._layers and layer.weights:
            layer.set_weights(leaves[layer.name].get_weights())


def by_leaf_name(model: keras.Model, values) -> dict:
    """Map ``values`` (one per trainable variable) to '<leaf layer>/<variable>' names."""
    names = {
        id(v): f"{layer.name}/{v.name}"
        for layer in model._flatten_layers()
        if not layer._layers
        for v in layer.trainable_weights
    }
    return {names[id(v)]: value for v, value in zip(model.trainable_variables, values, strict=True)}


def batch(size_px: int = SIZE_PX, batch_size: int = 2, seed: int = 0):
    rng = np.random.default_rng(seed)
    images = tf.constant(rng.integers(0, 256, (batch_size, size_px, size_px, 3), dtype=np.uint8))
    masks = tf.constant(rng.integers(0, 2, (batch_size, size_px, size_px), dtype=np.int32))
    return images, masks


@pytest.fixture(scope="module")
def remat_runs():
    """Loss, gradients, BN statistics and allocator reads of one forward/backward per remat mode."""
    keras.utils.set_random_seed(7)
    models = {
        mode: build_deeplabv3plus("mobilenetv2", (2 * SIZE_PX, 2 * SIZE_PX, 3), remat=mode, **TINY)
        for mode in ("none", "blocks", "full")
    }
    initial = models["none"].get_weights()
    for model in models.values():
        model.set_weights(initial)
    # 128 px, not 64: at 64 px TF's padding of the rate-18 atrous convs (space-to-batch)
    # and the decoder dominate, which only 'full' recomputes.
    images, masks = batch(size_px=2 * SIZE_PX, batch_size=1)
    runs = {"initial_stats": [v.numpy() for v in models["none"].non_trainable_weights]}
    for mode, model in models.items():
        fn = tf.function(lambda i, m, model=model: _gradients(model, i, m, memory_device="CPU:0"))
        loss, grads, reads = fn(images, masks)
        runs[mode] = {
            "loss": float(loss),
            "grads": [g.numpy() for g in grads],
            "stats": [v.numpy() for v in model.non_trainable_weights],
            "activation_bytes": int(reads["bytes_after_forward"] - reads["bytes_before_step"]),
        }
        del loss, grads, reads
    return runs


def test_gradients_are_finite_and_cover_every_trainable_variable(remat_runs):
    grads = remat_runs["none"]["grads"]
    assert all(np.isfinite(g).all() for g in grads)
    assert any(np.abs(g).max() > 0 for g in grads)


@pytest.mark.parametrize("mode", ["blocks", "full"])
def test_remat_gives_the_same_loss_gradients_and_batch_norm_statistics(remat_runs, mode):
    plain, remat = remat_runs["none"], remat_runs[mode]
    assert remat["loss"] == pytest.approx(plain["loss"], rel=1e-5)
    for g_remat, g_plain in zip(remat["grads"], plain["grads"], strict=True):
        np.testing.assert_allclose(g_remat, g_plain, rtol=1e-5, atol=1e-5 * np.abs(g_plain).max())
    # Moving statistics are updated once (not again in the recomputation).
    changed = False
    for s_remat, s_plain, s_init in zip(
        remat["stats"], plain["stats"], remat_runs["initial_stats"], strict=True
    ):
        np.testing.assert_allclose(s_remat, s_plain, rtol=1e-6, atol=1e-7)
        changed |= not np.allclose(s_plain, s_init)
    assert changed


def test_remat_cuts_the_bytes_alive_after_the_forward_pass(remat_runs):
    none, blocks, full = (remat_runs[m]["activation_bytes"] for m in ("none", "blocks", "full"))
    assert none > 0
    # On this tiny model the decoder (256-304 channels at stride 4, not recomputed by
    # 'blocks') holds most activations, so 'blocks' saves little here (CI once read it
    # 0.3% above plain: allocator chunk placement, which depends on the tests run before);
    # 'full' recomputes the decoder. What 'blocks' saves at scale: results/memory.json
    # (xception65 704 px float32: 0.84 GB kept against 3.16 GB).
    assert blocks < 1.01 * none
    assert full < 0.5 * none


@pytest.mark.slow
def test_remat_blocks_cuts_xception65_activations_about_threefold():
    size_px = 256
    images, masks = batch(size_px=size_px, batch_size=1)
    activation_bytes = {}
    for mode in ("none", "blocks"):
        model = build_deeplabv3plus("xception65", (size_px, size_px, 3), remat=mode)
        fn = tf.function(lambda i, m, model=model: _gradients(model, i, m, memory_device="CPU:0"))
        _, _, reads = fn(images, masks)
        activation_bytes[mode] = int(reads["bytes_after_forward"] - reads["bytes_before_step"])
    # About 6.8 KB/px plain and 2.2 KB/px with remat blocks at 256 px on the CPU.
    assert 6.0e3 < activation_bytes["none"] / size_px**2 < 7.5e3
    assert activation_bytes["none"] > 2.8 * activation_bytes["blocks"]


def test_train_step_updates_weights_and_reads_the_allocator_in_order():
    keras.utils.set_random_seed(3)
    model = build_deeplabv3plus("mobilenetv2", (SIZE_PX, SIZE_PX, 3), **TINY)
    step = make_train_step(model, make_optimizer("sgd", 0.1), memory_device="CPU:0")
    before = [v.numpy() for v in model.trainable_weights]
    out = step(*batch())
    assert out["loss"].dtype == tf.float32 and np.isfinite(float(out["loss"]))
    for key in ("bytes_before_step", "bytes_after_forward", "bytes_after_gradients"):
        assert out[key].dtype == tf.int64
    # Activations alive after the forward pass; most of them freed once gradients exist.
    assert (
        int(out["bytes_after_forward"])
        > int(out["bytes_after_gradients"])
        > int(out["bytes_before_step"])
    )
    assert any(
        not np.array_equal(a, v.numpy())
        for a, v in zip(before, model.trainable_weights, strict=True)
    )


def test_grad_transform_sees_the_gradients_before_they_are_applied():
    model = build_deeplabv3plus("mobilenetv2", (SIZE_PX, SIZE_PX, 3), **TINY)
    step = make_train_step(
        model,
        make_optimizer("sgd", 0.1, momentum=0.0),
        grad_transform=lambda gs: [g * 0.0 for g in gs],
    )
    before = [v.numpy() for v in model.trainable_weights]
    step(*batch())
    for a, v in zip(before, model.trainable_weights, strict=True):
        np.testing.assert_array_equal(a, v.numpy())


def test_float16_model_gets_loss_scaling_and_float32_model_does_not():
    f16 = build_deeplabv3plus(
        "mobilenetv2", (SIZE_PX, SIZE_PX, 3), precision="mixed_float16", **TINY
    )
    f32 = build_deeplabv3plus("mobilenetv2", (SIZE_PX, SIZE_PX, 3), **TINY)
    assert isinstance(
        make_train_step(f16, make_optimizer()).optimizer, keras.optimizers.LossScaleOptimizer
    )
    assert not isinstance(
        make_train_step(f32, make_optimizer()).optimizer, keras.optimizers.LossScaleOptimizer
    )


@pytest.mark.slow
def test_mixed_float16_step_runs_with_finite_loss():
    model = build_deeplabv3plus(
        "mobilenetv2", (SIZE_PX, SIZE_PX, 3), precision="mixed_float16", **TINY
    )
    step = make_train_step(model, make_optimizer())
    assert np.isfinite(float(step(*batch())["loss"]))
    _, grads = compute_gradients(model, *batch())
    assert all(g.dtype == tf.float32 for g in grads)


def test_prepare_images_scales_uint8_to_unit_range():
    images = prepare_images(np.array([[[[0, 255, 128]]]], dtype=np.uint8))
    np.testing.assert_allclose(images.numpy().ravel(), [-1.0, 1.0, 128 / 127.5 - 1.0], atol=1e-6)
    assert prepare_images(np.zeros((1, 2, 2, 3), np.float64)).dtype == tf.float32


def test_bad_optimizer_and_memory_device_raise_config_error():
    with pytest.raises(ConfigError, match="adam, sgd"):
        make_optimizer("rmsprop")
    model = build_deeplabv3plus("mobilenetv2", (SIZE_PX, SIZE_PX, 3), **TINY)
    with pytest.raises(ConfigError, match="CPU:0"):
        make_train_step(model, make_optimizer(), memory_device="TPU:0")


@pytest.mark.slow
def test_xception65_remat_full_matches_remat_none():
    # 'full' recomputes Xception's entry flow one separable conv at a time: check it too.
    keras.utils.set_random_seed(5)
    models = {
        mode: build_deeplabv3plus("xception65", (SIZE_PX, SIZE_PX, 3), remat=mode)
        for mode in ("none", "full")
    }
    copy_weights(models["none"], models["full"])
    images, masks = batch(batch_size=1)
    results = {}
    for mode, model in models.items():
        loss, grads = tf.function(lambda i, m, model=model: compute_gradients(model, i, m))(
            images, masks
        )
        results[mode] = (float(loss), by_leaf_name(model, [g.numpy() for g in grads]))
    assert results["full"][0] == pytest.approx(results["none"][0], rel=1e-5)
    assert results["full"][1].keys() == results["none"][1].keys()
    # Tolerance relative to the largest gradient of the model: some gradients are tiny
    # (~5e-7 for the stem's batch norm at init), where float32 rounding noise of a
    # different op order dominates an elementwise relative check.
    scale = max(np.abs(g).max() for g in results["none"][1].values())
    for name, g_none in results["none"][1].items():
        np.testing.assert_allclose(
            results["full"][1][name], g_none, rtol=1e-5, atol=1e-5 * scale, err_msg=name
        )


def test_xception_unit_remat_matches_plain_unit():
    # The code path of remat 'full' in Xception's entry flow, on one small unit.
    from histoseg.models.backbones.xception65 import _xception_module

    def unit_model(unit_remat: bool) -> keras.Model:
        inputs = keras.Input((16, 16, 8))
        outputs = _xception_module(
            inputs,
            (16, 16, 24),
            shortcut="conv",
            stride=2,
            rate=1,
            depth_activation=False,
            return_skip=False,
            name="unit",
            unit_remat=unit_remat,
        )
        return keras.Model(inputs, outputs)

    keras.utils.set_random_seed(11)
    plain, remat = unit_model(False), unit_model(True)
    copy_weights(plain, remat)
    x = tf.random.stateless_normal((2, 16, 16, 8), seed=(1, 2))
    results = []
    for model in (plain, remat):

        @tf.function
        def grads(x, model=model):
            with tf.GradientTape() as tape:
                loss = tf.reduce_sum(tf.square(model(x, training=True)))
            return loss, tape.gradient(loss, model.trainable_variables)

        loss, gs = grads(x)
        stats = {v.path: v.numpy() for v in model.non_trainable_weights}
        results.append((float(loss), by_leaf_name(model, [g.numpy() for g in gs]), stats))
    assert results[1][0] == pytest.approx(results[0][0], rel=1e-5)
    assert results[1][1].keys() == results[0][1].keys()
    for name, b in results[0][1].items():
        np.testing.assert_allclose(results[1][1][name], b, rtol=1e-5, atol=1e-5 * np.abs(b).max())
    # Moving statistics updated once, as in the plain unit (matched by layer/variable name).
    plain_stats = {"/".join(k.split("/")[-2:]): v for k, v in results[0][2].items()}
    remat_stats = {"/".join(k.split("/")[-2:]): v for k, v in results[1][2].items()}
    assert plain_stats.keys() == remat_stats.keys()
    for name, b in plain_stats.items():
        np.testing.assert_allclose(remat_stats[name], b, rtol=1e-6, atol=1e-7)


def test_tumour_weight_counts_tumour_pixels_more_and_one_is_the_plain_mean():
    masks = tf.constant([[[0, 0, 0, 1]]])
    logits = tf.zeros((1, 1, 4, 2))  # every pixel: cross-entropy ln 2 ...
    logits = tf.tensor_scatter_nd_update(logits, [[0, 0, 3, 1]], [5.0])  # ... but the tumour one
    losses = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=masks, logits=logits).numpy()
    plain = float(pixel_loss(masks, logits))
    assert plain == pytest.approx(losses.mean())
    weighted = float(pixel_loss(masks, logits, tumour_weight=3.0))
    assert weighted == pytest.approx((losses[0, 0, :3].sum() + 3 * losses[0, 0, 3]) / 6)
    assert weighted < plain  # the well-fitted tumour pixel now weighs more
