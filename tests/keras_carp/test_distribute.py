"""N replicas x B/N images compute what one device computes on B: TensorFlow MirroredStrategy and JAX DataParallel.

Each case runs ``tests/distributed_check.py`` in a fresh process, because the
host must be split into logical devices before the backend starts.
"""

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import keras
import pytest

from tests.conftest import require_optional

pytestmark = pytest.mark.slow  # several processes of simulated devices: `pytest -m slow`

ROOT = Path(__file__).resolve().parents[2]
RTOL = 1e-5


def _check(tmp_path, backend: str, devices: int, *extra: str) -> dict:
    if backend == "jax":
        require_optional("jax")
    output = tmp_path / f"{backend}-{devices}.json"
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3"}
    command = [sys.executable, "-m", "tests.distributed_check", "--devices", str(devices), "--output", str(output)]
    done = subprocess.run(command + list(extra), cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return json.loads(output.read_text())


@pytest.mark.parametrize("backend, devices", [("tensorflow", 2), ("tensorflow", 4), ("jax", 2), ("jax", 4)])
def test_replicas_match_one_device_with_the_same_global_batch(tmp_path, backend, devices):
    saved = tmp_path / "distributed.keras"
    result = _check(tmp_path, backend, devices, "--save", str(saved))
    assert result["replicas"] == devices and result["sync_batch_norm"]
    assert result["kernels_moved"] > 1e-3  # the steps changed the weights, so agreement means equal updates
    for key in ("loss", "consistency", "prototypes_used"):
        assert result["max_rel_logs"][key] <= RTOL, (key, result)
    # The entropy is log(N_B) - H, a difference of two numbers near 2.77: compared absolutely (1e-3 floor).
    assert result["max_rel_logs"]["entropy"] <= 1e-3, result
    for group, difference in result["max_rel_weights"].items():
        assert difference <= RTOL, (group, result)
    assert result["max_rel_optimizer"] <= RTOL, result
    if backend == "tensorflow":
        assert result["partitions_identical_across_replicas"] and result["partition_equals_single_device"]
        # Saved under the strategy, the file loads anywhere: the model keeps sync_batch_norm, the BN layer
        # configs do not carry `synchronized` (Keras refuses it off TensorFlow).
        with zipfile.ZipFile(saved) as archive:
            config = json.loads(archive.read("config.json"))
        assert config["config"]["sync_batch_norm"] is True
        assert '"synchronized": true' not in json.dumps(config)
        loaded = keras.saving.load_model(saved)
        assert loaded.sync_batch_norm and int(keras.ops.convert_to_numpy(loaded.optimizer.iterations)) == 3


@pytest.mark.parametrize("backend", ["tensorflow", "jax"])
def test_replicas_making_their_own_views_match_one_device(tmp_path, backend):
    """Views made in the step: every replica keys its images by their place in the global batch.

    On JAX the sharded and the single-device programs are compiled apart; they make the same views since the hue
    rotation no longer picks its formula by an equality that XLA's fusion could break (see
    ``test_device_augmentation.test_compiled_views_equal_eager_views``).
    """
    result = _check(tmp_path, backend, 2, "--device-views")
    assert result["kernels_moved"] > 1e-3
    for key in ("loss", "consistency", "prototypes_used"):
        assert result["max_rel_logs"][key] <= RTOL, (key, result)
    for group, difference in result["max_rel_weights"].items():
        assert difference <= RTOL, (group, result)


def test_without_synchronised_batch_norm_the_replicas_drift(tmp_path):
    """The comparison above can fail: per-replica batch statistics give other losses and weights."""
    result = _check(tmp_path, "tensorflow", 4, "--sync-batch-norm", "off")
    assert not result["sync_batch_norm"]
    assert max(result["max_rel_weights"].values()) > 1e-3 or result["max_rel_logs"]["loss"] > 1e-4, result


def test_strategy_resolution_on_this_host():
    import keras

    from keras_carp import distribute

    if keras.backend.backend() != "tensorflow":
        pytest.skip("tf.distribute strategies are TensorFlow's")
    with pytest.raises(ValueError, match="No TPU found"):
        distribute.resolve_strategy("tpu")
    auto = distribute.setup_distribution("auto")  # no TPU, no GPU: falls back to one device
    assert auto.replicas == 1 and not auto.per_host_input and auto.dtype_policy is None
    assert distribute.setup_distribution("mirrored").replicas == 1
    with pytest.raises(ValueError, match="strategy must be one of"):
        distribute.resolve_strategy("horovod")
    with pytest.raises(ValueError, match="divisible by the number of replicas"):
        distribute.check_global_batch(1022, 4)
    assert distribute.check_global_batch(1024, 8) == 128
