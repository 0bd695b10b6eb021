"""Encoders: KerasHub ResNet backbones (v1.5, torchvision layout) with global average pooling.

``build_encoder`` starts a named ResNet as the released code's torchvision
ResNets start (``zero_init_residual=True``): every convolution kernel from a
Kaiming normal with fan_out and ReLU gain (std sqrt(2 / (k*k*out))), and the
last batch norm of every residual branch with gamma = 0, so each block starts
as the identity of its shortcut. ``init="keras"`` keeps KerasHub's own
(Glorot-uniform kernels, gamma = 1).
"""

from __future__ import annotations

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


def build_encoder(
    backbone: str | keras.Model = "resnet50", name: str = "encoder", init: str = "torchvision"
) -> keras.Model:
    """An encoder mapping images [N, H, W, 3] of any size to pooled features [N, D].

    Args:
        backbone: a name in ``RESNET_CONFIGS`` or any Keras model returning a
            feature map (e.g. a KerasHub backbone built ``from_preset``, whose
            weights are kept as they are).
        name: the encoder's name.
        init: for a named ResNet, "torchvision" (default: as the released
            code, see the module docstring) or "keras" (KerasHub's initialisers).
    """
    if init not in INITIALIZATIONS:
        raise ValueError(f"init must be one of {INITIALIZATIONS}, got {init!r}.")
    if isinstance(backbone, str):
        if backbone in SMALL_IMAGE_RESNETS:
            backbone = small_image_resnet(**SMALL_IMAGE_RESNETS[backbone], name=backbone)
        elif backbone in RESNET_CONFIGS:
            backbone = keras_hub.models.ResNetBackbone(**RESNET_CONFIGS[backbone], image_shape=(None, None, 3))
        else:
            raise ValueError(
                f"Unknown backbone {backbone!r}; choose one of {sorted(RESNET_CONFIGS) + sorted(SMALL_IMAGE_RESNETS)} "
                "or pass a Keras model."
            )
        if init == "torchvision":
            torchvision_initialization(backbone)
    inputs = keras.Input(shape=(None, None, 3), name="images")
    features = backbone(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, pooled, name=name)
