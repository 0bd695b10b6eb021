"""carp-pretrain: pretrain a CARP encoder from a preset, then score it with weighted k-NN.

With no arguments it runs the ``digits`` preset: a small ResNet on
scikit-learn's bundled digits, a few minutes on 2 CPU cores. Every preset field
can be overridden on the command line (``--epochs 5``, ``--block-size 64``...);
the resolved configuration is saved in the run directory.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

PRESETS_DIR = Path(__file__).parent / "presets"


def available_presets() -> list[str]:
    return sorted(p.stem for p in PRESETS_DIR.glob("*.json"))


def load_preset(name: str) -> dict:
    path = PRESETS_DIR / f"{name}.json"
    if not path.is_file():
        raise SystemExit(f"carp-pretrain: unknown preset {name!r}; available: {', '.join(available_presets())}.")
    return json.loads(path.read_text())


def _flag(key: str) -> str:
    return "--" + key.replace("_", "-")


def parse_config(argv: list[str] | None = None) -> dict:
    """The preset named by --preset, with every field overridable by its own flag."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="digits")
    known, _ = pre.parse_known_args(argv)
    preset = load_preset(known.preset)

    parser = argparse.ArgumentParser(prog="carp-pretrain", description=__doc__.splitlines()[0], parents=[pre])
    parser.add_argument("--output-dir", default=None, help="run directory (default: runs/<preset>-<time>)")
    for key, value in preset.items():
        if key == "description":
            continue
        if isinstance(value, bool):
            parser.add_argument(_flag(key), type=lambda s: s.lower() in ("1", "true", "yes"), default=value)
        elif isinstance(value, list):
            parser.add_argument(_flag(key), type=type(value[0]), nargs=len(value), default=value)
        else:
            parser.add_argument(_flag(key), type=type(value), default=value, help=f"(preset: {value})")
    args = vars(parser.parse_args(argv))
    args["description"] = preset.get("description", "")
    return args


def prepare_output_dir(path: str | None, preset: str) -> Path:
    """Create the run directory and prove it is writable before any training."""
    out = Path(path) if path else Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as error:
        raise SystemExit(f"carp-pretrain: cannot write to the output directory {out}: {error}") from None
    return out


def run(config: dict) -> dict:
    """Pretrain, evaluate, save; returns the summary written to summary.json."""
    import keras

    import keras_carp
    from keras_carp.data import MultiCropAugmentation, load_digits, multicrop_dataset, normalize
    from keras_carp.evaluation import extract_features, weighted_knn

    out = prepare_output_dir(config["output_dir"], config["preset"])
    if config["dataset"] != "digits":
        raise SystemExit(f"carp-pretrain: dataset {config['dataset']!r} is not available yet (digits is).")
    (out / "config.json").write_text(json.dumps(config, indent=2))
    keras.utils.set_random_seed(config["seed"])

    augmentation = MultiCropAugmentation(
        global_size=config["global_size"],
        local_size=config["local_size"],
        num_local_crops=config["num_local_crops"],
        global_scale=tuple(config["global_scale"]),
        local_scale=tuple(config["local_scale"]),
        blur_sigma=tuple(config["blur_sigma"]),
    )
    head = keras_carp.CARPHead(
        num_prototypes=config["num_prototypes"],
        hidden_dim=config["hidden_dim"],
        bottleneck_dim=config["bottleneck_dim"],
    )
    (x_train, y_train), (x_test, y_test) = load_digits(config["image_size"], seed=config["seed"])
    dataset = multicrop_dataset(x_train, augmentation, config["batch_size"], labels=y_train, seed=config["seed"])
    steps_per_epoch = len(x_train) // config["batch_size"]
    total_steps = steps_per_epoch * config["epochs"]
    model = keras_carp.CARP(
        keras_carp.build_encoder(config["backbone"]),
        head,
        block_size=config["block_size"],
        partition=config["partition"],
        seed=config["seed"],
    )

    def knn(encoder) -> dict:
        train = extract_features(encoder, x_train, preprocess=normalize)
        test = extract_features(encoder, x_test, preprocess=normalize)
        return weighted_knn(train, y_train, test, y_test, k=config["knn_k"], temperature=config["knn_temperature"])

    random_init = knn(model.teacher_encoder)
    schedule = keras_carp.WarmupCosineDecay(
        base_learning_rate=config["base_learning_rate"],
        global_batch_size=config["batch_size"],
        total_steps=total_steps,
        warmup_steps=config["warmup_epochs"] * steps_per_epoch,
        min_learning_rate=config["min_learning_rate"],
    )
    model.compile(optimizer=keras_carp.LARS(schedule, weight_decay=config["weight_decay"]))
    started = time.time()
    history = model.fit(
        dataset,
        epochs=config["epochs"],
        callbacks=[
            keras_carp.TeacherEMA(config["base_teacher_momentum"], config["final_teacher_momentum"]),
            keras.callbacks.CSVLogger(str(out / "training_log.csv")),
        ],
    )
    train_seconds = time.time() - started
    learned = knn(model.teacher_encoder)
    model.save(out / "model.keras")
    summary = {
        "preset": config["preset"],
        "backend": keras.backend.backend(),
        "knn_top1": learned["top1"],
        "knn_top5": learned["top5"],
        "knn_top1_random_init": random_init["top1"],
        "knn_top5_random_init": random_init["top5"],
        "knn_k": config["knn_k"],
        "train_seconds": round(train_seconds, 1),
        "final_loss": float(history.history["loss"][-1]),
        "output_dir": str(out),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    config = parse_config(argv)
    summary = run(config)
    k = summary["knn_k"]
    print(f"\nweighted k-NN (k={k}, T={config['knn_temperature']}) top-1 on the {config['dataset']} test split:")
    print(f"  CARP encoder (teacher):     {summary['knn_top1']:.2f}%")
    print(f"  same encoder, random init:  {summary['knn_top1_random_init']:.2f}%")
    print(f"summary and model.keras in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
