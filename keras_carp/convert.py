"""Load the authors' released PyTorch checkpoints (ResNet-50 + CARP head) into Keras.

The released ``.pth`` files are dicts with ``student``, ``teacher``,
``optimizer``, ``epoch`` and ``args``; each network's weights are named
``module.backbone.<torchvision resnet50 name>`` and
``module.head.mlp.<i>.weight|bias|running_mean|running_var`` plus
``module.head.last_layer.weight_g|weight_v``. The backbone goes into KerasHub's
ResNet-50 (v1.5, the torchvision layout) through KerasHub's own timm/torchvision
weight mapping; the head mapping (MLP and weight-normalised prototypes) is ours.

Also accepted: safetensors files (flat, optionally prefixed ``student.`` /
``teacher.``), a bare state dict, and torchvision-style backbone state dicts
(``conv1.weight``, ``layer1.0...``). Reading ``.pth`` needs PyTorch; safetensors
needs the ``safetensors`` package (``pip install "keras-carp[convert]"``).

Every weight of the Keras model must be found with the right shape, and every
network weight of the checkpoint must be used: otherwise the error names the
missing, mismatched or unexpected keys.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
import warnings
from pathlib import Path

import keras
import numpy as np

from keras_carp.backbones import RESNET_CONFIGS, build_encoder
from keras_carp.heads import CARPHead
from keras_carp.model import CARP

NETWORKS = ("teacher", "student")
# Checkpoint entries that are not weights of the inference network.
IGNORED_SUFFIXES = (".num_batches_tracked",)
IGNORED_PREFIXES = ("backbone.fc.",)  # torchvision's classifier, replaced by Identity in self-supervised backbones


class CheckpointError(ValueError):
    """The checkpoint does not fit the network: names the keys that are missing, mismatched or unexpected."""


@dataclasses.dataclass
class TorchCheckpoint:
    """Network weights read from a checkpoint, as float32 NumPy arrays keyed without the ``module.`` prefix.

    ``networks`` maps "teacher" / "student" (or "network" for a single state
    dict) to ``{"backbone.conv1.weight": array, "head.mlp.0.weight": ...}``.
    """

    networks: dict
    epoch: int | None = None
    args: dict | None = None
    path: str = ""

    def network(self, which: str = "teacher") -> dict:
        """The state dict of ``which``; a single-network checkpoint serves both names."""
        if which not in NETWORKS:
            raise ValueError(f"which must be one of {NETWORKS}, got {which!r}.")
        if which in self.networks:
            return self.networks[which]
        if "network" in self.networks:
            return self.networks["network"]
        raise CheckpointError(f"{self.path} has no {which!r} network; it holds {sorted(self.networks)}.")


# ---------------------------------------------------------------- reading
def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # a torch tensor
        value = value.detach().cpu()
        if value.dtype.is_floating_point:
            value = value.float()
        value = value.numpy()
    array = np.asarray(value)
    return array.astype("float32") if array.dtype.kind == "f" else array


def _strip(name: str) -> str:
    """Drop DistributedDataParallel's ``module.`` prefix; torchvision-only names become ``backbone.<name>``."""
    name = name.removeprefix("module.")
    if not name.startswith(("backbone.", "head.")):
        name = "backbone." + name
    return name


def _is_state_dict(value) -> bool:
    return (
        isinstance(value, dict)
        and bool(value)
        and all(isinstance(k, str) for k in value)
        and all(hasattr(v, "shape") for v in value.values())
    )


def _split_networks(flat: dict, source: str) -> dict:
    """``{"teacher.module.x": t, ...}`` -> ``{"teacher": {"x": t}}``; unprefixed keys -> ``{"network": ...}``."""
    networks: dict = {}
    for key, value in flat.items():
        head, _, rest = key.partition(".")
        which = head if head in NETWORKS and rest else "network"
        networks.setdefault(which, {})[_strip(rest if which != "network" else key)] = _to_numpy(value)
    if "network" in networks and len(networks) > 1:
        raise CheckpointError(f"{source} mixes student./teacher.-prefixed keys with unprefixed ones.")
    return networks


