"""Evaluation protocols against NumPy references written here and scikit-learn."""

import itertools

import numpy as np
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import average_precision_score

from keras_carp.evaluation import (
    clustering_accuracy,
    extract_labelled_features,
    few_shot,
    kmeans_scores,
    linear_probe,
    prototype_groups,
    retrieval_map,
    weighted_knn,
)


def _blobs(num_classes=5, per_class=60, dim=16, spread=1.0, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(num_classes, dim)) * 3
    labels = np.repeat(np.arange(num_classes), per_class)
    return (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype("float32"), labels


def _knn_reference(train, train_labels, test, test_labels, k, temperature, num_classes):
    """One test point at a time: sort all similarities, vote with exp(sim / T)."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    top1 = top5 = 0
    for x, y in zip(test, test_labels):
        sims = train @ x
        nearest = np.argsort(-sims, kind="stable")[:k]
        votes = np.zeros(num_classes)
        for j in nearest:
            votes[train_labels[j]] += np.exp(sims[j] / temperature)
        ranked = np.argsort(-votes, kind="stable")
        top1 += ranked[0] == y
        top5 += y in ranked[:5]
    return {"top1": 100 * top1 / len(test), "top5": 100 * top5 / len(test)}


def test_weighted_knn_matches_the_reference_for_every_k_and_chunk_size():
    features, labels = _blobs(num_classes=8, spread=3.0)
    train, test = features[::2], features[1::2]
    train_labels, test_labels = labels[::2], labels[1::2]
    swept = weighted_knn(train, train_labels, test, test_labels, k=[1, 5, 20, 100], chunk_size=7)
    for k in (1, 5, 20, 100):
        expected = _knn_reference(train, train_labels, test, test_labels, k, 0.07, 8)
        assert swept[k] == pytest.approx(expected)
        assert weighted_knn(train, train_labels, test, test_labels, k=k) == pytest.approx(expected)
    assert 0 < swept[20]["top1"] < 100  # overlapping blobs: the test can tell methods apart


def test_clustering_accuracy_is_the_best_matching_over_all_permutations():
    rng = np.random.default_rng(1)
    labels, assignments = rng.integers(0, 4, 200), rng.integers(0, 4, 200)
    best = max(np.mean(np.asarray(p)[assignments] == labels) for p in itertools.permutations(range(4)))
    assert clustering_accuracy(labels, assignments) == pytest.approx(100 * best)


def test_kmeans_recovers_separated_classes_whatever_their_names():
    features, labels = _blobs(num_classes=4, spread=0.3)
    scores = kmeans_scores(features, (labels + 2) % 4)
    assert scores["accuracy"] == 100.0 and scores["nmi"] == pytest.approx(1.0) and scores["ari"] == pytest.approx(1.0)
    noise = kmeans_scores(np.random.default_rng(2).normal(size=features.shape), labels)
    assert noise["adjusted_nmi"] < 0.05 and noise["ari"] < 0.05


def test_few_shot_is_near_perfect_on_separated_classes_and_chance_on_noise():
    features, labels = _blobs(num_classes=10, per_class=40, spread=0.3)
    assert few_shot(features, labels, ways=5, shots=1, episodes=50)["accuracy"] > 99
    noise = few_shot(np.random.default_rng(3).normal(size=features.shape), labels, ways=5, shots=5, episodes=300)
    assert abs(noise["accuracy"] - 20.0) < 4 * noise["ci95"] + 1
    with pytest.raises(ValueError, match="classes with"):
        few_shot(features, labels, ways=11)


def test_retrieval_map_matches_scikit_learn_average_precision():
    features, labels = _blobs(num_classes=6, spread=2.5, per_class=20)
    is_query = np.arange(len(labels)) % 4 == 0
    queries, gallery = features[is_query], features[~is_query]
    query_labels, gallery_labels = labels[is_query], labels[~is_query]
    result = retrieval_map(queries, query_labels, gallery, gallery_labels, chunk_size=8)
    gallery_n = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    expected = [
        average_precision_score(gallery_labels == y, gallery_n @ (q / np.linalg.norm(q)))
        for q, y in zip(queries, query_labels)
    ]
    assert result["map"] == pytest.approx(100 * np.mean(expected), abs=1e-6)


def test_linear_probe_is_as_good_as_logistic_regression():
    features, labels = _blobs(num_classes=5, spread=2.5, per_class=80)
    train, test = features[::2], features[1::2]
    result = linear_probe(train, labels[::2], test, labels[1::2], epochs=30, batch_size=32)
    reference = 100 * LogisticRegression(max_iter=2000).fit(train, labels[::2]).score(test, labels[1::2])
    assert result["top1"] >= reference - 3 and result["top5"] == 100.0


def test_features_are_cached_to_disk(tmp_path):
    import keras

    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    batches = [(np.ones((2, 4), "float32"), np.array([0, 1])), (np.zeros((1, 4), "float32"), np.array([2]))]
    features, labels = extract_labelled_features(encoder, batches, cache_path=tmp_path / "f.npz")
    assert features.shape == (3, 3) and labels.tolist() == [0, 1, 2]
    cached, cached_labels = extract_labelled_features(None, [], cache_path=tmp_path / "f.npz")
    np.testing.assert_array_equal(cached, features)
    np.testing.assert_array_equal(cached_labels, labels)


def test_linear_probe_on_images_trains_a_dense_layer_on_the_frozen_encoder():
    import keras

    from keras_carp import build_encoder
    from keras_carp.data import classification_dataset, eval_dataset
    from keras_carp.evaluation import linear_probe_on_images

    rng = np.random.default_rng(5)
    labels = np.repeat(np.arange(2), 16)
    images = rng.uniform(0, 0.3, size=(32, 20, 20, 3)).astype("float32")
    images[labels == 1, :, :, 0] += 0.7  # class 1 is red: linearly separable from frozen features
    encoder = build_encoder("resnet_tiny")
    before = [keras.ops.convert_to_numpy(w).copy() for w in encoder.weights]
    train = classification_dataset(images, 16, batch_size=8, labels=labels, scale=(0.5, 1.0))
    test = eval_dataset(images, 16, batch_size=16, labels=labels)
    result = linear_probe_on_images(encoder, train, test, num_classes=2, epochs=3, steps_per_epoch=8, learning_rate=0.1)
    assert result["top1"] >= 90.0
    for w, b in zip(encoder.weights, before):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(w), b)  # the encoder stayed frozen


def test_prototype_groups_rank_by_use_and_score():
    rng = np.random.default_rng(0)
    assignments = rng.choice([3, 7, 11, 20], p=[0.1, 0.4, 0.3, 0.2], size=500)
    scores = rng.normal(size=500)
    groups = prototype_groups(assignments, scores, top=3, per_group=4)
    counts = {p: int(np.sum(assignments == p)) for p in (3, 7, 11, 20)}
    expected_order = sorted(counts, key=lambda p: (-counts[p], p))[:3]
    assert [g["prototype"] for g in groups] == expected_order
    for group in groups:
        assert group["count"] == counts[group["prototype"]]
        members = np.flatnonzero(assignments == group["prototype"])
        best = members[np.argsort(-scores[members])][:4]
        assert group["indices"] == best.tolist()


def test_features_of_an_array_are_the_encoders_outputs_in_batches():
    import keras

    from keras_carp.evaluation import extract_features

    encoder = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
    images = np.random.default_rng(0).normal(size=(7, 4)).astype("float32")
    features = extract_features(encoder, images, batch_size=3)
    np.testing.assert_allclose(features, keras.ops.convert_to_numpy(encoder(images)), rtol=1e-5, atol=1e-6)
