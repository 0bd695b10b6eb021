"""carp-eval: score a frozen encoder with the standard protocols (k-NN, linear probe, k-means, few-shot, retrieval).

    carp-eval --model runs/fashion/model.keras --dataset fashion_mnist
    carp-eval --model pixels --dataset fashion_mnist --image-size 28      # the raw-pixel baseline

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

from training.evaluation import evaluate

PROTOCOLS = ("knn", "linear", "kmeans", "fewshot", "retrieval")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="carp-eval", description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help=".keras file, SavedModel folder, or 'pixels'")
    parser.add_argument("--encoder", choices=("teacher", "student"), default="teacher")
    parser.add_argument("--dataset", default="digits", help="as carp-pretrain --dataset")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--train-split", default="train")
    parser.add_argument("--test-split", default="test")
    parser.add_argument("--image-size", type=int, default=None, help="default: the run's global_size, else 224")
    parser.add_argument("--crop-fraction", type=float, default=None, help="centre crop (224/256 for ImageNet)")
    parser.add_argument("--protocols", default=",".join(PROTOCOLS), help=f"comma list of {', '.join(PROTOCOLS)}")
    parser.add_argument("--knn-k", type=int, nargs="+", default=[10, 20, 100, 200])
    parser.add_argument("--knn-temperature", type=float, default=0.07)
    parser.add_argument("--linear-epochs", type=int, default=100)
    parser.add_argument("--fewshot-ways", type=int, default=5)
    parser.add_argument("--fewshot-shots", type=int, nargs="+", default=[1, 5])
    parser.add_argument("--fewshot-episodes", type=int, default=600)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--cache-dir", default=None, help="keep extracted features here (.npz)")
    parser.add_argument("--output", default=None, help="JSON results (default: next to the model)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    args.protocols = [p.strip() for p in args.protocols.split(",") if p.strip()]
    unknown = sorted(set(args.protocols) - set(PROTOCOLS))
    if unknown:
        parser.error(f"unknown protocols {unknown}; choose from {', '.join(PROTOCOLS)}")
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
    results = evaluate(args)
    print(f"\n{args.model} ({args.encoder} encoder) on {args.dataset} {args.test_split}:")
    print(format_table(results))
    print(f"results in {results['output']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
