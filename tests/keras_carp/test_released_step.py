"""keras-carp's training step against our PyTorch transcription of the released step (tests/released_step.py).

Same tiny network and weights, same batches (2 global 16 px + 2 local 8 px
crops of 8 images), same partitions, LARS with the cosine learning rate and the
cosine teacher momentum, float32: the loss of every batch and every student and
teacher weight and batch-norm statistic must match, within 1e-5 relative on
Keras' PyTorch backend and 1e-4 under XLA (TensorFlow, JAX).
"""

import keras
import numpy as np
import pytest

import keras_carp
from tests import reference
from tests.conftest import require_optional, to_numpy

pytestmark = pytest.mark.core

BATCH, K, BLOCK, HIDDEN, BOTTLENECK, SEED = 8, 64, 16, 32, 16, 3
PEAK_LR, MIN_LR, BASE_M, FINAL_M, WEIGHT_DECAY = 2.0, 0.2, 0.9, 1.0, 1e-4
TOLERANCE = 1e-5 if keras.backend.backend() == "torch" else 1e-4
BIASES_BEFORE_BATCH_NORM = ("head.mlp.0.bias", "head.mlp.3.bias")


def keras_tiny_backbone() -> keras.Model:
    """The transcription's TinyBackbone in Keras (explicit padding: Keras' "same" pads stride 2 asymmetrically)."""
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", use_bias=False, name="conv1")(inputs)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn1")(x)
    x = keras.layers.ReLU()(x)
    x = keras.layers.ZeroPadding2D(1)(x)
    x = keras.layers.Conv2D(16, 3, strides=2, use_bias=False, name="conv2")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name="bn2")(x)
    x = keras.layers.ReLU()(x)
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x), name="tiny_backbone")


def keras_weights_by_torch_name(network_layers) -> dict:
    """{torch parameter/buffer name: Keras variable} for the backbone and head of one network (student or teacher)."""
    encoder, head = network_layers
    names = {}
    for layer_name, torch_name in (("conv1", "conv1"), ("conv2", "conv2")):
        names[f"backbone.{torch_name}.weight"] = encoder.get_layer(layer_name).kernel
    for layer_name in ("bn1", "bn2"):
        bn = encoder.get_layer(layer_name)
        names.update({f"backbone.{layer_name}.weight": bn.gamma, f"backbone.{layer_name}.bias": bn.beta,
                      f"backbone.{layer_name}.running_mean": bn.moving_mean,
                      f"backbone.{layer_name}.running_var_biased": bn.moving_variance})  # fmt: skip
    dense = [layer for layer in head.mlp if isinstance(layer, keras.layers.Dense)]
    norms = [layer for layer in head.mlp if isinstance(layer, keras.layers.BatchNormalization)]
    for index, layer in zip((0, 3, 6), dense):
        names[f"head.mlp.{index}.weight"], names[f"head.mlp.{index}.bias"] = layer.kernel, layer.bias
    for index, bn in zip((1, 4), norms):
        names.update({f"head.mlp.{index}.weight": bn.gamma, f"head.mlp.{index}.bias": bn.beta,
                      f"head.mlp.{index}.running_mean": bn.moving_mean,
                      f"head.mlp.{index}.running_var_biased": bn.moving_variance})  # fmt: skip
    names["head.prototypes"] = head.prototypes
    return names


def to_torch_layout(name: str, value: np.ndarray) -> np.ndarray:
    if value.ndim == 4:  # conv kernel HWIO -> OIHW
        return value.transpose(3, 2, 0, 1)
    if value.ndim == 2 and name != "head.prototypes":  # Dense kernel [in, out] -> Linear weight [out, in]
        return value.T
    return value


