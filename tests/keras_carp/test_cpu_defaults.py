import os
import subprocess
import sys

import pytest

PROBE = "import os, keras_carp, tensorflow as tf; print(os.environ['TF_ENABLE_ONEDNN_OPTS'])"


@pytest.mark.parametrize("given, expected", [(None, "1"), ("0", "0")])
def test_importing_keras_carp_turns_on_onednn_unless_the_user_chose(given, expected):
    env = {k: v for k, v in os.environ.items() if k != "TF_ENABLE_ONEDNN_OPTS"}
    env.update(TF_CPP_MIN_LOG_LEVEL="0", KERAS_BACKEND="tensorflow")  # TensorFlow logs whether oneDNN is on
    if given is not None:
        env["TF_ENABLE_ONEDNN_OPTS"] = given
    done = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip() == expected
    assert ("oneDNN custom operations are on" in done.stderr) == (expected == "1")
