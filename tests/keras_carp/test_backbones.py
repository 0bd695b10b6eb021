import keras
import numpy as np
import pytest

import keras_carp
from keras_carp.keras_internals import flatten_layers
from tests.conftest import require_optional, to_numpy

pytestmark = pytest.mark.core


def _layers(encoder, kind):
    return [layer for layer in flatten_layers(encoder) if isinstance(layer, kind)]


@pytest.mark.parametrize("backbone,blocks", [("resnet18", 8), ("resnet50", 16), ("resnet10_small_images", 4)])
def test_resnets_start_as_torchvision_with_zero_init_residual(backbone, blocks):
    """The last BN of every residual branch starts at gamma = 0; kernels ~ N(0, 2 / fan_out), fan_out = k*k*out."""
    encoder = keras_carp.build_encoder(backbone)
    zero = [bn.name for bn in _layers(encoder, keras.layers.BatchNormalization) if not np.any(to_numpy(bn.gamma))]
    assert len(zero) == blocks and all(name.rsplit("_", 2)[-2] in ("2", "3") for name in zero), zero
    kernels = [to_numpy(conv.kernel) for conv in _layers(encoder, keras.layers.Conv2D)]
    # Pooled over layers: each kernel divided by its expected std is a standard normal (not truncated at 2).
    standardised = np.concatenate([(k * np.sqrt(k.shape[0] * k.shape[1] * k.shape[3] / 2.0)).ravel() for k in kernels])
    assert abs(standardised.std() - 1.0) < 0.01 and abs(standardised.mean()) < 0.01
    assert np.mean(np.abs(standardised) > 2) > 0.04  # a normal's tails: 4.6 % beyond 2 std (truncated: 0)


def test_zero_init_residual_makes_a_block_its_shortcut():
    """With gamma = 0 closing the residual branch, the first block's sum is its input (the max-pooled stem)."""
    backbone = keras_carp.build_encoder("resnet_tiny").get_layer(index=1)
    probe = keras.Model(backbone.input, [backbone.get_layer("pool1_pool").output,
                                         backbone.get_layer("stack0_block0_add").output])  # fmt: skip
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    shortcut, block_sum = (to_numpy(x) for x in probe(images, training=True))
    assert np.abs(shortcut).max() > 0.1
    np.testing.assert_allclose(block_sum, shortcut, atol=1e-6)


def test_keras_init_keeps_keras_hub_initialisers():
    encoder = keras_carp.build_encoder("resnet_tiny", init="keras")
    assert all(np.all(to_numpy(bn.gamma) == 1) for bn in _layers(encoder, keras.layers.BatchNormalization))
    with pytest.raises(ValueError, match="init must be one of"):
        keras_carp.build_encoder("resnet_tiny", init="xavier")


def test_head_kernels_start_normal_with_std_0_02_and_prototypes_uniform():
    head = keras_carp.CARPHead(num_prototypes=4096, hidden_dim=512, bottleneck_dim=256)
    head.build((None, 512))
    kernel = to_numpy(head.mlp[0].kernel)
    assert abs(kernel.std() - 0.02) < 0.0005 and np.abs(kernel).max() > 2 * 0.02  # untruncated at 2 std
    prototypes = to_numpy(head.prototypes)
    assert np.abs(prototypes).max() <= 256**-0.5 and abs(prototypes.std() - 256**-0.5 / np.sqrt(3)) < 0.001


def test_small_image_resnet_matches_a_torch_basic_block_resnet_with_a_stride_1_stem():
    """resnet10_small_images against the same network written in PyTorch (torchvision's BasicBlock, 3x3 stem)."""
    torch = require_optional("torch")
    from torch import nn

    encoder = keras_carp.build_encoder("resnet10_small_images")
    backbone = encoder.get_layer(index=1)
    rng = np.random.default_rng(0)
    for bn in _layers(encoder, keras.layers.BatchNormalization):  # eval-mode statistics away from 0 / 1
        for variable in (bn.gamma, bn.beta, bn.moving_mean):
            variable.assign(rng.uniform(-0.5, 0.5, variable.shape).astype("float32") + (variable is bn.gamma))
        bn.moving_variance.assign(rng.uniform(0.5, 1.5, bn.moving_variance.shape).astype("float32"))

    def conv_bn(name, stride, padding):
        conv, bn = backbone.get_layer(f"{name}_conv"), backbone.get_layer(f"{name}_bn")
        kernel = to_numpy(conv.kernel)
        layer = nn.Conv2d(kernel.shape[2], kernel.shape[3], kernel.shape[0], stride, padding, bias=False)
        norm = nn.BatchNorm2d(kernel.shape[3], eps=1e-5)
        with torch.no_grad():
            layer.weight.copy_(torch.from_numpy(kernel.transpose(3, 2, 0, 1).copy()))
            for target, source in ((norm.weight, bn.gamma), (norm.bias, bn.beta), (norm.running_mean, bn.moving_mean),
                                   (norm.running_var, bn.moving_variance)):  # fmt: skip
                target.copy_(torch.from_numpy(to_numpy(source)))
        return nn.Sequential(layer, norm).eval()

    def forward(x):
        x = torch.relu(conv_bn("conv1", 1, 1)(x))
        for stack in range(4):
            stride = 1 if stack == 0 else 2
            prefix = f"stack{stack}_block0"
            shortcut = x if stack == 0 else conv_bn(f"{prefix}_0", stride, 0)(x)
            y = torch.relu(conv_bn(f"{prefix}_1", stride, 1)(x))
            x = torch.relu(shortcut + conv_bn(f"{prefix}_2", 1, 1)(y))
        return x.mean(dim=(2, 3))

    images = rng.normal(size=(2, 28, 28, 3)).astype("float32")
    with torch.no_grad():
        expected = forward(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    assert backbone(images).shape == (2, 4, 4, 256)  # 28 px -> 28, 14, 7, 4: no 4x stem
    np.testing.assert_allclose(to_numpy(encoder(images)), expected, rtol=1e-4, atol=1e-5)
