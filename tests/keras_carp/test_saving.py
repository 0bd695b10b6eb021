"""Whole-model .keras files: config round trips of every public class, and resuming training from a checkpoint."""

import copy
import dataclasses

import keras
import numpy as np
import pytest

import keras_carp
from keras_carp.data import MultiCropAugmentation
from tests.conftest import random_views, tiny_model, to_numpy

pytestmark = pytest.mark.core

EPOCHS, BATCH, IMAGES = 4, 8, 16  # 2 steps per epoch, 8 steps in all


def _public_objects():
    """One instance of every public keras_carp class that Keras serialises."""
    head = keras_carp.CARPHead(num_prototypes=64, hidden_dim=32, bottleneck_dim=16, num_layers=2)
    schedule = keras_carp.WarmupCosineDecay(0.45, 1024, total_steps=1000, warmup_steps=10, min_learning_rate=0.0048)
    return [
        tiny_model(block_size=32, partition="fixed", seed=5),
        head,
        keras_carp.CARPLoss(128),
        keras_carp.LARS(schedule, weight_decay=1e-5, momentum=0.8, eta=0.002),
        schedule,
        keras_carp.TeacherEMA(0.996, 1.0, total_steps=500),
        keras_carp.TeacherMomentumSchedule(0.996, 1.0, total_steps=500),
        MultiCropAugmentation(global_size=32, local_size=16, num_local_crops=2, global_scale=(0.4, 1.0)),
        keras_carp.DeviceMultiCrop(global_size=32, local_size=16, num_local_crops=2, seed=4),
        tiny_model(augmentation=keras_carp.DeviceMultiCrop(global_size=16, local_size=8, num_local_crops=2)),
    ]


@pytest.mark.parametrize("obj", _public_objects(), ids=lambda obj: type(obj).__name__)
def test_public_classes_are_registered_and_round_trip_their_config(obj):
    cls = type(obj)
    assert keras.saving.get_registered_name(cls) == f"keras_carp>{cls.__name__}"
    # Its own get_config, or a dataclass whose inherited one saves every field (the view recipes).
    assert "get_config" in vars(cls) or dataclasses.is_dataclass(cls)
    assert callable(cls.from_config)
    serialized = keras.saving.serialize_keras_object(obj)
    assert serialized["registered_name"] == f"keras_carp>{cls.__name__}"
    restored = keras.saving.deserialize_keras_object(copy.deepcopy(serialized))  # it consumes its input
    assert type(restored) is cls
    assert keras.saving.serialize_keras_object(restored)["config"] == serialized["config"]


def _schedule() -> keras_carp.WarmupCosineDecay:
    # A large rate so every step moves the weights, the momentum buffers and the teacher measurably.
    steps = EPOCHS * IMAGES // BATCH
    return keras_carp.WarmupCosineDecay(20.0, BATCH, total_steps=steps, warmup_steps=2, min_learning_rate=0.5)


def _compiled_model() -> keras_carp.CARP:
    keras.utils.set_random_seed(0)
    model = tiny_model()
    model.compile(optimizer=keras_carp.LARS(_schedule()))
    return model


def _weights(variables) -> list:
    return [to_numpy(v).copy() for v in variables]


def test_resuming_from_a_keras_checkpoint_gives_the_uninterrupted_losses(tmp_path):
    """Optimizer state, step counter, teacher, head and the EMA schedule all come back from the file."""
    views = random_views(batch=IMAGES, num_local=2)
    fit_args = dict(x=views, batch_size=BATCH, verbose=0, shuffle=False)
    model = _compiled_model()
    checkpoint = keras.callbacks.ModelCheckpoint(str(tmp_path / "epoch_{epoch}.keras"))
    uninterrupted = model.fit(**fit_args, epochs=EPOCHS, callbacks=[checkpoint]).history  # the default schedule

    restored = keras.saving.load_model(tmp_path / "epoch_2.keras")
    assert isinstance(restored.optimizer, keras_carp.LARS)
    assert int(to_numpy(restored.optimizer.iterations)) == 2 * IMAGES // BATCH
    total = EPOCHS * IMAGES // BATCH
    assert restored.teacher_momentum_schedule == keras_carp.TeacherMomentumSchedule(total_steps=total)
    # No schedule passed: the model's saved schedule is used.
    resumed = restored.fit(**fit_args, epochs=EPOCHS, initial_epoch=2).history
    for key in ("loss", "consistency", "entropy", "teacher_momentum", "learning_rate"):
        np.testing.assert_allclose(resumed[key], uninterrupted[key][2:], rtol=1e-5, atol=1e-7, err_msg=key)
    for mine, theirs in zip(_weights(restored.weights), _weights(model.weights)):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-5)

    # The comparison can fail: the same checkpoint with its momentum buffers lost trains differently.
    amnesic = keras.saving.load_model(tmp_path / "epoch_2.keras")
    assert any(np.any(to_numpy(m) != 0) for m in amnesic.optimizer.momentums)
    for momentum in amnesic.optimizer.momentums:
        momentum.assign(np.zeros(momentum.shape, "float32"))
    without_state = amnesic.fit(**fit_args, epochs=EPOCHS, initial_epoch=2).history
    assert not np.allclose(without_state["loss"][1], uninterrupted["loss"][3], rtol=1e-5, atol=1e-7)


def test_teacher_and_student_come_back_distinct(tmp_path):
    model = _compiled_model()
    model.fit(x=random_views(batch=IMAGES), batch_size=BATCH, epochs=1, verbose=0)
    model.save(tmp_path / "carp.keras")
    loaded = keras.saving.load_model(tmp_path / "carp.keras")
    for network in ("student_encoder", "teacher_encoder", "student_head", "teacher_head"):
        for mine, theirs in zip(_weights(getattr(loaded, network).weights), _weights(getattr(model, network).weights)):
            np.testing.assert_array_equal(mine, theirs)
    student, teacher = _weights(loaded.student_head.weights), _weights(loaded.teacher_head.weights)
    assert any(not np.array_equal(s, t) for s, t in zip(student, teacher))
    assert not loaded.teacher_encoder.trainable and loaded.student_encoder.trainable


def test_an_uncompiled_model_loads_uncompiled(tmp_path):
    model = tiny_model()
    model.save(tmp_path / "fresh.keras")
    loaded = keras.saving.load_model(tmp_path / "fresh.keras")
    assert not loaded.compiled
    images = random_views(batch=2)[0]
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(model(images)), atol=1e-6)
