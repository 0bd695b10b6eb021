"""Ship an encoder as a TensorFlow SavedModel (TensorFlow-only; other backends export through a TensorFlow process).

The SavedModel needs neither Keras nor keras_carp to run: ``tf.saved_model.load``
and TF Serving use it as is. Endpoints:

- ``serving_default(images: uint8 [N, H, W, 3])``: resize the shorter side to
  ``image_size / crop_fraction``, centre-crop ``image_size``, scale to [0, 1],
  normalise with ``mean`` / ``std`` (exactly ``keras_carp.data.eval_dataset``'s
  preprocessing), then run the network;
- ``serve_normalized(images: float32 [N, H, W, 3])``: the network on images
  already preprocessed (what the Keras encoder takes);
- ``preprocess(images: uint8)``: the preprocessing alone.

Each returns ``features`` (the pooled encoder output [N, D], float32) and, on
request, ``embedding`` (the head's bottleneck z [N, d]) and ``assignments``
(the index of the closest unit-norm prototype, int64 [N]). ``keras_carp_export.json``
beside ``saved_model.pb`` records what was exported.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import keras

from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD

ENCODERS = ("teacher", "student")
METADATA_FILE = "keras_carp_export.json"


@dataclasses.dataclass(frozen=True)
class ServingPreprocessing:
    """What ``serving_default`` does to uint8 images before the network.

    Args:
        image_size: side of the centre crop fed to the encoder; None feeds the
            images at their own size (only scaled and normalised).
        crop_fraction: the shorter side is first resized to
            ``image_size / crop_fraction`` (224/256: ImageNet's resize 256,
            crop 224; 1.0: resize straight to ``image_size``).
        mean, std: per-channel normalisation of [0, 1] RGB.
    """

    image_size: int | None = 224
    crop_fraction: float = 224 / 256
    mean: tuple = IMAGENET_MEAN
    std: tuple = IMAGENET_STD

    def __post_init__(self):
        if self.image_size is not None and (isinstance(self.image_size, bool) or int(self.image_size) <= 0):
            raise ValueError(f"image_size must be a positive integer or None, got {self.image_size!r}.")
        if not 0 < self.crop_fraction <= 1:
            raise ValueError(f"crop_fraction must be in (0, 1], got {self.crop_fraction}.")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"mean and std need 3 channels and std > 0, got mean={self.mean}, std={self.std}.")
        object.__setattr__(self, "mean", tuple(float(m) for m in self.mean))
        object.__setattr__(self, "std", tuple(float(s) for s in self.std))


def select_networks(model: keras.Model, encoder: str = "teacher") -> tuple[keras.Model, keras.layers.Layer | None]:
    """(encoder, head) of a CARP model, or (model, None) for a plain Keras encoder."""
    if encoder not in ENCODERS:
        raise ValueError(f"encoder must be one of {ENCODERS}, got {encoder!r}.")
    if hasattr(model, "teacher_encoder"):
        if encoder == "teacher":
            return model.teacher_encoder, model.teacher_head
        return model.student_encoder, model.student_head
    if not isinstance(model, keras.Model):
        raise TypeError(f"Expected a keras_carp.CARP model or a Keras encoder, got {type(model).__name__}.")
    return model, None


def check_output_path(path: str | os.PathLike, overwrite: bool = False) -> Path:
    """Fail before any work when ``path`` exists (without ``overwrite``) or its parent is not writable."""
    path = Path(path)
    if path.exists() and not overwrite and (path.is_file() or any(path.iterdir())):
        raise FileExistsError(f"{path} already exists; pass overwrite=True to replace it.")
    parent = path.parent if str(path.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise PermissionError(f"Cannot write {path.name} under {parent}: {error}") from None
    return path


def export_encoder(
    model: keras.Model,
    path: str | os.PathLike,
    encoder: str = "teacher",
    preprocessing: ServingPreprocessing | None = None,
    include_embedding: bool = False,
    include_assignments: bool = False,
    overwrite: bool = False,
) -> Path:
    """Write ``model``'s encoder (teacher by default) as a TensorFlow SavedModel at ``path``.

    ``model`` is a ``keras_carp.CARP`` or a plain Keras encoder (features only).
    On the JAX and PyTorch backends the model is saved to a temporary
    ``.keras`` file and exported by a TensorFlow-backend process from those
    weights. Returns the SavedModel folder.
    """
    preprocessing = preprocessing or ServingPreprocessing()
    path = check_output_path(path, overwrite)
    _, head = select_networks(model, encoder)
    if (include_embedding or include_assignments) and head is None:
        raise ValueError("The embedding and prototype assignments need a CARP model (a plain encoder has no head).")
    options = dict(
        encoder=encoder,
        preprocessing=dataclasses.asdict(preprocessing),
        include_embedding=include_embedding,
        include_assignments=include_assignments,
    )
    staging = path.with_name(f".{path.name}.partial")
    shutil.rmtree(staging, ignore_errors=True)
    if keras.backend.backend() == "tensorflow":
        _write_saved_model(model, staging, **options)
    else:
        _export_in_tensorflow_process(model, staging, options)
    if path.exists():
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    staging.rename(path)
    return path


def _write_saved_model(
    model: keras.Model,
    path: Path,
    encoder: str,
    preprocessing: dict,
    include_embedding: bool,
    include_assignments: bool,
) -> None:
    import tensorflow as tf

    from keras_carp.data.pipeline import center_crop
    from keras_carp.imagenet import to_float_image

    settings = ServingPreprocessing(**preprocessing)
    network, head = select_networks(model, encoder)
    mean = tf.constant(settings.mean, tf.float32)
    std = tf.constant(settings.std, tf.float32)

    def preprocess(images):
        if settings.image_size is None:
            images = to_float_image(images)
        else:
            images = center_crop(images, int(settings.image_size), settings.crop_fraction)
        return (images - mean) / std

    def outputs(images):
        features = network(images, training=False)
        result = {"features": tf.cast(features, tf.float32)}
        if include_embedding or include_assignments:
            embedding = head.embed(features, training=False)
            if include_embedding:
                result["embedding"] = tf.cast(embedding, tf.float32)
            if include_assignments:
                prototypes = tf.cast(head.normalized_prototypes(), embedding.dtype)
                result["assignments"] = tf.argmax(tf.matmul(embedding, prototypes, transpose_b=True), axis=-1)
        return result

    def serve_uint8(images):
        return outputs(preprocess(images))

    def serve_normalized(images):
        return outputs(images)

    def preprocess_only(images):
        return {"images": preprocess(images)}

    uint8_images = tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")
    # Not archive.track(network): the endpoints already capture every variable they use, and tracking the
    # layers too stores each weight a second time (Keras 3.15 / TF 2.21: a SavedModel twice the size).
    archive = keras.export.ExportArchive()
    archive.add_endpoint("serving_default", serve_uint8, input_signature=[uint8_images])
    archive.add_endpoint(
        "serve_normalized", serve_normalized, input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)]
    )
    archive.add_endpoint("preprocess", preprocess_only, input_signature=[uint8_images])
    archive.write_out(str(path), verbose=False)
    outputs_written = ["features"] + ["embedding"] * include_embedding + ["assignments"] * include_assignments
    metadata = {
        "encoder": encoder if head is not None else "encoder",
        "feature_dim": int(network.output_shape[-1]),
        "outputs": outputs_written,
        "endpoints": ["serving_default", "serve_normalized", "preprocess"],
        "preprocessing": dataclasses.asdict(settings),
        "keras_version": keras.__version__,
    }
    (path / METADATA_FILE).write_text(json.dumps(metadata, indent=2))


def _export_in_tensorflow_process(model: keras.Model, path: Path, options: dict) -> None:
    """Save ``model`` to a temporary .keras file and export it from a TensorFlow-backend Python process."""
    with tempfile.TemporaryDirectory() as folder:
        weights = Path(folder) / "model.keras"
        model.save(weights)
        command = [sys.executable, "-m", "keras_carp.export", str(weights), str(path), json.dumps(options)]
        env = {**os.environ, "KERAS_BACKEND": "tensorflow"}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(
            f"Exporting the SavedModel on the TensorFlow backend failed (exit {done.returncode}):\n"
            + done.stderr[-4000:]
        )


def _main(argv: list[str] | None = None) -> None:
    """``python -m keras_carp.export MODEL.keras OUTPUT OPTIONS_JSON`` (used by non-TensorFlow backends)."""
    parser = argparse.ArgumentParser(prog="python -m keras_carp.export")
    parser.add_argument("model")
    parser.add_argument("output")
    parser.add_argument("options")
    args = parser.parse_args(argv)
    if keras.backend.backend() != "tensorflow":
        raise SystemExit("python -m keras_carp.export needs KERAS_BACKEND=tensorflow.")
    import keras_carp  # noqa: F401  (registers the classes the .keras file names)

    model = keras.saving.load_model(args.model, compile=False)
    _write_saved_model(model, Path(args.output), **json.loads(args.options))


if __name__ == "__main__":
    _main()
