import keras
import numpy as np
import pytest

import keras_carp
from tests.conftest import random_views, tiny_model, to_numpy

pytestmark = pytest.mark.core


def _fit(model, views, epochs=1, batch_size=8, callbacks=None, lr=0.05):
    model.compile(optimizer=keras_carp.LARS(lr))
    return model.fit(x=views, batch_size=batch_size, epochs=epochs, verbose=0, shuffle=False, callbacks=callbacks)


def _values(variables):
    return [to_numpy(v).copy() for v in variables]


def test_fit_reports_losses_and_collapse_indicator_with_multicrop():
    model = tiny_model()
    history = _fit(model, random_views(batch=16, num_local=2), epochs=2)
    for key in ("loss", "consistency", "entropy", "prototypes_used", "teacher_momentum", "learning_rate"):
        assert key in history.history and np.all(np.isfinite(history.history[key]))
    np.testing.assert_allclose(
        history.history["loss"], np.add(history.history["consistency"], history.history["entropy"]), rtol=1e-5
    )
    assert 1 <= history.history["prototypes_used"][-1] <= 64


def test_teacher_starts_identical_and_is_not_trainable():
    model = tiny_model()
    student = model.student_encoder.weights + model.student_head.weights
    teacher = model.teacher_encoder.weights + model.teacher_head.weights
    for s, t in zip(student, teacher):
        np.testing.assert_array_equal(to_numpy(s), to_numpy(t))
    trainable_ids = {id(v) for v in model.trainable_variables}
    assert not any(id(v) in trainable_ids for v in teacher)
    assert len(model.trainable_variables) == len(model.student_encoder.trainable_weights) + len(
        model.student_head.trainable_weights
    )


def test_teacher_ema_uses_the_pre_step_student_weights():
    """teacher_1 = m * teacher_0 + (1 - m) * student_0 for every trainable weight (released order)."""
    model = tiny_model()
    pairs = model.ema_pairs
    teacher_0 = _values([t for _, t in pairs])
    for s, _ in pairs:  # a student that differs from the teacher before the step
        s.assign(to_numpy(s) + np.random.default_rng(0).normal(0, 0.1, size=s.shape).astype("float32"))
    student_0 = _values([s for s, _ in pairs])
    _fit(model, random_views(batch=8), callbacks=[keras_carp.TeacherEMA(0.75, 0.75)])
    student_1, teacher_1 = _values([s for s, _ in pairs]), _values([t for _, t in pairs])
    moved = 0
    for t0, s0, s1, t1 in zip(teacher_0, student_0, student_1, teacher_1):
        np.testing.assert_allclose(t1, 0.75 * t0 + 0.25 * s0, rtol=1e-5, atol=1e-6)
        moved += not np.allclose(s0, s1)
    assert moved > len(pairs) // 2  # the student did move, so the pre-step / post-step check has teeth


def test_zero_momentum_makes_the_teacher_the_previous_student():
    """m = 0 (the no-momentum ablation, as released): after a step the teacher is the student before it."""
    model = tiny_model()
    _fit(model, random_views(batch=16), epochs=1, callbacks=[keras_carp.TeacherEMA(0.0, 0.0)])
    before = _values([s for s, _ in model.ema_pairs])
    model.fit(x=random_views(batch=8, seed=1), batch_size=8, epochs=1, verbose=0, shuffle=False,
              callbacks=[keras_carp.TeacherEMA(0.0, 0.0)])  # fmt: skip
    for (s, t), s0 in zip(model.ema_pairs, before):
        np.testing.assert_allclose(to_numpy(t), s0, rtol=1e-6, atol=1e-7)
    assert sum(not np.allclose(to_numpy(s), s0) for (s, _), s0 in zip(model.ema_pairs, before)) > len(before) // 2


def test_teacher_momentum_follows_the_cosine_over_the_whole_run():
    model = tiny_model()
    history = _fit(model, random_views(batch=16), epochs=2, callbacks=[keras_carp.TeacherEMA(0.9, 1.0)])
    # 2 steps per epoch, 4 in all; the epoch logs hold the last step's momentum (steps 1 and 3).
    want = [1.0 - 0.1 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in (1, 3)]
    np.testing.assert_allclose(history.history["teacher_momentum"], want, rtol=1e-5)


