import json
import os
import stat

import numpy as np
import pytest

from training import pretrain

pytestmark = pytest.mark.slow  # the command line end to end: `pytest -m slow`

TINY = [
    "--epochs",
    "1",
    "--batch-size",
    "64",
    "--num-prototypes",
    "64",
    "--block-size",
    "16",
    "--hidden-dim",
    "32",
    "--bottleneck-dim",
    "16",
    "--num-local-crops",
    "0",
    "--image-size",
    "16",
    "--global-size",
    "16",
    "--warmup-epochs",
    "0",
    "--export",  # the SavedModel export of a run is tested in test_runs.py and by the notebooks
    "false",
]


def test_carp_pretrain_writes_summary_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "knn_top5"):
        assert 0.0 <= summary[key] <= 100.0
    assert (out / "model.keras").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["model"]["block_size"] == 16
    assert "random init" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_fails_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(SystemExit, match="cannot write"):
        pretrain.main(TINY + ["--output-dir", str(locked / "run")])


def test_output_path_that_is_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write"):
        pretrain.main(TINY + ["--output-dir", str(blocker / "run")])


def _image_folder(root, rng):
    from PIL import Image

    for split, count in (("train", 40), ("test", 10)):
        for label in ("red", "blue"):
            (root / split / label).mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (20, 20, 3), dtype=np.uint8)
                pixels[..., 0 if label == "red" else 2] += 170
                Image.fromarray(pixels).save(root / split / label / f"{i}.png")
    (root / "train" / "red" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n")


def test_carp_pretrain_on_an_image_folder_with_splits(tmp_path, capsys):
    _image_folder(tmp_path / "data", np.random.default_rng(0))
    out = tmp_path / "run"
    args = ["--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--output-dir", str(out)]
    assert pretrain.main(TINY + ["--batch-size", "16"] + args) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_images"] == 80 and summary["dataset"].endswith("train")
    assert 0.0 <= summary["knn_top1"] <= 100.0
    assert "skipped_images" in (out / "training_log.csv").read_text().splitlines()[0]


@pytest.mark.parametrize(
    "args, message",
    [
        (["--dataset", "no_such_dataset_anywhere"], "Unknown TFDS dataset"),
        (["--dataset", "folder"], "needs data_dir"),
        (["--dataset", "folder", "--data-dir", "/nonexistent/images"], "does not exist"),
        (["--dataset", "fashion_mnist", "--data-dir", "/nonexistent/idx", "--download", "false"], "Fashion-MNIST"),
        (["--dataset", "digits", "--global-size", "64"], "smaller than 64 px"),
        (["--warmup-epochs", "3"], "lower --warmup-epochs"),
        (["--block-size", "48"], "block_size"),
    ],
)
def test_data_problems_stop_before_training_and_leave_nothing_behind(tmp_path, args, message):
    with pytest.raises(SystemExit, match=message):
        pretrain.main(TINY + args + ["--output-dir", str(tmp_path / "run")])
    assert not (tmp_path / "run").exists()


def test_carp_eval_scores_a_trained_checkpoint_and_raw_pixels(tmp_path, capsys):
    from training import evaluate

    run = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(run)]) == 0
    quick = ["--dataset", "digits", "--linear-epochs", "2", "--fewshot-episodes", "20", "--knn-k", "5", "20"]
    assert evaluate.main(["--model", str(run / "model.keras")] + quick) == 0
    results = json.loads((run / "eval.json").read_text())
    assert results["image_size"] == 16 and results["feature_dim"] == 128  # from the run's config.json
    summary = json.loads((run / "summary.json").read_text())
    assert results["knn"]["20"]["top1"] == pytest.approx(summary["knn_top1"])  # same protocol as carp-pretrain
    for key in ("linear", "kmeans", "fewshot", "retrieval"):
        assert key in results
    assert 0 <= results["kmeans"]["nmi"] <= 1 and 0 <= results["retrieval"]["map"] <= 100
    pixels = tmp_path / "pixels.json"
    assert evaluate.main(["--model", "pixels", "--image-size", "16", "--protocols", "knn", "--output", str(pixels)]
                         + quick[:2] + ["--knn-k", "20"]) == 0  # fmt: skip
    assert json.loads(pixels.read_text())["feature_dim"] == 16 * 16 * 3
    assert "k-NN k=20" in capsys.readouterr().out


