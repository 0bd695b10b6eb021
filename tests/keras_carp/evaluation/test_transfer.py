"""Transfer evaluation over several datasets: mocked TFDS splits and class folders, checked against
weighted_knn / kmeans_scores run on features computed here with NumPy."""

import json

import numpy as np
import pytest
from PIL import Image

from keras_carp.evaluation import kmeans_scores, weighted_knn
from keras_carp.evaluation.transfer import (
    TRANSFER_DATASETS,
    TRANSFER_LIST,
    markdown_table,
    resolve_datasets,
    run_transfer,
    table_rows,
)
from keras_carp.imagenet import IMAGENET_MEAN, IMAGENET_STD

tfds = pytest.importorskip("tensorflow_datasets")


def _mean_colour_encoder():
    import keras

    inputs = keras.Input((None, None, 3))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs))


def _numpy_features(images):
    return np.stack([((np.asarray(i, "float32") / 255 - IMAGENET_MEAN) / IMAGENET_STD).mean((0, 1)) for i in images])


def test_registry_covers_the_released_transfer_list():
    assert set(TRANSFER_LIST) <= set(TRANSFER_DATASETS)
    assert TRANSFER_DATASETS["pets"].tfds_name == "oxford_iiit_pet"
    assert TRANSFER_DATASETS["cars"].tfds_name == "cars196"
    assert TRANSFER_DATASETS["flowers102"].train_split == "train+validation"
    kmeans = {name for name, d in TRANSFER_DATASETS.items() if "kmeans" in d.protocols}
    assert kmeans == {"cifar10", "cifar100", "dtd", "gtsrb"}
    assert [d.name for d in resolve_datasets(["oxford_iiit_pet", "cifar10"])] == ["pets", "cifar10"]
    custom = resolve_datasets(["mnist:train[:10%]:test"])[0]
    assert (custom.tfds_name, custom.train_split, custom.test_split) == ("mnist", "train[:10%]", "test")
    with pytest.raises(ValueError, match="Unknown dataset"):
        resolve_datasets(["imagenet-x"])


def test_run_transfer_on_mocked_tfds_matches_numpy_features(tmp_path):
    encoder = _mean_colour_encoder()
    with tfds.testing.mock_data(num_examples=24):
        results = run_transfer(encoder, ["cifar10", "stl10"], image_size=32, batch_size=7, knn_k=(1, 5),
                               cache_dir=tmp_path / "cache", seed=0)  # fmt: skip
        splits = {s: list(tfds.as_numpy(tfds.load("cifar10", split=s))) for s in ("train", "test")}
    assert set(results) == {"cifar10", "stl10"}
    assert set(results["cifar10"]) == {"knn", "kmeans", "num_train", "num_test", "num_classes"}
    assert "kmeans" not in results["stl10"] and results["cifar10"]["num_classes"] == 10
    train = _numpy_features([e["image"] for e in splits["train"]]), np.array([e["label"] for e in splits["train"]])
    test = _numpy_features([e["image"] for e in splits["test"]]), np.array([e["label"] for e in splits["test"]])
    expected = weighted_knn(*train, *test, k=[1, 5], num_classes=10)
    for k in (1, 5):
        assert results["cifar10"]["knn"][str(k)] == pytest.approx(expected[k])
    assert results["cifar10"]["kmeans"] == pytest.approx(kmeans_scores(*test, 10, seed=0), abs=1e-6)
    assert (tmp_path / "cache" / "cifar10-train-32.npz").is_file()  # features cached per dataset and split


def _write_folder(root, classes=3, per_class=4):
    for split in ("train", "test"):
        for c in range(classes):
            (root / split / f"class_{c}").mkdir(parents=True)
            for i in range(per_class):
                colour = [30, 30, 30]
                colour[c] = 120 + 30 * i
                Image.new("RGB", (12, 12), tuple(colour)).save(root / split / f"class_{c}" / f"{i}.png")


def test_folder_datasets_run_when_present_and_are_skipped_when_absent(tmp_path):
    _write_folder(tmp_path / "gtsrb")
    results = run_transfer(_mean_colour_encoder(), ["gtsrb", "aircraft"], data_dir=tmp_path, image_size=8,
                           knn_k=(1,), skip_missing=True)  # fmt: skip
    assert results["gtsrb"]["knn"]["1"]["top1"] == pytest.approx(100.0)
    assert results["gtsrb"]["kmeans"]["nmi"] > 0.5 and results["gtsrb"]["num_classes"] == 3
    assert "not in TFDS" in results["aircraft"]["skipped"]
    with pytest.raises(FileNotFoundError, match="fgvc_aircraft"):
        run_transfer(_mean_colour_encoder(), ["aircraft"], data_dir=tmp_path)


def test_markdown_table_has_one_row_per_dataset_and_one_column_per_metric():
    results = {
        "cifar10": {"knn": {"10": {"top1": 80.0, "top5": 95.0}, "20": {"top1": 81.25, "top5": 96.0}},
                    "kmeans": {"nmi": 0.5, "adjusted_nmi": 0.49, "ari": 0.3, "accuracy": 60.0}},
        "aircraft": {"skipped": "not there"},
        "roxford5k": {"revisited": {"easy": {"map": 70.0}, "medium": {"map": 50.0}, "hard": {"map": 20.0}}},
        "copydays": {"copy_detection": {"strong": 40.0, "overall": 60.0}},
        "voc07": {"lowshot_svm": {1: {"map": 30.0}, 16: {"map": 70.0}}},
    }  # fmt: skip
    columns, rows = table_rows(results)
    assert columns[:2] == ["k-NN top-1 (k=20)", "k-NN top-5 (k=20)"]
    assert rows["roxford5k"] == {"mAP E": 70.0, "mAP M": 50.0, "mAP H": 20.0}
    assert rows["voc07"] == {"SVM mAP k=1": 30.0, "SVM mAP k=16": 70.0}
    table = markdown_table(results).splitlines()
    assert len(table) == 2 + len(results)
    assert all(line.count("|") == len(columns) + 2 for line in table)
    assert "| cifar10 | 81.25 | 96.00 | 0.500 | 0.300 | 60.00 |" in table[2]
    assert "skipped: not there" in table[3]
    json.dumps(results)  # the same dict is the JSON
