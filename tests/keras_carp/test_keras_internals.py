"""Guards for every private Keras / KerasHub member keras_carp uses (all behind keras_carp.keras_internals).

Each test checks that the internal still exists and still has the effect the
library relies on, and fails with a message naming it. When one fails after a
Keras or KerasHub upgrade, fix the function of the same name in
``keras_carp/keras_internals.py`` (and nothing else), then rerun this file under
the tensorflow, jax and torch backends and the full suite before raising the
upper bounds in pyproject.toml.
"""

import keras
import numpy as np
import pytest
from keras import ops

import keras_carp
from keras_carp import keras_internals
from tests.conftest import random_views, to_numpy

pytestmark = pytest.mark.core

BN_EPSILON = 1e-3  # Keras' default


def _changed(internal: str, what: str) -> str:
    return (
        f"Keras internal changed: {internal} ({what}). Tested with {keras_internals.TESTED_VERSIONS}, "
        f"running keras {keras.__version__}; update keras_carp/keras_internals.py."
    )


def _images(seed=0, shape=(6, 5, 5, 3)):
    return (np.random.default_rng(seed).normal(1.5, 2.0, size=shape)).astype("float32")


def _batch_normalised(x, gamma=1.0, beta=0.0, epsilon=BN_EPSILON):
    mean, var = x.mean(axis=(0, 1, 2)), x.var(axis=(0, 1, 2))
    return gamma * (x - mean) / np.sqrt(var + epsilon) + beta


def _bn_network():
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.BatchNormalization(name="bn")(keras.layers.Identity()(inputs))
    return keras.Model(inputs, outputs)


# --------------------------------------------------------------------- layers
def test_keep_batch_statistics_on_a_frozen_batch_norm_layer():
    """BatchNormalization._trainable: frozen BN on batch statistics in training mode, weights not trainable."""
    network = _bn_network()
    layer = network.get_layer("bn")
    x = _images()
    network.trainable = False
    frozen = to_numpy(network(x, training=True))
    assert np.allclose(frozen, x / np.sqrt(1.0 + BN_EPSILON), atol=1e-5), _changed(
        "BatchNormalization.call", "a non-trainable BN layer no longer uses its moving statistics in training mode; "
        "keep_batch_statistics may no longer be needed"
    )  # fmt: skip
    keras_internals.keep_batch_statistics(layer)
    got = to_numpy(network(x, training=True))
    np.testing.assert_allclose(got, _batch_normalised(x), rtol=1e-4, atol=1e-4,
                               err_msg=_changed("BatchNormalization._trainable", "setting it no longer makes a frozen "
                                                "BN layer normalise with batch statistics"))  # fmt: skip
    assert layer.trainable, _changed("BatchNormalization._trainable", "no longer backs the public `trainable`")
    assert not layer.gamma.trainable and not layer.beta.trainable, _changed(
        "BatchNormalization._trainable", "setting it made gamma/beta trainable"
    )
    assert network.trainable_weights == [] and layer.trainable_weights == [], _changed(
        "BatchNormalization._trainable", "a frozen BN layer's weights are listed as trainable"
    )
    moving = (x - to_numpy(layer.moving_mean)) / np.sqrt(to_numpy(layer.moving_variance) + BN_EPSILON)
    message = _changed("BatchNormalization._trainable", "inference no longer uses the moving statistics")
    np.testing.assert_allclose(to_numpy(network(x, training=False)), moving, rtol=1e-5, atol=1e-5, err_msg=message)


def test_flatten_layers_reaches_nested_models_and_layers_held_in_attributes():
    """Layer._flatten_layers: every layer, depth first, nested models and attribute-held layers included."""
    head = keras_carp.CARPHead(num_prototypes=8, hidden_dim=4, bottleneck_dim=4, num_layers=3)
    head.build((None, 5))
    inner = keras.Sequential([keras.Input((5,)), head], name="inner")
    outer = keras.Sequential([keras.Input((5,)), keras.layers.Dense(5, name="outer_dense"), inner], name="outer")
    layers = keras_internals.flatten_layers(outer)
    names = [layer.name for layer in layers]
    assert layers[0] is outer, _changed("Layer._flatten_layers", "include_self=True does not list the network first")
    for name in ("outer_dense", "inner", head.name, "bn_0", "bn_1", "bottleneck"):
        assert name in names, _changed("Layer._flatten_layers", f"{name!r} missing from {names}")
    assert outer not in keras_internals.flatten_layers(outer, include_self=False), _changed(
        "Layer._flatten_layers", "include_self=False still lists the network"
    )


