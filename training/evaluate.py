"""carp-eval: score a frozen encoder with the standard protocols (k-NN, linear probe, k-means, few-shot, retrieval).

    carp-eval --model runs/fashion/model.keras --dataset fashion_mnist
    carp-eval --model pixels --dataset fashion_mnist --image-size 28      # the raw-pixel baseline
    carp-eval --model run/model.keras --transfer --datasets voc07,copydays,roxford5k --data-dir ~/data

With ``--datasets`` (names of ``keras_carp.evaluation.transfer.TRANSFER_DATASETS``,
TFDS names, ``TFDS_NAME:TRAIN_SPLIT:TEST_SPLIT``, and ``voc07``, ``copydays``,
``roxford5k``, ``rparis6k``) or ``--transfer`` (the released transfer k-NN list)
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

from training.evaluation import SPECIAL_DATASETS, evaluate, evaluate_many

PROTOCOLS = ("knn", "linear", "kmeans", "fewshot", "retrieval")
TRANSFER_PROTOCOLS = ("knn", "kmeans")


def _comma_list(text: str | None) -> list[str]:
    return [item.strip() for item in (text or "").split(",") if item.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="carp-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=".keras file, SavedModel folder, or 'pixels'")
    parser.add_argument("--encoder", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--dataset", default=None, help="as carp-pretrain --dataset (default digits)")
    parser.add_argument("--datasets", default=None,
                        help=f"comma list for a multi-dataset table: transfer names, TFDS names, "
                             f"TFDS:TRAIN:TEST, {', '.join(SPECIAL_DATASETS)}")  # fmt: skip
    parser.add_argument("--transfer", action="store_true", help="add the released transfer k-NN list to --datasets")
    parser.add_argument("--download", choices=("true", "false"), default="true",
                        help="let TFDS download and prepare missing datasets")  # fmt: skip
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-size", type=int, default=None, help="default: the run's global_size, else 224")
    parser.add_argument("--crop-fraction", type=float, default=None, help="centre crop (224/256 for ImageNet)")
    parser.add_argument("--protocols", default=None,
                        help=f"comma list of {', '.join(PROTOCOLS)} (default all; with --datasets: each "
                             f"dataset's own, or a subset of {', '.join(TRANSFER_PROTOCOLS)})")  # fmt: skip
    parser.add_argument("--knn-k", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument("--fewshot-ways", type=int, default=5)
    parser.add_argument("--fewshot-shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--fewshot-episodes", type=int, default=600)
    parser.add_argument("--svm-shots", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="voc07 positives/class")
    parser.add_argument("--svm-samples", type=int, default=5, help="voc07 low-shot draws per k")
    parser.add_argument("--svm-costs", type=float, nargs="+", default=None, help="voc07 SVM cost sweep")
    parser.add_argument("--svm-folds", type=int, default=3, help="voc07 cross-validation folds for the cost")
    parser.add_argument("--copydays-dir", default=None, help="Copydays folder (default DATA_DIR/copydays)")
    parser.add_argument("--copydays-distractors", default=None, help="folder of extra database images")
    parser.add_argument("--copydays-image-size", type=int, default=320)
    parser.add_argument("--revisited-dir", default=None,
                        help="revisitop folder holding roxford5k/ and rparis6k/ (default DATA_DIR)")  # fmt: skip
    parser.add_argument("--revisited-image-size", type=int, default=224, help="longer side of every image")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cache-dir", default=None, help="keep extracted features here (.npz)")
    parser.add_argument("--output", default=None,
                        help="JSON results (default: beside the model); with --datasets, a .md table too")  # fmt: skip
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.download = args.download == "true"
    args.datasets = args.named_datasets = _comma_list(args.datasets)
    if args.transfer:
        from keras_carp.evaluation.transfer import TRANSFER_LIST

        args.datasets = list(dict.fromkeys(list(TRANSFER_LIST) + args.datasets))
    args.many = bool(args.datasets)
    if args.many and args.dataset is not None:
        parser.error("give either --dataset (one dataset, every protocol) or --datasets/--transfer (a table)")
    args.dataset = args.dataset or "digits"
    allowed = TRANSFER_PROTOCOLS if args.many else PROTOCOLS
    explicit = args.protocols is not None
    args.protocols = _comma_list(args.protocols) if explicit else (None if args.many else list(PROTOCOLS))
    unknown = sorted(set(args.protocols or ()) - set(allowed))
    if unknown:
        parser.error(f"unknown protocols {unknown}; choose from {', '.join(allowed)}")
    if args.many:
        from keras_carp.evaluation.transfer import resolve_datasets

        try:
            resolve_datasets([d for d in args.datasets if d not in SPECIAL_DATASETS])
        except ValueError as error:
            parser.error(str(error))
    return args


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
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    if args.many:
        results = evaluate_many(args)
        print(f"\n{args.model} ({args.encoder} encoder), {len(results['datasets'])} datasets:")
        print(results["markdown"])
        print(f"results in {results['output']} and {results['markdown_output']}")
        return 0
    results = evaluate(args)
    print(f"\n{args.model} ({args.encoder} encoder) on {args.dataset} {args.test_split}:")
    print(format_table(results))
    print(f"results in {results['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
