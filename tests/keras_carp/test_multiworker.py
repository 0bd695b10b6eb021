"""Several processes (hosts): ranks from TF_CONFIG, what a lost peer looks like, and the two-process step.

The two-process checks start ``tests/multiworker_check.py`` as a single-device run, then as a job of two
processes on localhost that each feed their own share of every global batch, and compare (as
``test_distribute.py`` does for the devices of one process).
"""

import json
import sys
import types

import keras
import pytest

from tests.conftest import require_optional
from tests.multiworker import ROOT, Job

RTOL = 1e-5


def _strategy(cluster: dict, task_type, task_id):
    """A stand-in for a MultiWorkerMirroredStrategy with TF_CONFIG's cluster and task."""
    spec = types.SimpleNamespace(as_dict=lambda: cluster)
    resolver = types.SimpleNamespace(cluster_spec=lambda: spec, task_type=task_type, task_id=task_id)
    return types.SimpleNamespace(cluster_resolver=resolver)


def test_worker_rank_follows_tensorflows_chief_rule():
    from keras_carp.distribute import worker_rank

    two_workers = {"worker": ["a:1", "b:1"]}
    assert worker_rank(_strategy(two_workers, "worker", 0)) == (0, 2)  # no chief task: worker 0 is the chief
    assert worker_rank(_strategy(two_workers, "worker", 1)) == (1, 2)
    with_chief = {"chief": ["c:1"], "worker": ["a:1", "b:1"]}
    assert worker_rank(_strategy(with_chief, "chief", 0)) == (0, 3)
    assert worker_rank(_strategy(with_chief, "worker", 0)) == (1, 3)
    assert worker_rank(_strategy({"worker": ["a:1"]}, "worker", 0)) == (0, 1)
    assert worker_rank(_strategy({}, None, None)) == (0, 1)  # no TF_CONFIG
    with pytest.raises(ValueError, match="chief or worker task, not 'ps'"):
        worker_rank(_strategy({"worker": ["a:1", "b:1"], "ps": ["p:1"]}, "ps", 0))


def test_lost_peer_errors_are_told_apart_from_other_failures():
    from keras_carp.distribute import lost_a_peer

    assert not lost_a_peer(ValueError("bad input"))
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        assert lost_a_peer(tf.errors.UnavailableError(None, None, "Collective ops is aborted by: Socket closed"))
        assert lost_a_peer(tf.errors.DeadlineExceededError(None, None, "health check"))
        assert not lost_a_peer(tf.errors.InvalidArgumentError(None, None, "shapes"))


def _compare(result: dict, processes: int) -> None:
    assert result["processes"] == processes
    assert result["kernels_moved"] > 1e-3  # the steps changed the weights, so agreement means equal updates
    for key in ("loss", "consistency", "prototypes_used"):
        assert result["max_rel_logs"][key] <= RTOL, (key, result)
    assert result["max_rel_logs"]["entropy"] <= 1e-3, result  # log(N_B) - H: compared absolutely
    for group, difference in result["max_rel_weights"].items():
        assert difference <= RTOL, (group, result)
    assert result["max_rel_optimizer"] <= RTOL, result


def _single_then_job(tmp_path, backend: str) -> dict:
    import subprocess

    from tests.multiworker import job_environment

    env = job_environment(backend)
    check = [sys.executable, "-m", "tests.multiworker_check", "--dir", str(tmp_path)]
    done = subprocess.run(check + ["--role", "single"], env=env, cwd=ROOT, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    job = Job(check + ["--role", "worker"], tmp_path / "logs", backend=backend)
    assert job.wait(timeout=600) == [0, 0], job.output(0)[1][-3000:] + job.output(1)[1][-3000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["logs", "single.npz", "workers.json"]  # chief only
    return json.loads((tmp_path / "workers.json").read_text())


@pytest.mark.slow
def test_two_tensorflow_workers_match_one_device_with_the_same_global_batch(tmp_path):
    result = _single_then_job(tmp_path, "tensorflow")
    assert result["replicas"] == 2
    _compare(result, processes=2)


@pytest.mark.slow
def test_two_jax_processes_match_one_device_with_the_same_global_batch(tmp_path):
    require_optional("jax")
    result = _single_then_job(tmp_path, "jax")
    assert result["replicas"] == 2
    _compare(result, processes=2)


def test_no_job_described_means_no_processes_to_join(monkeypatch):
    from keras_carp.distribute import JOB_VARIABLES, initialize_processes

    for name in JOB_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    assert initialize_processes() is False  # a lone process: nothing to join, nothing started