def test_carp_eval_reports_bad_input_before_any_work(tmp_path):
    from training import evaluate

    with pytest.raises(SystemExit, match="no model at"):
        evaluate.main(["--model", str(tmp_path / "missing.keras"), "--output", str(tmp_path / "r.json")])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "pixels", "--protocols", "knn,magic"])


def test_carp_eval_loads_an_exported_savedmodel_encoder(tmp_path):
    import keras

    from keras_carp import build_encoder
    from training import evaluation

    encoder = build_encoder("resnet_tiny")
    encoder.export(str(tmp_path / "encoder"), verbose=False)
    loaded = evaluation.load_encoder(str(tmp_path / "encoder"))
    images = np.random.default_rng(0).normal(size=(2, 16, 16, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(encoder(images, training=False))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(loaded(images)), expected, atol=1e-5)


def test_carp_export_ships_the_teacher_of_a_run_and_carp_eval_scores_it(tmp_path, capsys):
    import keras

    from training import evaluation, export

    run = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(run), "--knn-every", "0"]) == 0
    export.main([str(run / "model.keras"), str(tmp_path / "encoder"), "--assignments", "true"])
    assert "teacher encoder, 128-d features, outputs ['features', 'assignments'], centre crop 16 px" in (
        capsys.readouterr().out
    )  # image size from the run's config.json
    served = evaluation.load_encoder(str(tmp_path / "encoder"))  # the serve_normalized endpoint
    model = keras.saving.load_model(run / "model.keras", compile=False)
    images = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(model.teacher_encoder(images, training=False))
    assert np.max(np.abs(keras.ops.convert_to_numpy(served(images)) - expected)) <= 1e-5

    with pytest.raises(SystemExit, match="already exists"):
        export.main([str(run / "model.keras"), str(tmp_path / "encoder")])
    with pytest.raises(SystemExit, match="no model at"):
        export.main([str(tmp_path / "missing.keras"), str(tmp_path / "other")])
    with pytest.raises(SystemExit, match="need a CARP model"):
        model.teacher_encoder.save(tmp_path / "encoder_only.keras")
        export.main([str(tmp_path / "encoder_only.keras"), str(tmp_path / "third"), "--embedding", "true"])


def test_carp_pretrain_strategies_on_this_host(tmp_path, capsys):
    out = tmp_path / "mirrored"
    assert pretrain.main(TINY + ["--output-dir", str(out), "--strategy", "mirrored", "--knn-every", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distribution"] == "MirroredStrategy with 1 replica(s)"
    assert np.isfinite(summary["final_loss"])
    assert "MirroredStrategy with 1 replica(s), global batch 64" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="No TPU found"):
        pretrain.main(TINY + ["--output-dir", str(tmp_path / "tpu"), "--strategy", "tpu"])
    assert not (tmp_path / "tpu" / "config.json").exists()


def test_per_host_input_path_with_a_single_worker(tmp_path):
    """--strategy multiworker feeds through distribute_datasets_from_function (the TPU input path) end to end."""
    import subprocess
    import sys

    out = tmp_path / "multiworker"
    command = [sys.executable, "-m", "training.pretrain", *TINY, "--knn-every", "0", "--strategy", "multiworker",
               "--output-dir", str(out)]  # fmt: skip
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["distribution"] == "MultiWorkerMirroredStrategy with 1 replica(s)"
    assert np.isfinite(summary["final_loss"]) and 0 <= summary["knn_top1"] <= 100


def test_imagenet_preset_without_the_archives_stops_before_training(tmp_path):
    with pytest.raises(SystemExit, match="ILSVRC2012_img_train.tar"):
        pretrain.main(["--preset", "imagenet_resnet50_200ep", "--data-dir", str(tmp_path / "tfds"),
                       "--output-dir", str(tmp_path / "run"), "--strategy", "none"])  # fmt: skip
    assert not (tmp_path / "run").exists()


def test_carp_visualize_draws_prototype_groups_and_curves(tmp_path, capsys):
    from PIL import Image

    from training import visualize

    run = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(run), "--knn-every", "1"]) == 0
    assert visualize.main([str(run), "--prototypes", "4", "--images-per-prototype", "5", "--max-images", "300"]) == 0
    for name in ("prototypes.png", "training_curves.png"):
        with Image.open(run / "pictures" / name) as picture:
            assert picture.format == "PNG" and picture.size[0] > 200 and picture.size[1] > 100
    groups = json.loads((run / "pictures" / "prototypes.json").read_text())
    assert groups["images"] == 300 and 1 <= len(groups["groups"]) <= 4
    assert all(len(g["indices"]) <= 5 and g["count"] >= len(g["indices"]) for g in groups["groups"])
    assert "wrote" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="no config.json"):
        visualize.main([str(tmp_path)])


