"""VOC07 low-shot SVMs against a scikit-learn reference (GridSearchCV + average_precision_score), on a
synthetic multi-label problem, and the TFDS voc/2007 reader on mocked data."""

import numpy as np
import pytest
from sklearn.metrics import average_precision_score
from sklearn.model_selection import GridSearchCV, StratifiedKFold
from sklearn.svm import LinearSVC

from keras_carp.evaluation.lowshot_svm import (
    low_shot_svm,
    multilabel_targets,
    sample_low_shot,
    svm_map,
    voc_dataset,
)

COSTS = (0.01, 0.1, 1.0, 10.0)


def _multilabel(num=160, classes=4, dim=12, noise=1.0, seed=0):
    """Features: one direction per class present, plus noise. Targets 1 / -1, some positives 'difficult' (0)."""
    rng = np.random.default_rng(seed)
    present = rng.random((num, classes)) < 0.35
    present[np.arange(classes), np.arange(classes)] = True  # every class has positives
    directions = rng.normal(size=(classes, dim)) * 2
    features = present.astype("float32") @ directions + noise * rng.normal(size=(num, dim)) + 3.0
    targets = np.where(present, 1, -1)
    targets[present & (rng.random((num, classes)) < 0.1)] = 0
    targets[np.arange(classes), np.arange(classes)] = 1
    return features.astype("float32"), targets


def _reference(train, train_targets, test, test_targets, drawn=None, folds=3, seed=0):
    """Per class: GridSearchCV over C with stratified folds and AP scoring, refit, AP on non-difficult tests."""
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    train, test = norm(train), norm(test)
    aps, costs = [], []
    for c in range(train_targets.shape[1]):
        pos = np.flatnonzero(train_targets[:, c] == 1) if drawn is None else drawn[c][0]
        neg = np.flatnonzero(train_targets[:, c] == -1) if drawn is None else drawn[c][1]
        x = np.concatenate([train[pos], train[neg]])
        y = np.concatenate([np.ones(len(pos)), -np.ones(len(neg))]).astype(int)
        svm = LinearSVC(class_weight={1: 2, -1: 1}, dual=True, max_iter=2000, random_state=seed)
        cv = StratifiedKFold(n_splits=min(folds, len(pos)), shuffle=True, random_state=seed)
        search = GridSearchCV(svm, {"C": list(COSTS)}, cv=cv, scoring="average_precision").fit(x, y)
        keep = test_targets[:, c] != 0
        aps.append(average_precision_score(test_targets[keep, c] == 1, search.decision_function(test[keep])))
        costs.append(search.best_params_["C"])
    return 100 * np.mean(aps), costs


def test_multilabel_targets_mark_difficult_only_classes_as_ignored():
    targets = multilabel_targets([[0, 2, 2], [1], []], [[2], [1], []], num_classes=3)
    np.testing.assert_array_equal(targets, [[0, -1, 1], [-1, 1, -1], [-1, -1, -1]])


def test_svm_map_matches_the_scikit_learn_reference():
    features, targets = _multilabel()
    train, test = features[:100], features[100:]
    ours = svm_map(train, targets[:100], test, targets[100:], costs=COSTS)
    expected_map, expected_costs = _reference(train, targets[:100], test, targets[100:])
    assert ours["map"] == pytest.approx(expected_map, abs=1e-6)
    assert ours["costs"] == expected_costs
    assert 50 < ours["map"] < 100  # noisy enough to tell methods apart


def test_separable_classes_score_full_map_with_few_shots():
    rng = np.random.default_rng(1)
    classes = rng.integers(0, 4, 200)
    classes[:4] = np.arange(4)
    features = np.eye(4)[classes] * 3 + 0.05 * rng.normal(size=(200, 4))  # one class per image, well apart
    targets = np.where(np.eye(4, dtype=bool)[classes], 1, -1)
    results = low_shot_svm(features[:100], targets[:100], features[100:], targets[100:], shots=(1, 2), samples=3,
                           costs=COSTS)  # fmt: skip
    assert set(results) == {1, 2} and len(results[2]["maps"]) == 3
    assert results[1]["map"] == pytest.approx(100.0) and results[2]["map"] == pytest.approx(100.0)
    noise = low_shot_svm(rng.normal(size=(100, 4)), targets[:100], rng.normal(size=(100, 4)), targets[100:],
                         shots=(4,), samples=3, costs=COSTS)  # fmt: skip
    assert noise[4]["map"] < 60  # chance is about 25 % per class


def test_low_shot_samples_are_seeded_and_match_the_reference():
    features, targets = _multilabel(seed=2)
    train, test = features[:100], features[100:]
    first = sample_low_shot(targets[:100], 4, seed=7)
    for c, (pos, neg) in enumerate(first):  # k positives and (C - 1) k = 12 negatives of each class
        assert len(pos) == 4 and (targets[pos, c] == 1).all()
        assert len(neg) == 12 and (targets[neg, c] == -1).all() and len(np.unique(neg)) == 12
    again = sample_low_shot(targets[:100], 4, seed=7)
    assert all((a[0] == b[0]).all() and (a[1] == b[1]).all() for a, b in zip(first, again))
    results = low_shot_svm(train, targets[:100], test, targets[100:], shots=(4,), samples=2, costs=COSTS, seed=7)
    for s in range(2):
        drawn = sample_low_shot(targets[:100], 4, seed=7 + s)
        expected, _ = _reference(train, targets[:100], test, targets[100:], drawn, seed=7 + s)
        assert results[4]["maps"][s] == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="fewer than"):
        sample_low_shot(targets[:100], 1000, seed=0)


def test_voc_dataset_reads_multilabel_targets_from_mocked_tfds():
    tfds = pytest.importorskip("tensorflow_datasets")
    import tensorflow as tf

    # TFDS's random mock cannot fill VOC's nested "objects" sequence: serve known examples instead.
    labels = [[0, 14, 14], [3], [], [19, 2]]
    clear = [[14], [3], [], [19]]
    pngs = [tf.io.encode_png(np.full((10 + i, 12, 3), 40 * i, "uint8")).numpy() for i in range(4)]

    def as_dataset(self, split, decoders=None, **kwargs):
        assert split == "test" and self.name == "voc"
        return tf.data.Dataset.from_generator(
            lambda: ({"image": p, "labels": np.asarray(a, "int64"), "labels_no_difficult": np.asarray(b, "int64")}
                     for p, a, b in zip(pngs, labels, clear)),
            output_signature={"image": tf.TensorSpec((), tf.string), "labels": tf.TensorSpec((None,), tf.int64),
                              "labels_no_difficult": tf.TensorSpec((None,), tf.int64)},
        )  # fmt: skip

    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        batches = list(voc_dataset("test", image_size=8, batch_size=3))
    images = np.concatenate([np.asarray(b[0]) for b in batches])
    targets = np.concatenate([np.asarray(b[1]) for b in batches])
    assert images.shape == (4, 8, 8, 3) and targets.shape == (4, 20)
    np.testing.assert_array_equal(targets, multilabel_targets(labels, clear))
    assert targets[0, 0] == 0 and targets[0, 14] == 1 and targets[3, 2] == 0 and (targets[2] == -1).all()
