"""Per-backend train-step mechanics: gradients, optimizer update and the teacher EMA.

``keras_carp.model.CARP`` writes the method once with ``keras.ops``; the
module for the active backend (``keras.backend.backend()``) supplies only how
gradients are taken and state is updated, as Keras' own trainers do.
"""

from __future__ import annotations

import importlib

import keras

_MODULES = {"tensorflow": "tensorflow", "jax": "jax", "torch": "torch"}


def _module():
    name = keras.backend.backend()
    if name not in _MODULES:
        raise NotImplementedError(f"keras_carp supports the tensorflow, jax and torch backends, not {name!r}.")
    return importlib.import_module(f"keras_carp.backends.{_MODULES[name]}")


def num_replicas() -> int:
    """Replicas that each run the train step on a slice of the batch: the TensorFlow strategy's count, else 1.

    JAX's ``keras.distribution.DataParallel`` compiles one program over the
    global batch (sharded arrays), so batch statistics are global already.
    """
    if keras.backend.backend() != "tensorflow":
        return 1
    import tensorflow as tf

    return int(tf.distribute.get_strategy().num_replicas_in_sync)


def xla_by_default() -> bool:
    """Whether a compiled CARP step uses XLA when ``jit_compile="auto"``, by measurement (bench/cpu_settings.py).

    JAX: always (XLA is how JAX compiles). TensorFlow: on a GPU or TPU with one
    replica per program; not on a CPU, where TensorFlow's oneDNN kernels run the
    ResNet-18 step 5.4x faster than XLA's (947 vs 5157 ms at 2 x 32 px, batch
    256), and not under a multi-replica strategy (XLA cannot reach the other
    devices' variables; TPUStrategy compiles with XLA whatever this says).
    PyTorch: no (the step is eager).
    """
    backend = keras.backend.backend()
    if backend == "jax":
        return True
    if backend != "tensorflow" or num_replicas() > 1:
        return False
    import tensorflow as tf

    return bool(tf.config.list_logical_devices("GPU") or tf.config.list_logical_devices("TPU"))


def train_step(model, *args):
    """Run the active backend's CARP train step."""
    return _module().train_step(model, *args)


def stateful_logs(model, logs: dict, step, momentum) -> dict:
    """Update the model's trackers in place and return the step's logs (TensorFlow, torch)."""
    for tracker in model.trackers:
        tracker.update_state(logs[tracker.name])
    results = {tracker.name: tracker.result() for tracker in model.trackers}
    results["teacher_momentum"] = momentum
    results["learning_rate"] = model.current_learning_rate(step)
    return results
