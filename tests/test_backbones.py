import keras
import numpy as np
import pytest

import keras_carp
from tests.conftest import to_numpy

pytestmark = pytest.mark.core


def _layers(encoder, kind):
    return [layer for layer in encoder._flatten_layers() if isinstance(layer, kind)]


@pytest.mark.parametrize("backbone,blocks", [("resnet18", 8), ("resnet50", 16)])
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
