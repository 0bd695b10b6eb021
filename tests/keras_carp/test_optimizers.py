import keras
import numpy as np
import pytest

import keras_carp
from keras_carp.keras_internals import learning_rate_schedule
from tests import reference
from tests.conftest import to_numpy

pytestmark = pytest.mark.core


def test_lars_matches_numpy_steps_and_skips_1d_variables():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")
    grads = [(rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")) for _ in range(3)]
    w, b = keras.Variable(w0), keras.Variable(b0)
    optimizer = keras_carp.LARS(learning_rate=0.5, momentum=0.9, weight_decay=0.01, eta=0.02)
    ref_w, ref_b = w0.astype(np.float64), b0.astype(np.float64)
    mw, mb = np.zeros_like(ref_w), np.zeros_like(ref_b)
    for gw, gb in grads:
        optimizer.apply([keras.ops.convert_to_tensor(gw), keras.ops.convert_to_tensor(gb)], [w, b])
        ref_w, mw = reference.lars_step(ref_w, gw, mw, 0.5, 0.9, 0.01, 0.02)
        ref_b, mb = reference.lars_step(ref_b, gb, mb, 0.5, 0.9, 0.01, 0.02)
    np.testing.assert_allclose(to_numpy(w), ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(b), ref_b, rtol=1e-5, atol=1e-6)


def test_lars_zero_weight_keeps_gradient_unscaled():
    w = keras.Variable(np.zeros((2, 2), "float32"))
    optimizer = keras_carp.LARS(learning_rate=1.0, weight_decay=0.0)
    optimizer.apply([keras.ops.ones((2, 2))], [w])
    np.testing.assert_allclose(to_numpy(w), -np.ones((2, 2)))


def test_lars_serialises_with_a_schedule():
    schedule = keras_carp.WarmupCosineDecay(0.45, 1024, 1000, warmup_steps=10, min_learning_rate=0.0048)
    optimizer = keras_carp.LARS(schedule, momentum=0.8, weight_decay=1e-5, eta=0.002)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, keras_carp.LARS)
    assert (restored.momentum, restored.lars_weight_decay, restored.eta) == (0.8, 1e-5, 0.002)
    assert restored.learning_rate is not None
    np.testing.assert_allclose(float(to_numpy(learning_rate_schedule(restored)(500))), float(to_numpy(schedule(500))))


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        keras_carp.LARS(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        keras_carp.LARS(0.1, weight_decay=-1.0)
