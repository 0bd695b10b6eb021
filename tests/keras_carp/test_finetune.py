"""Fine-tuning on a fraction of the labels (keras_carp.finetune) and the online linear probe callback."""

import keras
import numpy as np
import pytest
from PIL import Image

from keras_carp.data import ArraySource, FolderSource, load_source
from keras_carp.evaluation.online_probe import OnlineLinearProbe
from keras_carp.finetune import (
    EpochStepDecay,
    GradientScale,
    build_classifier,
    label_fraction_indices,
    label_fraction_subset,
)
from tests.conftest import random_views, tiny_model

# ----------------------------------------------------------------------------- label fractions


def _labels(counts, seed=0):
    labels = np.concatenate([np.full(n, c) for c, n in enumerate(counts)])
    return np.random.default_rng(seed).permutation(labels)


@pytest.mark.core
def test_label_fraction_keeps_the_fraction_of_every_class_and_at_least_one():
    labels = _labels([600, 300, 55, 14, 1])
    chosen = label_fraction_indices(labels, 0.1, seed=3)
    assert np.bincount(labels[chosen], minlength=5).tolist() == [60, 30, 6, 1, 1]  # round(5.5) = 6, 1.4 -> 1
    assert len(np.unique(chosen)) == len(chosen) and np.all(np.diff(chosen) > 0)
    one_percent = label_fraction_indices(labels, 0.01, seed=3)
    assert np.bincount(labels[one_percent], minlength=5).tolist() == [6, 3, 1, 1, 1]


@pytest.mark.core
def test_label_fraction_is_reproducible_from_its_seed_and_nested():
    labels = _labels([200] * 10)
    first, again = label_fraction_indices(labels, 0.1, seed=7), label_fraction_indices(labels, 0.1, seed=7)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, label_fraction_indices(labels, 0.1, seed=8))
    assert set(label_fraction_indices(labels, 0.01, seed=7)) <= set(first)  # 1 % inside 10 % for one seed
    assert len(label_fraction_indices(labels, 1.0)) == len(labels)


@pytest.mark.core
@pytest.mark.parametrize("fraction", [0, -0.1, 1.5, float("nan"), "ten"])
def test_bad_label_fractions_are_refused(fraction):
    with pytest.raises(ValueError, match="label fraction"):
        label_fraction_indices(np.arange(10) % 2, fraction)


def test_subset_of_arrays_keeps_images_with_their_labels():
    images = np.arange(40, dtype=np.uint8).reshape(40, 1, 1, 1).repeat(4, 1).repeat(4, 2)
    labels = np.arange(40) % 4
    subset = label_fraction_subset(ArraySource(images, labels, name="toy"), 0.1, seed=1)
    assert subset.num_examples == 4 and subset.class_names == ("0", "1", "2", "3")
    assert sorted(subset.labels.tolist()) == [0, 1, 2, 3]
    np.testing.assert_array_equal(subset.images[:, 0, 0, 0] % 4, subset.labels)  # pixel value i has label i % 4


def test_subset_of_an_image_folder(tmp_path):
    for c in range(3):
        (tmp_path / f"class{c}").mkdir()
        for i in range(10):
            Image.fromarray(np.full((8, 8, 3), 20 * c + i, np.uint8)).save(tmp_path / f"class{c}" / f"{i}.png")
    source = FolderSource(tmp_path, workers=1)
    subset = label_fraction_subset(source, 0.2, seed=0)
    assert subset.num_examples == 6 and source.num_examples == 30
    assert sorted(subset.scan.labels) == [0, 0, 1, 1, 2, 2]
    assert all(f"class{label}" in path for path, label in zip(subset.scan.files, subset.scan.labels))
    records = list(subset.records().as_numpy_iterator())
    assert [r["label"] for r in records] == subset.scan.labels


def test_subset_of_a_tfds_dataset_reads_the_chosen_examples(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=40):
        source = load_source("mnist", "train", data_dir=tmp_path)
        ordered = source.builder.as_dataset(split="train", shuffle_files=False)
        every_label = np.array([int(example["label"]) for example in ordered.as_numpy_iterator()])
        subset = label_fraction_subset(source, 0.25, seed=0)
        labels = [int(r["label"]) for r in subset.records().as_numpy_iterator()]
    np.testing.assert_array_equal(labels, every_label[label_fraction_indices(every_label, 0.25, seed=0)])
    assert subset.num_examples == len(labels) and subset.class_names == source.class_names


def test_imagenet_fractions_use_tfds_imagenet2012_subset(tmp_path):
    import tensorflow_datasets as tfds

    with tfds.testing.mock_data(num_examples=12):
        source = load_source("imagenet2012", "train", data_dir=tmp_path)
        for fraction, config in ((0.01, "1pct"), (0.1, "10pct")):
            subset = label_fraction_subset(source, fraction)
            assert subset.builder.name == "imagenet2012_subset" and subset.builder.builder_config.name == config
            assert subset.split == "train" and len(subset.class_names) == 1000 and subset.num_examples == 12
        with pytest.raises(ValueError, match="1pct"):
            label_fraction_subset(source, 0.05)


def test_a_source_without_labels_is_refused():
    with pytest.raises(ValueError, match="no labels"):
        label_fraction_subset(ArraySource(np.zeros((4, 8, 8, 3), np.uint8)), 0.5)


# ----------------------------------------------------------------------------- schedule and learning rates


