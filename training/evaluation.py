"""carp-eval's stages: load the encoder, open the splits, extract features once, run the protocols.

``training.evaluate`` parses the command line and calls ``evaluate``; the
protocols themselves are in ``keras_carp.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.config import run_config_from_json


def load_encoder(path: str, which: str = "teacher"):
    """A Keras encoder from a .keras file (CARP -> teacher/student encoder), a SavedModel folder, or 'pixels'."""
    import keras

    from keras_carp.data import IMAGENET_MEAN, IMAGENET_STD

    if path == "pixels":
        inputs = keras.Input((None, None, 3))
        pixels = inputs * keras.ops.convert_to_tensor(IMAGENET_STD) + keras.ops.convert_to_tensor(IMAGENET_MEAN)
        return keras.Model(inputs, keras.layers.Flatten()(pixels), name="raw_pixels")
    location = Path(path)
    if location.is_dir() and (location / "saved_model.pb").is_file():
        if keras.backend.backend() != "tensorflow":
            raise SystemExit("carp-eval: SavedModel encoders load on the TensorFlow backend only.")
        # carp-export's SavedModels take preprocessed images at serve_normalized; others, at serving_default.
        exported = (location / "keras_carp_export.json").is_file()
        layer = keras.layers.TFSMLayer(
            str(location), call_endpoint="serve_normalized" if exported else "serving_default"
        )
        inputs = keras.Input((None, None, 3))
        outputs = layer(inputs)
        if isinstance(outputs, dict):
            outputs = outputs["features"] if "features" in outputs else next(iter(outputs.values()))
        return keras.Model(inputs, outputs, name="saved_model_encoder")
    if not location.is_file():
        raise SystemExit(f"carp-eval: no model at {location} (expected a .keras file or a SavedModel folder).")
    import keras_carp  # noqa: F401  (registers the CARP classes for deserialisation)

    model = keras.saving.load_model(location, compile=False)
    if hasattr(model, "teacher_encoder"):
        return model.teacher_encoder if which == "teacher" else model.student_encoder
    return model


def eval_preprocessing(model_path: str, image_size: int | None, crop_fraction: float | None) -> tuple[int, float]:
    """(image size, crop fraction): given values, else the run's global_size (config.json beside the model) or
    224; ImageNet's 224/256 centre crop from 128 px up, the whole image below."""
    if image_size is None:
        config = Path(model_path).parent / "config.json"
        image_size = 224
        if model_path != "pixels" and config.is_file():
            image_size = run_config_from_json(config.read_text()).views.global_size
    return image_size, crop_fraction or (224 / 256 if image_size >= 128 else 1.0)


def open_sources(args: argparse.Namespace, image_size: int) -> dict:
    """The labelled train and test splits; every data problem stops here, before any feature extraction."""
    from keras_carp.data import load_source

    try:
        sources = {split: load_source(args.dataset, split, args.data_dir, image_size=image_size)
                   for split in (args.train_split, args.test_split)}  # fmt: skip
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"carp-eval: {error}") from None
    for source in sources.values():
        if not source.has_labels:
            raise SystemExit(f"carp-eval: {source.name} has no labels; every protocol needs them.")
    return sources


def writable_output(args: argparse.Namespace) -> Path:
    """The results file, its folder proven writable (without leaving a file behind)."""
    if args.output:
        output = Path(args.output)
    else:
        output = Path(args.model).parent / "eval.json" if args.model != "pixels" else Path("eval_pixels.json")
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"carp-eval: cannot write {output}: {error}") from None
    return output


def extract_features(args, encoder, sources: dict, image_size: int, crop_fraction: float) -> dict:
    """(features, labels) of the train and test splits, cached in ``--cache-dir`` when given."""
    from keras_carp.data import eval_dataset
    from keras_carp.evaluation import extract_labelled_features

    features = {}
    for role, split in (("train", args.train_split), ("test", args.test_split)):
        name = f"{args.dataset}-{split}-{image_size}.npz".replace("/", "_")
        cache = Path(args.cache_dir) / name if args.cache_dir else None
        data = eval_dataset(sources[split], image_size, args.batch_size, crop_fraction=crop_fraction)
        print(f"features of {sources[split].name} ({sources[split].num_examples} images, {image_size} px)")
        features[role] = extract_labelled_features(encoder, data, progress=True, cache_path=cache)
    return features


def run_protocols(args, features: dict, num_classes: int) -> tuple[dict, dict]:
    """Every protocol of ``--protocols`` on the features; returns (results, seconds per protocol)."""
    from keras_carp.evaluation import few_shot, kmeans_scores, linear_probe, retrieval_map, weighted_knn

    (train, train_labels), (test, test_labels) = features["train"], features["test"]
    results, timings = {}, {}
    for protocol in args.protocols:
        started = time.time()
        if protocol == "knn":
            swept = weighted_knn(train, train_labels, test, test_labels, args.knn_k, args.knn_temperature, num_classes)
            results["knn"] = {str(k): v for k, v in swept.items()}
        elif protocol == "linear":
            results["linear"] = linear_probe(train, train_labels, test, test_labels, num_classes,
                                             epochs=args.linear_epochs, seed=args.seed)  # fmt: skip
        elif protocol == "kmeans":
            results["kmeans"] = kmeans_scores(test, test_labels, num_classes, seed=args.seed)
        elif protocol == "fewshot":
            results["fewshot"] = {
                f"{args.fewshot_ways}way_{shots}shot": few_shot(test, test_labels, args.fewshot_ways, shots,
                                                                episodes=args.fewshot_episodes, seed=args.seed)
                for shots in args.fewshot_shots
            }  # fmt: skip
        elif protocol == "retrieval":
            results["retrieval"] = retrieval_map(test, test_labels, train, train_labels)
        timings[protocol] = round(time.time() - started, 1)
    return results, timings


def evaluate(args: argparse.Namespace) -> dict:
    """Extract features once, run the protocols, write and return the results."""
    import numpy as np

    image_size, crop_fraction = eval_preprocessing(args.model, args.image_size, args.crop_fraction)
    sources = open_sources(args, image_size)
    output = writable_output(args)
    encoder = load_encoder(args.model, args.encoder)
    features = extract_features(args, encoder, sources, image_size, crop_fraction)
    results = {
        "model": args.model,
        "encoder": args.encoder,
        "dataset": args.dataset,
        "train_split": args.train_split,
        "test_split": args.test_split,
        "image_size": image_size,
        "feature_dim": int(features["train"][0].shape[1]),
    }
    protocols, timings = run_protocols(args, features, len(sources[args.train_split].class_names))
    results.update(protocols, seconds=timings)
    output.write_text(json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist()))
    results["output"] = str(output)
    return results
