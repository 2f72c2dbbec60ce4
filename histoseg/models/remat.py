"""Rematerialisation (gradient checkpointing) of model blocks: trade compute for memory.

A *block* is a small functional sub-model (an Xception unit, a bottleneck, an ASPP branch).
With remat on, only a block's inputs stay alive after the forward pass; its inner
activations are recomputed, block by block, in the backward pass.

Why not ``keras.RematScope``: with the TensorFlow backend it cannot run inside
``tf.function`` (BatchNormalization's ``training=`` keyword trips ``custom_gradient``),
and per-layer remat saves little (it recomputes inside one layer, not across a block).
:class:`RematBlock` instead hands ``keras.remat`` a closure that takes tensors only and has
``training`` baked in, and keeps batch norm from updating its moving statistics twice.

Recomputation order (TensorFlow backend): ``keras.remat`` is ``tf.recompute_grad`` there,
which does not order the recomputations: the next block's recomputation may start before
the current block's weight gradients are done, so several blocks' recomputed tensors are
alive at once and the step peak varied from trace to trace (a 4-block test model peaked at
14 to 36 feature maps). On TensorFlow :class:`RematBlock` therefore uses its own
``tf.custom_gradient``: the backward pass recomputes the block only once the incoming
gradient exists (a control dependency on it), and hands its input gradient back to the
previous block only once all of the block's weight gradients exist, so the recomputed
tensors of one block die before the next block is recomputed (the one-block-at-a-time
order :mod:`histoseg.memory.estimate` assumes; the same model then peaked at 14-15 maps on
every trace). On the torch backend it calls ``torch.utils.checkpoint`` as ``keras.remat``
does, with early stop off (see :meth:`RematBlock.call`); other backends keep ``keras.remat``.
"""

from __future__ import annotations

from collections.abc import Callable

import keras

from histoseg.models.layers import recomputing

#: What each remat mode recomputes in the backward pass, as
#: ``(backbone granularity, recompute the head)``.
#: ``none``: nothing (plain backprop). ``blocks``: every backbone block (stem, each
#: Xception/residual/inverted-residual block); ASPP and decoder are not recomputed.
#: ``full``: the backbone blocks, with Xception's high-resolution entry flow recomputed one
#: separable conv at a time ("units"), plus every ASPP branch and decoder conv, so that
#: almost only block inputs stay alive after the forward pass.
REMAT_PARTS: dict[str, tuple[str, bool]] = {
    "none": ("none", False),
    "blocks": ("blocks", False),
    "full": ("units", True),
}
REMAT_MODES: tuple[str, ...] = tuple(REMAT_PARTS)


@keras.saving.register_keras_serializable(package="histoseg")
class RematBlock(keras.layers.Layer):
    """Run a functional block so that its activations are recomputed in the backward pass.

    In training mode the forward pass keeps only the block's inputs; the backward pass
    runs the block again (on TensorFlow through a sequenced ``tf.custom_gradient``, see
    the module docstring; elsewhere through ``keras.remat`` or torch's checkpoint; all under
    :func:`histoseg.models.layers.recomputing`, so batch norm uses the batch moments
    without updating its moving statistics a second time) and backpropagates through
    the recomputed activations. In inference mode it is the plain block.

    Args:
        block: A functional ``keras.Model`` taking one tensor or a list of tensors.
        **kwargs: Passed to ``keras.layers.Layer`` (``name``, ``dtype``).

    Example:
        >>> inputs = keras.Input((32, 32, 8))
        >>> block = keras.Model(inputs, keras.layers.Conv2D(8, 3, padding="same")(inputs))
        >>> outputs = RematBlock(block)(inputs)
    """

    def __init__(self, block: keras.Model, **kwargs):
        super().__init__(**kwargs)
        self.block = block

    def call(self, inputs, training=None):
        if not training:
            return self.block(inputs, training=training)
        tensors = list(inputs) if isinstance(inputs, (list, tuple)) else [inputs]
        if keras.backend.backend() == "tensorflow":
            many = len(tensors) > 1
            return sequenced_recompute(
                lambda *xs: self.block(list(xs) if many else xs[0], training=True), tensors
            )
        traces: list[bool] = []

        def forward(*args):
            x = args[0] if len(args) == 1 else list(args)
            if traces:  # second trace or run = the recomputation in the backward pass
                with recomputing():
                    return self.block(x, training=True)
            traces.append(True)
            return self.block(x, training=True)

        if keras.backend.backend() == "torch":
            import torch  # only on the torch backend

            # keras.remat's checkpoint, without early stop: stopping a recomputation once
            # the tensors it needs exist raises an exception inside the block's call, and
            # its traceback (with Keras's re-raise) forms reference cycles that hold every
            # recomputed activation until Python's garbage collector runs. (The context
            # manager, not checkpoint's early_stop argument, which needs torch >= 2.9.)
            # The blocks draw no random numbers, so no generator state is kept per block.
            with torch.utils.checkpoint.set_checkpoint_early_stop(False):
                return torch.utils.checkpoint.checkpoint(
                    forward, *tensors, use_reentrant=False, preserve_rng_state=False
                )
        return keras.remat(forward)(*tensors)

    def compute_output_spec(self, inputs, training=None):
        return self.block.compute_output_spec(inputs)

    def get_config(self):
        return {**super().get_config(), "block": keras.saving.serialize_keras_object(self.block)}

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["block"] = keras.saving.deserialize_keras_object(config["block"])
        return cls(**config)


