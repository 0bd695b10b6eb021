"""Evaluation protocols on frozen encoders (their monitors for ``fit`` are in ``keras_carp.callbacks``)."""

from keras_carp.evaluation.clustering import clustering_accuracy, kmeans_scores
from keras_carp.evaluation.copy_detection import copy_detection_map, copydays_blocks, evaluate_copydays
from keras_carp.evaluation.features import extract_features, extract_labelled_features
from keras_carp.evaluation.fewshot import few_shot
from keras_carp.evaluation.knn import knn_accuracy, l2_normalize, weighted_knn
from keras_carp.evaluation.linear import linear_probe, linear_probe_on_images
from keras_carp.evaluation.lowshot_svm import low_shot_svm, multilabel_targets, sample_low_shot, svm_map, voc_dataset
from keras_carp.evaluation.online_probe import OnlineLinearProbe
from keras_carp.evaluation.prototypes import prototype_assignments, prototype_groups
from keras_carp.evaluation.retrieval import average_precision_from_ranks, image_file_features, retrieval_map
from keras_carp.evaluation.revisited import (
    compute_map,
    evaluate_revisited,
    load_revisited_ground_truth,
    revisited_map,
    setup_ground_truth,
)
from keras_carp.evaluation.transfer import (
    TRANSFER_DATASETS,
    TRANSFER_LIST,
    TransferDataset,
    markdown_table,
    resolve_datasets,
    run_transfer,
    table_rows,
)

__all__ = [
    "OnlineLinearProbe",
    "TRANSFER_DATASETS",
    "TRANSFER_LIST",
    "TransferDataset",
    "average_precision_from_ranks",
    "clustering_accuracy",
    "compute_map",
    "copy_detection_map",
    "copydays_blocks",
    "evaluate_copydays",
    "evaluate_revisited",
    "extract_features",
    "extract_labelled_features",
    "few_shot",
    "image_file_features",
    "kmeans_scores",
    "knn_accuracy",
    "l2_normalize",
    "linear_probe",
    "linear_probe_on_images",
    "load_revisited_ground_truth",
    "low_shot_svm",
    "markdown_table",
    "multilabel_targets",
    "prototype_assignments",
    "prototype_groups",
    "resolve_datasets",
    "retrieval_map",
    "revisited_map",
    "run_transfer",
    "sample_low_shot",
    "setup_ground_truth",
    "svm_map",
    "table_rows",
    "voc_dataset",
    "weighted_knn",
]