def test_set_untracked_attribute_keeps_variables_out_of_the_weights():
    """Layer.__setattr__ bypassed: variables set that way are not tracked (set normally, they are)."""
    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    other = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    count = len(model.weights)
    extra = keras.Variable(np.zeros(2, "float32"))
    keras_internals.set_untracked_attribute(model, "pairs", [(extra, model.weights[0])])
    assert len(model.weights) == count and model.pairs[0][0] is extra, _changed(
        "Layer.__setattr__ bypass", "object.__setattr__ no longer keeps variables out of layer.weights"
    )
    other.pairs = [(extra, other.weights[0])]
    assert len(other.weights) == count + 1, _changed(
        "Layer.__setattr__", "attribute variables are no longer tracked; set_untracked_attribute may be unnecessary"
    )


def test_set_synchronized_is_read_at_call_time_and_saved_in_the_config():
    """BatchNormalization.synchronized set after construction: Keras saves it, and refuses True off TensorFlow."""
    layer = keras.layers.BatchNormalization()
    layer.build((None, 4, 4, 3))
    keras_internals.set_synchronized(layer, False)
    assert layer.get_config()["synchronized"] is False, _changed("BatchNormalization.synchronized", "not in config")
    if keras.backend.backend() == "tensorflow":
        keras_internals.set_synchronized(layer, True)
        assert layer.get_config()["synchronized"] is True, _changed("BatchNormalization.synchronized", "not saved")
        got = to_numpy(layer(_images(), training=True))  # one replica: the same statistics
        np.testing.assert_allclose(got, _batch_normalised(_images()), rtol=1e-4, atol=1e-4)
    else:  # why CARP.get_config saves its layers with synchronized=False
        with pytest.raises(ValueError, match="synchronized"):
            keras.layers.BatchNormalization(synchronized=True)


# --------------------------------------------------------- batch-norm moments
def test_moments_hook_is_what_a_batch_norm_layer_trains_with():
    """BatchNormalization._moments / _reduction_axes: the per-instance hook computing the training statistics."""
    layer = keras.layers.BatchNormalization(center=False, scale=False)
    x = _images()
    layer.build(x.shape)
    assert keras_internals.has_keras_moments(layer), _changed("BatchNormalization._moments", "the hook is gone")
    assert keras_internals.reduction_axes(layer) == [0, 1, 2], _changed(
        "BatchNormalization._reduction_axes", f"got {keras_internals.reduction_axes(layer)} for a 4-D input, axis -1"
    )
    mean, variance = keras_internals.keras_moments(layer, ops.convert_to_tensor(x))
    np.testing.assert_allclose(to_numpy(mean), x.mean(axis=(0, 1, 2)), rtol=1e-5, atol=1e-5,
                               err_msg=_changed("BatchNormalization._moments", "not the batch mean"))  # fmt: skip
    message = _changed("BatchNormalization._moments", "not the biased batch variance")
    np.testing.assert_allclose(to_numpy(variance), x.var(axis=(0, 1, 2)), rtol=1e-4, err_msg=message)

    def fixed_moments(layer, inputs, mask=None):
        return ops.full((3,), 2.0), ops.full((3,), 4.0)

    keras_internals.override_moments(layer, fixed_moments)
    got = to_numpy(layer(x, training=True))
    np.testing.assert_allclose(got, (x - 2.0) / np.sqrt(4.0 + BN_EPSILON), rtol=1e-5, atol=1e-5,
                               err_msg=_changed("BatchNormalization._moments", "an instance override is not used "
                                                "by call(training=True)"))  # fmt: skip
    assert keras_internals.restore_moments(layer) and not keras_internals.restore_moments(layer)
    np.testing.assert_allclose(to_numpy(layer(x, training=True)), _batch_normalised(x), rtol=1e-4, atol=1e-4)

    class OwnMoments(keras.layers.BatchNormalization):
        def _moments(self, inputs, mask):
            return super()._moments(inputs, mask)

    assert not keras_internals.has_keras_moments(OwnMoments()), "a subclass's own _moments must be left alone"


