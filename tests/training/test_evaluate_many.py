"""carp-eval over several datasets: mocked TFDS transfer datasets, fake Copydays / rOxford folders and a
mocked voc/2007, written out as one JSON and one Markdown table."""

import json
import pickle

import numpy as np
import pytest
from PIL import Image

from training import evaluate

tfds = pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def mean_colour_model(tmp_path_factory):
    import keras

    inputs = keras.Input((None, None, 3))
    model = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(inputs), name="mean_colour")
    path = tmp_path_factory.mktemp("model") / "encoder.keras"
    model.save(path)
    return path


def _copydays(root):
    for name, colour in {"200000": (250, 10, 10), "200100": (10, 250, 10)}.items():
        for folder in ("original", "strong", "jpegqual/75"):
            (root / folder).mkdir(parents=True, exist_ok=True)
            Image.new("RGB", (16, 12), colour).save(root / folder / f"{name}.jpg")


def _roxford(root):
    (root / "jpg").mkdir(parents=True)
    colours = [(250, 10, 10), (10, 250, 10), (10, 10, 250)]
    for i, colour in enumerate(colours):
        Image.new("RGB", (16, 12), colour).save(root / "jpg" / f"db_{i}.jpg")
    Image.new("RGB", (16, 12), (10, 240, 20)).save(root / "jpg" / "q_0.jpg")
    gnd = [{"easy": [1], "hard": [], "junk": [2], "bbx": [0, 0, 16, 12]}]
    with open(root / "gnd_roxford5k.pkl", "wb") as file:
        pickle.dump({"imlist": ["db_0", "db_1", "db_2"], "qimlist": ["q_0"], "gnd": gnd}, file)


def test_one_call_scores_transfer_copy_detection_and_revisited(tmp_path, mean_colour_model, capsys):
    _copydays(tmp_path / "data" / "copydays")
    _roxford(tmp_path / "data" / "roxford5k")
    output = tmp_path / "out" / "table.json"
    argv = ["--model", str(mean_colour_model), "--datasets", "cifar10,stl10,copydays,roxford5k", "--data-dir",
            str(tmp_path / "data"), "--image-size", "16", "--knn-k", "1", "5", "--copydays-image-size", "8",
            "--revisited-image-size", "8", "--output", str(output)]  # fmt: skip
    with tfds.testing.mock_data(num_examples=12):
        assert evaluate.main(argv) == 0
    results = json.loads(output.read_text())
    datasets = results["datasets"]
    assert list(datasets) == ["cifar10", "stl10", "copydays", "roxford5k"]
    assert set(datasets["cifar10"]) >= {"knn", "kmeans"} and "kmeans" not in datasets["stl10"]
    assert datasets["cifar10"]["num_train"] == 12 and 0 <= datasets["cifar10"]["knn"]["5"]["top1"] <= 100
    assert datasets["copydays"]["copy_detection"]["strong"] == pytest.approx(100.0)
    assert datasets["roxford5k"]["revisited"]["easy"]["map"] == pytest.approx(100.0)
    table = output.with_suffix(".md").read_text()
    assert "| dataset | k-NN top-1 (k=1) |" in table  # k=20 when swept, else the first k and "| roxford5k |" in table
    assert f"| cifar10 | {datasets['cifar10']['knn']['1']['top1']:.2f} |" in table
    assert "| copydays |" in capsys.readouterr().out


def _voc_examples(split):
    """Class c lights up its own 2 x 3 block of a grey image: separable one-vs-rest from the pixels."""
    rng = np.random.default_rng(0 if split == "test" else 1)
    count = 40 if split == "test" else 60
    for i in range(count):
        c = i % 20
        image = np.full((12, 12, 3), 100.0) + rng.normal(0, 5, (12, 12, 3))
        image[c // 4 * 2 : c // 4 * 2 + 2, c % 4 * 3 : c % 4 * 3 + 3] = 250
        yield {"image": np.clip(image, 0, 255).astype("uint8"),
               "labels": np.array([c, (c + 1) % 20] if i % 7 == 0 else [c], "int64"),
               "labels_no_difficult": np.array([c], "int64")}  # fmt: skip


def test_voc07_low_shot_svms_from_mocked_tfds(tmp_path):
    import keras
    import tensorflow as tf

    inputs = keras.Input((12, 12, 3))
    keras.Model(inputs, keras.layers.Flatten()(inputs)).save(tmp_path / "pixels.keras")  # 432-d: separable

    def as_dataset(self, split, decoders=None, **kwargs):
        examples = [{**e, "image": tf.io.encode_png(e["image"]).numpy()} for e in _voc_examples(split)]
        spec = {"image": tf.TensorSpec((), tf.string), "labels": tf.TensorSpec((None,), tf.int64),
                "labels_no_difficult": tf.TensorSpec((None,), tf.int64)}  # fmt: skip
        return tf.data.Dataset.from_generator(lambda: iter(examples), output_signature=spec)

    output = tmp_path / "voc.json"
    argv = ["--model", str(tmp_path / "pixels.keras"), "--datasets", "voc07", "--image-size", "12",
            "--svm-shots", "1", "2", "--svm-samples", "2", "--svm-costs", "0.1", "1",
            "--output", str(output)]  # fmt: skip
    with tfds.testing.mock_data(as_dataset_fn=as_dataset):
        assert evaluate.main(argv) == 0
    scores = json.loads(output.read_text())["datasets"]["voc07"]
    assert scores["num_train"] == 60 and scores["num_test"] == 40
    assert set(scores["lowshot_svm"]) == {"1", "2"}
    assert scores["lowshot_svm"]["2"]["map"] > 90  # separable classes
    assert "SVM mAP k=2" in output.with_suffix(".md").read_text()


def test_bad_dataset_lists_stop_before_any_work(tmp_path):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "pixels", "--datasets", "cifar10,imagenet-x"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "pixels", "--dataset", "digits", "--datasets", "cifar10"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model", "pixels", "--datasets", "cifar10", "--protocols", "linear"])
    with pytest.raises(SystemExit, match="copydays"):  # the folder is checked before the (missing) model
        evaluate.main(["--model", str(tmp_path / "missing.keras"), "--datasets", "copydays",
                       "--data-dir", str(tmp_path), "--output", str(tmp_path / "r.json")])  # fmt: skip
    with pytest.raises(SystemExit, match="gtsrb is not in TFDS"):
        evaluate.main(["--model", str(tmp_path / "missing.keras"), "--datasets", "cifar10,gtsrb",
                       "--data-dir", str(tmp_path), "--output", str(tmp_path / "r.json")])  # fmt: skip
    args = evaluate.parse_args(["--model", "pixels", "--transfer", "true", "--datasets", "voc07"])
    assert args.datasets[0] == "stl10" and args.datasets[-1] == "voc07" and "cifar100" in args.datasets
    assert args.protocols is None and args.dataset == "digits"
