"""KerasHub presets: Backbone / ImageClassifier.from_preset load the trained backbone and our eval normalisation."""

import json

import keras
import keras_hub
import numpy as np
import pytest

import keras_carp
from keras_carp.hub_preset import (
    PRESET_METADATA_FILE,
    export_keras_hub_preset,
    find_keras_hub_backbone,
    image_converter_class,
)
from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD
from tests.conftest import tiny_model, to_numpy

MEAN = np.asarray(IMAGENET_MEAN, np.float32)
STD = np.asarray(IMAGENET_STD, np.float32)


@pytest.fixture(scope="module")
def trained_model():
    """A tiny CARP whose teacher differs from its student, with batch-norm statistics away from 0 and 1."""
    model = tiny_model()
    rng = np.random.default_rng(0)
    for variable in model.teacher_encoder.weights:
        value = to_numpy(variable)
        if "moving_variance" in variable.path:
            value = value * rng.uniform(0.5, 2.0, value.shape)
        else:
            value = value + rng.normal(0.0, 0.05, value.shape)
        variable.assign(value.astype(value.dtype))
    return model


def _pooled(backbone, images):
    """The encoder's features: global average pool of the backbone's feature map."""
    return to_numpy(keras.ops.mean(backbone(images, training=False), axis=(1, 2)))


def _small_image_encoder():
    """An encoder on a small-image ResNet (a plain keras.Model), narrow and left at Keras' initialisation."""
    from keras_carp.backbones import small_image_resnet

    return keras_carp.build_encoder(small_image_resnet((8,), (1,), name="resnet_small_images"))


def _eval_preprocessing(images, size, crop_fraction):
    from keras_carp.data import center_crop

    return (np.asarray(center_crop(images, size, crop_fraction)) - MEAN) / STD


@pytest.mark.core
def test_backbone_and_image_classifier_round_trip(trained_model, tmp_path):
    path = export_keras_hub_preset(trained_model, tmp_path / "preset", image_size=16, crop_fraction=1.0)
    images = np.random.default_rng(1).normal(size=(4, 16, 16, 3)).astype("float32")
    teacher = to_numpy(trained_model.teacher_encoder(images, training=False))

    backbone = keras_hub.models.Backbone.from_preset(str(path))
    assert isinstance(backbone, keras_hub.models.ResNetBackbone)
    assert np.max(np.abs(_pooled(backbone, images) - teacher)) <= 1e-5
    student = to_numpy(trained_model.student_encoder(images, training=False))
    assert np.max(np.abs(_pooled(backbone, images) - student)) > 1e-3  # the teacher was exported

    classifier = keras_hub.models.ImageClassifier.from_preset(str(path), num_classes=3)
    assert isinstance(classifier, keras_hub.models.ResNetImageClassifier)
    pooled = keras.Model(classifier.input, classifier.pooler.output)  # the features its new head sees
    assert np.max(np.abs(to_numpy(pooled(images, training=False)) - teacher)) <= 1e-5
    converter = classifier.preprocessor.image_converter
    assert type(converter) is keras_hub.layers.ResNetImageConverter
    pixels = np.random.default_rng(2).integers(0, 256, size=(4, 24, 24, 3), dtype=np.uint8)
    # The preprocessor resizes (24 -> 16, antialiased bilinear) and normalises as the eval pipeline does.
    converted = to_numpy(classifier.preprocessor(pixels.astype("float32")))
    evaluated = _eval_preprocessing(pixels, 16, 1.0)
    assert np.max(np.abs(converted - evaluated)) <= 1e-5
    # End to end: raw pixels -> logits = our features of the eval crops through the head's Dense layer.
    kernel, bias = (to_numpy(w) for w in classifier.output_dense.weights)
    logits = to_numpy(trained_model.teacher_encoder(evaluated, training=False)) @ kernel + bias
    assert np.max(np.abs(classifier.predict(pixels.astype("float32"), verbose=0) - logits)) <= 1e-4

    metadata = json.loads((path / PRESET_METADATA_FILE).read_text())
    assert metadata["encoder"] == "teacher" and metadata["feature_dim"] == 128
    assert metadata["backbone_class"] == "ResNetBackbone"
    assert [layer["class_name"] for layer in metadata["encoder_layers"]] == ["ResNetBackbone", "GlobalAveragePooling2D"]
    assert metadata["centre_crop_in_converter"] is True


