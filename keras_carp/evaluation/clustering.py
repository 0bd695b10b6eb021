"""k-means on frozen features: NMI, adjusted NMI, ARI and clustering accuracy (scikit-learn and SciPy)."""

from __future__ import annotations

import numpy as np

from keras_carp.evaluation.knn import l2_normalize


def clustering_accuracy(labels: np.ndarray, assignments: np.ndarray) -> float:
    """Accuracy (%) under the best one-to-one map of clusters to classes (Hungarian matching)."""
    labels, assignments = np.asarray(labels).astype(int), np.asarray(assignments).astype(int)
    size = max(labels.max(), assignments.max()) + 1
    counts = np.zeros((size, size), "int64")
    np.add.at(counts, (assignments, labels), 1)
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(counts, maximize=True)
    return 100.0 * counts[rows, cols].sum() / len(labels)


def kmeans_scores(
    features: np.ndarray, labels: np.ndarray, num_clusters: int | None = None, seed: int = 0, n_init: int = 3
) -> dict:
    """k-means (k = number of classes by default) on L2-normalised features, scored against the labels.

    Returns ``nmi``, ``adjusted_nmi``, ``ari`` (scikit-learn) and ``accuracy`` (%).
    """
    labels = np.asarray(labels).astype(int)
    num_clusters = num_clusters or len(np.unique(labels))
    from sklearn import metrics  # scikit-learn only where it is used (a GPU machine may lack it)
    from sklearn.cluster import KMeans

    assignments = KMeans(num_clusters, n_init=n_init, random_state=seed).fit_predict(l2_normalize(features))
    return {
        "nmi": float(metrics.normalized_mutual_info_score(labels, assignments)),
        "adjusted_nmi": float(metrics.adjusted_mutual_info_score(labels, assignments)),
        "ari": float(metrics.adjusted_rand_score(labels, assignments)),
        "accuracy": float(clustering_accuracy(labels, assignments)),
    }
