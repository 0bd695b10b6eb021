import keras
import keras_hub
import numpy as np
import pytest

import keras_carp
from keras_carp.backbones import bicubic_matrix
from keras_carp.keras_internals import flatten_layers
from tests.conftest import random_views, require_optional, to_numpy

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


def _tiny_vit(image_size=32, patch_size=8, class_token=True):
    shape = dict(image_shape=(image_size, image_size, 3), patch_size=patch_size, use_class_token=class_token)
    return keras_hub.models.ViTBackbone(**shape, num_layers=2, num_heads=2, hidden_dim=16, mlp_dim=32)


@pytest.mark.parametrize("size_in, size_out", [(14, 6), (14, 14), (4, 2), (2, 4), (7, 12), (3, 1)])
def test_position_embedding_resize_is_pytorch_bicubic(size_in, size_out):
    """DINO resizes position embeddings with torch's bicubic (a = -0.75): the same numbers on every backend."""
    torch = require_optional("torch")
    grid = np.random.default_rng(0).normal(size=(size_in, size_in, 5)).astype("float32")
    channels_first = torch.tensor(grid).permute(2, 0, 1)[None]
    resized = torch.nn.functional.interpolate(channels_first, size=(size_out, size_out), mode="bicubic",
                                              align_corners=False)  # fmt: skip
    expected = resized[0].permute(1, 2, 0).numpy()
    matrix = to_numpy(bicubic_matrix(size_in, size_out))
    np.testing.assert_allclose(np.einsum("ij,jkd,lk->ild", matrix, grid, matrix), expected, atol=1e-5)


def test_a_vit_runs_224_and_96_crops_through_one_set_of_weights():
    """At the stored size the encoder is KerasHub's ViT; at another it uses the resized position embeddings."""
    vit = _tiny_vit()
    encoder = keras_carp.build_encoder(vit)
    images = np.random.default_rng(1).normal(size=(2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(encoder(images)), to_numpy(vit(images))[:, 0], atol=1e-6)

    small = np.random.default_rng(2).normal(size=(2, 16, 24, 3)).astype("float32")  # a 2 x 3 patch grid
    layer = encoder.get_layer("any_resolution_vit")
    patching = layer.patching
    table = to_numpy(patching.position_embedding.embeddings)
    rows, columns = to_numpy(bicubic_matrix(4, 2)), to_numpy(bicubic_matrix(4, 3))
    grid = np.einsum("ij,jkd,lk->ild", rows, table[1:].reshape(4, 4, -1), columns).reshape(6, -1)
    patches = to_numpy(patching.patch_embedding(small)).reshape(2, 6, -1)
    tokens = np.concatenate([np.tile(to_numpy(patching.class_token), (2, 1, 1)), patches], axis=1)
    expected = to_numpy(layer.transformer(tokens + np.concatenate([table[:1], grid])[None]))[:, 0]
    np.testing.assert_allclose(to_numpy(encoder(small)), expected, atol=1e-5)
    # The patch grid stays in the features: crops of different sizes give different features.
    assert not np.allclose(to_numpy(encoder(small))[0], to_numpy(encoder(images))[0])


def test_token_pooling_class_token_or_mean_of_patch_tokens():
    vit = _tiny_vit()
    images = np.random.default_rng(3).normal(size=(2, 32, 32, 3)).astype("float32")
    tokens = to_numpy(vit(images))
    mean = keras_carp.build_encoder(vit, token_pooling="mean_patch_tokens")
    np.testing.assert_allclose(to_numpy(mean(images)), tokens[:, 1:].mean(axis=1), atol=1e-6)
    no_class = _tiny_vit(class_token=False)
    np.testing.assert_allclose(to_numpy(keras_carp.build_encoder(no_class, token_pooling="mean_patch_tokens")(images)),
                               to_numpy(no_class(images)).mean(axis=1), atol=1e-6)  # fmt: skip
    with pytest.raises(ValueError, match="class token"):
        keras_carp.build_encoder(_tiny_vit(class_token=False))
    with pytest.raises(ValueError, match="token_pooling"):
        keras_carp.build_encoder(vit, token_pooling="max")


def test_any_keras_model_of_rank_2_3_or_4_outputs_is_pooled_to_features():
    inputs = keras.Input((None, None, 3))
    vectors = keras.Model(inputs, keras.layers.Dense(5)(keras.layers.GlobalMaxPooling2D()(inputs)))
    images = np.random.default_rng(4).normal(size=(3, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(keras_carp.build_encoder(vectors)(images)), to_numpy(vectors(images)))
    maps = keras.Model(inputs, keras.layers.Conv2D(4, 3)(inputs))
    np.testing.assert_allclose(to_numpy(keras_carp.build_encoder(maps)(images)),
                               to_numpy(maps(images)).mean(axis=(1, 2)), atol=1e-6)  # fmt: skip
    rank_5 = keras.Model(inputs, keras.layers.Reshape((1, 1, 1, 5))(vectors(inputs)))
    with pytest.raises(ValueError, match=r"\[N, D\], \[N, H, W, C\] or \[N, T, D\]"):
        keras_carp.build_encoder(rank_5)
    with pytest.raises(ValueError, match="Unknown backbone 'resnet_99'"):
        keras_carp.build_encoder("resnet_99")


def test_vit_encoder_saves_and_loads(tmp_path):
    encoder = keras_carp.build_encoder(_tiny_vit(), token_pooling="mean_patch_tokens")
    images = np.random.default_rng(5).normal(size=(2, 24, 16, 3)).astype("float32")
    encoder.save(tmp_path / "vit.keras")
    loaded = keras.saving.load_model(tmp_path / "vit.keras")
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(encoder(images)), atol=1e-6)


@pytest.mark.parametrize(
    "backbone, global_size, local_size",
    [
        ("vit", 32, 16),
        pytest.param("convnext_tiny", 64, 32, marks=pytest.mark.slow),  # 28 M weights: the slow tier
        pytest.param("efficientnetv2_b0", 64, 32, marks=pytest.mark.slow),
    ],
)
def test_carp_trains_a_vit_a_convnext_and_an_efficientnet(backbone, global_size, local_size):
    """Fit steps on global and local crops (a ConvNeXt downsamples 32 x): finite losses, a moving encoder."""
    encoder = keras_carp.build_encoder(_tiny_vit() if backbone == "vit" else backbone)
    head = keras_carp.CARPHead(num_prototypes=64, hidden_dim=32, bottleneck_dim=16)
    model = keras_carp.CARP(encoder, head, block_size=16)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    views = random_views(batch=4, global_size=global_size, local_size=local_size, num_local=1)
    before = [to_numpy(w).copy() for w in encoder.trainable_weights]
    history = model.fit(x=views, batch_size=2, epochs=1, verbose=0, shuffle=False)
    assert np.all(np.isfinite(history.history["loss"]))
    assert any(not np.allclose(a, to_numpy(b)) for a, b in zip(before, encoder.trainable_weights))


@pytest.mark.parametrize("name, width", [("convnext_tiny", 768), ("efficientnetv2_b0", 1280), ("vit_tiny_4", 192)])
def test_named_backbones_of_other_families_give_their_widths_at_any_size(name, width):
    encoder = keras_carp.build_encoder(name)
    for size in (32, 64):
        assert tuple(encoder(np.zeros((1, size, size, 3), "float32")).shape) == (1, width)
