"""Command-line entry points (carp-pretrain, carp-eval, carp-export, carp-convert, carp-ablations) and presets."""

import os as _os

# oneDNN CPU kernels for TensorFlow on every x86 CPU, set before any entry point imports TensorFlow
# (see keras_carp/__init__.py for the measurement).
_os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")
