"""Per-backend train-step mechanics: gradients, optimizer update and the teacher EMA.

``keras_carp.model.CARP`` writes the method once with ``keras.ops``; the
module for the active backend (``keras.backend.backend()``) supplies only how
gradients are taken and state is updated, as Keras' own trainers do.

The interface: each ``backends/{tensorflow,jax,torch}.py`` defines
``train_step(model, ...)``, and that function may read or call on ``model``
only the members of ``StepModel`` below, plus
``keras_carp.optimizers.batch_counter(model.optimizer)`` and this module's
``stateful_logs``. Every backend's step does, in this order: read the batch
counter ``step``; forward and loss (``compute_carp_losses``) under the
backend's gradient mechanism, the loss scaled by ``optimizer.scale_loss``;
gradients of the student's (trainable) variables; the teacher EMA from the
pre-step student weights with ``applied_teacher_momentum``; the optimizer
update; the logs (``trackers``, ``teacher_momentum``, ``learning_rate``).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import keras


class StepModel(Protocol):
    """What a backend's ``train_step`` may use of the ``CARP`` model (nothing else)."""

    optimizer: keras.optimizers.Optimizer
    """``scale_loss``, ``apply`` (TensorFlow, torch), ``stateless_apply`` and ``variables`` (JAX)."""
    ema_pairs: Sequence[tuple[Any, Any]]
    """(student, teacher) variables the EMA averages: the trainable weights of both networks, in order."""
    trackers: Sequence[keras.metrics.Metric]
    """``keras.metrics.Mean`` per logged loss term, named as the keys of ``compute_carp_losses``' result."""

    @property
    def trainable_variables(self) -> list: ...  # the student's; gradients are taken for these

    @property
    def non_trainable_variables(self) -> list: ...  # teacher weights and every BN statistic (JAX state)

    def compute_carp_losses(self, data, step, training: bool = True, global_sum: Callable | None = None) -> dict:
        """Forward both networks on a batch; float32 ``loss``, ``consistency``, ``entropy``, ``prototypes_used``."""
        ...

    def teacher_momentum(self, step):
        """m of the resolved teacher momentum schedule at batch ``step`` (logged)."""
        ...

    def applied_teacher_momentum(self, step, momentum):
        """The m to apply at ``step``: ``momentum``, or 1 on batches that only accumulate gradients."""
        ...

    def current_learning_rate(self, step):
        """The learning rate at ``step`` (logged)."""
        ...

    def zero_grad(self) -> None:
        """Clear the variables' ``.grad`` (PyTorch backend only: ``torch.nn.Module.zero_grad``)."""
        ...


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


def replica_index():
    """This replica's index in a TensorFlow strategy's step (0 elsewhere): which slice of the global batch it holds."""
    if keras.backend.backend() != "tensorflow":
        return 0
    import tensorflow as tf

    context = tf.distribute.get_replica_context()
    return 0 if context is None else context.replica_id_in_sync_group


def xla_by_default() -> bool:
    """Whether a compiled CARP step uses XLA when ``jit_compile="auto"``, by measurement (python -m bench.cpu_settings).

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
