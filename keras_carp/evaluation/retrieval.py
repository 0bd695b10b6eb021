"""Image retrieval: mean average precision of a gallery ranked by cosine similarity to each query."""

from __future__ import annotations

import numpy as np

from keras_carp.evaluation.knn import l2_normalize


def retrieval_map(
    query_features: np.ndarray,
    query_labels: np.ndarray,
    gallery_features: np.ndarray,
    gallery_labels: np.ndarray,
    chunk_size: int = 1024,
    exclude_self: bool = False,
) -> dict:
    """mAP (%) and precision@1 (%): gallery items with the query's label are the relevant ones.

    ``exclude_self`` drops the identical index when queries and gallery are
    the same set. Queries without any relevant item are skipped.
    """
    query_labels, gallery_labels = np.asarray(query_labels), np.asarray(gallery_labels)
    queries, gallery = l2_normalize(query_features), l2_normalize(gallery_features)
    average_precisions, first_hits = [], []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ gallery.T
        if exclude_self:
            index = np.arange(start, start + len(similarity))
            similarity[np.arange(len(similarity)), index] = -np.inf
        order = np.argsort(-similarity, axis=1, kind="stable")
        relevant = gallery_labels[order] == query_labels[start : start + chunk_size, None]
        if exclude_self:
            relevant = relevant[:, :-1]  # the query itself, ranked last
        hits = np.cumsum(relevant, axis=1)
        ranks = np.arange(1, relevant.shape[1] + 1)
        totals = relevant.sum(axis=1)
        valid = totals > 0
        precision_at_hits = np.where(relevant, hits / ranks, 0.0).sum(axis=1)
        average_precisions.append(precision_at_hits[valid] / totals[valid])
        first_hits.append(relevant[valid, 0])
    return {"map": 100.0 * float(np.concatenate(average_precisions).mean()),
            "precision_at_1": 100.0 * float(np.concatenate(first_hits).mean())}  # fmt: skip