def _load_pth(path: Path, trust_checkpoint: bool):
    try:
        import torch
    except ImportError as error:
        raise ImportError("Reading .pth checkpoints needs PyTorch: pip install torch (CPU build is enough).") from error
    if trust_checkpoint:
        return torch.load(path, map_location="cpu", weights_only=False)
    # Safe unpickling; the released files also hold the training arguments as an argparse.Namespace.
    with torch.serialization.safe_globals([argparse.Namespace]):
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            found = re.search(r"Unsupported global: GLOBAL (\S+)", str(error))
            if found is None:
                raise  # not a pickle problem: reported as an unreadable file
            raise CheckpointError(
                f"{path} holds a pickled {found.group(1)} besides tensors and argparse.Namespace. If you trust "
                "the file, pass trust_checkpoint=True to unpickle it fully."
            ) from None


def read_checkpoint(path: str | os.PathLike, trust_checkpoint: bool = False) -> TorchCheckpoint:
    """Read a released ``.pth`` (or a state dict, or a ``.safetensors`` file) into NumPy arrays."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    if path.suffix == ".safetensors":
        try:
            from safetensors.numpy import load_file
        except ImportError as error:
            raise ImportError("Reading .safetensors needs the safetensors package: pip install safetensors.") from error
        try:
            flat = load_file(str(path))
        except Exception as error:
            raise CheckpointError(f"{path} is not a readable safetensors file: {error}") from None
        return TorchCheckpoint(_split_networks(flat, str(path)), path=str(path))

    try:
        contents = _load_pth(path, trust_checkpoint)
    except (CheckpointError, ImportError):
        raise
    except Exception as error:
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint: {error}") from None
    if not isinstance(contents, dict):
        raise CheckpointError(f"{path} holds a {type(contents).__name__}, not a checkpoint dict or a state dict.")
    networks = {which: contents[which] for which in NETWORKS if which in contents}
    if networks:
        for which, state in networks.items():
            if not _is_state_dict(state):
                raise CheckpointError(f"{path}: {which!r} is not a state dict of tensors.")
        networks = {which: {_strip(k): _to_numpy(v) for k, v in state.items()} for which, state in networks.items()}
    elif "state_dict" in contents and _is_state_dict(contents["state_dict"]):
        networks = _split_networks(contents["state_dict"], str(path))
    elif _is_state_dict(contents):
        networks = _split_networks(contents, str(path))
    else:
        raise CheckpointError(
            f"{path} has none of the keys 'student', 'teacher' or 'state_dict' and is not a state dict "
            f"(top-level keys: {sorted(map(str, contents))[:10]})."
        )
    args = contents.get("args")
    args = vars(args) if isinstance(args, argparse.Namespace) else args if isinstance(args, dict) else None
    epoch = contents.get("epoch")
    return TorchCheckpoint(networks, epoch=int(epoch) if epoch is not None else None, args=args, path=str(path))


# --------------------------------------------------------------- mapping
class _PortingLoader:
    """KerasHub's loader interface (``port_weight``) over a NumPy state dict, recording what went wrong."""

    def __init__(self, state: dict, prefix: str):
        self.state = state
        self.prefix = prefix
        self.used: set = set()
        self.missing: list = []
        self.mismatched: list = []

    def port_weight(self, keras_variable, hf_weight_key: str, hook_fn=None) -> None:
        key = self.prefix + hf_weight_key
        if key not in self.state:
            self.missing.append(key)
            return
        value = self.state[key]
        if hook_fn is not None:
            value = hook_fn(value, list(keras_variable.shape))
        if tuple(value.shape) != tuple(keras_variable.shape):
            self.mismatched.append(
                f"{key}: checkpoint {tuple(self.state[key].shape)}, Keras {tuple(keras_variable.shape)}"
            )
            return
        keras_variable.assign(value.astype(keras_variable.dtype))
        self.used.add(key)


def _resnet_backbone(encoder: keras.Model):
    import keras_hub

    for layer in encoder.layers:
        if isinstance(layer, keras_hub.models.ResNetBackbone):
            return layer
    raise TypeError(f"{encoder.name} has no KerasHub ResNetBackbone to load torchvision weights into.")


