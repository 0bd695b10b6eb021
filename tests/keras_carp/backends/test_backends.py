"""The method on JAX and PyTorch in the default run: the loss tests and the released-step parity under each.

The default ``pytest`` runs under one Keras backend (TensorFlow unless
KERAS_BACKEND says otherwise); these run the backend-agnostic method tests
(the loss against NumPy, five training steps against a PyTorch transcription
of the released step) under the other two, each in its own process because
Keras fixes its backend at import. CI also runs every ``core`` test under
each backend.
"""

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import keras
import pytest

ROOT = Path(__file__).resolve().parents[3]
METHOD_TESTS = ["tests/keras_carp/test_losses.py", "tests/keras_carp/test_released_step.py"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_the_method_trains_as_released_on_the_other_backends(backend):
    if backend == keras.backend.backend():
        pytest.skip("this process runs them already")
    if importlib.util.find_spec(backend) is None and os.environ.get("KERAS_CARP_REQUIRE_OPTIONAL") != "1":
        pytest.skip(f"{backend} is not installed")
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:xdist", "-m", "core", *METHOD_TESTS]
    done = subprocess.run(command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-2000:]
    assert " passed" in done.stdout and "failed" not in done.stdout
