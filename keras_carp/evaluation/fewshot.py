"""Few-shot N-way K-shot classification on frozen features: logistic regression per episode."""

from __future__ import annotations

import numpy as np

from keras_carp.evaluation.knn import l2_normalize


def few_shot(
    features: np.ndarray,
    labels: np.ndarray,
    ways: int = 5,
    shots: int = 5,
    queries: int = 15,
    episodes: int = 600,
    seed: int = 0,
) -> dict:
    """Mean accuracy (%) and 95 % interval half-width over random episodes.

    Each episode draws ``ways`` classes, ``shots`` support and ``queries`` query
    images per class (disjoint), fits a logistic regression on the L2-normalised
    support features and scores the queries.
    """
    from sklearn.linear_model import LogisticRegression  # scikit-learn only where it is used

    labels = np.asarray(labels).astype(int)
    features = l2_normalize(features)
    classes, counts = np.unique(labels, return_counts=True)
    eligible = classes[counts >= shots + queries]
    if len(eligible) < ways:
        raise ValueError(f"{ways}-way {shots}-shot needs {ways} classes with {shots + queries} images each; "
                         f"{len(eligible)} have enough.")  # fmt: skip
    rng = np.random.default_rng(seed)
    by_class = {c: np.flatnonzero(labels == c) for c in eligible}
    accuracies = []
    for _ in range(episodes):
        chosen = rng.choice(eligible, ways, replace=False)
        support, query = [], []
        for c in chosen:
            picked = rng.choice(by_class[c], shots + queries, replace=False)
            support.append(picked[:shots])
            query.append(picked[shots:])
        support, query = np.concatenate(support), np.concatenate(query)
        episode_labels = np.repeat(np.arange(ways), shots)
        classifier = LogisticRegression(max_iter=1000).fit(features[support], episode_labels)
        predicted = classifier.predict(features[query])
        accuracies.append(np.mean(predicted == np.repeat(np.arange(ways), queries)))
    accuracies = 100.0 * np.asarray(accuracies)
    half_width = 1.96 * accuracies.std(ddof=1) / np.sqrt(episodes) if episodes > 1 else float("nan")
    return {"ways": ways, "shots": shots, "episodes": episodes, "accuracy": float(accuracies.mean()),
            "ci95": float(half_width)}  # fmt: skip