def _port_backbone(loader: _PortingLoader, encoder: keras.Model) -> None:
    from keras_carp.keras_internals import port_torchvision_resnet

    port_torchvision_resnet(_resnet_backbone(encoder), loader, "resnet50")


def _head_layout(state: dict) -> list:
    """The head MLP's modules in order: ("linear", index) / ("bn", index), from the checkpoint's names."""
    if "head.mlp.weight" in state:  # a one-layer head: mlp is a single Linear
        return [("linear", None)]
    indices = sorted({int(m.group(1)) for k in state if (m := re.match(r"head\.mlp\.(\d+)\.", k))})
    layout = []
    for index in indices:
        if f"head.mlp.{index}.running_mean" in state:
            layout.append(("bn", index))
        elif state.get(f"head.mlp.{index}.weight") is not None and state[f"head.mlp.{index}.weight"].ndim == 2:
            layout.append(("linear", index))
    return layout


def _prototype_weights(state: dict) -> tuple[str, np.ndarray, str | None]:
    """(key, direction v [K, d], gain key) of the weight-normalised prototype layer."""
    for v_key, g_key in (
        ("head.last_layer.weight_v", "head.last_layer.weight_g"),
        ("head.last_layer.parametrizations.weight.original1", "head.last_layer.parametrizations.weight.original0"),
    ):
        if v_key in state:
            return v_key, state[v_key], g_key if g_key in state else None
    if "head.last_layer.weight" in state:
        return "head.last_layer.weight", state["head.last_layer.weight"], None
    raise CheckpointError("The checkpoint has no prototype layer: expected head.last_layer.weight_g / weight_v.")


def head_from_state(state: dict) -> CARPHead:
    """A ``CARPHead`` with the checkpoint's sizes (K, hidden width, bottleneck, depth, BN)."""
    layout = _head_layout(state)
    linears = [index for kind, index in layout if kind == "linear"]
    if not linears:
        raise CheckpointError("The checkpoint has no head MLP: expected head.mlp.<i>.weight entries.")
    weight = lambda index: state["head.mlp.weight" if index is None else f"head.mlp.{index}.weight"]  # noqa: E731
    _, prototypes, _ = _prototype_weights(state)
    return CARPHead(
        num_prototypes=int(prototypes.shape[0]),
        hidden_dim=int(weight(linears[0]).shape[0]) if len(linears) > 1 else 2048,
        bottleneck_dim=int(weight(linears[-1]).shape[0]),
        num_layers=len(linears),
        use_batch_norm=any(kind == "bn" for kind, _ in layout),
    )


def _port_head(loader: _PortingLoader, head: CARPHead) -> None:
    state = loader.state
    layout = _head_layout(state)
    dense = [layer for layer in head.mlp if isinstance(layer, keras.layers.Dense)]
    norms = [layer for layer in head.mlp if isinstance(layer, keras.layers.BatchNormalization)]
    linear_keys = ["mlp" if index is None else f"mlp.{index}" for kind, index in layout if kind == "linear"]
    bn_keys = [f"mlp.{index}" for kind, index in layout if kind == "bn"]
    if len(linear_keys) != len(dense) or len(bn_keys) != len(norms):
        raise CheckpointError(
            f"The checkpoint's head has {len(linear_keys)} Linear and {len(bn_keys)} BatchNorm layers; "
            f"the Keras head has {len(dense)} and {len(norms)}."
        )
    transpose = lambda x, _: np.transpose(x)  # noqa: E731  (PyTorch Linear is [out, in])
    for layer, key in zip(dense, linear_keys):
        loader.port_weight(layer.kernel, f"{key}.weight", hook_fn=transpose)
        loader.port_weight(layer.bias, f"{key}.bias")
    for layer, key in zip(norms, bn_keys):
        loader.port_weight(layer.gamma, f"{key}.weight")
        loader.port_weight(layer.beta, f"{key}.bias")
        loader.port_weight(layer.moving_mean, f"{key}.running_mean")
        loader.port_weight(layer.moving_variance, f"{key}.running_var")
    v_key, _, g_key = _prototype_weights(state)
    if g_key is not None:
        gain = state[g_key]
        if not np.allclose(gain, 1.0, atol=1e-6):
            raise CheckpointError(
                f"{g_key} is not 1 (max |g - 1| = {np.max(np.abs(gain - 1.0)):.3g}); CARP fixes the prototype gain "
                "to 1 and keras_carp's head normalises every prototype to unit length."
            )
        loader.used.add(g_key)
    loader.port_weight(head.prototypes, v_key.removeprefix(loader.prefix))