def sequenced_recompute(forward: Callable, tensors: list):
    """``forward(*tensors)``, recomputed in order in the backward pass (TensorFlow only).

    The forward pass keeps only ``tensors``; the backward pass runs ``forward`` again under
    :func:`~histoseg.models.layers.recomputing`, once the incoming gradient exists, and
    releases the input gradients only once every weight gradient exists (see the module
    docstring). ``forward`` returns a tensor or a list of tensors. Also used by the spatial
    executor (``histoseg.spatial``) to recompute a block of slabs.

    ``tf.custom_gradient`` records the trainable variables the forward pass reads and hands
    them to the gradient function as ``variables``, which must return one gradient per
    variable (``None`` where the block's output does not depend on it).
    """
    import tensorflow as tf  # only on the TensorFlow backend

    @tf.custom_gradient
    def run(*xs):
        outputs = forward(*xs)

        def grad(*output_grads, variables=None):
            variables = list(variables or [])
            present = [g for g in output_grads if g is not None]
            # Recompute only once the incoming gradient exists, i.e. after the blocks
            # above have finished their backward pass.
            with tf.control_dependencies(present):
                xs_again = [tf.identity(x) for x in xs]
            with tf.GradientTape() as tape:
                tape.watch(xs_again)
                with recomputing():
                    outputs_again = forward(*xs_again)
            grads = tape.gradient(
                outputs_again,
                xs_again + variables,
                output_gradients=list(output_grads)
                if isinstance(outputs_again, (list, tuple))
                else output_grads[0],
            )
            input_grads, variable_grads = grads[: len(xs)], grads[len(xs) :]
            # Release the input gradient (what the block below waits for) only after all
            # weight gradients: this block's recomputed tensors die before the next
            # recomputation starts.
            done = [g for g in variable_grads if g is not None]
            with tf.control_dependencies(done):
                input_grads = [None if g is None else tf.identity(g) for g in input_grads]
            return input_grads, variable_grads

        return outputs, grad

    return run(*tensors)


def apply_block(build: Callable, inputs, *, name: str, remat: bool):
    """Build ``build(block_inputs)`` as a functional block named ``name`` and apply it.

    Args:
        build: Function from symbolic input tensor(s) to output tensor(s).
        inputs: The tensor (or list of tensors) the block is applied to.
        name: The block's name (its layers are named inside ``build``).
        remat: Wrap the block in :class:`RematBlock`.

    Returns:
        The block's output tensor(s) applied to ``inputs``.
    """
    many = isinstance(inputs, (list, tuple))
    tensors = list(inputs) if many else [inputs]
    block_inputs = [
        keras.Input(shape=tuple(t.shape[1:]), dtype=t.dtype, name=f"{name}_in{i}")
        for i, t in enumerate(tensors)
    ]
    outputs = build(block_inputs if many else block_inputs[0])
    block = keras.Model(block_inputs if many else block_inputs[0], outputs, name=name)
    layer = RematBlock(block, name=f"{name}_remat") if remat else block
    return layer(inputs)