def test_teacher_ema_logs_the_momentum_in_the_train_steps_column(tmp_path):
    """The callback puts m at the epoch's last batch in the epoch logs, under the train step's own name."""
    model = tiny_model()
    ema = keras_carp.TeacherEMA(0.9, 1.0)
    csv = keras_carp.RunCSVLogger(str(tmp_path / "log.csv"))  # Keras' CSVLogger adds empty val_ columns
    _fit(model, random_views(batch=16), epochs=2, callbacks=[ema, csv])
    want = [1.0 - 0.1 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in (1, 3)]
    header, *rows = (tmp_path / "log.csv").read_text().splitlines()
    columns = header.split(",")
    assert [c for c in columns if "momentum" in c] == ["teacher_momentum"]
    column = columns.index("teacher_momentum")
    np.testing.assert_allclose([float(row.split(",")[column]) for row in rows], want, rtol=1e-5)
    assert ema.total_steps == 4  # resolved to this fit's length
    logs = {}
    ema.on_epoch_end(1, logs)
    assert isinstance(logs["teacher_momentum"], float) and logs["teacher_momentum"] == pytest.approx(want[-1])

    plain = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    plain.compile(optimizer="sgd", loss="mse")
    with pytest.raises(TypeError, match="keras_carp.CARP"):
        plain.fit(np.zeros((4, 2)), np.zeros((4, 1)), verbose=0, callbacks=[keras_carp.TeacherEMA()])


def test_the_model_owns_the_teacher_momentum_schedule():
    """CARP(teacher_momentum_schedule=) sets m; fit resolves an unset length; the TeacherEMA callback sets it too."""
    schedule = keras_carp.TeacherMomentumSchedule(0.9, 1.0)
    model = tiny_model(teacher_momentum_schedule=schedule)
    history = _fit(model, random_views(batch=16), epochs=2)
    want = [1.0 - 0.1 * 0.5 * (1 + np.cos(np.pi * s / 4)) for s in (1, 3)]
    np.testing.assert_allclose(history.history["teacher_momentum"], want, rtol=1e-5)
    assert model.teacher_momentum_schedule is schedule
    assert model.resolved_teacher_momentum_schedule == keras_carp.TeacherMomentumSchedule(0.9, 1.0, total_steps=4)
    saved = keras_carp.CARP.from_config(model.get_config()).teacher_momentum_schedule
    assert saved == keras_carp.TeacherMomentumSchedule(0.9, 1.0, total_steps=4)  # the run's length is kept

    model.teacher_momentum_schedule = keras_carp.TeacherMomentumSchedule(0.5, 0.5)
    history = model.fit(x=random_views(batch=8), batch_size=8, epochs=1, verbose=0)
    np.testing.assert_allclose(history.history["teacher_momentum"], [0.5])
    ema = keras_carp.TeacherEMA(0.75, 0.75, total_steps=10)
    history = model.fit(x=random_views(batch=8), batch_size=8, epochs=1, verbose=0, callbacks=[ema])
    np.testing.assert_allclose(history.history["teacher_momentum"], [0.75])
    assert model.teacher_momentum_schedule is ema.teacher_momentum_schedule
    with pytest.raises(ValueError, match="2 callbacks that set the teacher momentum"):
        model.fit(x=random_views(batch=8), batch_size=8, epochs=1, verbose=0,
                  callbacks=[ema, keras_carp.TeacherEMA(0.5, 0.5)])  # fmt: skip
    with pytest.raises(TypeError, match="TeacherMomentumSchedule"):
        tiny_model(teacher_momentum_schedule=0.99)


def test_prototypes_stay_unit_norm_after_training():
    model = tiny_model()
    _fit(model, random_views(batch=16), epochs=2, lr=0.5)
    raw = to_numpy(model.student_head.prototypes)
    assert not np.allclose(np.linalg.norm(raw, axis=1), 1.0)  # the raw weight is free ...
    norms = np.linalg.norm(to_numpy(model.student_head.normalized_prototypes()), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # ... the prototypes used are unit norm


def test_fixed_partition_and_one_block_ablations_train():
    for kwargs in (dict(partition="fixed"), dict(block_size=64)):
        history = _fit(tiny_model(**kwargs), random_views(batch=8))
        assert np.isfinite(history.history["loss"][-1])


def test_step_loss_matches_the_library_loss_on_the_same_permutation():
    """The model's forward equals carp_loss on the logits of each crop under the step's permutation."""
    model = tiny_model()
    views = random_views(batch=4)
    logs = model.compute_carp_losses(views, 3, training=False)
    perm = model.partition_permutation(3)
    student = [model.student_head(model.student_encoder(v)) for v in views]
    teacher = [model.teacher_head(model.teacher_encoder(v)) for v in views[:2]]
    # training=False: BN uses moving statistics, so per-crop forwards equal the grouped forward.
    want = keras_carp.carp_loss(student, teacher, perm, model.block_size)
    partitioned = [[keras.ops.take(x, perm, axis=1) for x in logits] for logits in (student, teacher)]
    loss_class = model.carp_loss(*partitioned)
    assert isinstance(model.carp_loss, keras_carp.CARPLoss) and model.carp_loss.block_size == model.block_size
    for key in ("loss", "consistency", "entropy"):
        np.testing.assert_allclose(float(to_numpy(logs[key])), float(to_numpy(want[key])), rtol=1e-4)
        np.testing.assert_allclose(float(to_numpy(loss_class[key])), float(to_numpy(want[key])), rtol=1e-5)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(block_size=24), "divide"),
        (dict(block_size=128), "larger"),
        (dict(block_size=-4), "positive"),
        (dict(partition="sometimes"), "partition"),
    ],
)
def test_bad_hyperparameters_raise_value_error(kwargs, message):
    with pytest.raises(ValueError, match=message):
        tiny_model(**kwargs)


