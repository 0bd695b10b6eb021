"""The typed configuration: presets against the schema, flags from it, defaults equal to the library's."""

import dataclasses
import inspect
import json

import pytest

from training import config as schema
from training import pretrain


def test_every_field_can_be_overridden_by_its_flag():
    config = pretrain.parse_config(["--block-size", "32", "--global-scale", "0.5", "1.0", "--image-size", "none"])
    assert config.model.block_size == 32 and config.views.global_scale == (0.5, 1.0)
    assert config.data.image_size is None
    assert config.model.num_prototypes == schema.load_preset("digits").model.num_prototypes
    assert config["block_size"] == 32  # a field by its own name


@pytest.mark.parametrize("preset", schema.available_presets())
def test_every_flag_is_valid_on_every_preset(preset):
    """Flags come from the schema, not from the keys a preset's file happens to have."""
    flags = ["--preset", preset, "--eval-crop-fraction", "0.9", "--image-size", "24", "--head-layers", "2"]
    flags += ["--lars-momentum", "0.8", "--batch-norm-moments", "keras", "--blur-probability", "1", "0", "0.5"]
    config = pretrain.parse_config(flags)
    assert config.preset == preset and config.description
    assert (config.evaluation.eval_crop_fraction, config.data.image_size, config.model.head_layers) == (0.9, 24, 2)
    assert (config.optimizer.lars_momentum, config.model.batch_norm_moments) == (0.8, "keras")
    assert config.views.blur_probability == (1.0, 0.0, 0.5)


def test_presets_have_one_name_each():
    with pytest.raises(SystemExit, match="unknown preset 'fashion-mnist-resnet18'"):
        pretrain.parse_config(["--preset", "fashion-mnist-resnet18"])
    assert sorted(schema.available_presets()) == sorted(
        ["cifar10_resnet18", "digits", "fashion_mnist", "fashion_mnist_resnet18", "imagenet_resnet50_200ep",
         "imagenet_resnet50_multicrop", "imagenet_vit_small_multicrop"])  # fmt: skip


def test_unknown_preset_and_unknown_fields_are_reported():
    with pytest.raises(SystemExit, match="unknown preset 'nope'; available: cifar10_resnet18"):
        pretrain.parse_config(["--preset", "nope"])
    with pytest.raises(ValueError, match="unknown model field.*blocksize"):
        schema.PretrainConfig.from_dict({"model": {"blocksize": 3}})
    with pytest.raises(ValueError, match="unknown section.*optimiser"):
        schema.PretrainConfig.from_dict({"optimiser": {}})
    with pytest.raises(ValueError, match="global_scale must be 2 numbers"):
        schema.PretrainConfig.from_dict({"views": {"global_scale": [0.2]}})
    with pytest.raises(ValueError, match="partition must be one of random, fixed"):
        schema.PretrainConfig.from_dict({"model": {"partition": "sorted"}})


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--block-size", "100"], "must divide num_prototypes"),
        (["--epochs", "0"], "epochs must be positive"),
        (["--epochs", "2", "--warmup-epochs", "3"], "lower --warmup-epochs"),
        (["--jitter-probability", "1.5"], "jitter_probability must be probabilities"),
        (["--keep-checkpoints", "0"], "keep_checkpoints must be >= 1"),
        (["--local-scale", "0.3", "0.1"], "local_scale must satisfy 0 < low <= high"),
    ],
)
def test_invalid_settings_are_refused_while_parsing(flags, message):
    with pytest.raises(SystemExit, match=message):
        pretrain.parse_config(flags)


def test_a_short_run_shortens_the_presets_warm_up():
    assert schema.load_preset("digits").optimizer.warmup_epochs == 2
    assert pretrain.parse_config(["--epochs", "1"]).optimizer.warmup_epochs == 0.5
    assert pretrain.parse_config(["--epochs", "3"]).optimizer.warmup_epochs == 1.5
    assert pretrain.parse_config(["--epochs", "4"]).optimizer.warmup_epochs == 2
    assert pretrain.parse_config(["--epochs", "1", "--warmup-epochs", "0"]).optimizer.warmup_epochs == 0


def test_print_config_prints_the_resolved_nested_configuration(capsys):
    with pytest.raises(SystemExit) as stopped:
        pretrain.parse_config(["--preset", "fashion_mnist_resnet18", "--block-size", "64", "--print-config"])
    assert stopped.value.code == 0
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["preset", "description", *schema.SECTIONS]
    assert printed["preset"] == "fashion_mnist_resnet18" and printed["model"]["block_size"] == 64
    assert schema.PretrainConfig.from_dict(printed) == pretrain.parse_config(["--preset", "fashion_mnist_resnet18",
                                                                             "--block-size", "64"])  # fmt: skip


def test_help_lists_every_field_by_section(capsys):
    with pytest.raises(SystemExit):
        pretrain.parse_config(["--help"])
    text = capsys.readouterr().out
    for name, section in schema.SECTIONS.items():
        assert f"\n{name}:" in text
        for spec in dataclasses.fields(section):
            assert "--" + spec.name.replace("_", "-") in text