@pytest.mark.core
def test_schedule_drops_by_the_factor_at_the_milestone_epochs():
    schedule = EpochStepDecay(0.5, steps_per_epoch=5, milestones=(12, 16), factor=0.2)
    steps = [0, 59, 60, 61, 79, 80, 99, 1000]
    expected = [0.5, 0.5, 0.1, 0.1, 0.1, 0.02, 0.02, 0.02]
    got = [float(keras.ops.convert_to_numpy(schedule(step))) for step in steps]
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    assert EpochStepDecay.from_config(schedule.get_config()).get_config() == schedule.get_config()
    with pytest.raises(ValueError, match="milestones"):
        EpochStepDecay(0.5, 5, milestones=(16, 12))


def _softmax(logits):
    shifted = np.exp(logits - logits.max(1, keepdims=True))
    return shifted / shifted.sum(1, keepdims=True)


@pytest.mark.core
def test_encoder_and_head_move_by_their_own_learning_rate():
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(6, 4)).astype("float32"), np.array([0, 1, 2, 0, 1, 2])
    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    encoder_lr, head_lr = 0.01, 0.5
    classifier = build_classifier(encoder, 3, encoder_lr, head_lr)
    head = classifier.get_layer("head")
    w1, b1 = (np.array(v) for v in encoder.layers[-1].get_weights())
    w2, b2 = (np.array(v) for v in head.get_weights())
    # The NumPy reference: mean cross-entropy of softmax(relu-free linear-linear), gradients by hand.
    features = x @ w1 + b1
    dlogits = (_softmax(features @ w2 + b2) - np.eye(3)[y]) / len(x)
    dw2, db2 = features.T @ dlogits, dlogits.sum(0)
    dfeatures = dlogits @ w2.T
    dw1, db1 = x.T @ dfeatures, dfeatures.sum(0)
    classifier.compile(
        optimizer=keras.optimizers.SGD(EpochStepDecay(head_lr, steps_per_epoch=10), momentum=0.0),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    classifier.train_on_batch(x, y)
    new_w1, new_b1 = encoder.layers[-1].get_weights()
    new_w2, new_b2 = head.get_weights()
    np.testing.assert_allclose(new_w1, w1 - encoder_lr * dw1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_b1, b1 - encoder_lr * db1, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(new_w2, w2 - head_lr * dw2, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(new_b2, b2 - head_lr * db2, rtol=1e-5, atol=1e-6)


@pytest.mark.core
def test_gradient_scale_is_the_identity_forward_and_scales_backward():
    x = np.random.default_rng(1).normal(size=(3, 5)).astype("float32")
    layer = GradientScale(0.004)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x)), x)
    assert GradientScale.from_config(layer.get_config()).scale == 0.004


@pytest.mark.core
def test_the_classifier_saves_and_loads(tmp_path):
    encoder = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    classifier = build_classifier(encoder, 4)
    classifier.save(tmp_path / "classifier.keras")
    restored = keras.saving.load_model(tmp_path / "classifier.keras")
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype("float32")
    np.testing.assert_allclose(restored.predict_on_batch(images), classifier.predict_on_batch(images), rtol=1e-6)


# ----------------------------------------------------------------------------- online linear probe


def _blobs(n, seed, dim=8, classes=3):
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(scale=3.0, size=(classes, dim))
    labels = rng.integers(0, classes, n)
    return (centres[labels] + rng.normal(size=(n, dim))).astype("float32"), labels


def _batches(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.mark.core
def test_online_probe_learns_separable_features_as_logistic_regression_does():
    from sklearn.linear_model import LogisticRegression

    (x, y), (x_test, y_test) = _blobs(600, 0), _blobs(300, 1)
    inputs = keras.Input((8,))
    identity = keras.Model(inputs, keras.layers.Identity()(inputs))
    probe = OnlineLinearProbe(_batches(x, y, 32), 3, encoder=identity, test_data=_batches(x_test, y_test, 100))
    logs = {}
    for epoch in range(3):
        probe.on_epoch_begin(epoch)
        for step in range(19):
            probe.on_train_batch_end(step)
        probe.on_epoch_end(epoch, logs)
    reference = 100.0 * LogisticRegression(max_iter=1000).fit(x, y).score(x_test, y_test)
    assert reference > 95.0
    assert logs["online_probe_test_top1"] >= reference - 3.0
    assert logs["online_probe_top1"] >= reference - 5.0  # prequential: each batch scored before it is learnt
    assert set(probe.history) == {1, 2, 3}


@pytest.mark.core
def test_online_probe_runs_inside_carp_fit_and_logs_its_accuracy():
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    rng = np.random.default_rng(0)
    labelled = [(rng.normal(size=(8, 16, 16, 3)).astype("float32"), rng.integers(0, 4, 8)) for _ in range(2)]
    probe = OnlineLinearProbe(labelled, 4, encoder="teacher", every_steps=1, test_data=labelled[:1])
    history = model.fit(x=random_views(batch=16), batch_size=8, epochs=2, verbose=0, callbacks=[probe]).history
    for key in ("online_probe_top1", "online_probe_loss", "online_probe_test_top1"):
        assert len(history[key]) == 2 and np.all(np.isfinite(history[key]))


def test_online_probe_refuses_bad_arguments():
    with pytest.raises(ValueError, match="encoder"):
        OnlineLinearProbe([], 3, encoder="momentum")
    with pytest.raises(ValueError, match="every_steps"):
        OnlineLinearProbe([], 3, every_steps=-1)
