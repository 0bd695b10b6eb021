"""The CARP training step written directly in PyTorch, as the authors run it: the baseline keras-carp is timed against.

Written by this project from ``CARP_SPEC.md`` (not the authors' code): a
torchvision-layout ResNet in channels_last (torchvision's own when it imports),
the CARP head (MLP 2048-2048-256 with BN and GELU, unit-norm prototypes),
a fresh random partition per step, the encoder once per resolution and the
head once on all crops, the consistency + entropy loss with float32
probabilities, the teacher EMA from the pre-step student, then LARS (momentum
0.9, eta 0.001, no decay or trust ratio on 1-D weights); autocast in bfloat16, or float16
with a GradScaler; optionally ``torch.compile`` of the forward and loss.
The optimizer and EMA use PyTorch's multi-tensor (``_foreach``) kernels: a
strong peer, faster than a per-parameter loop.

Prints one JSON line per run (``--json``: bench.train_step's worker, which records nothing) or a short report,
recorded in bench/results/torch_baseline.jsonl. Usage:
    python -m bench.torch_baseline --backbone resnet50 --global-size 224 --local-crops 6 --batch 256 \
        --precision bfloat16 --compile
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time

import torch
import torch.nn.functional as F
from torch import nn

from bench.results import Recorder, add_record_arguments

EPS = torch.finfo(torch.float32).eps


# ----------------------------------------------------------------------------- encoder


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.downsample = None
        if stride != 1 or in_channels != width:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(width))  # fmt: skip

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(out)) + identity, inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_channels: int, width: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride=stride, padding=1, bias=False)  # stride here: v1.5
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, 4 * width, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(4 * width)
        self.downsample = None
        if stride != 1 or in_channels != 4 * width:
            self.downsample = nn.Sequential(nn.Conv2d(in_channels, 4 * width, 1, stride=stride, bias=False),
                                            nn.BatchNorm2d(4 * width))  # fmt: skip

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)), inplace=True)
        out = F.relu(self.bn2(self.conv2(out)), inplace=True)
        return F.relu(self.bn3(self.conv3(out)) + identity, inplace=True)


# block, blocks per stage, stem kernel (resnet_tiny: keras_carp.backbones' small CPU network, for smoke runs)
ARCHITECTURES = {
    "resnet50": (Bottleneck, (3, 4, 6, 3), 7),
    "resnet18": (BasicBlock, (2, 2, 2, 2), 7),
    "resnet_tiny": (BasicBlock, (1, 1), 3),
}


class ResNet(nn.Module):
    """torchvision's ResNet up to global average pooling (``fc = Identity``)."""

    def __init__(self, name: str = "resnet50"):
        super().__init__()
        block, depths, stem = ARCHITECTURES[name]
        self.conv1 = nn.Conv2d(3, 64, stem, stride=2, padding=stem // 2, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1)
        channels, stages = 64, []
        for width, depth, stride in zip((64, 128, 256, 512), depths, (1, 2, 2, 2)):
            blocks = []
            for index in range(depth):
                blocks.append(block(channels, width, stride if index == 0 else 1))
                channels = width * block.expansion
            stages.append(nn.Sequential(*blocks))
        self.stages = len(stages)
        for index, stage in enumerate(stages, 1):  # torchvision's names: layer1 ... layer4
            setattr(self, f"layer{index}", stage)
        self.num_features = channels

    def forward(self, x):
        x = self.maxpool(F.relu(self.bn1(self.conv1(x)), inplace=True))
        for index in range(1, self.stages + 1):
            x = getattr(self, f"layer{index}")(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)


def build_encoder(name: str) -> nn.Module:
    """torchvision's model when torchvision imports, else the same layout written above."""
    try:
        import torchvision

        encoder = getattr(torchvision.models, name)(weights=None)  # AttributeError for resnet_tiny
        encoder.num_features = encoder.fc.in_features
        encoder.fc = nn.Identity()
        return encoder
    except Exception:  # noqa: BLE001 - torchvision missing or built against another torch
        return ResNet(name)


# ----------------------------------------------------------------------------- head, loss, LARS, EMA


class CARPHead(nn.Module):
    def __init__(self, in_dim: int, num_prototypes: int, hidden_dim: int = 2048, bottleneck_dim: int = 256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.GELU(),
                                 nn.Linear(hidden_dim, bottleneck_dim))  # fmt: skip
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.prototypes = nn.Parameter(torch.randn(num_prototypes, bottleneck_dim))  # weight_v; gain fixed to 1

    def forward(self, features):
        return F.linear(self.mlp(features), F.normalize(self.prototypes, dim=1))


def carp_loss(student_logits: list, teacher_logits: list, permutation, block_size: int):
    """Consistency over the (student crop i, teacher view j != i) pairs + KL(mean block assignment || uniform)."""

    def probs(logits):  # [N, K] -> [N_P, N, N_B], float32 even under autocast
        n = logits.shape[0]
        blocks = logits.float()[:, permutation].view(n, -1, block_size).transpose(0, 1)
        return torch.softmax(blocks, dim=-1)

    student = [probs(x) for x in student_logits]
    teacher = [probs(x).detach() for x in teacher_logits]
    terms = []
    for i, s in enumerate(student):
        for j, t in enumerate(teacher):
            if i != j:
                agreement = (s * t).sum(-1).clamp(EPS, 1 - EPS)
                terms.append(-torch.log(agreement).mean())
    consistency = torch.stack(terms).mean()
    mean_probs = torch.cat(student + teacher, dim=1).mean(dim=1)  # [N_P, N_B]
    entropy = (math.log(block_size) + (mean_probs * torch.log(mean_probs.clamp(EPS, 1 - EPS))).sum(-1)).mean()
    return consistency + entropy


class LARS(torch.optim.Optimizer):
    """LARS as in CARP_SPEC: decay and trust ratio on weights with more than one dimension; multi-tensor kernels."""

    def __init__(self, params, lr: float, weight_decay: float = 1e-6, momentum: float = 0.9, eta: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, eta=eta))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            matrices = [p for p in params if p.ndim > 1]
            if matrices:
                grads = [p.grad for p in matrices]
                torch._foreach_add_(grads, matrices, alpha=group["weight_decay"])
                weight_norms = torch._foreach_norm(matrices)
                grad_norms = torch._foreach_norm(grads)
                ratios = [torch.where((w > 0) & (g > 0), group["eta"] * w / g, torch.ones_like(w))
                          for w, g in zip(weight_norms, grad_norms)]  # fmt: skip
                torch._foreach_mul_(grads, ratios)
            momenta = []
            for p in params:
                if "mu" not in self.state[p]:
                    self.state[p]["mu"] = torch.zeros_like(p)
                momenta.append(self.state[p]["mu"])
            torch._foreach_mul_(momenta, group["momentum"])
            torch._foreach_add_(momenta, [p.grad for p in params])
            torch._foreach_add_(params, momenta, alpha=-group["lr"])


