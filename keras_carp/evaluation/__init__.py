"""Evaluation protocols on frozen encoders."""

from keras_carp.evaluation.knn import extract_features, extract_labelled_features, weighted_knn

__all__ = ["extract_features", "extract_labelled_features", "weighted_knn"]
