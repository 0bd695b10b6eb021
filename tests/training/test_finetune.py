"""carp-finetune end to end on tiny data, and its errors for bad input."""

import json

import keras
import numpy as np
import pytest

from keras_carp.data import load_digits
from tests.conftest import random_views, tiny_model
from training import finetune

TINY = ["--dataset", "digits", "--image-size", "16", "--epochs", "2", "--steps-per-epoch", "2", "--batch-size", "32",
        "--verbose", "0"]  # fmt: skip


def test_carp_finetune_on_digits_writes_results(tmp_path, capsys):
    output = tmp_path / "results" / "ft.json"
    assert (
        finetune.main(["--model", "random:resnet_tiny", "--label-fraction", "0.1", "--output", str(output)] + TINY) == 0
    )
    assert output.is_file()
    results = json.loads(output.read_text())
    (_, train_labels), (_, test_labels) = load_digits(16)
    expected = sum(max(1, int(np.floor(0.1 * n + 0.5))) for n in np.bincount(train_labels))  # 10 % of each class
    assert results["labelled_images"] == expected
    assert results["label_fraction"] == 0.1 and results["epochs"] == 2 and len(results["loss"]) == 2
    assert results["encoder_lr"] == 0.002 and results["head_lr"] == 0.5 and results["milestones"] == [12, 16]
    assert results["crop_scale"] == [0.08, 1.0] and results["crop_fraction"] == 1.0
    assert 0.0 <= results["top1"] <= results["top5"] <= 100.0
    assert "top-1" in capsys.readouterr().out


def test_carp_finetune_starts_from_the_teacher_of_a_carp_checkpoint(tmp_path):
    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.fit(x=random_views(batch=8), batch_size=8, epochs=1, verbose=0)
    model.save(tmp_path / "model.keras")
    assert finetune.main(["--model", str(tmp_path / "model.keras"), "--label-fraction", "0.01"] + TINY) == 0
    results = json.loads((tmp_path / "finetune_1pct.json").read_text())  # beside the model by default
    assert results["labelled_images"] == 10 and results["encoder"] == "teacher"  # one image per digit


@pytest.mark.parametrize(
    "model, message",
    [
        ("{tmp}/missing.keras", "no model at"),
        ("{tmp}", "is a folder"),
        ("pixels", "no weights to fine-tune"),
        ("random:resnet9000", "Unknown backbone"),
    ],
)
def test_bad_models_are_refused_with_a_clear_error(tmp_path, model, message):
    with pytest.raises(SystemExit, match=message):
        finetune.main(["--model", model.format(tmp=tmp_path), "--output", str(tmp_path / "r.json")] + TINY)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--label-fraction", "0"], "label fraction must be in (0, 1]"),
        (["--label-fraction", "1.5"], "label fraction must be in (0, 1]"),
        (["--label-fraction", "-0.01"], "label fraction must be in (0, 1]"),
        (["--crop-scale", "0.5", "0.2"], "--crop-scale must be"),
        (["--epochs", "0"], "--epochs must be positive"),
    ],
)
def test_bad_flags_stop_at_the_command_line(flags, message, capsys):
    with pytest.raises(SystemExit) as raised:
        finetune.main(["--model", "random:resnet_tiny"] + TINY + flags)
    assert raised.value.code == 2 and message in capsys.readouterr().err


def test_data_problems_stop_before_training(tmp_path):
    with pytest.raises(SystemExit, match="digits splits"):
        finetune.main(["--model", "random:resnet_tiny", "--test-split", "validation"] + TINY)
    with pytest.raises(SystemExit, match="needs data_dir"):
        finetune.main(["--model", "random:resnet_tiny"] + TINY + ["--dataset", "folder"])
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(SystemExit, match="cannot write"):
        finetune.main(["--model", "random:resnet_tiny", "--output", str(blocker / "r.json")] + TINY)