@pytest.mark.core
def test_converter_normalisation_against_numpy_and_the_documented_limits(trained_model, tmp_path):
    path = export_keras_hub_preset(
        trained_model, tmp_path / "student", image_size=16, crop_fraction=0.8, encoder="student"
    )
    converter = keras_hub.layers.ImageConverter.from_preset(str(path))
    rng = np.random.default_rng(3)
    # Images already at the crop size: only scale and offset, against NumPy.
    pixels = rng.uniform(0, 255, size=(2, 16, 16, 3)).astype("float32")
    assert np.max(np.abs(to_numpy(converter(pixels)) - (pixels / 255.0 - MEAN) / STD)) <= 1e-5

    # crop_fraction < 1 is not in the converter: centre-cropping first (the documented recipe) reproduces
    # the eval preprocessing; the raw image does not.
    raw = rng.integers(0, 256, size=(3, 21, 27, 3), dtype=np.uint8)
    expected = _eval_preprocessing(raw, 16, 0.8)
    from keras_carp.data import center_crop

    cropped = 255.0 * np.asarray(center_crop(raw, 16, 0.8))
    assert np.max(np.abs(to_numpy(converter(cropped)) - expected)) <= 1e-5
    assert np.max(np.abs(to_numpy(converter(raw.astype("float32"))) - expected)) > 0.1

    # uint8 input: keras.layers.Resizing rounds the resized pixels back to integers (half a grey level).
    square = rng.integers(0, 256, size=(2, 24, 24, 3), dtype=np.uint8)
    error = np.max(np.abs(to_numpy(converter(square)) - _eval_preprocessing(square, 16, 1.0)))
    assert error <= 0.5 / 255.0 / STD.min() + 1e-5

    metadata = json.loads((path / PRESET_METADATA_FILE).read_text())
    assert metadata["encoder"] == "student" and metadata["preprocessing"]["crop_fraction"] == 0.8
    assert metadata["centre_crop_in_converter"] is False


@keras.saving.register_keras_serializable(package="keras_carp_tests")
class TinyBackbone(keras_hub.models.Backbone):
    def __init__(self, filters=4, **kwargs):
        inputs = keras.Input((None, None, 3))
        outputs = keras.layers.Conv2D(filters, 3, padding="same")(inputs)
        super().__init__(inputs=inputs, outputs=outputs, **kwargs)
        self.filters = filters

    def get_config(self):
        return {**super().get_config(), "filters": self.filters}


@pytest.mark.core
def test_any_keras_hub_backbone_and_its_converter(tmp_path):
    vit = keras_hub.models.ViTBackbone(
        image_shape=(16, 16, 3), patch_size=8, num_layers=1, num_heads=1, hidden_dim=8, mlp_dim=8
    )
    encoder = keras_carp.build_encoder(vit)  # class-token pooling
    assert find_keras_hub_backbone(encoder) is vit
    assert image_converter_class(vit) is keras_hub.layers.ViTImageConverter
    with pytest.raises(ValueError, match="takes 16 x 16 images"):
        export_keras_hub_preset(encoder, tmp_path / "vit", image_size=32, crop_fraction=1.0)
    path = export_keras_hub_preset(encoder, tmp_path / "vit", image_size=16, crop_fraction=1.0)
    images = np.random.default_rng(4).normal(size=(2, 16, 16, 3)).astype("float32")
    loaded = keras_hub.models.Backbone.from_preset(str(path))
    assert isinstance(loaded, keras_hub.models.ViTBackbone)
    class_token = to_numpy(loaded(images))[:, 0]
    assert np.max(np.abs(class_token - to_numpy(encoder(images, training=False)))) <= 1e-5
    classifier = keras_hub.models.ImageClassifier.from_preset(str(path), num_classes=2)
    assert type(classifier.preprocessor.image_converter) is keras_hub.layers.ViTImageConverter
    assert classifier.predict(np.zeros((1, 20, 20, 3), "float32"), verbose=0).shape == (1, 2)
    pooling = json.loads((path / PRESET_METADATA_FILE).read_text())["encoder_layers"][-1]
    assert pooling["class_name"] == "TokenPooling" and pooling["config"]["mode"] == "class_token"

    # A Backbone class KerasHub pairs with no converter gets the base ImageConverter.
    custom = TinyBackbone()
    assert image_converter_class(custom) is keras_hub.layers.ImageConverter
    path = export_keras_hub_preset(custom, tmp_path / "custom", image_size=None, crop_fraction=1.0)
    loaded = keras_hub.models.Backbone.from_preset(str(path))
    np.testing.assert_allclose(to_numpy(loaded(images)), to_numpy(custom(images)), atol=1e-6)
    # ImageConverter.from_preset looks for a subclass paired with TinyBackbone and finds none: the
    # documented way to load the base converter is its JSON.
    with pytest.raises(ValueError, match="Unable to find a subclass of ImageConverter"):
        keras_hub.layers.ImageConverter.from_preset(str(path))
    converter = keras.saving.deserialize_keras_object(json.loads((path / "image_converter.json").read_text()))
    assert type(converter) is keras_hub.layers.ImageConverter and converter.image_size is None
    pixels = np.random.default_rng(6).uniform(0, 255, size=(1, 9, 11, 3)).astype("float32")
    np.testing.assert_allclose(to_numpy(converter(pixels)), (pixels / 255.0 - MEAN) / STD, atol=1e-5)


