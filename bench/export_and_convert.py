"""Cost of the interoperability paths on a real-size model (ResNet-50, K = 65 536, 2048-2048-256 head).

Writes a checkpoint in the released PyTorch layout (random weights), then times
and prints: reading + converting it to a full CARP model, saving / loading that
model as .keras, exporting the teacher as a SavedModel, and serving throughput
of the SavedModel (uint8 224 px, in-graph preprocessing) against the Keras
encoder on the same preprocessed batch. Needs torch. TensorFlow backend.
Usage: python -m bench.export_and_convert [--batch 32 --rounds 3] [--k 65536 --hidden 2048 --bottleneck 256]
The figures are recorded in bench/results/export_and_convert.jsonl (bench.results).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ["KERAS_BACKEND"] = "tensorflow"
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import torch  # noqa: E402

from bench.released_layout import released_checkpoint  # noqa: E402
from bench.results import Recorder, add_record_arguments  # noqa: E402
from keras_carp import convert  # noqa: E402
from keras_carp.data import center_crop, normalize  # noqa: E402
from keras_carp.export import ServingPreprocessing, export_encoder  # noqa: E402


def timed(label: str, fn, figures: dict, key: str):
    """Run ``fn``, print its wall time under ``label`` and store it in ``figures[key]`` (seconds)."""
    start = time.perf_counter()
    result = fn()
    figures[key] = time.perf_counter() - start
    print(f"{label:<44} {figures[key]:8.2f} s")
    return result


def folder_size(path: Path) -> float:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file()) / 2**20


def main(argv: list[str] | None = None) -> None:
    """Time converting, saving, loading, exporting and serving one released-layout checkpoint; print and record."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--k", type=int, default=65536, help="prototypes of the checkpoint's head")
    parser.add_argument("--hidden", type=int, default=2048, help="the head's hidden width")
    parser.add_argument("--bottleneck", type=int, default=256, help="the head's bottleneck width")
    add_record_arguments(parser)
    args = parser.parse_args(argv)
    work, figures = Path(tempfile.mkdtemp(prefix="carp-bench-")), {}
    checkpoint, _, teacher = timed(
        "PyTorch: build + calibrate 2 networks",
        lambda: released_checkpoint(num_prototypes=args.k, hidden_dim=args.hidden, bottleneck_dim=args.bottleneck),
        figures,
        "build_torch_s",
    )
    pth = work / "carp_rn50.pth"
    torch.save(checkpoint, pth)
    figures["pth_mib"] = pth.stat().st_size / 2**20
    print(f"{'released-layout .pth':<44} {figures['pth_mib']:8.1f} MiB")
    model = timed("read + convert to a full CARP model", lambda: convert.convert_model(pth), figures, "convert_s")
    timed("save .keras", lambda: model.save(work / "carp.keras"), figures, "save_keras_s")
    figures["keras_file_mib"] = (work / "carp.keras").stat().st_size / 2**20
    print(f"{'.keras file':<44} {figures['keras_file_mib']:8.1f} MiB")
    timed("load .keras", lambda: keras.saving.load_model(work / "carp.keras"), figures, "load_keras_s")
    saved = timed(
        "export teacher SavedModel (+embedding, assignments)",
        lambda: export_encoder(
            model,
            work / "encoder",
            preprocessing=ServingPreprocessing(224),
            include_embedding=True,
            include_assignments=True,
        ),  # fmt: skip
        figures,
        "export_savedmodel_s",
    )
    figures["savedmodel_mib"] = folder_size(saved)
    print(f"{'SavedModel folder':<44} {figures['savedmodel_mib']:8.1f} MiB")

    served = tf.saved_model.load(str(saved)).signatures["serving_default"]
    images = np.random.default_rng(0).integers(0, 256, size=(args.batch, 256, 320, 3), dtype=np.uint8)
    preprocessed = normalize(center_crop(images, 224, 224 / 256))
    keras_forward = tf.function(lambda x: model.teacher_encoder(x, training=False))
    with torch.no_grad():
        torch_input = torch.from_numpy(np.asarray(preprocessed).transpose(0, 3, 1, 2).copy())
        torch_features = teacher.backbone(torch_input).numpy()
    difference = np.max(np.abs(served(images=tf.constant(images))["features"].numpy() - torch_features))
    print(f"{'max |SavedModel - PyTorch| features':<44} {difference:8.2e}")
    figures["max_abs_difference_vs_pytorch"] = float(difference)
    rates = {"SavedModel serving_default (uint8 in)": [], "Keras encoder (preprocessed in)": []}
    for _ in range(args.rounds):
        start = time.perf_counter()
        served(images=tf.constant(images))["features"].numpy()
        rates["SavedModel serving_default (uint8 in)"].append(args.batch / (time.perf_counter() - start))
        start = time.perf_counter()
        keras_forward(preprocessed).numpy()
        rates["Keras encoder (preprocessed in)"].append(args.batch / (time.perf_counter() - start))
    for (label, values), key in zip(rates.items(), ("savedmodel_images_per_s", "keras_encoder_images_per_s")):
        figures[key] = float(np.median(values[1:] or values))
        print(f"{label:<44} {figures[key]:8.1f} images/s (median, batch {args.batch})")
    config = {"backbone": "resnet50", "k": args.k, "hidden": args.hidden, "bottleneck": args.bottleneck,
              "batch": args.batch, "rounds": args.rounds, "image_size": 224}  # fmt: skip
    Recorder.from_args("export_and_convert", args).record(config, figures, backend="tensorflow")


if __name__ == "__main__":
    main()