def test_bad_head_sizes_raise_value_error():
    with pytest.raises(ValueError, match="bottleneck_dim"):
        keras_carp.CARPHead(num_prototypes=16, bottleneck_dim=0)
    with pytest.raises(ValueError, match="num_prototypes"):
        keras_carp.CARPHead(num_prototypes=-1)


def test_fewer_than_two_global_crops_is_a_clear_error():
    model = tiny_model()
    model.compile(optimizer=keras_carp.LARS(0.1))
    with pytest.raises(ValueError, match="2 global crops"):
        model.fit(x=(random_views(batch=8)[0],), batch_size=8, epochs=1, verbose=0)


def test_config_round_trip_and_keras_file(tmp_path):
    model = tiny_model(block_size=32, partition="fixed", seed=5)
    restored = keras_carp.CARP.from_config(model.get_config())
    assert (restored.block_size, restored.partition, restored.seed, restored.num_prototypes) == (32, "fixed", 5, 64)
    head = keras_carp.CARPHead.from_config(model.student_head.get_config())
    assert head.get_config() == model.student_head.get_config()
    _fit(model, random_views(batch=8))
    path = tmp_path / "carp.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    images = random_views(batch=4)[0]
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(model(images)), rtol=1e-5, atol=1e-5)


def test_mixed_precision_keeps_probabilities_and_loss_in_float32():
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        model = tiny_model()
        logs = model.compute_carp_losses(random_views(batch=4), 0, training=True)
        for key in ("loss", "consistency", "entropy"):
            assert keras.backend.standardize_dtype(logs[key].dtype) == "float32"
        features = model.student_encoder(random_views(batch=4)[0])
        logits = model.student_head(features)
        assert keras.backend.standardize_dtype(logits.dtype) == "bfloat16"
        probs = keras_carp.partition_probs(logits, keras.ops.arange(64, dtype="int32"), 16)
        assert keras.backend.standardize_dtype(probs.dtype) == "float32"
        history = _fit(model, random_views(batch=8))
        assert np.isfinite(history.history["loss"][-1])
    finally:
        keras.config.set_dtype_policy("float32")


def test_two_accumulated_half_batches_equal_one_batch_of_both_halves():
    """Gradient accumulation (N = 2) against one batch, where the method allows them to be equal.

    Equal: the full batch is a half-batch A twice, [A, A], under the fixed partition. Batch-norm batch
    statistics over [A, A] are those over A (same mean, same biased variance), and so is the entropy's batch
    mean, so the full batch's gradient is the mean of the two halves': the student, the teacher (updated once,
    on the group's last batch) and the LARS state end equal. Not equal: the BN moving statistics, updated once
    per batch (twice with accumulation); and, with random partitions, each accumulated batch draws its own
    partition (tests/keras_carp/test_released_step.py checks that case against the released step).
    """
    half = random_views(batch=8, num_local=2, seed=3)
    doubled = tuple(np.concatenate([view, view]) for view in half)
    models = []
    for accumulation, batch in ((None, 16), (2, 8)):
        keras.utils.set_random_seed(0)
        model = tiny_model(partition="fixed")
        rng = np.random.default_rng(1)
        for student, _ in model.ema_pairs:  # a student away from the teacher, so that the teacher's update shows
            student.assign(to_numpy(student) + rng.normal(0, 0.05, student.shape).astype("float32"))
        model.compile(optimizer=keras_carp.LARS(0.5, weight_decay=1e-4, gradient_accumulation_steps=accumulation))
        model.fit(x=doubled, batch_size=batch, epochs=1, verbose=0, shuffle=False,
                  callbacks=[keras_carp.TeacherEMA(0.9, 0.9)])  # fmt: skip
        models.append(model)
    full, accumulated = models
    assert int(to_numpy(accumulated.optimizer.iterations)) == int(to_numpy(full.optimizer.iterations)) == 1
    pairs = list(zip(full.ema_pairs, accumulated.ema_pairs))
    for (student_a, teacher_a), (student_b, teacher_b) in pairs:
        np.testing.assert_allclose(to_numpy(student_b), to_numpy(student_a), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(to_numpy(teacher_b), to_numpy(teacher_a), rtol=1e-5, atol=1e-7)
    for momentum_a, momentum_b in zip(full.optimizer.momentums, accumulated.optimizer.momentums):
        np.testing.assert_allclose(to_numpy(momentum_b), to_numpy(momentum_a), rtol=1e-4, atol=1e-8)
    moving_a = [to_numpy(v) for v in full.student_encoder.non_trainable_weights]
    moving_b = [to_numpy(v) for v in accumulated.student_encoder.non_trainable_weights]
    assert not all(np.allclose(a, b) for a, b in zip(moving_a, moving_b))  # two BN updates against one
