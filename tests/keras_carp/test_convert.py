"""The authors' released checkpoint layout -> Keras: features equal PyTorch's (eval mode), and bad files are named."""

import argparse

import keras
import numpy as np
import pytest

from keras_carp import convert
from tests.conftest import require_optional, to_numpy
from tests.saved_model_client import serve

torch = require_optional("torch")
torch_reference = pytest.importorskip("tests.torch_reference")  # imports torch; present whenever torch is

TOLERANCE = 1e-4  # max abs difference between Keras and PyTorch outputs in float32


@pytest.fixture(scope="module")
def released(tmp_path_factory):
    """A .pth in the released layout (random weights) and the PyTorch networks it came from."""
    checkpoint, student, teacher = torch_reference.released_checkpoint(num_prototypes=512, hidden_dim=64)
    path = tmp_path_factory.mktemp("checkpoint") / "carp_rn50.pth"
    torch.save(checkpoint, path)
    return path, checkpoint, student, teacher


def _images(size: int, count: int = 2, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(count, size, size, 3)).astype("float32")


def _torch_outputs(network, images: np.ndarray) -> dict:
    with torch.no_grad():
        features = network.backbone(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
        return {
            "features": features.numpy(),
            "embedding": network.head.embed(features).numpy(),
            "logits": network.head(features).numpy(),
        }


def _max_difference(a, b) -> float:
    return float(np.max(np.abs(to_numpy(a) - np.asarray(b))))


def test_released_checkpoint_gives_the_pytorch_features_embedding_and_logits(released):
    path, _, student, teacher = released
    model = convert.convert_model(path)
    assert model.num_prototypes == 512 and model.student_head.hidden_dim == 64
    assert model.student_head.bottleneck_dim == 32 and model.student_head.use_batch_norm
    for size in (224, 97):  # an odd size checks the stride-2 padding against PyTorch's
        images = _images(size)
        for name, network in (("teacher", teacher), ("student", student)):
            expected = _torch_outputs(network, images)
            encoder, head = getattr(model, f"{name}_encoder"), getattr(model, f"{name}_head")
            features = encoder(images, training=False)
            assert _max_difference(features, expected["features"]) <= TOLERANCE, (name, size)
            assert _max_difference(head.embed(features, training=False), expected["embedding"]) <= TOLERANCE
            assert _max_difference(head(features, training=False), expected["logits"]) <= TOLERANCE
    # The comparison can fail: the two networks of the file differ far beyond the tolerance.
    images = _images(224)
    assert _max_difference(model.student_encoder(images), _torch_outputs(teacher, images)["features"]) > 1e-2


def test_checkpoint_metadata_and_single_encoders(released):
    path, _, student, _ = released
    checkpoint = convert.read_checkpoint(path)
    assert checkpoint.epoch == 7 and checkpoint.args["num_prototypes"] == 512
    assert sorted(checkpoint.networks) == ["student", "teacher"]
    assert "backbone.layer4.2.conv3.weight" in checkpoint.network("teacher")  # "module." dropped
    encoder = convert.convert_encoder(checkpoint, which="student")
    images = _images(128)
    assert encoder.output_shape == (None, 2048)
    assert _max_difference(encoder(images), _torch_outputs(student, images)["features"]) <= TOLERANCE


def test_safetensors_and_torchvision_style_state_dicts(released, tmp_path):
    safetensors_torch = require_optional("safetensors.torch")
    _, checkpoint, _, teacher = released
    flat = {f"{which}.{key}": value.contiguous() for which in ("student", "teacher")
            for key, value in checkpoint[which].items()}  # fmt: skip
    safetensors_torch.save_file(flat, tmp_path / "carp.safetensors")
    # A torchvision-style backbone alone: no prefixes, with its classifier.
    backbone = {key.removeprefix("module.backbone."): value for key, value in checkpoint["teacher"].items()
                if key.startswith("module.backbone.")}  # fmt: skip
    backbone.update({"fc.weight": torch.zeros(1000, 2048), "fc.bias": torch.zeros(1000)})
    torch.save(backbone, tmp_path / "resnet50.pth")

    images = _images(160)
    expected = _torch_outputs(teacher, images)["features"]
    from_safetensors = convert.convert_encoder(tmp_path / "carp.safetensors", which="teacher")
    from_state_dict = convert.convert_encoder(tmp_path / "resnet50.pth")
    assert _max_difference(from_safetensors(images), expected) <= TOLERANCE
    assert _max_difference(from_state_dict(images), expected) <= TOLERANCE


def _corrupted(checkpoint: dict, tmp_path, edit) -> str:
    teacher = dict(checkpoint["teacher"])
    edit(teacher)
    path = tmp_path / "edited.pth"
    torch.save({**checkpoint, "teacher": teacher}, path)
    return str(path)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda s: s.pop("module.backbone.layer3.2.bn2.running_var"), r"1 missing: backbone\.layer3\.2\.bn2\.run"),
        (lambda s: s.pop("module.head.mlp.4.weight"), r"missing: head\.mlp\.4\.weight"),
        (lambda s: s.__setitem__("module.backbone.layer1.0.conv2.weight", torch.zeros(64, 64, 1, 1)),
         r"mismatched: backbone\.layer1\.0\.conv2\.weight: checkpoint \(64, 64, 1, 1\), Keras \(3, 3, 64, 64\)"),
        (lambda s: s.__setitem__("module.backbone.layer4.3.conv1.weight", torch.zeros(512, 2048, 1, 1)),
         r"unexpected: backbone\.layer4\.3\.conv1\.weight"),
        (lambda s: s.__setitem__("module.head.last_layer.weight_g", 2 * torch.ones(512, 1)), "weight_g is not 1"),
    ],
    ids=["missing-backbone", "missing-head", "mismatched", "unexpected", "gain"],
)  # fmt: skip
def test_wrong_or_partial_checkpoints_name_the_keys(released, tmp_path, edit, message):
    _, checkpoint, _, _ = released
    path = _corrupted(checkpoint, tmp_path, edit)
    with pytest.raises(convert.CheckpointError, match=message):
        convert.convert_model(path)


