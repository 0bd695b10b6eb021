"""Weighted k-NN on L2-normalised frozen features (the DINO / CARP protocol)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from keras_carp.evaluation.features import extract_labelled_features


def l2_normalize(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, "float32")
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def weighted_knn(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    test_features: np.ndarray,
    test_labels: np.ndarray,
    k: int | Sequence[int] = 20,
    temperature: float = 0.07,
    num_classes: int | None = None,
    chunk_size: int = 1024,
) -> dict:
    """Top-1 and top-5 accuracy (%) of the weighted k-NN classifier.

    Features are L2-normalised; each test point's k most cosine-similar training
    points vote for their class with weight ``exp(sim / temperature)``. Test
    points go in chunks, so only a [chunk, N_train] similarity block ever
    exists (1.28M x 2048 training features stay feasible). With a list of k
    (e.g. 10, 20, 100, 200) the neighbours are found once and the result
    is ``{k: {"top1", "top5"}}``.
    """
    ks = [k] if np.isscalar(k) else list(k)
    if not ks or min(ks) <= 0 or temperature <= 0:
        raise ValueError(f"k and temperature must be positive, got k={k}, temperature={temperature}.")
    train_labels = np.asarray(train_labels).astype(int)
    test_labels = np.asarray(test_labels).astype(int)
    if len(train_labels) != len(train_features) or len(test_labels) != len(test_features):
        raise ValueError("Features and labels differ in length.")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max()) + 1)
    k_max = min(max(ks), len(train_features))
    train = l2_normalize(train_features)
    test = l2_normalize(test_features)
    hits = {kk: [0, 0] for kk in ks}
    for start in range(0, len(test), chunk_size):
        similarity = test[start : start + chunk_size] @ train.T
        nearest = np.argpartition(-similarity, k_max - 1, axis=1)[:, :k_max]
        nearest_sim = np.take_along_axis(similarity, nearest, axis=1)
        order = np.argsort(-nearest_sim, axis=1, kind="stable")
        nearest, nearest_sim = np.take_along_axis(nearest, order, 1), np.take_along_axis(nearest_sim, order, 1)
        truth = test_labels[start : start + chunk_size, None]
        rows = np.arange(len(similarity))[:, None]
        for kk in ks:
            used = min(kk, k_max)
            votes = np.zeros((len(similarity), num_classes), "float64")
            np.add.at(votes, (rows, train_labels[nearest[:, :used]]), np.exp(nearest_sim[:, :used] / temperature))
            ranked = np.argsort(-votes, axis=1, kind="stable")
            hits[kk][0] += int((ranked[:, :1] == truth).any(axis=1).sum())
            hits[kk][1] += int((ranked[:, :5] == truth).any(axis=1).sum())
    results = {kk: {"top1": 100.0 * h1 / len(test), "top5": 100.0 * h5 / len(test)} for kk, (h1, h5) in hits.items()}
    return results[ks[0]] if np.isscalar(k) else results


def knn_accuracy(
    encoder, bank, queries, k: int = 20, temperature: float = 0.07, num_classes: int | None = None
) -> dict:
    """``weighted_knn`` of an encoder: features of the labelled ``bank`` and ``queries`` batches, then the vote."""
    train_features, train_labels = extract_labelled_features(encoder, bank)
    test_features, test_labels = extract_labelled_features(encoder, queries)
    return weighted_knn(train_features, train_labels, test_features, test_labels, k, temperature, num_classes)
