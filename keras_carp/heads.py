"""CARPHead: the projection MLP and the weight-normalised prototype layer."""

from __future__ import annotations

import keras
from keras import layers, ops


def _check_positive(**sizes: int) -> None:
    for name, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}.")


@keras.saving.register_keras_serializable(package="keras_carp")
class CARPHead(layers.Layer):
    """MLP (Dense -> BN -> GELU, ...) to a bottleneck z, then K unit-norm prototypes.

    ``logits = z . (C / ||C||_row)^T``: the prototype weight is weight-normalised
    with the gain fixed at 1, so every prototype has unit L2 norm at every step;
    z itself is not normalised. Initialisation as released: MLP kernels from a
    normal with std 0.02 (PyTorch's ``trunc_normal_`` cuts at +-2 in absolute
    units, i.e. never at this std), biases 0; the prototypes as PyTorch's
    default ``Linear`` weight, uniform in +-1/sqrt(d) (only their direction
    matters).

    Args:
        num_prototypes: K.
        hidden_dim: width of the hidden layers (2048 in the paper).
        bottleneck_dim: d, the size of z (256).
        num_layers: number of Dense layers in the MLP, the bottleneck included (3).
        use_batch_norm: BN after each hidden Dense (on in the paper).
    """

    def __init__(
        self,
        num_prototypes: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        num_layers: int = 3,
        use_batch_norm: bool = True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        _check_positive(
            num_prototypes=num_prototypes,
            hidden_dim=hidden_dim,
            bottleneck_dim=bottleneck_dim,
            num_layers=num_layers,
        )
        self.num_prototypes = num_prototypes
        self.hidden_dim = hidden_dim
        self.bottleneck_dim = bottleneck_dim
        self.num_layers = num_layers
        self.use_batch_norm = use_batch_norm
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.mlp = []
        for index in range(num_layers - 1):
            self.mlp.append(
                layers.Dense(hidden_dim, kernel_initializer=init, name=f"dense_{index}", dtype=self.dtype_policy)
            )
            if use_batch_norm:
                self.mlp.append(
                    layers.BatchNormalization(epsilon=1e-5, momentum=0.9, name=f"bn_{index}", dtype=self.dtype_policy)
                )
            self.mlp.append(layers.Activation("gelu", name=f"gelu_{index}", dtype=self.dtype_policy))
        self.mlp.append(
            layers.Dense(bottleneck_dim, kernel_initializer=init, name="bottleneck", dtype=self.dtype_policy)
        )

    def build(self, input_shape):
        shape = tuple(input_shape)
        for layer in self.mlp:
            layer.build(shape)
            shape = layer.compute_output_shape(shape)
        # [K, d], one prototype per row (PyTorch Linear layout, as in released checkpoints).
        self.prototypes = self.add_weight(
            name="prototypes",
            shape=(self.num_prototypes, self.bottleneck_dim),
            initializer=keras.initializers.RandomUniform(-(self.bottleneck_dim**-0.5), self.bottleneck_dim**-0.5),
        )

    def embed(self, features, training=None):
        """The bottleneck output z [N, d]."""
        x = features
        for layer in self.mlp:
            x = layer(x, training=training)
        return x

    def normalized_prototypes(self, permutation=None):
        """Unit-norm prototype rows [K, d], optionally in permuted order."""
        weights = ops.convert_to_tensor(self.prototypes)
        weights = weights * ops.rsqrt(ops.maximum(ops.sum(ops.square(weights), axis=1, keepdims=True), 1e-24))
        if permutation is not None:
            weights = ops.take(weights, permutation, axis=0)
        return weights

    def call(self, features, training=None, permutation=None):
        """Prototype logits [N, K]; with ``permutation``, column k is prototype permutation[k].

        Permuting the K prototype rows before the matmul gives the same logits as
        gathering the columns of the [N, K] output, and is cheaper (see README).
        """
        z = self.embed(features, training=training)
        prototypes = ops.cast(self.normalized_prototypes(permutation), z.dtype)
        return ops.matmul(z, ops.transpose(prototypes))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape[:-1]) + (self.num_prototypes,)

    def get_config(self) -> dict:
        config = super().get_config()
        config.update(
            num_prototypes=self.num_prototypes,
            hidden_dim=self.hidden_dim,
            bottleneck_dim=self.bottleneck_dim,
            num_layers=self.num_layers,
            use_batch_norm=self.use_batch_norm,
        )
        return config
