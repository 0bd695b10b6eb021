"""Batch-norm statistics in one read of the activations, for the CARP train step.

Keras' ``BatchNormalization`` computes the variance in two passes: the mean,
then the mean of the squared deviations, which must wait for the mean. Under
XLA that is two reductions over every activation map in the forward pass and
more in the backward one; in a ResNet-50 CARP step they are the largest
non-convolution cost. Here both moments come from one pass over the shifted
activations ``x - c``: ``E[x - c]`` and ``E[(x - c)^2]`` read the same tensor, so
XLA fuses them into one reduction. The shift ``c`` is the layer's moving mean
(held constant for the gradient), which keeps the subtraction
``E[(x - c)^2] - E[x - c]^2`` well conditioned once the moving mean tracks the
batch mean (the shifted-data algorithm). The values are those of Keras' moments
up to float32 rounding; the gradient is the same function's.

Keras has no switch for this, so ``use_one_pass_moments`` replaces the
``_moments`` method of each BN layer instance (a Keras-internal hook, reached
through ``keras_carp.keras_internals``; the layer's
config, weights and inference path are untouched, so saved files stay plain
Keras). Masked inputs and synchronised (cross-replica) BN keep Keras' own path.
"""

from __future__ import annotations

from collections.abc import Iterable

import keras
from keras import ops

from keras_carp import keras_internals

MOMENTS = ("one_pass", "keras")


def one_pass_moments(layer: keras.layers.BatchNormalization, inputs, mask=None):
    """Batch mean and (biased) variance of ``inputs`` over the layer's reduction axes, in one pass."""
    if mask is not None or layer.synchronized:
        return keras_internals.keras_moments(layer, inputs, mask)
    axes = keras_internals.reduction_axes(layer)
    shape = [1] * len(inputs.shape)
    shape[layer.axis] = inputs.shape[layer.axis]
    shift = ops.stop_gradient(ops.cast(layer.moving_mean, inputs.dtype))
    centered = inputs - ops.reshape(shift, shape)
    shifted_mean = ops.mean(centered, axis=axes)
    mean_square = ops.mean(ops.square(centered), axis=axes)
    variance = ops.maximum(mean_square - ops.square(shifted_mean), 0.0)
    return shifted_mean + shift, variance


def batch_norm_layers(network: keras.layers.Layer) -> list:
    """The BatchNormalization layers in ``network`` (itself included), nested models and layers too."""
    return [
        layer
        for layer in keras_internals.flatten_layers(network, include_self=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def use_one_pass_moments(layers: Iterable[keras.layers.BatchNormalization], enabled: bool = True) -> int:
    """Make these BN layers compute their training statistics in one pass (or Keras' way again).

    Returns the number of layers changed. Layers whose class brings its own
    ``_moments``, and every layer if Keras drops that hook, keep their statistics.
    """
    changed = 0
    for layer in layers:
        if not keras_internals.has_keras_moments(layer):
            continue
        if enabled:
            keras_internals.override_moments(layer, one_pass_moments)
        else:
            keras_internals.restore_moments(layer)
        changed += 1
    return changed
