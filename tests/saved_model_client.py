"""Run an exported SavedModel in a fresh Python process that imports only TensorFlow and NumPy."""

import subprocess
import sys

import numpy as np

# Runs in a fresh interpreter: TensorFlow and NumPy only.
SERVE = """
import json, sys
import numpy as np
import tensorflow as tf
saved, inputs, outputs = sys.argv[1:]
data = np.load(inputs)
served = tf.saved_model.load(saved)
results = {}
for name in ("serving_default", "serve_normalized", "preprocess"):
    images = data["uint8"] if name != "serve_normalized" else data["normalized"]
    for key, value in served.signatures[name](images=tf.constant(images)).items():
        results[f"{name}/{key}"] = value.numpy()
assert "keras_carp" not in sys.modules, "the SavedModel must not need keras_carp"
np.savez(outputs, **results)
"""


def serve(saved_model, tmp_path, uint8_images, normalized_images) -> dict:
    """Every endpoint's outputs, keyed "endpoint/output", for uint8 and already-normalised images."""
    inputs, outputs = tmp_path / "inputs.npz", tmp_path / "outputs.npz"
    np.savez(inputs, uint8=uint8_images, normalized=normalized_images)
    env = {"TF_CPP_MIN_LOG_LEVEL": "3", "PATH": "/usr/bin:/bin", "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run([sys.executable, "-c", SERVE, str(saved_model), str(inputs), str(outputs)],
                          env=env, capture_output=True, text=True)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(np.load(outputs))
