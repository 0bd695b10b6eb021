"""Encoders: KerasHub ResNet backbones (v1.5, torchvision layout) with global average pooling."""

from __future__ import annotations

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


def build_encoder(backbone: str | keras.Model = "resnet50", name: str = "encoder") -> keras.Model:
    """An encoder mapping images [N, H, W, 3] of any size to pooled features [N, D].

    Args:
        backbone: a name in ``RESNET_CONFIGS`` or any Keras model returning a
            feature map (e.g. a KerasHub backbone built ``from_preset``).
        name: the encoder's name.
    """
    if isinstance(backbone, str):
        if backbone not in RESNET_CONFIGS:
            raise ValueError(
                f"Unknown backbone {backbone!r}; choose one of {sorted(RESNET_CONFIGS)} or pass a Keras model."
            )
        backbone = keras_hub.models.ResNetBackbone(**RESNET_CONFIGS[backbone], image_shape=(None, None, 3))
    inputs = keras.Input(shape=(None, None, 3), name="images")
    features = backbone(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    return keras.Model(inputs, pooled, name=name)
