import math
import warnings

import keras
import numpy as np
import pytest

import keras_carp
from tests.conftest import to_numpy

pytestmark = pytest.mark.core


def test_warmup_cosine_follows_the_formula_with_linear_scaling():
    schedule = keras_carp.WarmupCosineDecay(
        0.6, global_batch_size=512, total_steps=100, warmup_steps=10, min_learning_rate=0.06
    )
    peak = 0.6 * 512 / 256
    for step in [0, 5, 10, 40, 99, 100, 150]:
        if step < 10:
            want = peak * step / 10
        else:
            t = min((step - 10) / 90, 1.0)
            want = 0.06 + (peak - 0.06) * 0.5 * (1 + math.cos(math.pi * t))
        np.testing.assert_allclose(float(to_numpy(schedule(step))), want, rtol=1e-5, atol=1e-7)
    restored = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(schedule))
    assert restored.get_config() == schedule.get_config()


def test_teacher_momentum_is_a_cosine_from_base_to_final():
    ema = keras_carp.TeacherEMA(0.99, 1.0, total_steps=200)
    for step in [0, 50, 100, 200]:
        want = 1.0 - 0.01 * 0.5 * (1 + math.cos(math.pi * step / 200))
        np.testing.assert_allclose(float(to_numpy(ema.momentum(step))), want, rtol=1e-6)


@pytest.mark.parametrize("kwargs", [dict(base_momentum=-0.1), dict(final_momentum=1.5), dict(total_steps=0)])
def test_teacher_ema_rejects_bad_momentum(kwargs):
    with pytest.raises(ValueError):
        keras_carp.TeacherEMA(**kwargs)
    with pytest.raises(ValueError):
        keras_carp.TeacherMomentumSchedule(**kwargs)


def test_teacher_momentum_schedule_is_the_cosine_and_round_trips():
    schedule = keras_carp.TeacherMomentumSchedule(0.9, 1.0, total_steps=40)
    for step in [0, 10, 40, 60]:
        want = 1.0 - 0.1 * 0.5 * (1 + math.cos(math.pi * min(step, 40) / 40))
        np.testing.assert_allclose(float(to_numpy(schedule(step))), want, rtol=1e-6)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    assert restored == schedule and restored is not schedule
    unresolved = keras_carp.TeacherMomentumSchedule(0.9, 1.0)
    assert float(to_numpy(unresolved(30))) == pytest.approx(0.9)  # no length yet: the base momentum
    assert unresolved.with_total_steps(40) == schedule and schedule.with_total_steps(7) is schedule


def test_teacher_ema_carries_the_schedule_and_warns_of_nothing():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ema = keras_carp.TeacherEMA(0.9, 1.0, total_steps=40)
    assert ema.teacher_momentum_schedule == keras_carp.TeacherMomentumSchedule(0.9, 1.0, total_steps=40)
    assert (ema.base_momentum, ema.final_momentum, ema.total_steps) == (0.9, 1.0, 40)
    restored = keras_carp.TeacherEMA.from_config(ema.get_config())
    assert restored.teacher_momentum_schedule == ema.teacher_momentum_schedule


def test_schedule_rejects_bad_values():
    with pytest.raises(ValueError):
        keras_carp.WarmupCosineDecay(0.1, 256, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError):
        keras_carp.WarmupCosineDecay(-0.1, 256, total_steps=10)
