"""The typed configuration of a pretraining run: nested dataclasses, presets as data, flags from the schema.

A run's configuration has seven sections (``data``, ``views``, ``model``,
``optimizer``, ``teacher``, ``evaluation``, ``run``). Each field has one
default here (equal to the library constructor's; ``tests/training`` checks
that they agree), a help text, and a command-line flag named after it
(``block_size`` -> ``--block-size``), so every flag is valid on every preset.
A preset (``training/presets/<name>.json``) is a partial configuration in the
same nested shape, checked against this schema when it is loaded.

Nothing here imports Keras or TensorFlow: ``carp-pretrain --print-config`` and
``--help`` answer at once.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PRESETS_DIR = Path(__file__).parent / "presets"


def option(default: Any, help: str, choices: tuple | None = None, resumable: bool = False) -> Any:
    """A config field: its default, help text, allowed values, and whether it may change when a run resumes.

    ``resumable`` fields say where and how a run executes (paths, devices, logging), not what it trains:
    a run directory's checkpoints may be resumed with other values for them.
    """
    metadata = {"help": help, "choices": choices, "resumable": resumable}
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    return field(default=default, metadata=metadata)


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _positive(section: Any, *names: str) -> None:
    for name in names:
        value = getattr(section, name)
        _require(value is None or value > 0, f"{name} must be positive, got {value}.")


def _probability(section: Any, *names: str) -> None:
    for name in names:
        values = getattr(section, name)
        for value in values if isinstance(values, tuple) else (values,):
            _require(0.0 <= value <= 1.0, f"{name} must be probabilities in [0, 1], got {values}.")


@dataclass
class DataConfig:
    """Where the images come from (see ``keras_carp.data.load_source``)."""

    dataset: str = option("digits", "digits, fashion_mnist, folder (class subfolders under --data-dir), or a TFDS name")
    split: str = option("train", "split to pretrain on (TFDS split string or subfolder)")
    eval_split: str = option("test", "labelled split for the k-NN queries ('' to skip k-NN)")
    data_dir: str | None = option(None, "TFDS data_dir, image folder, or Fashion-MNIST IDX folder", resumable=True)
    image_size: int | None = option(None, "resize in-memory datasets (digits, Fashion-MNIST) to this size")
    min_image_size: int | None = option(None, "smaller images are an error (0: upsample them)")
    download: bool = option(True, "let TFDS download and prepare the dataset", resumable=True)
    decode: str = option("once", "JPEG decoding per image or per crop", ("once", "crop"), resumable=True)
    cache: bool = option(False, "cache the encoded images in memory", resumable=True)
    augment: str = option(
        "auto",
        "where the views are made: host (tf.data, on the CPU cores), device (keras.ops in the train step, on the "
        "accelerator; the host only decodes), auto (device on GPUs and without TensorFlow, else host)",
        ("auto", "host", "device"),
        resumable=True,
    )
    device_image_size: int | None = option(
        None,
        "--augment device: encoded images are stretched to this square on the host before the device crops them "
        "(default: 10/7 of --global-size, 320 for 224; in-memory arrays keep their size)",
        resumable=True,
    )

    def __post_init__(self):
        _positive(self, "image_size", "device_image_size")
        _require(self.min_image_size is None or self.min_image_size >= 0, "min_image_size must be >= 0.")


@dataclass
class ViewsConfig:
    """The multi-crop views: 2 global crops (the teacher's) and local crops (``MultiCropAugmentation``)."""

    global_size: int = option(224, "side of the 2 global crops, in pixels")
    local_size: int = option(96, "side of the local crops, in pixels")
    num_local_crops: int = option(6, "local crops per image (the student only)")
    global_scale: tuple[float, float] = option((0.2, 1.0), "area range of the global crops")
    local_scale: tuple[float, float] = option((0.05, 0.2), "area range of the local crops")
    blur_sigma: tuple[float, float] = option((0.1, 2.0), "Gaussian blur sigma range")
    blur_probability: tuple[float, float, float] = option((1.0, 0.1, 0.5), "blur on view 1, view 2, local crops")
    solarize_probability: float = option(0.2, "solarisation on view 2")
    jitter_probability: float = option(0.8, "colour jitter on every crop")
    grayscale_probability: float = option(0.2, "grayscale on every crop")
    antialias: bool = option(True, "PIL-like antialiasing filter on downscaled crops")

    def __post_init__(self):
        _positive(self, "global_size", "local_size")
        _require(self.num_local_crops >= 0, f"num_local_crops must be >= 0, got {self.num_local_crops}.")
        for name in ("global_scale", "local_scale", "blur_sigma"):
            low, high = getattr(self, name)
            _require(0 < low <= high, f"{name} must satisfy 0 < low <= high, got {(low, high)}.")
        _probability(self, "blur_probability", "solarize_probability", "jitter_probability", "grayscale_probability")


@dataclass
class ModelConfig:
    """Encoder, head and partition (``build_encoder``, ``CARPHead``, ``CARP``)."""

    backbone: str = option(
        "resnet50",
        "encoder: a name in keras_carp.backbones.backbone_names() (ResNets, ViTs, ConvNeXt, EfficientNetV2) or a "
        "KerasHub preset (name, handle or local directory)",
    )
    token_pooling: str = option(
        "class_token", "features of a ViT: its class token, or the mean of its patch tokens",
        ("class_token", "mean_patch_tokens"),
    )  # fmt: skip
    encoder_init: str = option(
        "torchvision",
        "torchvision: as the released code (Kaiming fan_out, zero last BN gamma per block); "
        "keras: KerasHub's initialisers",
        ("torchvision", "keras"),
    )
    num_prototypes: int = option(65536, "K, the number of prototypes")
    block_size: int = option(512, "N_B, prototypes per block of the random partition (must divide K)")
    partition: str = option("random", "random: redrawn every step; fixed: the ablation", ("random", "fixed"))
    hidden_dim: int = option(2048, "width of the head's hidden layers")
    bottleneck_dim: int = option(256, "d, the head's bottleneck before the prototypes")
    head_layers: int = option(3, "Dense layers in the head's MLP, the bottleneck included")
    batch_norm_moments: str = option(
        "one_pass",
        "batch-norm statistics from one read of the activations, or Keras' two passes",
        ("one_pass", "keras"),
    )

    def __post_init__(self):
        _positive(self, "num_prototypes", "block_size", "hidden_dim", "bottleneck_dim", "head_layers")
        _require(
            self.block_size <= self.num_prototypes and self.num_prototypes % self.block_size == 0,
            f"block_size (N_B={self.block_size}) must divide num_prototypes (K={self.num_prototypes}) "
            "into whole blocks; N_B = K is the one-block ablation.",
        )


@dataclass
class OptimizerConfig:
    """Length, batch and LARS with its warm-up + cosine learning rate (``LARS``, ``WarmupCosineDecay``)."""

    epochs: int = option(200, "passes over the training split")
    batch_size: int = option(256, "global batch (all replicas) of one step")
    gradient_accumulation_steps: int = option(
        1,
        "average the gradients of N batches into one optimizer step (the learning rate scales with "
        "batch x N; every batch draws its own partition)",
    )
    base_learning_rate: float = option(0.45, "learning rate at batch 256 (scaled linearly with the batch)")
    min_learning_rate: float = option(0.0048, "learning rate at the end of the cosine")
    warmup_epochs: float = option(
        0.0,
        "linear warm-up length (may be fractional); carp-pretrain cuts a preset's warm-up longer than half "
        "a short run to half of it",
    )
    optimizer: str = option(
        "lars",
        "lars: the paper's (ResNets); adamw: DINO's ViT recipe (weight-decay cosine, gradient clipping, "
        "prototypes frozen at first)",
        ("lars", "adamw"),
    )
    weight_decay: float = option(1e-6, "weight decay (not on biases and norms): LARS's, or AdamW's at the start")
    weight_decay_end: float | None = option(None, "AdamW: weight decay at the end of a cosine (None: constant)")
    clip_norm: float = option(0.0, "clip each weight's gradient to this norm (0: off; DINO's ViTs: 3.0)")
    freeze_prototypes_epochs: float = option(
        0.0, "keep the prototypes unchanged for the first epochs (DINO freezes its last layer for 1 with ViTs)"
    )
    lars_momentum: float = option(0.9, "LARS momentum")
    lars_eta: float = option(0.001, "LARS trust coefficient")

    def __post_init__(self):
        _positive(self, "epochs", "batch_size", "gradient_accumulation_steps", "base_learning_rate")
        names = ("min_learning_rate", "warmup_epochs", "weight_decay", "clip_norm", "freeze_prototypes_epochs")
        for name in (*names, "lars_momentum", "lars_eta"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}.")
        _require(
            self.weight_decay_end is None or (self.optimizer == "adamw" and self.weight_decay_end >= 0),
            f"weight_decay_end is AdamW's and must be >= 0, got {self.weight_decay_end} with {self.optimizer}.",
        )
        _require(
            self.freeze_prototypes_epochs < self.epochs,
            f"freeze_prototypes_epochs ({self.freeze_prototypes_epochs:g}) must be shorter than the run "
            f"({self.epochs} epochs).",
        )
        _require(
            self.warmup_epochs < self.epochs,
            f"the warm-up ({self.warmup_epochs:g} epochs) must be shorter "
            f"than the run ({self.epochs} epochs): lower --warmup-epochs.",
        )


@dataclass
class TeacherConfig:
    """The teacher's momentum m, cosine from base to final over the run."""

    base_teacher_momentum: float = option(0.99, "m at the first step (0: the teacher is the previous student)")
    final_teacher_momentum: float = option(1.0, "m at the last step")

    def __post_init__(self):
        _probability(self, "base_teacher_momentum", "final_teacher_momentum")


@dataclass
class EvaluationConfig:
    """Weighted k-NN on the evaluation split, at the end and every ``knn_every`` epochs."""

    knn_k: int = option(20, "neighbours of the weighted k-NN")
    knn_temperature: float = option(0.07, "temperature of the k-NN weights")
    knn_every: int = option(0, "also score k-NN every N epochs during training (0: at the end only)")
    eval_crop_fraction: float = option(1.0, "centre crop fraction of evaluation images (0.875: ImageNet's)")
    online_probe_every: int = option(
        0,
        "train a linear classifier on the teacher's detached features of labelled training images every N steps "
        "and log its accuracy (0: off); it restarts when a run resumes",
        resumable=True,
    )

    def __post_init__(self):
        _positive(self, "knn_k", "knn_temperature")
        _require(self.knn_every >= 0, f"knn_every must be >= 0, got {self.knn_every}.")
        _require(self.online_probe_every >= 0, f"online_probe_every must be >= 0, got {self.online_probe_every}.")
        _require(
            0 < self.eval_crop_fraction <= 1, f"eval_crop_fraction must be in (0, 1], got {self.eval_crop_fraction}."
        )


@dataclass
class RunConfig:
    """Where the run writes, how often, on which devices, and its seed."""

    output_dir: str | None = option(
        None, "run directory, local or gs:// (default: runs/<preset>); reruns resume", resumable=True
    )
    seed: int = option(0, "seed of the weights, the views and the partitions")
    checkpoint_every_steps: int = option(
        0,
        "also checkpoint every N training batches (with gradient accumulation a batch is not an optimizer step); "
        "always at each epoch's end",
        resumable=True,
    )
    keep_checkpoints: int = option(2, "newest checkpoints kept", resumable=True)
    log_every_steps: int = option(50, "TensorBoard step summaries every N steps (0: epochs only)", resumable=True)
    export: bool = option(True, "export the teacher encoder as a SavedModel", resumable=True)
    strategy: str = option(
        "auto",
        "auto: a TPU if one answers, else all GPUs (TF) or devices (JAX), else one",
        ("auto", "mirrored", "multiworker", "tpu", "none"),
        resumable=True,
    )
    tpu: str | None = option(None, "TPU name or grpc:// address (Cloud TPU VMs find their own)", resumable=True)
    coordinator_address: str | None = option(
        None, "JAX multi-process: host:port of process 0 (else KERAS_DISTRIBUTION_JOB_ADDRESSES)", resumable=True
    )
    num_processes: int | None = option(
        None, "JAX multi-process: how many processes (else KERAS_DISTRIBUTION_NUM_PROCESSES)", resumable=True
    )
    process_id: int | None = option(
        None, "JAX multi-process: this process's index (else KERAS_DISTRIBUTION_PROCESS_ID)", resumable=True
    )
    precision: str = option(
        "auto",
        "compute dtype: auto (mixed_bfloat16 on TPUs, float32 elsewhere), float32, mixed_bfloat16, or "
        "mixed_float16 (with dynamic loss scaling); block probabilities and the loss stay float32",
        ("auto", "float32", "mixed_bfloat16", "mixed_float16"),
    )

    def __post_init__(self):
        for name in ("checkpoint_every_steps", "log_every_steps"):
            _require(getattr(self, name) >= 0, f"{name} must be >= 0, got {getattr(self, name)}.")
        _require(self.keep_checkpoints >= 1, f"keep_checkpoints must be >= 1, got {self.keep_checkpoints}.")


SECTIONS: dict[str, type] = {
    "data": DataConfig,
    "views": ViewsConfig,
    "model": ModelConfig,
    "optimizer": OptimizerConfig,
    "teacher": TeacherConfig,
    "evaluation": EvaluationConfig,
    "run": RunConfig,
}


def _field_types(section: type) -> dict[str, Any]:
    hints = typing.get_type_hints(section)
    return {f.name: hints[f.name] for f in dataclasses.fields(section)}


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """``value`` (from JSON or argparse) as the field's type; a ValueError names the field otherwise."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        if value is None:
            return None
        annotation = next(a for a in args if a is not type(None))
        args = typing.get_args(annotation)
    if typing.get_origin(annotation) is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ValueError(f"{name} must be {len(args)} numbers, got {value!r}.")
        return tuple(_coerce(name, a, v) for a, v in zip(args, value))
    if annotation is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, got {value!r}.")
        return value
    if annotation is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if annotation is int and isinstance(value, int) and not isinstance(value, bool):
        return value
    if annotation is str and isinstance(value, str):
        return value
    raise ValueError(f"{name} must be {annotation.__name__}, got {value!r}.")


def _build_section(name: str, values: dict) -> Any:
    section = SECTIONS[name]
    types_ = _field_types(section)
    unknown = sorted(set(values) - set(types_))
    if unknown:
        raise ValueError(f"unknown {name} field(s) {', '.join(unknown)}; known: {', '.join(types_)}.")
    kwargs = {key: _coerce(key, types_[key], value) for key, value in values.items()}
    for f in dataclasses.fields(section):
        choices = f.metadata.get("choices")
        if choices and f.name in kwargs and kwargs[f.name] not in choices:
            raise ValueError(f"{f.name} must be one of {', '.join(choices)}, got {kwargs[f.name]!r}.")
    return section(**kwargs)


def resumable_fields() -> set[str]:
    """Fields that may change when a run resumes (where and how it runs, not what it trains)."""
    return {f.name for section in SECTIONS.values() for f in dataclasses.fields(section) if f.metadata["resumable"]}


def field_section() -> dict[str, str]:
    """Every field name -> its section (field names are unique across sections: they are the flags)."""
    return {f.name: name for name, section in SECTIONS.items() for f in dataclasses.fields(section)}


@dataclass
class PretrainConfig:
    """Everything a pretraining run needs, by section; ``carp-pretrain --print-config`` prints it."""

    preset: str = "digits"
    description: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    views: ViewsConfig = field(default_factory=ViewsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    run: RunConfig = field(default_factory=RunConfig)

    @classmethod
    def from_dict(cls, values: dict) -> PretrainConfig:
        """A config from its nested form (as ``to_dict`` writes it, or a preset); missing fields take defaults."""
        unknown = sorted(set(values) - set(SECTIONS) - {"preset", "description"})
        if unknown:
            raise ValueError(f"unknown section(s) {', '.join(unknown)}; known: {', '.join(SECTIONS)}.")
        sections = {name: _build_section(name, values.get(name) or {}) for name in SECTIONS}
        return cls(preset=values.get("preset", "digits"), description=values.get("description", ""), **sections)

    def to_dict(self) -> dict:
        """The nested form, JSON-ready (tuples as lists)."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def flat(self) -> dict:
        """Every field by its own name (the flags' spelling with underscores)."""
        values = self.to_dict()
        return {key: value for name in SECTIONS for key, value in values[name].items()}

    def replace(self, **overrides: Any) -> PretrainConfig:
        """A copy with fields changed by their flat names (``replace(block_size=64)``), validated again."""
        where = field_section()
        unknown = sorted(set(overrides) - set(where))
        if unknown:
            raise ValueError(f"unknown config field(s) {', '.join(unknown)}.")
        values = self.to_dict()
        for key, value in overrides.items():
            values[where[key]][key] = list(value) if isinstance(value, tuple) else value
        return PretrainConfig.from_dict(values)

    def __getitem__(self, key: str) -> Any:
        """A field by its own name (``config["block_size"]``), whatever its section."""
        if key in ("preset", "description"):
            return getattr(self, key)
        where = field_section()
        if key not in where:
            raise KeyError(key)
        return getattr(getattr(self, where[key]), key)

    def get(self, key: str, default: Any = None) -> Any:
        """A field by its own name, or ``default``."""
        try:
            return self[key]
        except KeyError:
            return default

    def training_fields(self) -> dict:
        """The flat fields that define what is trained (a resumed run must keep them)."""
        return {key: value for key, value in self.flat().items() if key not in resumable_fields()}


def available_presets() -> list[str]:
    """The presets' names."""
    return sorted(path.stem for path in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> PretrainConfig:
    """A preset as a validated config; a field the schema does not know is an error."""
    if not (PRESETS_DIR / f"{name}.json").is_file():
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(available_presets())}.")
    values = json.loads((PRESETS_DIR / f"{name}.json").read_text())
    try:
        return PretrainConfig.from_dict({**values, "preset": name})
    except ValueError as error:
        raise ValueError(f"preset {name}: {error}") from None


EARLIER_VERSION = (
    "config.json was written by an earlier version of keras-carp (one flat list of fields, no sections), which this "
    "version does not read; start the run over with a new --output-dir."
)


def run_config(saved: dict) -> PretrainConfig:
    """The configuration a run directory's ``config.json`` holds (``PretrainConfig.to_dict``'s sections).

    Raises ValueError (``EARLIER_VERSION``) for the flat files of earlier versions, fields at the top level.
    """
    fields = field_section()
    if any(key in fields and not isinstance(value, dict) for key, value in saved.items()):
        raise ValueError(EARLIER_VERSION)
    return PretrainConfig.from_dict(saved)


def run_config_from_json(text: str) -> PretrainConfig:
    """``run_config`` of a ``config.json`` file's text."""
    return run_config(json.loads(text))
