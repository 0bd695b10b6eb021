"""Evaluation protocols on frozen encoders, and monitors for ``fit``."""

from keras_carp.evaluation.callbacks import CollapseMonitor, KNNMonitor
from keras_carp.evaluation.features import extract_features, extract_labelled_features
from keras_carp.evaluation.knn import l2_normalize, weighted_knn

__all__ = [
    "CollapseMonitor",
    "KNNMonitor",
    "extract_features",
    "extract_labelled_features",
    "l2_normalize",
    "weighted_knn",
]