def test_unreadable_files_and_untrusted_pickles_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="No checkpoint"):
        convert.read_checkpoint(tmp_path / "missing.pth")
    (tmp_path / "notes.pth").write_text("not a checkpoint")
    with pytest.raises(convert.CheckpointError, match="not a readable PyTorch checkpoint"):
        convert.read_checkpoint(tmp_path / "notes.pth")
    torch.save({"teacher": {"conv1.weight": torch.zeros(1)}, "args": _Arbitrary()}, tmp_path / "pickle.pth")
    with pytest.raises(convert.CheckpointError, match="trust_checkpoint=True"):
        convert.read_checkpoint(tmp_path / "pickle.pth")
    trusted = convert.read_checkpoint(tmp_path / "pickle.pth", trust_checkpoint=True)
    assert "backbone.conv1.weight" in trusted.network("teacher")
    torch.save({"model": 3}, tmp_path / "other.pth")
    with pytest.raises(convert.CheckpointError, match="none of the keys"):
        convert.read_checkpoint(tmp_path / "other.pth")


class _Arbitrary:
    """Stands for any pickled object a checkpoint might carry besides tensors and argparse.Namespace."""


def test_carp_convert_writes_a_keras_model_and_a_saved_model(released, tmp_path, capsys):
    from training import convert as convert_cli

    path, _, student, teacher = released
    keras_file, saved_model = tmp_path / "carp.keras", tmp_path / "carp_sm"
    convert_cli.main([str(path), "--keras", str(keras_file), "--saved-model", str(saved_model),
                      "--image-size", "64", "--embedding", "true", "--assignments", "true"])  # fmt: skip
    printed = capsys.readouterr().out
    assert "epoch 7" in printed and "2048-d features" in printed

    model = keras.saving.load_model(keras_file)
    images = _images(64, count=3, seed=1)
    expected = _torch_outputs(teacher, images)
    assert _max_difference(model.teacher_encoder(images), expected["features"]) <= TOLERANCE
    assert _max_difference(model.student_encoder(images), _torch_outputs(student, images)["features"]) <= TOLERANCE

    uint8_images = np.random.default_rng(2).integers(0, 256, size=(2, 80, 72, 3), dtype=np.uint8)
    served = serve(saved_model, tmp_path, uint8_images, images)
    assert float(np.max(np.abs(served["serve_normalized/features"] - expected["features"]))) <= TOLERANCE
    assert float(np.max(np.abs(served["serve_normalized/embedding"] - expected["embedding"]))) <= TOLERANCE
    np.testing.assert_array_equal(served["serve_normalized/assignments"], np.argmax(expected["logits"], axis=-1))
    preprocessed = served["preprocess/images"]
    assert preprocessed.shape == (2, 64, 64, 3)
    expected_uint8 = _torch_outputs(teacher, preprocessed)["features"]
    assert float(np.max(np.abs(served["serving_default/features"] - expected_uint8))) <= TOLERANCE


def test_carp_convert_checks_outputs_before_reading(released, tmp_path):
    from training import convert as convert_cli

    path = released[0]
    with pytest.raises(SystemExit):
        convert_cli.main([str(path)])  # nothing to write
    (tmp_path / "taken.keras").write_text("x")
    with pytest.raises(SystemExit, match="already exists"):
        convert_cli.main([str(path), "--keras", str(tmp_path / "taken.keras")])
    with pytest.raises(SystemExit, match="No checkpoint"):
        convert_cli.main([str(tmp_path / "absent.pth"), "--keras", str(tmp_path / "new.keras")])
    assert not (tmp_path / "new.keras").exists()


def test_namespace_args_are_read_without_trusting_the_file(released):
    checkpoint = convert.read_checkpoint(released[0])
    assert isinstance(checkpoint.args, dict) and checkpoint.args["arch"] == "resnet50"
    assert argparse.Namespace(**checkpoint.args).batch_size_per_gpu == 256
