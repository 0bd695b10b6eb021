"""keras-carp: CARP self-supervised learning (Consistent Assignment of views over Random Partitions) for Keras 3."""

import os as _os

# TensorFlow enables its oneDNN CPU kernels by default only on CPUs with AVX-512-class features; on AVX2-only
# CPUs (many cloud AMD machines) its fallback kernels ran the CARP step 7.5x slower (python -m bench.cpu_settings).
# Applies when keras_carp is imported before TensorFlow; an explicit TF_ENABLE_ONEDNN_OPTS=0 wins.
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")

from keras_carp import backbones, callbacks, checkpoints, keras_internals, losses, optimizers, schedules
from keras_carp.backbones import AnyResolutionViT, TokenPooling, build_encoder
from keras_carp.callbacks import (
    CollapseMonitor,
    KNNMonitor,
    RunCheckpoint,
    RunCSVLogger,
    SkippedImagesLogger,
    StepTensorBoard,
    TeacherEMA,
)
from keras_carp.checkpoints import latest_checkpoint
from keras_carp.device_augmentation import DeviceMultiCrop
from keras_carp.heads import CARPHead
from keras_carp.hub_preset import export_keras_hub_preset
from keras_carp.losses import CARPLoss, carp_loss, partition_probs, partitioned_carp_loss
from keras_carp.model import CARP
from keras_carp.optimizers import LARS
from keras_carp.schedules import TeacherMomentumSchedule, WarmupCosineDecay
from keras_carp.view_recipe import ViewRecipe

__version__ = "0.1.0"

__all__ = [
    "AnyResolutionViT",
    "CARP",
    "CARPHead",
    "CARPLoss",
    "CollapseMonitor",
    "DeviceMultiCrop",
    "KNNMonitor",
    "LARS",
    "RunCSVLogger",
    "RunCheckpoint",
    "SkippedImagesLogger",
    "StepTensorBoard",
    "TeacherEMA",
    "TeacherMomentumSchedule",
    "TokenPooling",
    "ViewRecipe",
    "WarmupCosineDecay",
    "backbones",
    "build_encoder",
    "callbacks",
    "checkpoints",
    "export_keras_hub_preset",
    "carp_loss",
    "keras_internals",
    "latest_checkpoint",
    "losses",
    "optimizers",
    "partition_probs",
    "partitioned_carp_loss",
    "schedules",
]