def load_torch_weights(state: dict, encoder: keras.Model, head: CARPHead | None = None) -> None:
    """Assign one network's state dict (``backbone.*``, ``head.*``) to a Keras encoder (and head).

    Raises ``CheckpointError`` naming every missing, mismatched or unused key;
    nothing is partially loaded without an error.
    """
    backbone = _PortingLoader(state, "backbone.")
    _port_backbone(backbone, encoder)
    loaders = [backbone]
    if head is not None:
        if not head.built:
            head.build((None, encoder.output_shape[-1]))
        head_loader = _PortingLoader(state, "head.")
        _port_head(head_loader, head)
        loaders.append(head_loader)
    used = set().union(*(loader.used for loader in loaders))
    wanted_prefixes = ("backbone.", "head.") if head is not None else ("backbone.",)
    unexpected = sorted(
        key
        for key in state
        if key.startswith(wanted_prefixes)
        and key not in used
        and not key.endswith(IGNORED_SUFFIXES)
        and not key.startswith(IGNORED_PREFIXES)
    )
    missing = [key for loader in loaders for key in loader.missing]
    mismatched = [entry for loader in loaders for entry in loader.mismatched]
    if missing or mismatched or unexpected:
        parts = []
        for label, keys in (("missing", missing), ("mismatched", mismatched), ("unexpected", unexpected)):
            if keys:
                shown = ", ".join(keys[:12]) + (f", ... ({len(keys)} in all)" if len(keys) > 12 else "")
                parts.append(f"{len(keys)} {label}: {shown}")
        raise CheckpointError("The checkpoint does not fit a ResNet-50 CARP network; " + "; ".join(parts) + ".")


# ------------------------------------------------------------- building
def _checkpoint(source, trust_checkpoint: bool) -> TorchCheckpoint:
    return source if isinstance(source, TorchCheckpoint) else read_checkpoint(source, trust_checkpoint)


def convert_encoder(
    source: str | os.PathLike | TorchCheckpoint,
    which: str = "teacher",
    backbone: str = "resnet50",
    trust_checkpoint: bool = False,
) -> keras.Model:
    """The released checkpoint's ``which`` encoder as a Keras model (images -> pooled 2048-d features)."""
    checkpoint = _checkpoint(source, trust_checkpoint)
    if backbone not in RESNET_CONFIGS:
        raise ValueError(f"Unknown backbone {backbone!r}; choose one of {sorted(RESNET_CONFIGS)}.")
    encoder = build_encoder(backbone, name=f"{which}_encoder")
    load_torch_weights(checkpoint.network(which), encoder)
    return encoder


def convert_model(
    source: str | os.PathLike | TorchCheckpoint,
    block_size: int = 512,
    partition: str = "random",
    seed: int = 0,
    trust_checkpoint: bool = False,
) -> CARP:
    """A whole ``CARP`` model (student and teacher, encoders and heads) from a released checkpoint.

    The head's sizes come from the checkpoint. A file holding one network
    loads it into both student and teacher (with a warning). The optimizer
    state is not converted: compile the model before training on.
    """
    checkpoint = _checkpoint(source, trust_checkpoint)
    student_state = checkpoint.network("student")
    teacher_state = checkpoint.network("teacher")
    if "network" in checkpoint.networks:
        warnings.warn(
            f"{checkpoint.path} holds one network; it becomes both the student and the teacher.", stacklevel=2
        )
    model = CARP(build_encoder("resnet50"), head_from_state(student_state), block_size=block_size,
                 partition=partition, seed=seed)  # fmt: skip
    load_torch_weights(student_state, model.student_encoder, model.student_head)
    load_torch_weights(teacher_state, model.teacher_encoder, model.teacher_head)
    return model