def test_field_names_are_unique_across_sections():
    names = [spec.name for section in schema.SECTIONS.values() for spec in dataclasses.fields(section)]
    assert len(names) == len(set(names))


def _defaults(callable_) -> dict:
    return {name: p.default for name, p in inspect.signature(callable_).parameters.items()}


def test_schema_defaults_are_the_library_constructors_defaults():
    """One default per hyperparameter: the schema repeats the library's, and this keeps them equal."""
    import keras_carp
    from keras_carp.data import MultiCropAugmentation

    views = schema.ViewsConfig()
    augmentation = MultiCropAugmentation()
    for spec in dataclasses.fields(views):
        assert getattr(views, spec.name) == getattr(augmentation, spec.name), spec.name
    model, head = schema.ModelConfig(), _defaults(keras_carp.CARPHead)
    assert (model.num_prototypes, model.hidden_dim, model.bottleneck_dim, model.head_layers) == (
        head["num_prototypes"], head["hidden_dim"], head["bottleneck_dim"], head["num_layers"])  # fmt: skip
    carp = _defaults(keras_carp.CARP)
    assert (model.block_size, model.partition, model.batch_norm_moments) == (
        carp["block_size"], carp["partition"], carp["batch_norm_moments"])  # fmt: skip
    lars, optimizer = _defaults(keras_carp.LARS), schema.OptimizerConfig()
    assert (optimizer.lars_momentum, optimizer.weight_decay, optimizer.lars_eta) == (
        lars["momentum"], lars["weight_decay"], lars["eta"])  # fmt: skip
    teacher, ema = schema.TeacherConfig(), _defaults(keras_carp.TeacherEMA)
    assert (teacher.base_teacher_momentum, teacher.final_teacher_momentum) == (
        ema["base_momentum"], ema["final_momentum"])  # fmt: skip
    assert schema.ModelConfig().encoder_init == _defaults(keras_carp.build_encoder)["init"]


def test_paper_presets_follow_the_paper():
    for name, local_crops in (("imagenet_resnet50_200ep", 0), ("imagenet_resnet50_multicrop", 6)):
        c = schema.load_preset(name)
        assert (c.data.dataset, c.model.backbone, c.data.eval_split) == ("imagenet2012", "resnet50", "validation")
        assert (c.model.num_prototypes, c.model.block_size, c.optimizer.batch_size) == (65536, 512, 1024)
        assert (c.model.hidden_dim, c.model.bottleneck_dim, c.optimizer.epochs) == (2048, 256, 200)
        assert (c.views.global_size, c.views.local_size, c.views.num_local_crops) == (224, 96, local_crops)
        assert c.views.global_scale == (0.2, 1.0) and c.views.local_scale == (0.05, 0.2)
        assert (c.optimizer.base_learning_rate, c.optimizer.min_learning_rate) == (0.45, 0.0048)
        assert (c.optimizer.weight_decay, c.optimizer.warmup_epochs) == (1e-6, 0)
        assert (c.teacher.base_teacher_momentum, c.teacher.final_teacher_momentum) == (0.99, 1.0)
        assert c.evaluation.eval_crop_fraction == 0.875
    c = pretrain.parse_config(["--preset", "imagenet_resnet50_200ep", "--partition", "fixed",
                               "--block-size", "65536", "--eval-split", "train[:1%]"])  # fmt: skip
    assert (c.model.partition, c.model.block_size, c.data.eval_split) == ("fixed", 65536, "train[:1%]")


def test_a_run_config_json_reads_back_and_a_flat_one_of_an_earlier_version_is_refused():
    config = pretrain.parse_config(["--preset", "fashion_mnist", "--block-size", "64", "--seed", "3"])
    assert schema.run_config_from_json(json.dumps(config.to_dict())) == config
    assert "output_dir" not in config.training_fields() and "data_dir" not in config.training_fields()
    flat = {"preset": "fashion_mnist", "description": "d", "dataset": "fashion_mnist", "block_size": 64,
            "global_scale": [0.4, 1.0], "output_dir": "runs/x", "seed": 3}  # fmt: skip
    for saved in (flat, {"preset": "digits", "optimizer": "lars"}):
        with pytest.raises(ValueError) as refused:
            schema.run_config(saved)
        assert str(refused.value) == schema.EARLIER_VERSION and "\n" not in str(refused.value)
        assert "earlier version" in str(refused.value) and "new --output-dir" in str(refused.value)


