"""The authors' released CARP training step, transcribed into PyTorch by this project for parity tests.

Written from the method's description (the released step as the spec states
it), not from the authors' code, at test scale:

- the student's backbone runs once per group of consecutive same-size crops,
  its head ONCE on the pooled features of all crops concatenated (one set of
  head batch-norm statistics); the teacher runs on the 2 global crops;
- every batch draws its partition (here injected, so that both sides use the
  same one); block softmax in float32; consistency over the (i != j) pairs,
  entropy as the KL of the batch-mean block probabilities to uniform;
- the loss is divided by the number of accumulated batches; on the last batch
  of each group the teacher moves with the PRE-step student weights
  (``t <- m t + (1 - m) s`` over every parameter), then backward, the LARS
  step and zero_grad; on the other batches only backward;
- the learning rate and the teacher momentum are indexed by batch.

Batch norm is PyTorch's (running variance with the unbiased batch variance);
each BN layer also keeps ``running_var_biased``, the same average taken with
the biased variance, which is Keras' convention, so the tests can compare
every statistic.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

EPS = torch.finfo(torch.float32).eps


class TrackedBatchNorm(nn.BatchNorm2d):
    """``BatchNorm2d`` / ``1d`` (any rank) that also tracks the running variance with the biased batch variance."""

    def __init__(self, channels: int):
        super().__init__(channels, eps=1e-5, momentum=0.1)
        self.register_buffer("running_var_biased", torch.ones(channels))

    def _check_input_dim(self, x):  # 2-D [N, C] and 4-D [N, C, H, W] inputs
        if x.dim() not in (2, 4):
            raise ValueError(f"expected a 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x):
        if self.training:
            with torch.no_grad():
                axes = [0] if x.dim() == 2 else [0, 2, 3]
                biased = x.var(dim=axes, unbiased=False)
                self.running_var_biased.mul_(1 - self.momentum).add_(self.momentum * biased)
        return super().forward(x)


class TinyBackbone(nn.Module):
    """conv3x3(3->8) BN ReLU, conv3x3 stride 2 (8->16) BN ReLU, global average pool: [N, 3, H, W] -> [N, 16]."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.bn1 = TrackedBatchNorm(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = TrackedBatchNorm(16)

    def forward(self, x):
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return x.mean(dim=(2, 3))


class Head(nn.Module):
    """Linear BN GELU, Linear BN GELU, Linear (bottleneck), then weight-normalised prototypes with gain fixed at 1."""

    def __init__(self, in_dim: int, hidden_dim: int, bottleneck_dim: int, num_prototypes: int):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(in_dim, hidden_dim), TrackedBatchNorm(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, hidden_dim), TrackedBatchNorm(hidden_dim), nn.GELU(),
            nn.Linear(hidden_dim, bottleneck_dim),
        )  # fmt: skip
        self.prototypes = nn.Parameter(torch.zeros(num_prototypes, bottleneck_dim))  # weight_norm's v

    def forward(self, x):
        z = self.mlp(x)
        return z @ (self.prototypes / self.prototypes.norm(dim=1, keepdim=True)).T


class MultiCropNetwork(nn.Module):
    """Backbone once per run of consecutive same-size crops, head once on all crops' features."""

    def __init__(self, backbone: nn.Module, head: nn.Module):
        super().__init__()
        self.backbone, self.head = backbone, head

    def forward(self, crops: list[torch.Tensor]) -> torch.Tensor:
        features, start = [], 0
        while start < len(crops):
            end = start
            while end < len(crops) and crops[end].shape[-2:] == crops[start].shape[-2:]:
                end += 1
            features.append(self.backbone(torch.cat(crops[start:end])))
            start = end
        return self.head(torch.cat(features))


def block_probs(logits: torch.Tensor, permutation: torch.Tensor, block_size: int) -> torch.Tensor:
    """[N, K] logits -> [K / N_B, N, N_B] softmax within the blocks of the permutation."""
    blocks = logits.float()[:, permutation].split(block_size, dim=1)
    return torch.softmax(torch.stack(blocks), dim=-1)


def carp_loss(student_logits, teacher_logits, num_crops: int, permutation, block_size: int):
    """(consistency, entropy) of one batch."""
    student = [block_probs(x, permutation, block_size) for x in student_logits.chunk(num_crops)]
    teacher = [block_probs(x, permutation, block_size) for x in teacher_logits.detach().chunk(2)]
    terms = [
        -torch.log(torch.clamp((s * t).sum(-1), EPS, 1 - EPS)).mean()
        for i, s in enumerate(student)
        for j, t in enumerate(teacher)
        if i != j
    ]
    consistency = sum(terms) / len(terms)
    mean_probs = torch.cat(student + teacher, dim=1).mean(dim=1)
    entropy = (math.log(block_size) + (mean_probs * torch.log(torch.clamp(mean_probs, EPS, 1 - EPS))).sum(-1)).mean()
    return consistency, entropy


def cosine(step: int, total: int, start: float, end: float) -> float:
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * min(step / total, 1.0)))


@torch.no_grad()
def lars_step(params, lr: float, momentum_buffers: dict, momentum=0.9, weight_decay=1e-6, eta=0.001) -> None:
    for p in params:
        g = p.grad
        if p.ndim > 1:
            g = g + weight_decay * p
            w_norm, g_norm = torch.norm(p), torch.norm(g)
            if w_norm > 0 and g_norm > 0:
                g = g * (eta * w_norm / g_norm)
        buffer = momentum_buffers.setdefault(p, torch.zeros_like(p))
        buffer.mul_(momentum).add_(g)
        p.sub_(lr * buffer)


def train(student, teacher, batches, permutations, *, block_size, peak_lr, min_lr, base_momentum, final_momentum,
          weight_decay, accumulation_steps=1) -> list[float]:  # fmt: skip
    """Run the released loop over ``batches`` (lists of NCHW crops); returns each batch's loss (not divided by N)."""
    total = len(batches)
    buffers: dict = {}
    params = [p for p in student.parameters() if p.requires_grad]
    losses = []
    student.train(), teacher.train()
    for it, crops in enumerate(batches):
        lr, m = cosine(it, total, peak_lr, min_lr), cosine(it, total, base_momentum, final_momentum)
        student_logits = student(crops)
        teacher_logits = teacher(crops[:2])
        consistency, entropy = carp_loss(student_logits, teacher_logits, len(crops), permutations[it], block_size)
        loss = consistency + entropy
        losses.append(float(loss.detach()))
        if (it + 1) % accumulation_steps == 0:
            with torch.no_grad():  # the teacher first, from the pre-step student
                for s, t in zip(student.parameters(), teacher.parameters()):
                    t.mul_(m).add_((1 - m) * s.detach())
            (loss / accumulation_steps).backward()
            lars_step(params, lr, buffers, weight_decay=weight_decay)
            student.zero_grad()
        else:
            (loss / accumulation_steps).backward()
    return losses
