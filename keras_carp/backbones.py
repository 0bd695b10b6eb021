"""Encoders: a backbone (KerasHub ResNet, ViT, Keras' ConvNeXt/EfficientNetV2, any Keras model) and its pooling.

``build_encoder`` turns a backbone into an encoder of images of any size into
features [N, D]: a feature map [N, H, W, C] is averaged over space; tokens
[N, T, D] give the class token or the mean of the patch tokens; [N, D] is kept.
A ViT is wrapped in ``AnyResolutionViT``, which interpolates its position
embeddings to each input's patch grid (DINO's idea, resized to the exact grid), so the 224 and 96 px
crops of multi-crop run through one set of weights.

``build_encoder`` starts a named ResNet as the released code's torchvision
ResNets start (``zero_init_residual=True``): every convolution kernel from a
Kaiming normal with fan_out and ReLU gain (std sqrt(2 / (k*k*out))), and the
last batch norm of every residual branch with gamma = 0, so each block starts
as the identity of its shortcut. ``init="keras"`` keeps KerasHub's own
(Glorot-uniform kernels, gamma = 1).
"""

from __future__ import annotations

import os
import re

import keras
import keras_hub

from keras_carp.keras_internals import flatten_layers

# ResNetBackbone arguments; "resnet50" is the paper's encoder (2048-d features).
RESNET_CONFIGS = {
    "resnet50": dict(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[3, 4, 6, 3],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="bottleneck_block",
    ),
    "resnet18": dict(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[7],
        stackwise_num_filters=[64, 128, 256, 512],
        stackwise_num_blocks=[2, 2, 2, 2],
        stackwise_num_strides=[1, 2, 2, 2],
        block_type="basic_block",
    ),
    # A small ResNet for CPU runs on small images (digits, Fashion-MNIST): 128-d features.
    "resnet_tiny": dict(
        input_conv_filters=[64],
        input_conv_kernel_sizes=[3],
        stackwise_num_filters=[64, 128],
        stackwise_num_blocks=[1, 1],
        stackwise_num_strides=[1, 2],
        block_type="basic_block",
    ),
}


# Small-image ResNets (the "CIFAR" variant SSL libraries train on 32 px data): a 3x3 stride-1 stem and no
# max-pool, so a 28-32 px image keeps its resolution into the first stage. KerasHub's ResNetBackbone always
# downsamples 4x in its stem, so these are built here from Keras layers, basic blocks as torchvision's, with
# KerasHub's layer names (the torchvision initialisation finds the same blocks).
SMALL_IMAGE_RESNETS = {
    "resnet18_small_images": dict(filters=(64, 128, 256, 512), blocks=(2, 2, 2, 2)),
    "resnet10_small_images": dict(filters=(32, 64, 128, 256), blocks=(1, 1, 1, 1)),
    "resnet10_small_images_wide": dict(filters=(64, 128, 256, 512), blocks=(1, 1, 1, 1)),
}


def _conv_bn(x, filters: int, kernel: int, stride: int, name: str, relu: bool = True):
    """Conv (torchvision padding: k // 2 on every side) -> BN (eps 1e-5, momentum 0.9) [-> ReLU]."""
    if stride > 1 and kernel > 1:
        x = keras.layers.ZeroPadding2D(kernel // 2, name=f"{name}_pad")(x)
    padding = "valid" if stride > 1 or kernel == 1 else "same"
    x = keras.layers.Conv2D(filters, kernel, strides=stride, padding=padding, use_bias=False, name=f"{name}_conv")(x)
    x = keras.layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"{name}_bn")(x)
    return keras.layers.ReLU(name=f"{name}_relu")(x) if relu else x


def small_image_resnet(filters, blocks, name: str = "small_image_resnet") -> keras.Model:
    """A basic-block ResNet with a 3x3 stride-1 stem and no max-pool: [N, H, W, 3] -> [N, H/8, W/8, C]."""
    inputs = keras.Input((None, None, 3), name="images")
    x = _conv_bn(inputs, filters[0], 3, 1, "conv1")
    channels = filters[0]
    for stack, (width, count) in enumerate(zip(filters, blocks)):
        for block in range(count):
            stride = 2 if stack > 0 and block == 0 else 1
            prefix = f"stack{stack}_block{block}"
            shortcut = x
            if stride > 1 or channels != width:
                shortcut = _conv_bn(x, width, 1, stride, f"{prefix}_0", relu=False)
            y = _conv_bn(x, width, 3, stride, f"{prefix}_1")
            y = _conv_bn(y, width, 3, 1, f"{prefix}_2", relu=False)
            x = keras.layers.ReLU(name=f"{prefix}_out")(keras.layers.Add(name=f"{prefix}_add")([shortcut, y]))
            channels = width
    return keras.Model(inputs, x, name=name)


