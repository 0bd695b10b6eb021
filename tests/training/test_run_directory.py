"""The run directory object and the refusals of a run before its first step."""

import json
import os
import stat

import pytest

from training import config as schema
from training.run import RunRefused, check_same_run, run
from training.run_directory import RunDirectory


def test_create_proves_the_directory_writable_and_leaves_no_probe(tmp_path):
    run_dir = RunDirectory(str(tmp_path / "a" / "run")).create()
    assert run_dir.created and os.listdir(run_dir.path) == []
    assert RunDirectory(run_dir.path).create().created is False  # it existed already


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_an_unwritable_or_blocked_path_is_an_error_naming_it(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(stat.S_IRUSR | stat.S_IXUSR)
    with pytest.raises(OSError, match=f"cannot write to the output directory {locked / 'run'}"):
        RunDirectory(str(locked / "run")).create()


def test_a_file_in_the_way_is_an_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError, match="exists and is not a directory"):
        RunDirectory(str(tmp_path / "file")).create()


def test_a_refused_run_removes_only_the_empty_directory_it_created(tmp_path):
    fresh = RunDirectory(str(tmp_path / "fresh")).create()
    with pytest.raises(ValueError), fresh.removed_if_refused():
        raise ValueError("refused")
    assert not (tmp_path / "fresh").exists()
    kept = RunDirectory(str(tmp_path / "kept")).create()
    with pytest.raises(ValueError), kept.removed_if_refused():
        kept.write_json("config.json", {"a": 1})
        raise ValueError("refused after writing")
    assert (tmp_path / "kept" / "config.json").is_file()
    (tmp_path / "theirs").mkdir()
    theirs = RunDirectory(str(tmp_path / "theirs")).create()
    with pytest.raises(ValueError), theirs.removed_if_refused():
        raise ValueError("refused")
    assert (tmp_path / "theirs").is_dir()  # not created by this run: left alone


def test_truncate_csv_log_keeps_the_header_and_the_checkpointed_epochs(tmp_path):
    run_dir = RunDirectory(str(tmp_path)).create()
    (tmp_path / "training_log.csv").write_text("epoch,loss\n0,1.0\n1,0.9\n2,0.8\n")
    run_dir.truncate_csv_log(2)
    assert (tmp_path / "training_log.csv").read_text() == "epoch,loss\n0,1.0\n1,0.9\n"


def test_resuming_with_other_training_settings_is_refused_but_other_paths_are_not(tmp_path):
    run_dir = RunDirectory(str(tmp_path)).create()
    config = schema.load_preset("digits")
    run_dir.write_json("config.json", config.to_dict())
    check_same_run(run_dir, config.replace(output_dir="elsewhere", data_dir="/data", keep_checkpoints=5))
    with pytest.raises(RunRefused, match=r"different configuration \(block_size: 128 -> 64\).*--output-dir"):
        check_same_run(run_dir, config.replace(block_size=64))
    (tmp_path / "config.json").write_text(json.dumps({**config.flat(), "preset": "digits"}))  # an earlier, flat file
    with pytest.raises(RunRefused) as refused:
        check_same_run(run_dir, config)
    assert str(refused.value) == f"carp-pretrain: {run_dir}: {schema.EARLIER_VERSION}"
    assert "earlier version" in str(refused.value) and "new --output-dir" in str(refused.value)


def test_a_run_refused_for_its_data_leaves_no_directory(tmp_path):
    config = schema.load_preset("digits").replace(dataset="no_such_dataset_anywhere", output_dir=str(tmp_path / "r"))
    with pytest.raises(SystemExit, match="carp-pretrain: Unknown TFDS dataset"):
        run(config)
    assert not (tmp_path / "r").exists()


def test_a_bucket_path_goes_through_tf_io_gfile():
    """TensorFlow's ram:// filesystem stands in for gs://: paths are joined with '/', files written atomically."""
    import tensorflow as tf

    run_dir = RunDirectory("ram://bucket/runs/one").create()
    assert run_dir.remote and run_dir.join("checkpoints", "a.json") == "ram://bucket/runs/one/checkpoints/a.json"
    run_dir.write_json("config.json", {"model": {"block_size": 64}})
    assert run_dir.exists("config.json") and run_dir.read_json("config.json") == {"model": {"block_size": 64}}
    with tf.io.gfile.GFile(run_dir.join("training_log.csv"), "w") as handle:
        handle.write("epoch,loss\n0,1.0\n1,0.9\n")
    run_dir.truncate_csv_log(1)
    assert run_dir.read_text("training_log.csv") == "epoch,loss\n0,1.0\n"
    refused = RunDirectory("ram://bucket/runs/refused").create()
    with pytest.raises(ValueError), refused.removed_if_refused():
        raise ValueError("refused")
    assert not tf.io.gfile.exists("ram://bucket/runs/refused")


def test_a_worker_that_is_not_the_chief_reads_the_run_directory_and_writes_only_its_scratch(tmp_path, monkeypatch):
    shared = tmp_path / "run"
    chief = RunDirectory(str(shared)).create()
    chief.write_json("config.json", {"seed": 1})
    (shared / "training_log.csv").write_text("epoch,loss\n0,1.0\n1,0.5\n")
    monkeypatch.setenv("TMPDIR", str(tmp_path / "tmp"))
    (tmp_path / "tmp").mkdir()
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", None)  # re-read TMPDIR
    worker = RunDirectory(str(shared), chief=False).create()
    assert not worker.created and worker.scratch.startswith(str(tmp_path / "tmp"))
    assert worker.read_json("config.json") == {"seed": 1}  # reads: the shared directory
    worker.write_json("summary.json", {"loss": 0.5})  # writes: its scratch
    assert worker.output("checkpoints") == os.path.join(worker.scratch, "checkpoints")
    assert json.loads(open(worker.output("summary.json")).read()) == {"loss": 0.5}
    worker.truncate_csv_log(1)  # the chief's log is the chief's
    assert (shared / "training_log.csv").read_text().count("\n") == 3
    assert sorted(os.listdir(shared)) == ["config.json", "training_log.csv"]
    with pytest.raises(RuntimeError), worker.removed_if_refused():  # never removes the shared directory
        raise RuntimeError("refused")
    assert shared.is_dir()
    worker.close()
    assert os.listdir(tmp_path / "tmp") == [] and worker.scratch is None
