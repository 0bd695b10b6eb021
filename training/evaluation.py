"""carp-eval's stages: load the encoder, open the splits, extract features once, run the protocols.

``training.evaluate`` parses the command line and calls ``evaluate`` (one
dataset, every protocol) or ``evaluate_many`` (a table over datasets, each
with its own protocols); the protocols themselves are in ``keras_carp.evaluation``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from training.config import run_config_from_json

# Datasets of evaluate_many that are not transfer k-NN datasets: their protocol, and where they are read from.
SPECIAL_DATASETS = ("voc07", "copydays", "roxford5k", "rparis6k")


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


def writable_file(output: Path, command: str) -> Path:
    """``output``, its folder created and proven writable (without leaving a file behind), before any work."""
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        probe = output.parent / f".{output.name}.write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"{command}: cannot write {output}: {error}") from None
    return output


def writable_output(args: argparse.Namespace) -> Path:
    """The results file, its folder proven writable."""
    if args.output:
        output = Path(args.output)
    else:
        output = Path(args.model).parent / "eval.json" if args.model != "pixels" else Path("eval_pixels.json")
    return writable_file(output, "carp-eval")


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


def _special_folder(args: argparse.Namespace, name: str) -> Path:
    """The local folder of copydays / roxford5k / rparis6k, checked before any work."""
    if name == "copydays":
        folder = Path(args.copydays_dir) if args.copydays_dir else None
    else:
        folder = Path(args.revisited_dir) / name if args.revisited_dir else None
    if folder is None and args.data_dir:
        folder = Path(args.data_dir) / name
    if folder is None:
        option = "--copydays-dir" if name == "copydays" else "--revisited-dir"
        raise SystemExit(f"carp-eval: {name} is read from a local folder: pass {option} or --data-dir.")
    expected = folder / "original" if name == "copydays" else folder / f"gnd_{name}.pkl"
    if not expected.exists():
        raise SystemExit(f"carp-eval: no {name} in {folder} (expected {expected}).")
    return folder


def _voc07(args, encoder, image_size: int, crop_fraction: float) -> dict:
    """VOC07 low-shot SVM mAP: TFDS voc/2007 trainval features train the SVMs, test features score them."""
    from keras_carp.evaluation import extract_labelled_features
    from keras_carp.evaluation.lowshot_svm import COSTS, low_shot_svm, voc_dataset

    features = {}
    for role, split in (("train", "train+validation"), ("test", "test")):
        cache = Path(args.cache_dir) / f"voc07-{split}-{image_size}.npz" if args.cache_dir else None
        data = voc_dataset(split, args.data_dir, image_size, crop_fraction, args.batch_size)
        print(f"features of voc/2007:{split} ({image_size} px)")
        features[role] = extract_labelled_features(encoder, data, progress=True, cache_path=cache)
    (train, train_targets), (test, test_targets) = features["train"], features["test"]
    scores = low_shot_svm(train, train_targets, test, test_targets, args.svm_shots, args.svm_samples,
                          args.svm_costs or COSTS, args.svm_folds, args.seed)  # fmt: skip
    return {"lowshot_svm": scores, "num_train": len(train), "num_test": len(test)}


def evaluate_many(args: argparse.Namespace) -> dict:
    """Every dataset of ``args.datasets`` with its own protocols; one JSON and one Markdown table.

    Bad names and missing local folders stop the run before the encoder loads.
    With ``--transfer``, class-folder datasets that are absent (and TFDS datasets
    that cannot be prepared) are listed as skipped instead of stopping the run.
    """
    import numpy as np

    from keras_carp.evaluation.copy_detection import evaluate_copydays
    from keras_carp.evaluation.revisited import evaluate_revisited
    from keras_carp.evaluation.transfer import folder_path, markdown_table, resolve_datasets, run_transfer

    image_size, crop_fraction = eval_preprocessing(args.model, args.image_size, args.crop_fraction)
    named = getattr(args, "named_datasets", args.datasets)  # --transfer's own folder datasets may be absent
    for dataset in resolve_datasets([name for name in named if name not in SPECIAL_DATASETS]):
        if dataset.tfds_name is None and folder_path(dataset, args.data_dir) is None:
            where = Path(args.data_dir or "DATA_DIR") / (dataset.folder or dataset.name)
            raise SystemExit(f"carp-eval: {dataset.name} is not in TFDS: put its class folders in "
                             f"{where}/{dataset.train_split} and {where}/{dataset.test_split}.")  # fmt: skip
    folders = {name: _special_folder(args, name) for name in args.datasets if name in ("copydays", "roxford5k",
                                                                                       "rparis6k")}  # fmt: skip
    if args.output:
        output = writable_output(args)
    else:
        default = Path(args.model).parent / "eval_datasets.json" if args.model != "pixels" else None
        args.output = str(default or Path("eval_datasets_pixels.json"))
        output = writable_output(args)
    encoder = load_encoder(args.model, args.encoder)
    datasets, timings = {}, {}
    for name in args.datasets:
        started = time.time()
        skip = args.transfer and name not in named
        try:
            if name == "voc07":
                datasets[name] = _voc07(args, encoder, image_size, crop_fraction)
            elif name == "copydays":
                scores = evaluate_copydays(encoder, folders[name], args.copydays_image_size,
                                           args.copydays_distractors, batch_size=args.batch_size)  # fmt: skip
                datasets[name] = {"copy_detection": scores}
            elif name in ("roxford5k", "rparis6k"):
                datasets[name] = {"revisited": evaluate_revisited(encoder, folders[name], name,
                                                                  args.revisited_image_size)}  # fmt: skip
            else:
                datasets.update(run_transfer(
                    encoder, [name], args.data_dir, image_size, crop_fraction, args.batch_size, args.knn_k,
                    args.knn_temperature, tuple(args.protocols) if args.protocols else None, args.cache_dir,
                    skip_missing=skip, download=args.download, seed=args.seed, progress=True,
                ))  # fmt: skip
        except (FileNotFoundError, NotADirectoryError, ValueError) as error:
            raise SystemExit(f"carp-eval: {name}: {error}") from None
        timings[name] = round(time.time() - started, 1)
    results = {
        "model": args.model,
        "encoder": args.encoder,
        "image_size": image_size,
        "crop_fraction": crop_fraction,
        "datasets": datasets,
        "seconds": timings,
    }
    output.write_text(json.dumps(results, indent=2, default=lambda x: np.asarray(x).tolist()))
    table = markdown_table(datasets, knn_k="20" if 20 in args.knn_k else str(args.knn_k[0]))
    markdown = output.with_suffix(".md")
    markdown.write_text(f"# {args.model} ({args.encoder} encoder, {image_size} px)\n\n{table}\n")
    results.update(output=str(output), markdown=table, markdown_output=str(markdown))
    return results