# ViTs by name (patch size last): KerasHub ViTBackbone arguments; image_shape is the grid the position
# embeddings are stored at (other sizes are interpolated). "vit_tiny_4" is for 28-32 px images on a CPU.
VIT_CONFIGS = {
    "vit_tiny_16": dict(image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=3, hidden_dim=192,
                        mlp_dim=768),
    "vit_small_16": dict(image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=6, hidden_dim=384,
                         mlp_dim=1536),
    "vit_base_16": dict(image_shape=(224, 224, 3), patch_size=16, num_layers=12, num_heads=12, hidden_dim=768,
                        mlp_dim=3072),
    "vit_tiny_4": dict(image_shape=(32, 32, 3), patch_size=4, num_layers=6, num_heads=3, hidden_dim=192,
                       mlp_dim=768),
}  # fmt: skip

# Keras' own applications (KerasHub 0.32 has no ConvNeXt); built without weights and without their
# internal input rescaling, since the views arrive ImageNet-normalised.
KERAS_APPLICATIONS = {
    "convnext_tiny": "ConvNeXtTiny",
    "convnext_small": "ConvNeXtSmall",
    "efficientnetv2_b0": "EfficientNetV2B0",
    "efficientnetv2_s": "EfficientNetV2S",
}

TOKEN_POOLING = ("class_token", "mean_patch_tokens")


def backbone_names() -> list[str]:
    """Every backbone ``build_encoder`` knows by name (KerasHub preset names are accepted too)."""
    return sorted([*RESNET_CONFIGS, *SMALL_IMAGE_RESNETS, *VIT_CONFIGS, *KERAS_APPLICATIONS])


INITIALIZATIONS = ("torchvision", "keras")
# KerasHub names a ResNet block's layers stack<s>_block<b>_<i>_{conv,bn}: i = 0 is the projection shortcut,
# i = 1, 2 (, 3) the residual branch in order.
_BLOCK_LAYER = re.compile(r"^(stack\d+_block\d+)_(\d+)_bn$")


def torchvision_initialization(backbone: keras.Model) -> int:
    """Re-initialise a KerasHub ResNet as torchvision's ``resnet*(zero_init_residual=True)``; returns the blocks.

    Kernels of every ``Conv2D``: normal with std sqrt(2 / fan_out), fan_out =
    kernel height * width * output channels (``kaiming_normal_(mode="fan_out",
    nonlinearity="relu")``). The last BN of each residual branch: gamma = 0.
    """
    kaiming_fan_out = keras.initializers.VarianceScaling(2.0, mode="fan_out", distribution="untruncated_normal")
    last_bn: dict = {}
    for layer in flatten_layers(backbone, include_self=False):
        if isinstance(layer, keras.layers.Conv2D):
            layer.kernel.assign(kaiming_fan_out(layer.kernel.shape, dtype=layer.kernel.dtype))
        match = _BLOCK_LAYER.match(layer.name) if isinstance(layer, keras.layers.BatchNormalization) else None
        if match and int(match.group(2)) > 0:
            block, index = match.group(1), int(match.group(2))
            if index > last_bn.get(block, (0, None))[0]:
                last_bn[block] = (index, layer)
    for _, layer in last_bn.values():
        layer.gamma.assign(keras.ops.zeros(layer.gamma.shape, dtype=layer.gamma.dtype))
    return len(last_bn)