# ----------------------------------------------------------------- optimizers
def _gradients(variables):
    return [ops.ones(v.shape) for v in variables]


def test_batch_counter_counts_batches_with_gradient_accumulation():
    """Optimizer._iterations: one per apply() (batch); the public iterations counts optimizer steps."""
    variables = [keras.Variable(np.ones((2, 2), "float32"))]
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    optimizer.build(variables)
    for _ in range(4):
        optimizer.apply(_gradients(variables), variables)
    counter = keras_internals.batch_counter(optimizer)
    assert int(to_numpy(counter)) == 4, _changed("Optimizer._iterations", f"counted {int(to_numpy(counter))} of 4")
    assert int(to_numpy(optimizer.iterations)) == 2, _changed("Optimizer.iterations", "no longer counts steps")
    assert keras_carp.optimizers.batch_counter(keras.mixed_precision.LossScaleOptimizer(optimizer)) is counter


def test_learning_rate_schedule_is_the_object_given():
    """Optimizer._learning_rate: the schedule itself (or the variable holding a float rate)."""
    schedule = keras_carp.WarmupCosineDecay(0.1, 256, total_steps=100)
    optimizer = keras.optimizers.SGD(schedule)
    assert keras_internals.learning_rate_schedule(optimizer) is schedule, _changed(
        "Optimizer._learning_rate", "no longer holds the LearningRateSchedule given"
    )
    constant = keras_internals.learning_rate_schedule(keras.optimizers.SGD(0.25))
    assert float(to_numpy(ops.convert_to_tensor(constant))) == 0.25, _changed("Optimizer._learning_rate", "float")


def test_optimizer_variable_index_addresses_per_variable_state():
    """Optimizer._get_variable_index: the slot of a variable in add_optimizer_variables' lists."""
    variables = [keras.Variable(np.full(shape, i, "float32")) for i, shape in enumerate([(2,), (3, 2), (4,)])]
    optimizer = keras_carp.LARS(0.1)
    optimizer.build(variables)
    for position, variable in enumerate(variables):
        index = keras_internals.optimizer_variable_index(optimizer, variable)
        assert index == position, _changed("Optimizer._get_variable_index", f"variable {position} -> {index}")
        assert tuple(optimizer.momentums[index].shape) == tuple(variable.shape)


# ------------------------------------------------------------------ callbacks
def test_tensorboard_train_step_sets_the_step_of_batch_summaries(tmp_path):
    """TensorBoard._global_train_batch: batch summaries are written at this counter (+1 per batch)."""
    tf = pytest.importorskip("tensorflow")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    callback = keras.callbacks.TensorBoard(str(tmp_path), update_freq=1, write_graph=False)
    callback.set_model(model)
    callback.on_train_begin()
    assert hasattr(callback, "_global_train_batch"), _changed("TensorBoard._global_train_batch", "attribute gone")
    keras_internals.set_tensorboard_train_step(callback, 41)
    callback.on_train_batch_begin(0)
    callback.on_train_batch_end(0, {"loss": 1.5})
    callback.on_train_end()
    steps = []
    for path in (tmp_path / "train").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            steps += [event.step for value in event.summary.value if value.tag == "batch_loss"]
    assert steps == [42], _changed("TensorBoard._global_train_batch", f"batch_loss written at steps {steps}, not [42]")


def test_close_csv_logger_closes_the_file(tmp_path):
    """CSVLogger.csv_file / writer: the open file and its csv writer, set in on_train_begin."""
    path = tmp_path / "log.csv"
    callback = keras.callbacks.CSVLogger(str(path))
    callback.set_model(keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)]))
    callback.on_train_begin()
    handle = callback.csv_file
    callback.on_epoch_end(0, {"loss": 1.5})
    assert callback.writer is not None, _changed("CSVLogger.writer", "no writer after the first epoch")
    keras_internals.close_csv_logger(callback)
    assert handle.closed and callback.csv_file is None and callback.writer is None, _changed(
        "CSVLogger.csv_file", "the file was not closed"
    )
    lines = path.read_text().splitlines()
    assert lines[0].startswith("epoch,loss") and lines[1].startswith("0,1.5"), lines


