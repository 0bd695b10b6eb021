"""Every use of a private Keras or KerasHub member, each behind one small named function.

The rest of keras_carp calls these functions and never touches a private
attribute itself, so a Keras release that renames or changes one of them
breaks here, in one place, and ``tests/keras_carp/test_keras_internals.py`` says which one
(each function has a test that fails with the internal's name in its message).

Tested with Keras 3.15.1 and KerasHub 0.32.0 on TensorFlow 2.21, JAX 0.10.2
and PyTorch 2.13. To accept a newer Keras or KerasHub: install it, run
``pytest tests/keras_carp/test_keras_internals.py`` under ``KERAS_BACKEND=tensorflow``,
``jax`` and ``torch``, then the full suite, and raise the upper bounds in
``pyproject.toml``.

Why each internal is needed:

- ``BatchNormalization._trainable`` (``keep_batch_statistics``): a BN layer
  normalises with its batch statistics only when ``training and
  self.trainable``. The CARP teacher is never trained but runs on batch
  statistics (as in the released code); setting the public ``trainable`` back
  to True would also make its gamma and beta trainable, so only the layer's
  flag is set.
- ``BatchNormalization._moments`` and ``_reduction_axes``
  (``keras_moments``, ``reduction_axes``, ``override_moments``,
  ``restore_moments``, ``has_keras_moments``): the hook that computes a
  layer's training statistics, replaced per instance by the one-pass moments
  of ``keras_carp.batch_norm``; Keras has no public switch for it.
- ``BatchNormalization.synchronized`` set after construction
  (``set_synchronized``): cross-replica BN is decided when the model is built
  under a strategy, after the layers exist; Keras reads the attribute at call
  time and writes it into ``get_config``.
- ``Layer._flatten_layers`` (``flatten_layers``): every layer of a network,
  nested models and layers held in attributes (``CARPHead.mlp``) included;
  ``Model.layers`` lists only the top level.
- ``Layer.__setattr__`` bypassed (``set_untracked_attribute``): Keras tracks
  variables assigned to a layer's attributes; the model's (student, teacher)
  pairs must not count as its weights a second time.
- ``Optimizer._iterations`` (``batch_counter``): the count of training
  batches. The public ``iterations`` counts optimizer steps, which differ from
  batches with gradient accumulation; Keras' own schedules read
  ``_iterations``.
- ``Optimizer._learning_rate`` (``learning_rate_schedule``): the schedule
  object (or variable) itself; the public ``learning_rate`` evaluates it at the
  optimizer's own counter, the step logs need it at the step being run.
- ``Optimizer._get_variable_index`` (``optimizer_variable_index``): the slot
  of a variable in per-variable optimizer state, as Keras' own optimizers use
  it in ``update_step`` (LARS's momentum buffers).
- ``TensorBoard._global_train_batch`` (``set_tensorboard_train_step``): the
  step of batch-level summaries, which Keras restarts at 0 in every ``fit``.
- ``CSVLogger.csv_file`` / ``writer`` (``close_csv_logger``): closed without
  asking ``closed``, which ``tf.io.gfile.GFile`` (``gs://`` paths) lacks.
- ``Trainer._maybe_symbolic_build`` (``skip_symbolic_build_once_built``):
  Keras' TensorFlow trainer reads a sample batch at the start of every
  ``fit`` and, under a strategy, averages it across replicas, to build the
  model symbolically, even when it is built. Under
  ``MultiWorkerMirroredStrategy`` with several workers that average fails
  (the collective reduce takes one tensor, not CARP's tuple of views); a built
  model needs no sample batch, so the hook is skipped per instance.
- ``Trainer._get_jax_state`` (``jax_state``): the (trainable, non-trainable,
  optimizer, metrics) state tuple the JAX train step takes, for callers that
  run the compiled step outside ``fit`` (benchmarks).
- ``keras.src.backend.jax.nn`` (``jax_backend_nn``): the module whose
  ``max_pool`` ``bench.profile_step`` replaces to measure a pooling variant.
- ``keras_hub.src.utils.timm.convert_resnet.convert_weights`` and its loader
  protocol ``port_weight(keras_variable, hf_weight_key, hook_fn)``
  (``port_torchvision_resnet``): KerasHub's timm/torchvision ResNet weight
  mapping, which KerasHub exposes only through ``from_preset``.
"""

from __future__ import annotations

import types
from collections.abc import Callable

import keras

TESTED_VERSIONS = {"keras": "3.15.1", "keras_hub": "0.32.0"}


# --------------------------------------------------------------------- layers
def keep_batch_statistics(layer: keras.layers.BatchNormalization) -> None:
    """Make a frozen BN layer normalise with batch statistics in training mode; its weights stay non-trainable."""
    layer._trainable = True


def flatten_layers(network: keras.layers.Layer, include_self: bool = True) -> list:
    """Every layer in ``network``, depth first: nested models and layers held in attributes too."""
    return list(network._flatten_layers(include_self=include_self))


def set_untracked_attribute(layer: keras.layers.Layer, name: str, value) -> None:
    """Set ``layer.<name>`` without Keras tracking the variables it holds (they stay out of ``layer.weights``)."""
    object.__setattr__(layer, name, value)