def bicubic_matrix(in_size: int, out_size, dtype="float32"):
    """[out_size, in_size] weights of PyTorch's bicubic resize (a = -0.75, half-pixel centres, edges clamped).

    The same numbers on every backend (Keras' ``image.resize`` uses a = -0.5 on TF and JAX but -0.75 on
    torch), and ``out_size`` may be a traced size.
    """
    scale = keras.ops.cast(in_size, "float32") / keras.ops.cast(out_size, "float32")
    position = (keras.ops.cast(keras.ops.arange(out_size), "float32") + 0.5) * scale - 0.5
    start = keras.ops.floor(position)
    t = position - start
    a = -0.75

    def near(x):  # |x| <= 1
        return ((a + 2) * x - (a + 3)) * x * x + 1

    def far(x):  # 1 < |x| < 2
        return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

    weights = (far(t + 1), near(t), near(1 - t), far(2 - t))
    matrix = 0.0
    for offset, weight in zip((-1, 0, 1, 2), weights):
        index = keras.ops.clip(keras.ops.cast(start, "int32") + offset, 0, in_size - 1)
        matrix = matrix + keras.ops.one_hot(index, in_size) * weight[:, None]
    return keras.ops.cast(matrix, dtype)


@keras.saving.register_keras_serializable(package="keras_carp")
class AnyResolutionViT(keras.layers.Layer):
    """A KerasHub ``ViTBackbone`` run at any image size: [N, H, W, 3] -> tokens [N, 1 + h * w, D].

    KerasHub's ViT is built for one image shape. This layer reuses its weights
    (patch embedding, class token, position embeddings, encoder) and, for a
    patch grid other than the stored one, resizes the patch position
    embeddings bicubically to exactly that grid (the class token's is kept): DINOv2's
    ``interpolate_pos_encoding`` with ``interpolate_offset=0`` and no antialiasing, where DINO v1 scales by
    (grid + 0.1) / stored grid (PyTorch's bicubic; see ``bicubic_matrix``). At the stored size it equals the backbone.
    """

    def __init__(self, backbone: keras_hub.models.ViTBackbone, **kwargs):
        super().__init__(**kwargs)
        if not isinstance(backbone, keras_hub.models.ViTBackbone):
            raise TypeError(f"AnyResolutionViT wraps a keras_hub.models.ViTBackbone, got {type(backbone).__name__}.")
        if backbone.data_format != "channels_last":
            raise ValueError("AnyResolutionViT expects a channels_last ViTBackbone.")
        self.backbone = backbone
        self.patching = backbone.get_layer("vit_patching_and_embedding")
        self.transformer = backbone.get_layer("vit_encoder")
        self.grid = tuple(s // p for s, p in zip(backbone.image_shape[:2], backbone.patch_size))

    def position_embeddings(self, grid_height, grid_width):
        """Position embeddings [1, (1 +) grid_height * grid_width, D] for a patch grid."""
        table = keras.ops.convert_to_tensor(self.patching.position_embedding.embeddings)
        class_position = table[:1] if self.patching.use_class_token else table[:0]
        patches = table[1:] if self.patching.use_class_token else table
        if isinstance(grid_height, int) and isinstance(grid_width, int) and (grid_height, grid_width) == self.grid:
            return table[None]
        grid = keras.ops.reshape(patches, (*self.grid, -1))
        rows = bicubic_matrix(self.grid[0], grid_height, grid.dtype)
        columns = bicubic_matrix(self.grid[1], grid_width, grid.dtype)
        grid = keras.ops.einsum("ij,jkd,lk->ild", rows, grid, columns)
        patches = keras.ops.reshape(grid, (-1, keras.ops.shape(table)[-1]))
        return keras.ops.concatenate([class_position, patches], axis=0)[None]

    def call(self, images, training=None):
        patches = self.patching.patch_embedding(images)  # [N, h, w, D]
        shape = keras.ops.shape(patches)
        tokens = keras.ops.reshape(patches, (shape[0], -1, shape[-1]))
        if self.patching.use_class_token:
            class_token = keras.ops.tile(keras.ops.cast(self.patching.class_token, tokens.dtype), (shape[0], 1, 1))
            tokens = keras.ops.concatenate([class_token, tokens], axis=1)
        positions = keras.ops.cast(self.position_embeddings(shape[1], shape[2]), tokens.dtype)
        return self.transformer(tokens + positions, training=training)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], None, self.backbone.hidden_dim)

    def get_config(self) -> dict:
        return {**super().get_config(), "backbone": keras.saving.serialize_keras_object(self.backbone)}

    @classmethod
    def from_config(cls, config: dict) -> AnyResolutionViT:
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


