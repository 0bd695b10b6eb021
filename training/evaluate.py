"""carp-eval: score a frozen encoder with the standard protocols (k-NN, linear probe, k-means, few-shot, retrieval).

    carp-eval --model runs/fashion/model.keras --dataset fashion_mnist
    carp-eval --model pixels --dataset fashion_mnist --image-size 28      # the raw-pixel baseline
    carp-eval --model run/model.keras --transfer true --datasets voc07,copydays,roxford5k --data-dir ~/data

With ``--datasets`` (names of ``keras_carp.evaluation.transfer.TRANSFER_DATASETS``,
TFDS names, ``TFDS_NAME:TRAIN_SPLIT:TEST_SPLIT``, and ``voc07``, ``copydays``,
``roxford5k``, ``rparis6k``) or ``--transfer true`` (the released transfer k-NN list)
each dataset runs its own protocols and the results go out as one table,
datasets x metrics, in JSON and Markdown.

``--model`` is a ``.keras`` file (a CARP model: its teacher encoder by default,
or any Keras encoder), an exported TensorFlow SavedModel folder, or ``pixels``.
Features of the ``--train-split`` (memory bank / probe training set / gallery)
and ``--test-split`` are extracted once; results print as a table and go to
``--output`` as JSON.
"""

from __future__ import annotations

import argparse
import logging
import sys
from dataclasses import dataclass

from training import evaluation
from training.cli import CommandConfig, option, parse, quiet_startup_logs, refuse
from training.evaluation import SPECIAL_DATASETS

PROTOCOLS = ("knn", "linear", "kmeans", "fewshot", "retrieval")
TRANSFER_PROTOCOLS = ("knn", "kmeans")


@dataclass(kw_only=True)
class EvalConfig(CommandConfig):
    """carp-eval's options: one flag per field (``knn_k`` -> ``--knn-k``)."""

    model: str = option(help=".keras file, SavedModel folder, or 'pixels'")
    encoder: str = option("teacher", "the CARP model's encoder to score", ("teacher", "student"))
    dataset: str | None = option(None, "one dataset, every protocol: as carp-pretrain --dataset (default digits)")
    datasets: tuple[str, ...] = option(
        (),
        f"comma list for a multi-dataset table: transfer names, TFDS names, TFDS:TRAIN:TEST, "
        f"{', '.join(SPECIAL_DATASETS)}",
        separator=",",
        metavar="NAME,...",
    )
    transfer: bool = option(False, "add the released transfer k-NN list to --datasets")
    download: bool = option(True, "let TFDS download and prepare missing datasets")
    data_dir: str | None = option(None, "TFDS data_dir, or the folder of class-folder and local datasets")
    train_split: str = option("train", "memory bank / probe training set / gallery split")
    test_split: str = option("test", "query split")
    image_size: int | None = option(None, "image side (default: the run's global_size, else 224)")
    crop_fraction: float | None = option(None, "centre crop (224/256 for ImageNet; default: that from 128 px up)")
    protocols: tuple[str, ...] | None = option(
        None,
        f"comma list of {', '.join(PROTOCOLS)} (default all; with --datasets: each dataset's own, or a subset of "
        f"{', '.join(TRANSFER_PROTOCOLS)})",
        separator=",",
        metavar="NAME,...",
    )
    knn_k: tuple[int, ...] = option((10, 20, 100, 200), "neighbours of the weighted k-NN (a sweep)")
    knn_temperature: float = option(0.07, "temperature of the k-NN weights")
    linear_epochs: int = option(100, "epochs of the linear probe")
    fewshot_ways: int = option(5, "classes per few-shot episode")
    fewshot_shots: tuple[int, ...] = option((1, 5), "labelled images per class of a few-shot episode")
    fewshot_episodes: int = option(600, "few-shot episodes")
    svm_shots: tuple[int, ...] = option((1, 2, 4, 8, 16), "voc07 positives per class")
    svm_samples: int = option(5, "voc07 low-shot draws per k")
    svm_costs: tuple[float, ...] | None = option(None, "voc07 SVM cost sweep (default: the released one)")
    svm_folds: int = option(3, "voc07 cross-validation folds for the cost")
    copydays_dir: str | None = option(None, "Copydays folder (default: DATA_DIR/copydays)")
    copydays_distractors: str | None = option(None, "folder of extra database images")
    copydays_image_size: int = option(320, "Copydays image side")
    revisited_dir: str | None = option(None, "revisitop folder holding roxford5k/ and rparis6k/ (default: DATA_DIR)")
    revisited_image_size: int = option(224, "longer side of every revisited Oxford/Paris image")
    batch_size: int = option(256, "images per feature-extraction batch")
    cache_dir: str | None = option(None, "keep extracted features here (.npz)")
    output: str | None = option(None, "JSON results (default: beside the model); with --datasets, a .md table too")
    seed: int = option(0, "seed of the linear probe, k-means and the few-shot episodes")

    @property
    def many(self) -> bool:
        """A table over datasets (``--datasets`` or ``--transfer``), not one dataset with every protocol."""
        return bool(self.datasets) or self.transfer

    def validate(self) -> None:
        self.positive("image_size", "knn_k", "knn_temperature", "linear_epochs", "fewshot_ways", "fewshot_shots",
                      "fewshot_episodes", "svm_shots", "svm_samples", "svm_costs", "copydays_image_size",
                      "revisited_image_size", "batch_size")  # fmt: skip
        self.require(self.svm_folds >= 2, f"--svm-folds must be >= 2, got {self.svm_folds}")
        self.fraction("crop_fraction")
        self.require(self.knn_k != (), "--knn-k needs at least one k")
        self.require(
            not (self.many and self.dataset is not None),
            "give either --dataset (one dataset, every protocol) or --datasets/--transfer (a table)",
        )
        allowed = TRANSFER_PROTOCOLS if self.many else PROTOCOLS
        unknown = sorted(set(self.protocols or ()) - set(allowed))
        self.require(not unknown, f"unknown protocols {unknown}; choose from {', '.join(allowed)}")
        self.require(self.protocols != (), "--protocols needs at least one protocol")

    def resolved(self) -> argparse.Namespace:
        """The options as ``training.evaluation`` reads them: lists, the transfer list added, names checked.

        Unknown dataset names raise ValueError; this imports keras_carp (and so Keras) for ``--datasets``.
        """
        values = {key: list(value) if isinstance(value, tuple) else value for key, value in vars(self).items()}
        args = argparse.Namespace(**values)
        args.named_datasets = list(self.datasets)
        if self.transfer:
            from keras_carp.evaluation.transfer import TRANSFER_LIST

            args.datasets = list(dict.fromkeys(list(TRANSFER_LIST) + args.datasets))
        args.many = self.many
        args.dataset = self.dataset or "digits"
        if self.protocols is None and not self.many:
            args.protocols = list(PROTOCOLS)
        if self.many:
            from keras_carp.evaluation.transfer import resolve_datasets

            resolve_datasets([d for d in args.datasets if d not in SPECIAL_DATASETS])
        return args


