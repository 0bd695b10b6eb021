"""Harness shared by the kill -9 resume tests: one run killed mid-epoch beside an uninterrupted one."""

import os
import signal
import subprocess
import time
from pathlib import Path

from keras_carp.checkpoints import Checkpoint, latest_checkpoint

ROOT = Path(__file__).resolve().parents[2]


def kill_one_run_finish_the_other(command, full_out: Path, killed_out: Path, env: dict, at_step: int = 6) -> Checkpoint:
    """Start ``command`` twice; SIGKILL the second once its step-``at_step`` checkpoint exists.

    The uninterrupted run goes alongside the killed one (independent processes). Returns the
    killed run's last checkpoint; no process outlives the call.
    """
    full_errors = full_out.parent / f"{full_out.name}.stderr"
    with open(full_errors, "w") as errors:
        full = subprocess.Popen(command(full_out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=errors)
    victim = None
    try:
        victim = subprocess.Popen(command(killed_out), env=env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 600
        while not (killed_out / "checkpoints" / f"step-{at_step:09d}.json").exists():
            assert victim.poll() is None and time.time() < deadline, (
                f"the run ended before its step-{at_step} checkpoint"
            )
            time.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        assert full.wait(timeout=600) == 0, full_errors.read_text()[-3000:]
    finally:  # kill() is a no-op on a process that has ended
        for process in (full, victim):
            if process is not None:
                process.kill()
    return latest_checkpoint(str(killed_out / "checkpoints"))


def csv_rows(path) -> list[dict]:
    """The rows of a CSVLogger file as dicts of strings."""
    lines = Path(path).read_text().splitlines()
    header = lines[0].split(",")
    return [dict(zip(header, line.split(","))) for line in lines[1:]]