@keras.saving.register_keras_serializable(package="keras_carp")
class TokenPooling(keras.layers.Layer):
    """Tokens [N, T, D] -> [N, D]: the class token (token 0), or the mean of the patch tokens after it."""

    def __init__(self, mode: str = "class_token", has_class_token: bool = True, **kwargs):
        super().__init__(**kwargs)
        if mode not in TOKEN_POOLING:
            raise ValueError(f"token pooling must be one of {TOKEN_POOLING}, got {mode!r}.")
        if mode == "class_token" and not has_class_token:
            raise ValueError("class_token pooling needs a backbone with a class token; use mean_patch_tokens.")
        self.mode, self.has_class_token = mode, has_class_token

    def call(self, tokens):
        if self.mode == "class_token":
            return tokens[:, 0]
        return keras.ops.mean(tokens[:, 1:] if self.has_class_token else tokens, axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self) -> dict:
        return {**super().get_config(), "mode": self.mode, "has_class_token": self.has_class_token}


def named_backbone(name: str, init: str = "torchvision") -> keras.Model:
    """A backbone by name (``backbone_names()``), or a KerasHub preset (handle or local directory)."""
    if name in SMALL_IMAGE_RESNETS:
        backbone = small_image_resnet(**SMALL_IMAGE_RESNETS[name], name=name)
    elif name in RESNET_CONFIGS:
        backbone = keras_hub.models.ResNetBackbone(**RESNET_CONFIGS[name], image_shape=(None, None, 3))
    elif name in VIT_CONFIGS:
        return keras_hub.models.ViTBackbone(**VIT_CONFIGS[name])
    elif name in KERAS_APPLICATIONS:
        application = getattr(keras.applications, KERAS_APPLICATIONS[name])
        return application(include_top=False, weights=None, input_shape=(None, None, 3), include_preprocessing=False)
    elif not (name in keras_hub.models.Backbone.presets or "://" in name or os.path.isdir(name)):
        raise ValueError(
            f"Unknown backbone {name!r}: choose one of {backbone_names()}, a KerasHub preset name or handle "
            "(keras_hub.models.Backbone.presets), a preset directory, or pass a Keras model."
        )
    else:
        try:
            return keras_hub.models.Backbone.from_preset(name)
        except Exception as error:  # from_preset raises several kinds; the message says what was tried
            raise ValueError(
                f"The KerasHub preset {name!r} did not load ({type(error).__name__}: {error}). Without a "
                "network, pass a local preset directory."
            ) from error
    if init == "torchvision":
        torchvision_initialization(backbone)
    return backbone


def build_encoder(
    backbone: str | keras.Model = "resnet50",
    name: str = "encoder",
    init: str = "torchvision",
    token_pooling: str = "class_token",
) -> keras.Model:
    """An encoder mapping images [N, H, W, 3] of any size to pooled features [N, D].

    Args:
        backbone: a name in ``backbone_names()``, a KerasHub preset (handle or
            directory, weights kept), or any Keras model returning [N, D],
            [N, H, W, C] or [N, T, D] (a KerasHub ``ViTBackbone`` is run at
            any resolution through ``AnyResolutionViT``).
        name: the encoder's name.
        init: for a named ResNet, "torchvision" (default: as the released
            code, see ``torchvision_initialization``) or "keras" (KerasHub's
            initialisers). Other backbones keep their own initialisers.
        token_pooling: for token outputs, "class_token" (DINO's) or
            "mean_patch_tokens".
    """
    if init not in INITIALIZATIONS:
        raise ValueError(f"init must be one of {INITIALIZATIONS}, got {init!r}.")
    if token_pooling not in TOKEN_POOLING:
        raise ValueError(f"token_pooling must be one of {TOKEN_POOLING}, got {token_pooling!r}.")
    if isinstance(backbone, str):
        backbone = named_backbone(backbone, init)
    has_class_token = True
    if isinstance(backbone, keras_hub.models.ViTBackbone):
        has_class_token = backbone.use_class_token
        backbone = AnyResolutionViT(backbone, name="any_resolution_vit")
    inputs = keras.Input(shape=(None, None, 3), name="images")
    features = backbone(inputs)
    rank = len(features.shape)
    if rank == 4:
        pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    elif rank == 3:
        pooled = TokenPooling(token_pooling, has_class_token=has_class_token, name="pool")(features)
    elif rank == 2:
        pooled = features
    else:
        raise ValueError(
            f"the backbone returns a tensor of shape {features.shape}; expected [N, D], [N, H, W, C] or [N, T, D]."
        )
    return keras.Model(inputs, pooled, name=name)
