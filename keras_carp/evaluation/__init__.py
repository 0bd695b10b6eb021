"""Evaluation protocols on frozen encoders, and monitors for ``fit``."""

from keras_carp.evaluation.callbacks import CollapseMonitor, KNNMonitor
from keras_carp.evaluation.clustering import clustering_accuracy, kmeans_scores
from keras_carp.evaluation.features import extract_features, extract_labelled_features
from keras_carp.evaluation.fewshot import few_shot
from keras_carp.evaluation.knn import knn_accuracy, l2_normalize, weighted_knn
from keras_carp.evaluation.linear import linear_probe, linear_probe_on_images
from keras_carp.evaluation.prototypes import prototype_assignments, prototype_groups
from keras_carp.evaluation.retrieval import retrieval_map

__all__ = [
    "CollapseMonitor",
    "KNNMonitor",
    "clustering_accuracy",
    "extract_features",
    "extract_labelled_features",
    "few_shot",
    "kmeans_scores",
    "knn_accuracy",
    "l2_normalize",
    "linear_probe",
    "linear_probe_on_images",
    "prototype_assignments",
    "prototype_groups",
    "retrieval_map",
    "weighted_knn",
]