class CARPStep:
    """One training step: student on all crops (encoder per resolution, head once), teacher on the 2 global crops."""

    def __init__(self, args, device):
        self.args, self.device = args, device
        torch.manual_seed(0)
        encoder = build_encoder(args.backbone)
        head = CARPHead(encoder.num_features, args.k, args.hidden, args.bottleneck)
        self.student = nn.ModuleDict(dict(encoder=encoder, head=head)).to(device, memory_format=torch.channels_last)
        self.teacher = nn.ModuleDict(
            dict(
                encoder=build_encoder(args.backbone),
                head=CARPHead(encoder.num_features, args.k, args.hidden, args.bottleneck),
            )
        )
        self.teacher = self.teacher.to(device, memory_format=torch.channels_last)  # fmt: skip
        self.teacher.load_state_dict(self.student.state_dict())
        self.teacher.requires_grad_(False)
        self.student_params = [p for p in self.student.parameters()]
        self.teacher_params = [p for p in self.teacher.parameters()]
        self.optimizer = LARS(self.student_params, lr=0.45 * args.batch / 256)
        self.dtype = {"float32": None, "bfloat16": torch.bfloat16, "float16": torch.float16}[args.precision]
        self.scaler = torch.amp.GradScaler(device.type, enabled=args.precision == "float16")
        self.generator = torch.Generator(device=device).manual_seed(0)
        self.forward = torch.compile(self._forward_loss) if args.compile else self._forward_loss

    def _forward_loss(self, global_crops, local_crops, permutation):
        # The encoder once per resolution, the head once on every crop's features (released MultiCropWrapper).
        features = [self.student["encoder"](global_crops)]
        if local_crops is not None:
            features.append(self.student["encoder"](local_crops))
        student_logits = self.student["head"](torch.cat(features))
        with torch.no_grad():
            teacher_logits = self.teacher["head"](self.teacher["encoder"](global_crops)).chunk(2)
        student = list(student_logits.split(self.args.batch))
        return carp_loss(student, list(teacher_logits), permutation, self.args.block_size)

    def __call__(self, global_crops, local_crops, momentum: float = 0.99):
        permutation = torch.randperm(self.args.k, device=self.device, generator=self.generator)
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = self.forward(global_crops, local_crops, permutation)
        with torch.no_grad():  # the teacher first, from the pre-step student (as released)
            torch._foreach_mul_(self.teacher_params, momentum)
            torch._foreach_add_(self.teacher_params, self.student_params, alpha=1 - momentum)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return loss


