"""An independent PyTorch reference for checkpoint conversion: torchvision's ResNet-50 (v1.5) and the CARP head.

Written here (torchvision's PyPI wheels do not load beside the CPU torch this
project tests with) with torchvision's module names, so its ``state_dict()``
has exactly the released checkpoints' keys: ``conv1``, ``bn1``,
``layer<s>.<b>.conv<i>`` / ``bn<i>`` / ``downsample.0|1``; the head has
``mlp.<i>`` (Linear, BatchNorm1d, GELU) and ``last_layer.weight_g|weight_v``.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (stride here: v1.5) -> 1x1 with a projection shortcut when the shape changes."""

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        out_channels = 4 * width
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, out_channels, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_channels != out_channels:
            self.downsample = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False), nn.BatchNorm2d(out_channels)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


class ResNet50(nn.Module):
    """torchvision.models.resnet50 with ``fc = Identity``: images [N, 3, H, W] -> pooled features [N, 2048]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels = 64
        for stage, (width, blocks, stride) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3), (1, 2, 2, 2)), 1):
            layers = []
            for index in range(blocks):
                layers.append(Bottleneck(channels, width, stride if index == 0 else 1))
                channels = 4 * width
            setattr(self, f"layer{stage}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Identity()
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


class CARPHead(nn.Module):
    """MLP (Linear -> BN -> GELU) x (layers - 1) -> Linear bottleneck, then unit-norm prototypes (gain fixed at 1)."""

    def __init__(self, in_dim: int, num_prototypes: int, hidden_dim: int, bottleneck_dim: int, num_layers: int = 3):
        super().__init__()
        modules, width = [], in_dim
        for _ in range(num_layers - 1):
            modules += [nn.Linear(width, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU()]
            width = hidden_dim
        modules.append(nn.Linear(width, bottleneck_dim))
        self.mlp = nn.Sequential(*modules)
        with warnings.catch_warnings():  # deprecated, but it is what gives the released names weight_g / weight_v
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        self.last_layer.weight_g.data.fill_(1.0)
        self.last_layer.weight_g.requires_grad = False

    def embed(self, features):
        return self.mlp(features)

    def forward(self, features):
        return self.last_layer(self.embed(features))


class CARPNetwork(nn.Module):
    def __init__(self, head: CARPHead):
        super().__init__()
        self.backbone = ResNet50()
        self.head = head


def calibrated(network: CARPNetwork, seed: int, image_size: int = 64, batches: int = 3) -> CARPNetwork:
    """Random BN affine weights and running statistics measured on random images, so eval-mode activations
    stay O(1) through all 50 layers (a fresh network's unit statistics would blow them up or shrink them)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                # Residual branches end in small gains, as in trained ResNets, so the residual stream stays O(1).
                low, high = (0.1, 0.3) if name.endswith("bn3") else (0.4, 0.8)
                module.weight.copy_(low + (high - low) * torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.momentum = None  # cumulative average over the calibration batches
                module.reset_running_stats()
        network.train()
        for _ in range(batches):
            images = torch.randn(8, 3, image_size, image_size, generator=generator)
            network.head(network.backbone(images))
    return network.eval()


def released_checkpoint(num_prototypes: int = 512, hidden_dim: int = 64, bottleneck_dim: int = 32, seed: int = 0):
    """(checkpoint dict in the released layout, student network, teacher network) with different random weights."""
    networks = []
    for offset in range(2):
        torch.manual_seed(seed + offset)
        network = CARPNetwork(CARPHead(2048, num_prototypes, hidden_dim, bottleneck_dim))
        networks.append(calibrated(network, seed + offset))
    student, teacher = networks

    def ddp_state(network):
        return {f"module.{key}": value for key, value in network.state_dict().items()}

    checkpoint = {
        "student": ddp_state(student),
        "teacher": ddp_state(teacher),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.45, "params": [0, 1]}]},
        "epoch": 7,
        "args": argparse.Namespace(arch="resnet50", num_prototypes=num_prototypes, batch_size_per_gpu=256),
    }
    return checkpoint, student, teacher
