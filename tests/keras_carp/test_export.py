"""SavedModel export: the served features equal the Keras model's, in a process that never imports keras_carp."""

import json

import numpy as np
import pytest

import keras_carp
from keras_carp.export import METADATA_FILE, ServingPreprocessing, export_encoder
from tests.conftest import random_views, tiny_model, to_numpy
from tests.saved_model_client import serve

pytestmark = pytest.mark.core


def _trained_model():
    model = tiny_model()
    model.compile(optimizer=keras_carp.LARS(2.0))
    model.fit(x=random_views(batch=16, num_local=0), batch_size=8, epochs=1, verbose=0)
    return model


def test_saved_model_serves_the_keras_features_embedding_and_assignments(tmp_path):
    from keras_carp.data import center_crop, normalize

    model = _trained_model()
    preprocessing = ServingPreprocessing(image_size=16, crop_fraction=0.8)
    path = export_encoder(model, tmp_path / "teacher", preprocessing=preprocessing,
                          include_embedding=True, include_assignments=True)  # fmt: skip
    rng = np.random.default_rng(1)
    uint8_images = rng.integers(0, 256, size=(6, 21, 27, 3), dtype=np.uint8)  # not square, not the crop size
    normalized = rng.normal(size=(6, 16, 16, 3)).astype("float32")
    served = serve(path, tmp_path, uint8_images, normalized)

    # The eval pipeline's preprocessing (keras_carp.data), done here in this process.
    preprocessed = np.asarray(normalize(center_crop(uint8_images, 16, 0.8)))
    np.testing.assert_allclose(served["preprocess/images"], preprocessed, atol=1e-6)
    for endpoint, images in (("serving_default", preprocessed), ("serve_normalized", normalized)):
        features = model.teacher_encoder(images, training=False)
        embedding = model.teacher_head.embed(features, training=False)
        assignments = np.argmax(to_numpy(model.teacher_head(features, training=False)), axis=-1)
        assert np.max(np.abs(served[f"{endpoint}/features"] - to_numpy(features))) <= 1e-5
        assert np.max(np.abs(served[f"{endpoint}/embedding"] - to_numpy(embedding))) <= 1e-5
        np.testing.assert_array_equal(served[f"{endpoint}/assignments"], assignments)
    # The teacher was exported, not the student (they differ after a step).
    student = to_numpy(model.student_encoder(normalized, training=False))
    assert np.max(np.abs(served["serve_normalized/features"] - student)) > 1e-3

    metadata = json.loads((path / METADATA_FILE).read_text())
    assert metadata["encoder"] == "teacher" and metadata["feature_dim"] == 128
    assert metadata["outputs"] == ["features", "embedding", "assignments"]
    assert metadata["preprocessing"]["image_size"] == 16


def test_student_export_with_images_at_their_own_size(tmp_path):
    model = _trained_model()
    preprocessing = ServingPreprocessing(image_size=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = export_encoder(model, tmp_path / "student", encoder="student", preprocessing=preprocessing)
    uint8_images = np.random.default_rng(2).integers(0, 256, size=(3, 12, 12, 3), dtype=np.uint8)
    normalized = (uint8_images.astype("float32") / 255.0 - 0.5) / 0.25
    served = serve(path, tmp_path, uint8_images, normalized)
    assert sorted(k.split("/")[1] for k in served if k.startswith("serving_default/")) == ["features"]
    expected = to_numpy(model.student_encoder(normalized, training=False))
    assert np.max(np.abs(served["serving_default/features"] - expected)) <= 1e-5
    assert np.max(np.abs(served["serve_normalized/features"] - expected)) <= 1e-5


def test_export_checks_its_inputs_before_any_work(tmp_path):
    model = tiny_model()
    occupied = tmp_path / "occupied"
    occupied.mkdir()
    (occupied / "file").write_text("keep me")
    with pytest.raises(FileExistsError, match="overwrite"):
        export_encoder(model, occupied)
    assert (occupied / "file").read_text() == "keep me"
    with pytest.raises(ValueError, match="need a CARP model"):
        export_encoder(model.teacher_encoder, tmp_path / "plain", include_embedding=True)
    with pytest.raises(ValueError, match="encoder must be one of"):
        export_encoder(model, tmp_path / "x", encoder="momentum")
    with pytest.raises(ValueError, match="crop_fraction"):
        ServingPreprocessing(crop_fraction=1.5)
    with pytest.raises(ValueError, match="image_size"):
        ServingPreprocessing(image_size=0)
    assert not (tmp_path / "plain").exists() and not (tmp_path / "x").exists()


def test_overwrite_replaces_an_export(tmp_path):
    model = tiny_model()
    path = tmp_path / "encoder"
    export_encoder(model, path, preprocessing=ServingPreprocessing(16, 1.0))
    export_encoder(model, path, preprocessing=ServingPreprocessing(12, 1.0), overwrite=True)
    assert json.loads((path / METADATA_FILE).read_text())["preprocessing"]["image_size"] == 12
    assert not any(p.name.endswith(".partial") for p in tmp_path.iterdir())