def set_synchronized(layer: keras.layers.BatchNormalization, synchronized: bool) -> None:
    """Turn cross-replica batch statistics on or off on an existing BN layer."""
    layer.synchronized = bool(synchronized)


# --------------------------------------------------------- batch-norm moments
def has_keras_moments(layer: keras.layers.BatchNormalization) -> bool:
    """Whether the layer's class uses Keras' own ``_moments`` hook (False when Keras drops the hook)."""
    keras_hook = getattr(keras.layers.BatchNormalization, "_moments", None)
    return keras_hook is not None and getattr(type(layer), "_moments", None) is keras_hook


def keras_moments(layer: keras.layers.BatchNormalization, inputs, mask=None):
    """Keras' batch mean and variance for ``layer`` (the class's hook, whatever the instance overrides)."""
    return type(layer)._moments(layer, inputs, mask)


def reduction_axes(layer: keras.layers.BatchNormalization) -> list:
    """The axes a built BN layer reduces over (every axis but ``layer.axis``)."""
    return list(layer._reduction_axes)


def override_moments(layer: keras.layers.BatchNormalization, moments: Callable) -> None:
    """Make ``layer`` compute its training statistics with ``moments(layer, inputs, mask) -> (mean, variance)``."""
    object.__setattr__(layer, "_moments", types.MethodType(moments, layer))


def restore_moments(layer: keras.layers.BatchNormalization) -> bool:
    """Undo ``override_moments``; returns whether there was an override."""
    if "_moments" in vars(layer):
        object.__delattr__(layer, "_moments")
        return True
    return False


# ------------------------------------------------------------------- trainers
def fully_built(model: keras.Model) -> bool:
    """Whether every layer and the optimizer of a compiled ``model`` are built (what Keras' symbolic build makes)."""
    optimizer = getattr(model, "optimizer", None)
    return all(layer.built for layer in flatten_layers(model)) and (optimizer is None or optimizer.built)


def skip_symbolic_build_once_built(model: keras.Model) -> None:
    """Make ``fit`` on ``model`` skip Keras' TensorFlow symbolic build (a sample batch averaged across replicas)
    whenever the model is already built; an unbuilt model is built by Keras as before."""
    if "_maybe_symbolic_build" in vars(model):
        return
    keras_hook = model._maybe_symbolic_build

    def maybe_symbolic_build(iterator=None, data_batch=None):
        if not fully_built(model):
            keras_hook(iterator=iterator, data_batch=data_batch)

    object.__setattr__(model, "_maybe_symbolic_build", maybe_symbolic_build)


# ----------------------------------------------------------------- optimizers
def batch_counter(optimizer: keras.optimizers.Optimizer):
    """The optimizer's variable counting training batches (optimizer steps times accumulation steps)."""
    return optimizer._iterations


def learning_rate_schedule(optimizer: keras.optimizers.Optimizer):
    """The optimizer's learning rate as given: a ``LearningRateSchedule``, or the variable holding a float."""
    return optimizer._learning_rate


def optimizer_variable_index(optimizer: keras.optimizers.Optimizer, variable) -> int:
    """The index of ``variable`` in the optimizer's per-variable state lists (``add_optimizer_variables``)."""
    return optimizer._get_variable_index(variable)


# ------------------------------------------------------------------ callbacks
def set_tensorboard_train_step(callback: keras.callbacks.TensorBoard, step: int) -> None:
    """Index the next batch-level TensorBoard summaries from ``step`` (call in ``on_train_begin``)."""
    callback._global_train_batch = int(step)


def close_csv_logger(callback: keras.callbacks.CSVLogger) -> None:
    """Close a ``CSVLogger``'s file and forget its writer, for files that cannot say whether they are closed."""
    if callback.csv_file is not None:
        callback.csv_file.close()
        callback.csv_file = None
    callback.writer = None


# -------------------------------------------------------------------- trainer
def jax_state(model: keras.Model) -> tuple:
    """The (trainable, non-trainable, optimizer, metrics) values the JAX backend's train step takes (JAX only)."""
    return model._get_jax_state(
        trainable_variables=True, non_trainable_variables=True, optimizer_variables=True, metrics_variables=True
    )


def jax_backend_nn():
    """Keras' JAX ``nn`` module (``keras.src.backend.jax.nn``), whose ``max_pool`` a benchmark swaps for a variant."""
    from keras.src.backend.jax import nn

    return nn


# ------------------------------------------------------------------- KerasHub
def port_torchvision_resnet(backbone: keras.Model, loader, architecture: str = "resnet50") -> None:
    """Load torchvision-named weights into a KerasHub ``ResNetBackbone`` with KerasHub's timm mapping.

    ``loader`` provides ``port_weight(keras_variable, hf_weight_key, hook_fn=None)``;
    it is called once per variable with the torchvision name of the weight
    (``conv1.weight``, ``layer1.0.bn1.running_var``, ...) and a hook that
    converts the array's layout.
    """
    from keras_hub.src.utils.timm.convert_resnet import convert_weights

    convert_weights(backbone, loader, {"architecture": architecture})