# -------------------------------------------------------------------- trainer
def test_jax_state_is_the_train_step_state():
    """Trainer._get_jax_state: (trainable, non-trainable, optimizer, metrics) values (JAX backend only)."""
    if keras.backend.backend() != "jax":
        pytest.skip("a JAX-backend internal")
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1), keras.layers.BatchNormalization()])
    model.compile(optimizer="sgd", loss="mse")
    model.optimizer.build(model.trainable_variables)
    state = keras_internals.jax_state(model)
    want = (
        model.trainable_variables,
        model.non_trainable_variables,
        model.optimizer.variables,
        model.metrics_variables,
    )
    assert len(state) == 4, _changed("Trainer._get_jax_state", f"{len(state)} parts")
    for part, variables in zip(state, want):
        assert len(part) == len(variables), _changed("Trainer._get_jax_state", "parts do not match the variables")


def test_symbolic_build_is_skipped_once_the_model_is_built_and_runs_before(monkeypatch):
    """Trainer._maybe_symbolic_build(iterator=, data_batch=): Keras' hook reading a sample batch in fit (TF)."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("a TensorFlow-trainer internal")
    assert callable(getattr(keras.Model, "_maybe_symbolic_build", None)), _changed(
        "Trainer._maybe_symbolic_build", "gone"
    )

    class NoBatches:
        def __iter__(self):
            raise AssertionError("a built model read a sample batch")

    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    calls = []
    keras_hook = type(model)._maybe_symbolic_build
    monkeypatch.setattr(type(model), "_maybe_symbolic_build",
                        lambda self, **kw: calls.append(kw) or keras_hook(self, **kw))  # fmt: skip
    keras_internals.skip_symbolic_build_once_built(model)  # wraps the (here recording) hook
    model._maybe_symbolic_build(iterator=NoBatches())
    assert not keras_internals.fully_built(model) and len(calls) == 1  # unbuilt: Keras' hook runs
    model.optimizer.build(model.trainable_variables)
    assert keras_internals.fully_built(model)
    model._maybe_symbolic_build(iterator=NoBatches())  # built: skipped, no batch read
    assert len(calls) == 1
    model.fit(np.zeros((4, 2), "float32"), np.zeros((4, 1), "float32"), epochs=1, verbose=0)  # fit still trains


# ------------------------------------------------------------------- KerasHub
def test_port_torchvision_resnet_maps_every_weight_by_torchvision_name():
    """keras_hub.src.utils.timm.convert_resnet.convert_weights and its port_weight(variable, key, hook_fn) loader."""
    import keras_hub

    backbone = keras_hub.models.ResNetBackbone(**keras_carp.backbones.RESNET_CONFIGS["resnet_tiny"],
                                               image_shape=(None, None, 3))  # fmt: skip
    ported = {}

    class Loader:
        def port_weight(self, keras_variable, hf_weight_key, hook_fn=None):
            shape = tuple(keras_variable.shape)
            torch_shape = (shape[3], shape[2], shape[0], shape[1]) if len(shape) == 4 else shape
            value = np.arange(np.prod(torch_shape), dtype="float32").reshape(torch_shape)
            if hook_fn is not None:
                value = hook_fn(value, list(shape))
            assert value.shape == shape, _changed("convert_resnet hook_fn", f"{hf_weight_key}: {value.shape}")
            ported[hf_weight_key] = keras_variable

    keras_internals.port_torchvision_resnet(backbone, Loader())
    for key in ("conv1.weight", "bn1.running_var", "layer1.0.conv1.weight", "layer2.0.downsample.0.weight",
                "layer2.0.downsample.1.bias", "layer2.0.bn2.running_mean"):  # fmt: skip
        assert key in ported, _changed("convert_resnet.convert_weights", f"no {key!r} among {sorted(ported)}")
    ported_ids = {id(v) for v in ported.values()}
    missed = [v.path for v in backbone.weights if id(v) not in ported_ids]
    assert not missed, _changed("convert_resnet.convert_weights", f"weights not ported: {missed}")


# ------------------------------------------------- the teacher in a train step
def _bn_first_encoder() -> keras.Model:
    """Images -> BN (its input is the raw crops, so its batch statistics have a NumPy reference) -> conv -> pool."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, name="input_bn")(inputs)
    x = keras.layers.Conv2D(8, 1, name="conv")(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="encoder")


