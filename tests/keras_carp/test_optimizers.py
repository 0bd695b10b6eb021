import keras
import numpy as np
import pytest

import keras_carp
from keras_carp.keras_internals import learning_rate_schedule
from tests import reference
from tests.conftest import to_numpy

pytestmark = pytest.mark.core


def test_lars_matches_numpy_steps_and_skips_1d_variables():
    rng = np.random.default_rng(0)
    w0, b0 = rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")
    grads = [(rng.normal(size=(3, 4)).astype("float32"), rng.normal(size=(4,)).astype("float32")) for _ in range(3)]
    w, b = keras.Variable(w0), keras.Variable(b0)
    optimizer = keras_carp.LARS(learning_rate=0.5, momentum=0.9, weight_decay=0.01, eta=0.02)
    ref_w, ref_b = w0.astype(np.float64), b0.astype(np.float64)
    mw, mb = np.zeros_like(ref_w), np.zeros_like(ref_b)
    for gw, gb in grads:
        optimizer.apply([keras.ops.convert_to_tensor(gw), keras.ops.convert_to_tensor(gb)], [w, b])
        ref_w, mw = reference.lars_step(ref_w, gw, mw, 0.5, 0.9, 0.01, 0.02)
        ref_b, mb = reference.lars_step(ref_b, gb, mb, 0.5, 0.9, 0.01, 0.02)
    np.testing.assert_allclose(to_numpy(w), ref_w, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(to_numpy(b), ref_b, rtol=1e-5, atol=1e-6)


def test_lars_zero_weight_keeps_gradient_unscaled():
    w = keras.Variable(np.zeros((2, 2), "float32"))
    optimizer = keras_carp.LARS(learning_rate=1.0, weight_decay=0.0)
    optimizer.apply([keras.ops.ones((2, 2))], [w])
    np.testing.assert_allclose(to_numpy(w), -np.ones((2, 2)))


def test_lars_serialises_with_a_schedule():
    schedule = keras_carp.WarmupCosineDecay(0.45, 1024, 1000, warmup_steps=10, min_learning_rate=0.0048)
    optimizer = keras_carp.LARS(schedule, momentum=0.8, weight_decay=1e-5, eta=0.002)
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, keras_carp.LARS)
    assert (restored.momentum, restored.lars_weight_decay, restored.eta) == (0.8, 1e-5, 0.002)
    assert restored.learning_rate is not None
    np.testing.assert_allclose(float(to_numpy(learning_rate_schedule(restored)(500))), float(to_numpy(schedule(500))))


def test_lars_rejects_bad_hyperparameters():
    with pytest.raises(ValueError, match="momentum"):
        keras_carp.LARS(0.1, momentum=1.5)
    with pytest.raises(ValueError, match="weight_decay"):
        keras_carp.LARS(0.1, weight_decay=-1.0)


def test_scheduled_adamw_matches_dino_torch_adamw_with_its_schedules_freeze_and_clipping():
    """DINO's ViT loop in PyTorch: wd per step from a cosine, none on 1-D weights, last layer's grads dropped."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    shapes = {"kernel": (3, 4), "bias": (4,), "prototypes": (5, 4)}
    start = {name: rng.normal(size=shape).astype("float32") for name, shape in shapes.items()}
    steps, frozen_steps, lr, clip = 6, 2, 0.05, 1.5
    grads = [
        {name: 2 * rng.normal(size=shape).astype("float32") for name, shape in shapes.items()} for _ in range(steps)
    ]

    variables = {name: keras.Variable(value, name=name) for name, value in start.items()}
    decay = keras.optimizers.schedules.CosineDecay(0.04, decay_steps=steps, alpha=10.0)  # 0.04 -> 0.4
    optimizer = keras_carp.optimizers.ScheduledAdamW(
        lr, weight_decay=decay, frozen_paths=[variables["prototypes"].path], frozen_steps=frozen_steps, clipnorm=clip
    )
    for grad in grads:
        optimizer.apply([keras.ops.convert_to_tensor(grad[n]) for n in shapes], [variables[n] for n in shapes])

    params = {name: torch.nn.Parameter(torch.tensor(value, dtype=torch.float64)) for name, value in start.items()}
    regularized = torch.optim.AdamW([params["kernel"], params["prototypes"]], lr=lr, eps=1e-8)
    not_regularized = torch.optim.AdamW([params["bias"]], lr=lr, weight_decay=0.0, eps=1e-8)
    for step, grad in enumerate(grads):
        regularized.param_groups[0]["weight_decay"] = 0.4 + 0.5 * (0.04 - 0.4) * (1 + np.cos(np.pi * step / steps))
        for name, parameter in params.items():
            g = torch.tensor(grad[name], dtype=torch.float64)
            parameter.grad = g * min(1.0, clip / float(g.norm()))  # Keras clips with max(norm, clip): no 1e-6
        if step < frozen_steps:
            params["prototypes"].grad = None  # DINO's cancel_gradients_last_layer
        regularized.step()
        not_regularized.step()
    for name in shapes:
        np.testing.assert_allclose(to_numpy(variables[name]), params[name].detach().numpy(), rtol=1e-5, atol=1e-5,
                                   err_msg=name)  # fmt: skip
    np.testing.assert_array_equal(start["prototypes"] != to_numpy(variables["prototypes"]), True)


def test_scheduled_adamw_round_trips_its_config_and_refuses_bad_settings():
    decay = keras.optimizers.schedules.CosineDecay(0.04, decay_steps=100, alpha=10.0)
    optimizer = keras_carp.optimizers.ScheduledAdamW(0.001, weight_decay=decay, frozen_paths=["head/prototypes"],
                                                     frozen_steps=10, clipnorm=3.0)  # fmt: skip
    again = keras_carp.optimizers.ScheduledAdamW.from_config(optimizer.get_config())
    assert again.frozen_paths == ("head/prototypes",) and again.frozen_steps == 10 and again.clipnorm == 3.0
    assert float(again.weight_decay_at(100)) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="beta_1"):
        keras_carp.optimizers.ScheduledAdamW(beta_1=1.0)
    with pytest.raises(ValueError, match="frozen_paths name no trained variable"):
        keras_carp.optimizers.ScheduledAdamW(frozen_paths=["nowhere"]).build([keras.Variable(np.zeros(2))])