def parse_config(argv: list[str] | None = None) -> EvalConfig:
    """carp-eval's command line as an ``EvalConfig``; bad values stop here in one line (exit status 2)."""
    return parse(EvalConfig, argv, "carp-eval", __doc__.splitlines()[0])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line resolved as ``training.evaluation`` reads it (``EvalConfig.resolved``)."""
    config = parse_config(argv)
    try:
        return config.resolved()
    except ValueError as error:
        refuse("carp-eval", error)


def evaluate(config: EvalConfig) -> dict:
    """Score ``config.model``: every protocol on one dataset, or a table over ``config.datasets``; the results."""
    return _evaluate(config.resolved())


def _evaluate(args: argparse.Namespace) -> dict:
    return evaluation.evaluate_many(args) if args.many else evaluation.evaluate(args)


def format_table(results: dict) -> str:
    rows = []
    for k, scores in results.get("knn", {}).items():
        rows.append((f"k-NN k={k}", f"top-1 {scores['top1']:.2f}", f"top-5 {scores['top5']:.2f}"))
    if "linear" in results:
        rows.append(
            ("linear probe", f"top-1 {results['linear']['top1']:.2f}", f"top-5 {results['linear']['top5']:.2f}")
        )
    if "kmeans" in results:
        m = results["kmeans"]
        rows.append(
            (
                "k-means",
                f"NMI {m['nmi']:.3f}  AMI {m['adjusted_nmi']:.3f}",
                f"ARI {m['ari']:.3f}  acc {m['accuracy']:.2f}",
            )
        )
    for name, m in results.get("fewshot", {}).items():
        rows.append((f"few-shot {name}", f"{m['accuracy']:.2f} ± {m['ci95']:.2f}", f"{m['episodes']} episodes"))
    if "retrieval" in results:
        m = results["retrieval"]
        rows.append(("retrieval", f"mAP {m['map']:.2f}", f"P@1 {m['precision_at_1']:.2f}"))
    width = max(len(r[0]) for r in rows) if rows else 0
    return "\n".join(f"  {a:<{width}}  {b:<28} {c}" for a, b, c in rows)


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    quiet_startup_logs()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        args = config.resolved()
    except ValueError as error:
        refuse("carp-eval", error)
    results = _evaluate(args)
    if args.many:
        print(f"\n{args.model} ({args.encoder} encoder), {len(results['datasets'])} datasets:")
        print(results["markdown"])
        print(f"results in {results['output']} and {results['markdown_output']}")
        return 0
    print(f"\n{args.model} ({args.encoder} encoder) on {args.dataset} {args.test_split}:")
    print(format_table(results))
    print(f"results in {results['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
