"""Transfer evaluation over many datasets: a registry of the released transfer list and one call that
extracts each dataset's features and runs its protocols (weighted k-NN everywhere, k-means where the
released code runs it).

``TRANSFER_DATASETS`` maps short names to the TFDS dataset, its train and test
split strings and its protocols. Datasets TFDS does not carry (GTSRB,
FGVC-Aircraft, Country211) read class folders from ``<data_dir>/<name>/train``
and ``<data_dir>/<name>/test`` instead.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

logger = logging.getLogger("keras_carp.evaluation")


@dataclass(frozen=True)
class TransferDataset:
    """One dataset of the transfer list: where its images are and which protocols run on it.

    ``tfds_name`` None means a class-folder dataset: ``<data_dir>/<folder>/<split>/<class>/*.jpg``.
    """

    name: str
    tfds_name: str | None
    train_split: str = "train"
    test_split: str = "test"
    protocols: tuple[str, ...] = ("knn",)
    folder: str | None = None
    description: str = ""


_KNN_KMEANS = ("knn", "kmeans")
TRANSFER_DATASETS: dict[str, TransferDataset] = {
    d.name: d
    for d in (
        TransferDataset("stl10", "stl10", description="STL-10, 5 000 labelled training images"),
        TransferDataset("gtsrb", None, protocols=_KNN_KMEANS, folder="gtsrb",
                        description="German traffic signs (not in TFDS: class folders)"),
        TransferDataset("flowers102", "oxford_flowers102", "train+validation", "test",
                        description="Oxford Flowers-102"),
        TransferDataset("food101", "food101", "train", "validation", description="Food-101"),
        TransferDataset("pets", "oxford_iiit_pet", "train", "test", description="Oxford-IIIT Pets"),
        TransferDataset("cars", "cars196", "train", "test", description="Stanford Cars"),
        TransferDataset("aircraft", None, folder="fgvc_aircraft",
                        description="FGVC-Aircraft (not in TFDS: class folders)"),
        TransferDataset("dtd", "dtd", "train+validation", "test", _KNN_KMEANS, description="Describable Textures"),
        TransferDataset("cifar10", "cifar10", protocols=_KNN_KMEANS, description="CIFAR-10"),
        TransferDataset("cifar100", "cifar100", protocols=_KNN_KMEANS, description="CIFAR-100"),
        TransferDataset("country211", None, folder="country211",
                        description="Country211 (not in TFDS: class folders; not in --transfer)"),
    )
}  # fmt: skip
# --transfer: the released k-NN transfer list (folder datasets are skipped when their folder is absent).
TRANSFER_LIST = ("stl10", "gtsrb", "flowers102", "food101", "pets", "cars", "aircraft", "dtd", "cifar10", "cifar100")


def _split_outside_brackets(text: str) -> list[str]:
    """``"mnist:train[:10%]:test"`` -> ``["mnist", "train[:10%]", "test"]``: colons inside TFDS slices stay."""
    parts, depth, current = [], 0, ""
    for char in text:
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == ":" and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    return parts + [current]


def resolve_datasets(names) -> list[TransferDataset]:
    """Registry entries for short names, TFDS names or ``tfds_name:train_split:test_split`` (k-NN only)."""
    by_tfds = {d.tfds_name: d for d in TRANSFER_DATASETS.values() if d.tfds_name}
    out = []
    for name in names:
        if name in TRANSFER_DATASETS:
            out.append(TRANSFER_DATASETS[name])
        elif name in by_tfds:
            out.append(by_tfds[name])
        elif len(_split_outside_brackets(name)) == 3:
            tfds_name, train, test = _split_outside_brackets(name)
            out.append(TransferDataset(tfds_name, tfds_name, train, test))
        else:
            raise ValueError(f"Unknown dataset {name!r}: choose from {', '.join(TRANSFER_DATASETS)} "
                             "or give TFDS_NAME:TRAIN_SPLIT:TEST_SPLIT.")  # fmt: skip
    return out


def folder_path(dataset: TransferDataset, data_dir: str | os.PathLike | None) -> Path | None:
    """``<data_dir>/<folder>`` of a class-folder dataset when it holds ``train`` and ``test`` folders, else None."""
    if dataset.tfds_name or data_dir is None:
        return None
    root = Path(data_dir) / (dataset.folder or dataset.name)
    return root if (root / dataset.train_split).is_dir() and (root / dataset.test_split).is_dir() else None


def open_dataset(dataset: TransferDataset, data_dir=None, download: bool = True):
    """(train source, test source) of a registry entry, opened by ``load_source``; a clear error when its images
    are not there."""
    from keras_carp.data import load_source

    splits = (dataset.train_split, dataset.test_split)
    if dataset.tfds_name is None:
        root = folder_path(dataset, data_dir)
        if root is None:
            where = Path(data_dir) / (dataset.folder or dataset.name) if data_dir else f"<data_dir>/{dataset.folder}"
            raise FileNotFoundError(f"{dataset.name} is not in TFDS: put its class folders in {where}/"
                                    f"{dataset.train_split} and {where}/{dataset.test_split}.")  # fmt: skip
        sources = tuple(load_source("folder", split, root) for split in splits)
    else:
        sources = tuple(load_source(dataset.tfds_name, split, data_dir, download=download) for split in splits)
    for source in sources:
        if not source.has_labels:
            raise ValueError(f"{source.name} has no labels.")
    return sources


def run_transfer(
    encoder,
    datasets,
    data_dir: str | os.PathLike | None = None,
    image_size: int = 224,
    crop_fraction: float = 1.0,
    batch_size: int = 256,
    knn_k=(10, 20, 100, 200),
    knn_temperature: float = 0.07,
    protocols: tuple[str, ...] | None = None,
    cache_dir: str | os.PathLike | None = None,
    skip_missing: bool = False,
    download: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict:
    """``{name: {"knn": {k: {top1, top5}}, "kmeans": {...}, "num_train", "num_test", "num_classes"}}``.

    ``datasets`` are names for ``resolve_datasets``. Each runs its registry
    protocols (``protocols`` overrides them: any of ``knn``, ``kmeans``).
    k-means clusters the test features into as many clusters as classes.
    With ``skip_missing`` a dataset whose images are absent gets
    ``{"skipped": reason}`` instead of stopping the run.
    """
    from keras_carp.data import eval_dataset
    from keras_carp.evaluation.clustering import kmeans_scores
    from keras_carp.evaluation.features import extract_labelled_features
    from keras_carp.evaluation.knn import weighted_knn

    results = {}
    for dataset in resolve_datasets(datasets):
        try:
            sources = open_dataset(dataset, data_dir, download)
        except (FileNotFoundError, ValueError) as error:
            if not skip_missing:
                raise
            logger.warning("skipping %s: %s", dataset.name, error)
            results[dataset.name] = {"skipped": str(error).splitlines()[0]}
            continue
        features = []
        for role, source in zip(("train", "test"), sources):
            cache = None
            if cache_dir is not None:
                split = dataset.train_split if role == "train" else dataset.test_split
                cache = Path(cache_dir) / f"{dataset.name}-{split}-{image_size}.npz".replace("/", "_")
            batches = eval_dataset(source, image_size, batch_size, crop_fraction=crop_fraction)
            features.append(extract_labelled_features(encoder, batches, progress=progress, cache_path=cache))
        (train, train_labels), (test, test_labels) = features
        num_classes = len(sources[0].class_names)
        entry = {"num_train": len(train), "num_test": len(test), "num_classes": num_classes}
        for protocol in protocols or dataset.protocols:
            if protocol == "knn":
                swept = weighted_knn(train, train_labels, test, test_labels, list(knn_k), knn_temperature, num_classes)
                entry["knn"] = {str(k): v for k, v in swept.items()}
            elif protocol == "kmeans":
                entry["kmeans"] = kmeans_scores(test, test_labels, num_classes, seed=seed)
            else:
                raise ValueError(f"Unknown transfer protocol {protocol!r} (knn, kmeans).")
        logger.info("%s: %s", dataset.name, {k: v for k, v in entry.items() if k.startswith("num")})
        results[dataset.name] = entry
    return results


def _number(value) -> float | None:
    try:
        return None if value is None or np.isnan(value) else float(value)
    except TypeError:
        return None


def table_rows(results: dict, knn_k: str = "20") -> tuple[list[str], dict[str, dict[str, float]]]:
    """(columns, {dataset: {column: value}}) of every protocol's headline numbers, for ``markdown_table``.

    k-NN shows ``knn_k``'s top-1 and top-5 (the JSON keeps every k); k-means NMI, ARI and accuracy;
    copy detection the strong / jpeg / crops / overall mAP; revisited the Easy / Medium / Hard mAP;
    low-shot SVMs the mAP for each k.
    """
    columns, rows = [], {}

    def put(name, column, value):
        value = _number(value)
        if value is None:
            return
        if column not in columns:
            columns.append(column)
        rows.setdefault(name, {})[column] = value

    for name, entry in results.items():
        rows.setdefault(name, {})
        if "knn" in entry:
            k = knn_k if knn_k in entry["knn"] else next(iter(entry["knn"]))
            put(name, f"k-NN top-1 (k={k})", entry["knn"][k]["top1"])
            put(name, f"k-NN top-5 (k={k})", entry["knn"][k]["top5"])
        for key, label in (("nmi", "k-means NMI"), ("ari", "k-means ARI"), ("accuracy", "k-means acc")):
            put(name, label, entry.get("kmeans", {}).get(key))
        for key in ("strong", "jpegqual", "crops", "overall"):
            put(name, f"copydays mAP {key}", entry.get("copy_detection", {}).get(key))
        for setup in ("easy", "medium", "hard"):
            put(name, f"mAP {setup[0].upper()}", entry.get("revisited", {}).get(setup, {}).get("map"))
        for k, scores in entry.get("lowshot_svm", {}).items():
            put(name, f"SVM mAP k={k}", scores["map"])
    return columns, rows


def _cell(value: float | None, column: str) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if column in ("k-means NMI", "k-means ARI") else f"{value:.2f}"


def markdown_table(results: dict, knn_k: str = "20") -> str:
    """One Markdown table, datasets x metrics (``–`` where a protocol did not run, skipped datasets noted)."""
    columns, rows = table_rows(results, knn_k)
    lines = ["| dataset | " + " | ".join(columns) + " |", "|---|" + "---|" * len(columns)]
    for name, values in rows.items():
        if "skipped" in results[name]:
            cells = [f"skipped: {results[name]['skipped']}"] + [""] * max(len(columns) - 1, 0)
        else:
            cells = [_cell(values.get(c), c) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
