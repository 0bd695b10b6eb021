import json
import os
import stat

import pytest

from training import pretrain

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
]


def test_carp_pretrain_writes_summary_and_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert pretrain.main(TINY + ["--output-dir", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("knn_top1", "knn_top1_random_init", "knn_top5"):
        assert 0.0 <= summary[key] <= 100.0
    assert (out / "model.keras").stat().st_size > 0
    assert json.loads((out / "config.json").read_text())["block_size"] == 16
    assert "random init" in capsys.readouterr().out


def test_every_preset_field_can_be_overridden():
    config = pretrain.parse_config(["--block-size", "32", "--global-scale", "0.5", "1.0"])
    assert config["block_size"] == 32 and config["global_scale"] == [0.5, 1.0]
    assert config["num_prototypes"] == pretrain.load_preset("digits")["num_prototypes"]


def test_unknown_preset_is_reported():
    with pytest.raises(SystemExit, match="unknown preset"):
        pretrain.parse_config(["--preset", "nope"])


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_dir_fails_before_training(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(SystemExit, match="cannot write"):
        pretrain.prepare_output_dir(str(locked / "run"), "digits")


def test_output_path_that_is_a_file_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(SystemExit, match="cannot write"):
        pretrain.prepare_output_dir(str(blocker / "run"), "digits")