def synthetic_crops(args, device):
    """Device-resident batches: the 2 global crops stacked, and the local crops stacked (channels_last)."""
    generator = torch.Generator(device="cpu").manual_seed(0)

    def crops(count, size):
        x = torch.randn(count * args.batch, 3, size, size, generator=generator)
        return x.to(device).contiguous(memory_format=torch.channels_last)

    return crops(2, args.global_size), (crops(args.local_crops, args.local_size) if args.local_crops else None)


def step_flops(args) -> float:
    """Floating-point operations of one training step (forward + backward of the student, forward of the teacher),
    counted by PyTorch's FlopCounterMode on this very step at batch 2 and scaled to the batch (they are linear)."""
    from torch.utils.flop_counter import FlopCounterMode

    small = argparse.Namespace(**{**vars(args), "batch": 2, "compile": False, "precision": "float32"})
    step = CARPStep(small, torch.device("cpu"))
    global_crops, local_crops = synthetic_crops(small, torch.device("cpu"))
    counter = FlopCounterMode(display=False)
    with counter:
        step(global_crops, local_crops)
    return counter.get_total_flops() * args.batch / 2


def device_peak_flops(device, precision: str) -> tuple[float, str]:
    """Dense peak FLOP/s of the device for the precision in use, and where the figure comes from."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        tensor = {"H100": 989e12, "H200": 989e12, "A100": 312e12}  # bf16/fp16 dense, SXM datasheets
        tf32 = {"H100": 494.5e12, "H200": 494.5e12, "A100": 156e12}  # TF32 dense: float32 convolutions and matmuls
        for key in tensor:
            if key in name:
                table = tf32 if precision == "float32" else tensor
                return table[key], f"{name} datasheet, {'dense TF32' if precision == 'float32' else 'dense bf16/fp16'}"
        return float("nan"), f"{name}: peak unknown"
    return cpu_peak_flops(), "CPU: cores x clock x 32 float32 FLOP/cycle (AVX2, 2 FMA units)"


def cpu_peak_flops() -> float:
    import os

    cores = len(os.sched_getaffinity(0))
    clock = 0.0
    try:
        with open("/proc/cpuinfo") as handle:
            clock = max(float(line.split(":")[1]) for line in handle if line.startswith("cpu MHz")) * 1e6
    except (OSError, ValueError):
        clock = 2.5e9
    return cores * clock * 32


def peak_memory(device) -> tuple[float, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30, "device"
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS"


def run(args) -> dict:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        # float32 runs as TF32 on tensor cores, as JAX and TensorFlow do by default (PyTorch's convolutions
        # already do; this extends it to the head's matmuls): the stronger peer.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    step = CARPStep(args, device)
    global_crops, local_crops = synthetic_crops(args, device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    started = time.perf_counter()
    step(global_crops, local_crops)
    sync()
    first = time.perf_counter() - started
    for _ in range(args.warmup):
        step(global_crops, local_crops)
    sync()
    times = []
    for _ in range(args.steps):
        started = time.perf_counter()
        loss = step(global_crops, local_crops)
        sync()
        times.append(time.perf_counter() - started)
    if not math.isfinite(float(loss)):
        raise RuntimeError(f"the reference step produced a non-finite loss: {float(loss)}")
    median = statistics.median(times)
    deciles = statistics.quantiles(times, n=10, method="inclusive")  # p10 ... p90, within the samples
    flops = step_flops(args)
    peak, peak_source = device_peak_flops(device, args.precision)
    memory, memory_kind = peak_memory(device)
    images = args.batch
    return {
        "implementation": "torch reference" + (" + torch.compile" if args.compile else ""),
        "backend": "torch",
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "backbone": args.backbone, "global_size": args.global_size, "local_size": args.local_size,
        "local_crops": args.local_crops, "k": args.k, "block_size": args.block_size, "batch": args.batch,
        "precision": args.precision, "steps": args.steps,
        "median_ms": 1e3 * median, "p10_ms": 1e3 * deciles[0], "p90_ms": 1e3 * deciles[-1],
        "images_per_s": images / median, "compile_s": max(first - median, 0.0),
        "peak_memory_gib": memory, "memory_kind": memory_kind,
        "step_tflop": flops / 1e12, "mfu": flops / median / peak, "peak_tflops": peak / 1e12,
        "peak_source": peak_source,
        "versions": {"torch": torch.__version__},
    }  # fmt: skip


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--backbone", default="resnet50", choices=sorted(ARCHITECTURES))
    p.add_argument("--global-size", type=int, default=224)
    p.add_argument("--local-size", type=int, default=96)
    p.add_argument("--local-crops", type=int, default=6)
    p.add_argument("--k", type=int, default=65536)
    p.add_argument("--block-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=2048)
    p.add_argument("--bottleneck", type=int, default=256)
    p.add_argument("--batch", type=int, default=64, help="images per device")
    p.add_argument("--precision", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--compile", action="store_true", help="torch.compile the forward and loss")
    p.add_argument("--steps", type=int, default=50)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--device", default=None)
    p.add_argument("--json", action="store_true", help="print one JSON line (and record nothing)")
    add_record_arguments(p)
    return p


CONFIG_KEYS = ("backbone", "global_size", "local_size", "local_crops", "k", "block_size", "hidden", "bottleneck",
               "batch", "precision", "compile", "steps", "warmup")  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """Time one configuration; print a JSON line (--json) or a report, which is also recorded."""
    args = parser().parse_args(argv)
    if args.k % args.block_size:
        raise SystemExit(f"--block-size {args.block_size} must divide --k {args.k}.")
    result = run(args)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{result['implementation']}: {result['median_ms']:.1f} ms/step "
              f"(p10 {result['p10_ms']:.1f}, p90 {result['p90_ms']:.1f}), {result['images_per_s']:.1f} images/s, "
              f"MFU {100 * result['mfu']:.1f}%, peak memory {result['peak_memory_gib']:.2f} GiB")  # fmt: skip
        config = {key: getattr(args, key) for key in CONFIG_KEYS}
        skip = {"backend", "versions", *config}
        figures = {key: value for key, value in result.items() if key not in skip}
        Recorder.from_args("torch_baseline", args).record(config, figures, backend="torch")


if __name__ == "__main__":
    main()
