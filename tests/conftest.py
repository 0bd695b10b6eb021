import importlib
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")  # as keras_carp sets it: oneDNN kernels on every x86 CPU

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

import keras_carp  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "core: backend-agnostic core tests, run under tensorflow, jax and torch")
    config.addinivalue_line(
        "markers", "tensorflow_free: must pass where TensorFlow is not installed (CI runs them in such a virtualenv)"
    )
    config.addinivalue_line(
        "markers", "slow: the slow tier (CLI end to end, kill -9, notebooks, bench, distributed): pytest -m slow"
    )


@pytest.fixture(autouse=True)
def _seed():
    keras.utils.set_random_seed(0)


def tiny_model(num_prototypes=64, block_size=16, **kwargs) -> keras_carp.CARP:
    """A CARP small enough for CPU unit tests."""
    encoder = keras_carp.build_encoder("resnet_tiny")
    head = keras_carp.CARPHead(num_prototypes=num_prototypes, hidden_dim=32, bottleneck_dim=16)
    return keras_carp.CARP(encoder, head, block_size=block_size, **kwargs)


def random_views(batch=8, global_size=16, local_size=8, num_local=2, seed=0):
    rng = np.random.default_rng(seed)
    views = [rng.normal(size=(batch, global_size, global_size, 3)).astype("float32") for _ in range(2)]
    views += [rng.normal(size=(batch, local_size, local_size, 3)).astype("float32") for _ in range(num_local)]
    return tuple(views)


def to_numpy(x):
    return keras.ops.convert_to_numpy(x)


def require_optional(module: str):
    """Import an optional dependency of a test: skip without it, but fail when CI says it must be there.

    CI sets KERAS_CARP_REQUIRE_OPTIONAL=1 so that torch- and safetensors-dependent
    tests can never pass by being skipped.
    """
    if os.environ.get("KERAS_CARP_REQUIRE_OPTIONAL") == "1":
        return importlib.import_module(module)
    return pytest.importorskip(module)