def batches_of_crops(num_batches: int):
    """Image-like crops (smooth 4x4 patterns plus a little noise), 2 x 16 px then 2 x 8 px, per batch."""
    rng = np.random.default_rng(0)

    def crops(size):
        coarse = np.repeat(np.repeat(rng.normal(size=(BATCH, 4, 4, 3)), size // 4, axis=1), size // 4, axis=2)
        return (coarse + 0.1 * rng.normal(size=coarse.shape)).astype("float32")

    return [[crops(size) for size in (16, 16, 8, 8)] for _ in range(num_batches)]


def run_keras(batches, accumulation_steps: int):
    keras.utils.set_random_seed(1)
    head = keras_carp.CARPHead(num_prototypes=K, hidden_dim=HIDDEN, bottleneck_dim=BOTTLENECK)
    model = keras_carp.CARP(keras_tiny_backbone(), head, block_size=BLOCK, seed=SEED)
    initial = {name: to_numpy(v).copy() for name, v in
               keras_weights_by_torch_name((model.student_encoder, model.student_head)).items()}  # fmt: skip
    total = len(batches)
    schedule = keras_carp.WarmupCosineDecay(PEAK_LR, 256, total_steps=total, min_learning_rate=MIN_LR)
    optimizer = keras_carp.LARS(schedule, weight_decay=WEIGHT_DECAY, gradient_accumulation_steps=accumulation_steps)
    model.compile(optimizer=optimizer)
    losses = []

    class Losses(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            losses.append(float(logs["loss"]) * (batch + 1) - sum(losses))  # logs hold the running mean

    crops = tuple(np.concatenate([batch[i] for batch in batches]) for i in range(4))
    model.fit(x=crops, batch_size=BATCH, epochs=1, shuffle=False, verbose=0,
              callbacks=[keras_carp.TeacherEMA(BASE_M, FINAL_M, total_steps=total), Losses()])  # fmt: skip
    student = keras_weights_by_torch_name((model.student_encoder, model.student_head))
    teacher = keras_weights_by_torch_name((model.teacher_encoder, model.teacher_head))
    return initial, losses, {n: to_numpy(v) for n, v in student.items()}, {n: to_numpy(v) for n, v in teacher.items()}


def run_torch(initial, batches, accumulation_steps: int):
    torch = require_optional("torch")
    from tests import released_step

    networks = []
    for _ in range(2):
        network = released_step.MultiCropNetwork(released_step.TinyBackbone(),
                                                 released_step.Head(16, HIDDEN, BOTTLENECK, K))  # fmt: skip
        state = {name: torch.from_numpy(np.ascontiguousarray(to_torch_layout(name, value)))
                 for name, value in initial.items()}  # fmt: skip
        network.load_state_dict(state, strict=False)  # the teacher starts as a copy of the student
        networks.append(network)
    student, teacher = networks
    for p in teacher.parameters():
        p.requires_grad = False
    permutations = [torch.from_numpy(reference.permutation(K, SEED, step)) for step in range(len(batches))]
    torch_batches = [[torch.from_numpy(c.transpose(0, 3, 1, 2).copy()) for c in batch] for batch in batches]
    losses = released_step.train(student, teacher, torch_batches, permutations, block_size=BLOCK,
                                 peak_lr=PEAK_LR, min_lr=MIN_LR, base_momentum=BASE_M, final_momentum=FINAL_M,
                                 weight_decay=WEIGHT_DECAY, accumulation_steps=accumulation_steps)  # fmt: skip

    def state_of(network):
        values = {**dict(network.named_parameters()), **dict(network.named_buffers())}
        return {name: value.detach().numpy() for name, value in values.items()}

    return losses, state_of(student), state_of(teacher)


def relative_error(actual: np.ndarray, expected: np.ndarray) -> float:
    return float(np.max(np.abs(actual - expected)) / max(np.max(np.abs(expected)), 1e-12))


@pytest.mark.parametrize("accumulation_steps,num_batches", [(1, 5), (2, 6)])
def test_training_matches_the_released_step(accumulation_steps, num_batches):
    batches = batches_of_crops(num_batches)
    initial, keras_losses, keras_student, keras_teacher = run_keras(batches, accumulation_steps)
    torch_losses, torch_student, torch_teacher = run_torch(initial, batches, accumulation_steps)

    np.testing.assert_allclose(keras_losses, torch_losses, rtol=TOLERANCE)
    errors = {}
    for role, ours, theirs in (("student", keras_student, torch_student), ("teacher", keras_teacher, torch_teacher)):
        for name, value in ours.items():
            value = to_torch_layout(name, value)
            if name in BIASES_BEFORE_BATCH_NORM:
                # Batch norm subtracts these biases, so their gradient is zero up to rounding: both sides hold
                # float32 noise near 1e-8, compared in absolute terms.
                np.testing.assert_allclose(value, theirs[name], atol=1e-6)
                continue
            errors[f"{role} {name}"] = relative_error(value, theirs[name])
    worst = max(errors, key=errors.get)
    print(f"largest relative difference ({keras.backend.backend()}, N={accumulation_steps}): "
          f"{errors[worst]:.2e} at {worst}")  # fmt: skip
    assert errors[worst] <= TOLERANCE, {k: v for k, v in errors.items() if v > TOLERANCE}

    # Teeth: every kernel moved by at least 10x the tolerance, so a step that differs in a sizeable part of the
    # update (the per-resolution head changed 41 % of it, the teacher order all of the teacher's) cannot pass.
    for name, start in initial.items():
        if start.ndim > 1:
            end = to_torch_layout(name, keras_student[name])
            moved = np.max(np.abs(end - to_torch_layout(name, start))) / np.max(np.abs(end))
            assert moved > 10 * TOLERANCE, (name, moved)
