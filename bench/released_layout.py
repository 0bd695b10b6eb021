"""A random CARP checkpoint in the released PyTorch layout, for bench.export_and_convert (needs torch).

The released checkpoints hold DDP state dicts (``module.`` prefix) of a torchvision ResNet-50 (``backbone``)
and the CARP head (``head.mlp.<i>``, ``head.last_layer.weight_g|weight_v``) for the student and the teacher.
The ResNet is bench.torch_baseline's (torchvision's module names); the batch norms are calibrated on random
images so that eval-mode activations stay O(1) through all 50 layers, as in a trained network.
The tests keep their own independent reference (tests/torch_reference.py): the benchmarks do not import tests.
"""

from __future__ import annotations

import argparse
import warnings

import torch
from torch import nn

from bench.torch_baseline import ResNet


class ReleasedHead(nn.Module):
    """MLP (Linear -> BN -> GELU) x 2 -> Linear bottleneck, then weight-normalised prototypes (gain fixed at 1)."""

    def __init__(self, in_dim: int, num_prototypes: int, hidden_dim: int, bottleneck_dim: int):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))  # fmt: skip
        with warnings.catch_warnings():  # deprecated, but it is what gives the released names weight_g / weight_v
            warnings.simplefilter("ignore", FutureWarning)
            self.last_layer = nn.utils.weight_norm(nn.Linear(bottleneck_dim, num_prototypes, bias=False))
        self.last_layer.weight_g.data.fill_(1.0)
        self.last_layer.weight_g.requires_grad = False

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.last_layer(self.mlp(features))


class ReleasedNetwork(nn.Module):
    """``backbone`` (ResNet-50 up to pooling) and ``head``, the released checkpoints' two children."""

    def __init__(self, head: ReleasedHead):
        super().__init__()
        self.backbone = ResNet("resnet50")
        for module in self.backbone.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        self.head = head


def calibrated(network: ReleasedNetwork, seed: int, image_size: int = 64, batches: int = 3) -> ReleasedNetwork:
    """Random BN affine weights, running statistics measured on random images; returned in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, module in network.named_modules():
            if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
                low, high = (0.1, 0.3) if name.endswith("bn3") else (0.4, 0.8)  # small residual-branch gains
                module.weight.copy_(low + (high - low) * torch.rand(module.weight.shape, generator=generator))
                module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
                module.momentum = None  # cumulative average over the calibration batches
                module.reset_running_stats()
        network.train()
        for _ in range(batches):
            network.head(network.backbone(torch.randn(8, 3, image_size, image_size, generator=generator)))
    return network.eval()


def released_checkpoint(num_prototypes: int = 65536, hidden_dim: int = 2048, bottleneck_dim: int = 256,
                        seed: int = 0) -> tuple[dict, ReleasedNetwork, ReleasedNetwork]:  # fmt: skip
    """(checkpoint dict in the released layout, student network, teacher network), with different random weights."""
    networks = []
    for offset in range(2):
        torch.manual_seed(seed + offset)
        network = ReleasedNetwork(ReleasedHead(2048, num_prototypes, hidden_dim, bottleneck_dim))
        networks.append(calibrated(network, seed + offset))
    student, teacher = networks

    def ddp_state(network: nn.Module) -> dict:
        return {f"module.{key}": value for key, value in network.state_dict().items()}

    checkpoint = {
        "student": ddp_state(student),
        "teacher": ddp_state(teacher),
        "optimizer": {"state": {}, "param_groups": [{"lr": 0.45, "params": [0, 1]}]},
        "epoch": 7,
        "args": argparse.Namespace(arch="resnet50", num_prototypes=num_prototypes, batch_size_per_gpu=256),
    }
    return checkpoint, student, teacher