@pytest.mark.core
def test_clear_errors_before_writing(trained_model, tmp_path):
    small = _small_image_encoder()
    with pytest.raises(TypeError, match=r"no keras_hub.models.Backbone.*small_images.*plain keras.Model"):
        export_keras_hub_preset(small, tmp_path / "small", image_size=16, crop_fraction=1.0)
    assert not any(tmp_path.iterdir())
    with pytest.raises(ValueError, match="crop_fraction"):
        export_keras_hub_preset(trained_model, tmp_path / "x", image_size=16, crop_fraction=1.5)
    with pytest.raises(ValueError, match="encoder must be one of"):
        export_keras_hub_preset(trained_model, tmp_path / "x", image_size=16, crop_fraction=1.0, encoder="ema")
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_keras_hub_preset(trained_model, occupied, image_size=16, crop_fraction=1.0)
    path = export_keras_hub_preset(trained_model, occupied, image_size=16, crop_fraction=1.0, overwrite=True)
    assert not (path / "file").exists() and (path / "config.json").is_file()


@pytest.mark.core
def test_preset_passes_upload_presets_checks_without_network(trained_model, tmp_path):
    path = export_keras_hub_preset(trained_model, tmp_path / "preset", image_size=16, crop_fraction=1.0)
    # upload_preset validates the folder (config.json, model.weights.h5) before looking at the URI.
    with pytest.raises(ValueError, match="Unknown URI"):
        keras_hub.upload_preset("file://nowhere", str(path))
    with pytest.raises(FileNotFoundError):
        keras_hub.upload_preset("file://nowhere", str(tmp_path))


def test_carp_export_flag(trained_model, tmp_path, monkeypatch, capsys):
    from training.export import main

    monkeypatch.setenv("KERAS_BACKEND", keras.backend.backend())  # main() sets it; restored afterwards
    trained_model.save(tmp_path / "model.keras")
    main([str(tmp_path / "model.keras"), "--keras-hub-preset", str(tmp_path / "preset"), "--image-size", "16"])
    assert "KerasHub preset written to" in capsys.readouterr().out
    assert not (tmp_path / "preset" / "saved_model.pb").exists()
    images = np.random.default_rng(5).normal(size=(2, 16, 16, 3)).astype("float32")
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "preset"))
    teacher = to_numpy(trained_model.teacher_encoder(images, training=False))
    assert np.max(np.abs(_pooled(backbone, images) - teacher)) <= 1e-5
    converter = json.loads((tmp_path / "preset" / "image_converter.json").read_text())["config"]
    assert converter["image_size"] == [16, 16] and converter["antialias"] is True
    np.testing.assert_allclose(converter["scale"], 1.0 / (255.0 * STD), rtol=1e-6)
    np.testing.assert_allclose(converter["offset"], -MEAN / STD, rtol=1e-6)

    # Both at once, the student's.
    main([str(tmp_path / "model.keras"), str(tmp_path / "saved_model"), "--keras-hub-preset",
          str(tmp_path / "student"), "--image-size", "16", "--encoder", "student"])  # fmt: skip
    assert (tmp_path / "saved_model" / "saved_model.pb").is_file()
    student = to_numpy(trained_model.student_encoder(images, training=False))
    backbone = keras_hub.models.Backbone.from_preset(str(tmp_path / "student"))
    assert np.max(np.abs(_pooled(backbone, images) - student)) <= 1e-5

    with pytest.raises(SystemExit):
        main([str(tmp_path / "model.keras")])  # neither a SavedModel folder nor a preset
    small = _small_image_encoder()
    small.save(tmp_path / "small.keras")
    with pytest.raises(SystemExit, match="no keras_hub.models.Backbone"):
        main([str(tmp_path / "small.keras"), "--keras-hub-preset", str(tmp_path / "small_preset")])