@pytest.mark.parametrize("moments", ["one_pass", "keras"])
def test_teacher_batch_norm_uses_batch_statistics_and_gets_no_gradient_in_the_train_step(moments):
    """In CARP's train step the teacher's BN normalises with the batch's statistics, and no teacher weight trains.

    Keras updates a BN layer's moving averages only on the branch that
    normalises with batch statistics, so the teacher's input BN after one
    step must hold 0.9 * initial + 0.1 * (mean, biased variance of the two
    global crops). With momentum m = 1 the EMA leaves the teacher's weights as
    they were: any change would be a gradient update.
    """
    head = keras_carp.CARPHead(num_prototypes=16, hidden_dim=8, bottleneck_dim=4)
    model = keras_carp.CARP(_bn_first_encoder(), head, block_size=4, batch_norm_moments=moments,
                            teacher_momentum_schedule=keras_carp.TeacherMomentumSchedule(1.0, 1.0))  # fmt: skip
    teacher_weights = model.teacher_encoder.weights + model.teacher_head.weights
    trainable_ids = {id(v) for v in model.trainable_variables}
    assert not any(id(v) in trainable_ids or v.trainable for v in teacher_weights), "a teacher weight is trainable"
    teacher_bn = model.teacher_encoder.get_layer("input_bn")
    assert teacher_bn.trainable, _changed("BatchNormalization._trainable", "teacher BN reports trainable=False")
    trained_before = [to_numpy(v).copy() for v in model.teacher_encoder.trainable_weights]
    teacher_before = {v.path: to_numpy(v).copy() for v in teacher_weights if "moving" not in v.path}
    student_before = [to_numpy(v).copy() for v in model.trainable_variables]

    views = random_views(batch=8, global_size=6, local_size=4, num_local=1, seed=4)
    model.compile(optimizer=keras_carp.LARS(0.5))
    model.fit(x=views, batch_size=8, epochs=1, verbose=0, shuffle=False)

    crops = np.concatenate(views[:2])  # the teacher sees the 2 global crops
    mean, variance = crops.mean(axis=(0, 1, 2)), crops.var(axis=(0, 1, 2))
    np.testing.assert_allclose(to_numpy(teacher_bn.moving_mean), 0.1 * mean, rtol=1e-4, atol=1e-6,
                               err_msg=_changed("BatchNormalization._trainable", "the teacher BN did not use the "
                                                "batch statistics in the train step"))  # fmt: skip
    message = "the teacher BN's batch variance is not the global crops' biased variance"
    np.testing.assert_allclose(to_numpy(teacher_bn.moving_variance), 0.9 + 0.1 * variance, rtol=1e-4, err_msg=message)
    for bn in [layer for layer in keras_internals.flatten_layers(model.teacher_head)
               if isinstance(layer, keras.layers.BatchNormalization)]:  # fmt: skip
        assert np.any(to_numpy(bn.moving_mean) != 0), f"teacher head {bn.name} did not use batch statistics"
    assert model.teacher_encoder.trainable_weights == [] and trained_before == []
    for variable in teacher_weights:
        if variable.path in teacher_before:
            message = f"teacher weight {variable.path} changed: it received a gradient"
            np.testing.assert_array_equal(to_numpy(variable), teacher_before[variable.path], err_msg=message)
    after = [to_numpy(v) for v in model.trainable_variables]
    moved = sum(not np.allclose(a, b) for a, b in zip(after, student_before))
    assert moved > len(after) // 2, "the student did not train"


def test_jax_backend_nn_holds_the_max_pool_a_benchmark_swaps():
    """keras.src.backend.jax.nn: the module whose max_pool bench.profile_step replaces (JAX backend only)."""
    if keras.backend.backend() != "jax":
        pytest.skip("a JAX-backend internal")
    nn = keras_internals.jax_backend_nn()
    assert callable(getattr(nn, "max_pool", None)), _changed("keras.src.backend.jax.nn.max_pool", "it is gone")
    pooled = keras.ops.max_pool(keras.ops.reshape(keras.ops.arange(16.0), (1, 4, 4, 1)), (2, 2), strides=(2, 2))
    assert keras.ops.convert_to_numpy(pooled).ravel().tolist() == [5.0, 7.0, 13.0, 15.0]
