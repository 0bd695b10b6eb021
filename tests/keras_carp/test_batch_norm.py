"""One-pass batch-norm statistics: the same values as NumPy's and Keras' two-pass ones, and the same train step."""

import keras
import numpy as np
import pytest

import keras_carp
from keras_carp.batch_norm import batch_norm_layers, one_pass_moments, use_one_pass_moments
from tests.conftest import random_views, tiny_model, to_numpy

pytestmark = pytest.mark.core


def _layer(channels: int, moving_mean=None, name="bn") -> keras.layers.BatchNormalization:
    layer = keras.layers.BatchNormalization(name=name)
    layer.build((None, 5, 5, channels))
    if moving_mean is not None:
        layer.moving_mean.assign(np.asarray(moving_mean, "float32"))
    return layer


@pytest.mark.parametrize("offset, shift", [(0.0, 0.0), (3.0, 0.0), (1000.0, 999.0), (1000.0, 1000.5)])
def test_one_pass_moments_match_numpy_in_float64(offset, shift):
    rng = np.random.default_rng(0)
    x = (offset + rng.normal(scale=[0.5, 1.0, 2.0, 4.0], size=(16, 5, 5, 4))).astype("float32")
    layer = _layer(4, moving_mean=np.full(4, shift))
    mean, variance = one_pass_moments(layer, keras.ops.convert_to_tensor(x))
    x64 = x.astype("float64")
    np.testing.assert_allclose(to_numpy(mean), x64.mean(axis=(0, 1, 2)), rtol=1e-6)
    # With the moving mean near the batch mean, the variance of activations 1000 away from 0 stays accurate
    # (float32 sums of 400 values: Keras' two-pass statistics are within 1e-5 of float64 here too).
    np.testing.assert_allclose(to_numpy(variance), x64.var(axis=(0, 1, 2)), rtol=1e-4)


def test_the_shift_is_what_keeps_large_offsets_accurate():
    """Without it (moving mean 0), E[x^2] - E[x]^2 at an offset of 1000 loses the variance: the test can fail."""
    rng = np.random.default_rng(0)
    x = (1000.0 + rng.normal(scale=0.5, size=(16, 5, 5, 4))).astype("float32")
    _, unshifted = one_pass_moments(_layer(4), keras.ops.convert_to_tensor(x))
    error = np.abs(to_numpy(unshifted) / x.astype("float64").var(axis=(0, 1, 2)) - 1)
    assert error.max() > 1e-3


def test_batch_norm_layer_output_matches_keras_two_pass_statistics():
    rng = np.random.default_rng(1)
    x = keras.ops.convert_to_tensor((2.0 + rng.normal(size=(8, 5, 5, 3))).astype("float32"))
    plain, fast = _layer(3), _layer(3)
    assert use_one_pass_moments([fast]) == 1
    np.testing.assert_allclose(to_numpy(fast(x, training=True)), to_numpy(plain(x, training=True)), atol=1e-5)
    np.testing.assert_allclose(to_numpy(fast.moving_variance), to_numpy(plain.moving_variance), rtol=1e-5)
    assert fast.get_config() == plain.get_config()  # saved files stay plain Keras
    assert use_one_pass_moments([fast], enabled=False) == 1 and "_moments" not in vars(fast)


def test_subclasses_with_their_own_statistics_are_left_alone():
    class MedianBatchNorm(keras.layers.BatchNormalization):
        def _moments(self, inputs, mask):
            return super()._moments(inputs, mask)

    layer = MedianBatchNorm()
    layer.build((None, 3))
    assert use_one_pass_moments([layer]) == 0 and "_moments" not in vars(layer)


def test_masked_inputs_keep_keras_statistics():
    rng = np.random.default_rng(2)
    x = keras.ops.convert_to_tensor(rng.normal(size=(4, 6, 3)).astype("float32"))
    mask = keras.ops.convert_to_tensor(np.arange(6)[None, :].repeat(4, 0) < 4)
    plain, fast = keras.layers.BatchNormalization(), keras.layers.BatchNormalization()
    plain.build((None, 6, 3))
    fast.build((None, 6, 3))
    use_one_pass_moments([fast])
    expected = to_numpy(plain(x, training=True, mask=mask))
    np.testing.assert_allclose(to_numpy(fast(x, training=True, mask=mask)), expected)


def test_carp_uses_one_pass_statistics_in_student_and_teacher_and_saves_the_choice():
    model = tiny_model()
    networks = (model.student_encoder, model.student_head, model.teacher_encoder, model.teacher_head)
    layers = [layer for network in networks for layer in batch_norm_layers(network)]
    assert layers and all("_moments" in vars(layer) for layer in layers)
    assert model.get_config()["batch_norm_moments"] == "one_pass"
    restored = keras_carp.CARP.from_config(tiny_model(batch_norm_moments="keras").get_config())
    assert restored.batch_norm_moments == "keras"
    assert not any("_moments" in vars(layer) for layer in batch_norm_layers(restored.student_encoder))
    with pytest.raises(ValueError, match="batch_norm_moments"):
        tiny_model(batch_norm_moments="welford")


def test_train_steps_match_keras_two_pass_statistics():
    """Two steps of the whole CARP step give the same logs and weights with either statistics."""
    views = random_views()
    runs = []
    for moments in ("keras", "one_pass"):
        keras.utils.set_random_seed(0)
        model = tiny_model(batch_norm_moments=moments)
        model.compile(optimizer=keras_carp.LARS(0.1))
        logs = [model.train_on_batch(views, return_dict=True) for _ in range(2)]
        runs.append((logs, [to_numpy(w) for w in model.weights]))
    (logs_keras, weights_keras), (logs_fast, weights_fast) = runs
    for before, after in zip(logs_keras, logs_fast):
        for key in ("loss", "consistency", "entropy"):
            np.testing.assert_allclose(after[key], before[key], rtol=1e-4, atol=1e-6)
    for before, after in zip(weights_keras, weights_fast):
        np.testing.assert_allclose(after, before, rtol=1e-3, atol=1e-4)
