"""carp-visualize: pictures of a trained run, as PNG files.

    carp-visualize runs/fashion                 # -> runs/fashion/pictures/{prototypes,training_curves}.png

``prototypes.png`` is a contact sheet: one row per most-used prototype of the
teacher (on ``--split`` of the run's dataset), its highest-scoring images, with
the prototype's share of the images and, when labels exist, the majority
class's share of the row. ``training_curves.png`` plots every column of the
run's ``training_log.csv`` (loss terms, learning rate, teacher momentum,
prototype usage, k-NN accuracy).
"""

from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

from training.cli import CommandConfig, option, parse, quiet_startup_logs
from training.config import run_config_from_json


@dataclass(kw_only=True)
class VisualizeConfig(CommandConfig):
    """carp-visualize's options: one flag (or positional argument) per field."""

    run: str = option(help="run directory of carp-pretrain (config.json, model.keras, training_log.csv)",
                      positional=True)  # fmt: skip
    split: str | None = option(None, "images to group (default: the run's eval split, else its training split)")
    prototypes: int = option(8, "rows: the most used prototypes")
    images_per_prototype: int = option(10, "images shown per prototype (its highest-scoring ones)")
    max_images: int = option(2000, "images assigned (from the split's start)")
    output: str | None = option(None, "folder for the PNG files (default: RUN/pictures)")

    def validate(self) -> None:
        self.positive("prototypes", "images_per_prototype", "max_images")


def parse_config(argv: list[str] | None = None) -> VisualizeConfig:
    """carp-visualize's command line as a ``VisualizeConfig``; bad values stop here in one line (exit status 2)."""
    return parse(VisualizeConfig, argv, "carp-visualize", __doc__.splitlines()[0])


parse_args = parse_config  # earlier name


def read_log(path: Path) -> dict[str, list[float]]:
    """Columns of a CSVLogger file as (epoch, value) pairs; empty, "NA" and NaN cells are skipped."""
    columns: dict[str, list[tuple[int, float]]] = {}
    with open(path, newline="") as handle:
        for row in csv.DictReader(handle):
            epoch = int(row["epoch"]) + 1
            for key, value in row.items():
                try:
                    number = float(value)
                except (TypeError, ValueError):
                    continue
                if key != "epoch" and math.isfinite(number):
                    columns.setdefault(key, []).append((epoch, number))
    return columns


def plot_curves(columns: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [
        ("loss terms", ["loss", "consistency", "entropy"]),
        ("learning rate", ["learning_rate"]),
        ("teacher momentum", ["teacher_momentum"]),
        ("prototypes used per batch", ["prototypes_used"]),
        ("probe-set prototype usage", ["prototype_usage", "largest_assignment_share"]),
        ("k-NN accuracy (%)", ["knn_top1", "knn_top5"]),
    ]
    panels = [(title, [k for k in keys if k in columns]) for title, keys in panels]
    panels = [(title, keys) for title, keys in panels if keys]
    figure, axes = plt.subplots(1, len(panels), figsize=(3.6 * len(panels), 3.0), squeeze=False)
    for axis, (title, keys) in zip(axes[0], panels):
        for key in keys:
            epochs, values = zip(*columns[key])
            axis.plot(epochs, values, marker="o", markersize=3, label=key)
        axis.set_title(title, fontsize=10)
        axis.set_xlabel("epoch")
        axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def contact_sheet(pixels, groups: list[dict], labels, class_names, total: int, path: Path) -> None:
    """One row per prototype group: the images (float [0, 1]) with a caption."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    columns = max(len(g["indices"]) for g in groups)
    figure, axes = plt.subplots(len(groups), columns, figsize=(1.1 * columns + 1.8, 1.15 * len(groups)),
                                squeeze=False)  # fmt: skip
    for row, group in zip(axes, groups):
        caption = f"#{group['prototype']}\n{100 * group['count'] / total:.1f}% of images"
        if labels is not None:
            members = labels[group["indices"]]
            values, counts = np.unique(members, return_counts=True)
            name = class_names[values[np.argmax(counts)]] if class_names else str(values[np.argmax(counts)])
            caption += f"\n{counts.max()}/{len(members)} {name}"
        for column, axis in enumerate(row):
            axis.axis("off")
            if column < len(group["indices"]):
                axis.imshow(np.clip(pixels[group["indices"][column]], 0, 1))
        row[0].text(-0.15, 0.5, caption, transform=row[0].transAxes, ha="right", va="center", fontsize=7)
    figure.subplots_adjust(left=0.16, right=0.99, top=0.99, bottom=0.01, wspace=0.05, hspace=0.08)
    figure.savefig(path, dpi=110)
    plt.close(figure)


def visualize(args: VisualizeConfig) -> list[Path]:
    """Draw the pictures of the run directory ``args.run``; the files written."""
    run = Path(args.run)
    for name in ("config.json", "model.keras"):
        if not (run / name).is_file():
            raise SystemExit(f"carp-visualize: {run} has no {name}; pass a carp-pretrain run directory.")
    output = Path(args.output) if args.output else run / "pictures"
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / ".write-test").write_text("ok")
        (output / ".write-test").unlink()
    except OSError as error:
        raise SystemExit(f"carp-visualize: cannot write to {output}: {error}") from None

    import keras
    import numpy as np

    import keras_carp  # noqa: F401  (registers the classes the .keras file names)
    from keras_carp.data import IMAGENET_MEAN, IMAGENET_STD, eval_dataset, load_source
    from keras_carp.evaluation import prototype_assignments, prototype_groups

    config = run_config_from_json((run / "config.json").read_text())
    split = args.split or config.data.eval_split or config.data.split
    try:
        source = load_source(config.data.dataset, split, config.data.data_dir, config.data.image_size,
                             download=False, seed=config.run.seed)  # fmt: skip
    except (ValueError, FileNotFoundError, NotADirectoryError) as error:
        raise SystemExit(f"carp-visualize: {error}") from None
    size, crop_fraction = config.views.global_size, config.evaluation.eval_crop_fraction
    images, labels = [], []
    for batch in eval_dataset(source, size, batch_size=256, crop_fraction=crop_fraction):
        batch_images = batch[0] if isinstance(batch, tuple) else batch
        images.append(np.asarray(batch_images))
        if isinstance(batch, tuple):
            labels.append(np.asarray(batch[1]))
        if sum(len(x) for x in images) >= args.max_images:
            break
    images = np.concatenate(images)[: args.max_images]
    labels = np.concatenate(labels)[: args.max_images] if labels else None

    model = keras.saving.load_model(run / "model.keras", compile=False)
    assignments, scores = prototype_assignments(model, images)
    groups = prototype_groups(assignments, scores, args.prototypes, args.images_per_prototype)
    pixels = images * np.asarray(IMAGENET_STD) + np.asarray(IMAGENET_MEAN)
    contact_sheet(pixels, groups, labels, source.class_names, len(images), output / "prototypes.png")
    written = [output / "prototypes.png"]
    if (run / "training_log.csv").is_file():
        plot_curves(read_log(run / "training_log.csv"), output / "training_curves.png")
        written.append(output / "training_curves.png")
    (output / "prototypes.json").write_text(json.dumps(
        {"split": split, "images": int(len(images)), "distinct_prototypes": int(len(np.unique(assignments))),
         "groups": groups}, indent=2))  # fmt: skip
    print(f"{len(np.unique(assignments))} distinct prototypes over {len(images)} images of {source.name}")
    for path in written:
        print(f"wrote {path}")
    return written


def main(argv: list[str] | None = None) -> int:
    args = parse_config(argv)
    quiet_startup_logs()
    visualize(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
