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
    for layer in backbone._flatten_layers(include_self=False):
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
        if backbone not in RESNET_CONFIGS:
            raise ValueError(
                f"Unknown backbone {backbone!r}; choose one of {sorted(RESNET_CONFIGS)} or pass a Keras model."
            )
        backbone = keras_hub.models.ResNetBackbone(**RESNET_CONFIGS[backbone], image_shape=(None, None, 3))
        if init == "torchvision":
            torchvision_initialization(backbone)
    inputs = keras.Input(shape=(None, None, 3), name="images")
    features = backbone(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, pooled, name=name)