def test_carp_pretrain_trains_in_float16_with_loss_scaling(tmp_path):
    import keras

    out = tmp_path / "fp16"
    assert pretrain.main(TINY + ["--output-dir", str(out), "--precision", "mixed_float16", "--knn-every", "0"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["precision"] == "mixed_float16" and np.isfinite(summary["final_loss"])
    assert json.loads((out / "config.json").read_text())["run"]["precision"] == "mixed_float16"
    assert keras.config.dtype_policy().name == "float32"  # the run's policy does not outlive it


def test_carp_pretrain_trains_a_vit_with_the_adamw_recipe(tmp_path):
    """--backbone vit_tiny_4 with AdamW, a weight-decay cosine, clipping and the prototypes frozen for epoch 1."""
    import keras

    out = tmp_path / "vit"
    vit = ["--backbone", "vit_tiny_4", "--num-local-crops", "2", "--local-size", "8", "--optimizer", "adamw",
           "--base-learning-rate", "0.0005", "--min-learning-rate", "1e-5", "--weight-decay", "0.04",
           "--weight-decay-end", "0.4", "--clip-norm", "3", "--freeze-prototypes-epochs", "1", "--epochs", "2",
           "--eval-split", "", "--output-dir", str(out)]  # fmt: skip
    assert pretrain.main(TINY + vit) == 0
    model = keras.saving.load_model(out / "model.keras")
    assert model.student_encoder.get_layer("any_resolution_vit") is not None
    optimizer = model.optimizer
    assert optimizer.frozen_steps == 21 and optimizer.clipnorm == 3.0  # digits: 1347 images, 64 a batch
    assert int(keras.ops.convert_to_numpy(optimizer.iterations)) == 42
    assert float(optimizer.weight_decay_at(42)) == pytest.approx(0.4)
    summary = json.loads((out / "summary.json").read_text())
    assert np.isfinite(summary["final_loss"])


def test_carp_pretrain_logs_an_online_linear_probe(tmp_path):
    """--online-probe-every 5: the probe's accuracies reach the CSV log beside the loss."""
    out = tmp_path / "probe"
    assert pretrain.main(TINY + ["--online-probe-every", "5", "--output-dir", str(out)]) == 0
    lines = (out / "training_log.csv").read_text().splitlines()
    row = dict(zip(lines[0].split(","), lines[1].split(",")))
    assert 10 < float(row["online_probe_top1"]) <= 100  # 10 classes: above chance after 4 probe steps
    assert 0 <= float(row["online_probe_test_top1"]) <= 100
    with pytest.raises(SystemExit, match="--online-probe-every needs labels"):
        pretrain.main(TINY + ["--online-probe-every", "5", "--eval-split", "", "--output-dir", str(tmp_path / "x")])