@pytest.mark.parametrize("preset", schema.available_presets())
def test_every_preset_builds_its_views_head_and_schedule(preset):
    """A preset the schema accepts is also accepted by the library objects it configures."""
    import keras_carp
    from training.run import build_views

    c = schema.load_preset(preset)
    for augment in ("host", "device"):
        assert build_views(c, augment).num_crops == 2 + c.views.num_local_crops
    assert c.model.backbone in keras_carp.backbones.backbone_names()
    model = c.model
    keras_carp.CARPHead(num_prototypes=model.num_prototypes, hidden_dim=model.hidden_dim,
                        bottleneck_dim=model.bottleneck_dim, num_layers=model.head_layers)  # fmt: skip
    keras_carp.losses.check_partition(c.model.num_prototypes, c.model.block_size)
    optimizer = c.optimizer
    keras_carp.WarmupCosineDecay(optimizer.base_learning_rate, optimizer.batch_size, total_steps=1000,
                                 warmup_steps=round(optimizer.warmup_epochs * 10),
                                 min_learning_rate=optimizer.min_learning_rate)  # fmt: skip


def test_block_size_goes_from_its_flag_to_the_loss_the_model_trains_with():
    """--block-size -> ModelConfig.block_size -> CARP(block_size=) -> CARPLoss(block_size) in the train step."""
    from keras_carp.distribute import setup_distribution
    from training.run import Data, build_model

    config = pretrain.parse_config(["--block-size", "64", "--num-prototypes", "256", "--hidden-dim", "32",
                                    "--bottleneck-dim", "16"])  # fmt: skip
    assert config.model.block_size == 64 and config.to_dict()["model"]["block_size"] == 64
    model = build_model(config, Data(None, None, 10, 100, 5), setup_distribution("none"))
    assert model.block_size == 64 and model.carp_loss.block_size == 64
    assert model.student_head.num_prototypes == 256


@pytest.mark.parametrize("precision", ["mixed_float16", "mixed_bfloat16", "float32"])
def test_precision_sets_the_compute_dtype_and_float16_scales_the_loss(precision):
    """--precision on any device: float16 gets Keras' dynamic loss scaling; the loss stays float32."""
    import keras

    from keras_carp.distribute import setup_distribution
    from tests.conftest import random_views
    from training.run import Data, build_model, compute_dtype_policy, setup_devices

    config = pretrain.parse_config(["--precision", precision, "--num-prototypes", "256", "--block-size", "64",
                                    "--hidden-dim", "32", "--bottleneck-dim", "16"])  # fmt: skip
    assert compute_dtype_policy(config, setup_distribution("none")) == precision
    try:
        model = build_model(config, Data(None, None, 10, 100, 0), setup_devices(config))
        assert model.dtype_policy.name == precision and model.student_head.compute_dtype == precision.split("_")[-1]
        scaled = type(model.optimizer).__name__ == "LossScaleOptimizer"
        assert scaled == (precision == "mixed_float16")
        logs = model.compute_carp_losses(random_views(batch=4), 0)
        assert keras.backend.standardize_dtype(logs["loss"].dtype) == "float32"
    finally:
        keras.config.set_dtype_policy("float32")


def test_auto_precision_is_the_devices_choice():
    from types import SimpleNamespace

    from training.run import compute_dtype_policy

    config = pretrain.parse_config([])
    assert config.run.precision == "auto"
    assert compute_dtype_policy(config, SimpleNamespace(dtype_policy="mixed_bfloat16")) == "mixed_bfloat16"  # TPU
    assert compute_dtype_policy(config, SimpleNamespace(dtype_policy=None)) == "float32"
    with pytest.raises(SystemExit):
        pretrain.parse_config(["--precision", "float16"])


def test_the_vit_preset_trains_with_scheduled_adamw_clipping_and_frozen_prototypes():
    """optimizer: adamw -> ScheduledAdamW with a 0.04 -> 0.4 cosine, clipnorm 3, prototypes frozen for 1 epoch."""
    from keras_carp.optimizers import LARS, ScheduledAdamW
    from tests.conftest import tiny_model
    from training.run import Data, build_optimizer

    c = schema.load_preset("imagenet_vit_small_multicrop")
    data = Data(train=None, evaluation=None, steps_per_epoch=10, total_steps=1000, warmup_steps=100)
    model = tiny_model()
    optimizer = build_optimizer(c.optimizer, 0.001, model, data)
    assert isinstance(optimizer, ScheduledAdamW)
    assert optimizer.frozen_paths == (model.student_head.prototypes.path,) and optimizer.frozen_steps == 10
    assert optimizer.clipnorm == 3.0
    assert float(optimizer.weight_decay_at(0)) == pytest.approx(0.04)
    assert float(optimizer.weight_decay_at(1000)) == pytest.approx(0.4)
    lars = schema.load_preset("digits").optimizer
    assert isinstance(build_optimizer(lars, 0.1, model, data), LARS)
    with pytest.raises(ValueError, match="freeze_prototypes_epochs needs --optimizer adamw"):
        build_optimizer(dataclasses.replace(lars, freeze_prototypes_epochs=1.0), 0.1, model, data)
    with pytest.raises(ValueError, match="weight_decay_end is AdamW's"):
        dataclasses.replace(lars, weight_decay_end=0.4)
