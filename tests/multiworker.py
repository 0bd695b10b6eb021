"""Start the processes of one multi-process job on this machine, for the tests of several hosts.

TensorFlow workers get a ``TF_CONFIG`` naming two localhost ports; JAX processes get Keras' variables
``KERAS_DISTRIBUTION_JOB_ADDRESSES`` / ``_NUM_PROCESSES`` / ``_PROCESS_ID``, with the coordinator on the
first port. Each process's output goes to ``<logs>/process-<i>.out|.err``.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def free_ports(count: int) -> list[int]:
    """Ports the system has just handed out as free (kept open together, so they differ)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for handle in sockets:
            handle.bind(("localhost", 0))
        return [handle.getsockname()[1] for handle in sockets]
    finally:
        for handle in sockets:
            handle.close()


def job_environment(backend: str, ports: list[int] | None = None, index: int = 0) -> dict:
    """The variables that make process ``index`` one of ``len(ports)`` processes of a job (none: a lone one)."""
    env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3", "PYTHONPATH": str(ROOT)}
    for name in ("TF_CONFIG", "KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES",
                 "KERAS_DISTRIBUTION_PROCESS_ID"):  # fmt: skip
        env.pop(name, None)
    if not ports:
        return env
    addresses = [f"localhost:{port}" for port in ports]
    if backend == "tensorflow":
        env["TF_CONFIG"] = json.dumps({"cluster": {"worker": addresses}, "task": {"type": "worker", "index": index}})
    else:
        env.update(KERAS_DISTRIBUTION_JOB_ADDRESSES=",".join(addresses), KERAS_DISTRIBUTION_NUM_PROCESSES=str(
            len(ports)), KERAS_DISTRIBUTION_PROCESS_ID=str(index))  # fmt: skip
    return env


class Job:
    """``processes`` copies of ``command`` started as one job (``wait`` for all, ``kill`` one)."""

    def __init__(self, command: list[str], logs: Path, backend: str = "tensorflow", processes: int = 2,
                 extra_env: dict | None = None):  # fmt: skip
        logs.mkdir(parents=True, exist_ok=True)
        self.logs = logs
        ports = free_ports(processes)
        self.processes = []
        for index in range(processes):
            env = {**job_environment(backend, ports, index), **(extra_env or {}).get(index, {})}
            with open(logs / f"process-{index}.out", "w") as out, open(logs / f"process-{index}.err", "w") as err:
                self.processes.append(subprocess.Popen(command, env=env, cwd=ROOT, stdout=out, stderr=err))

    def output(self, index: int) -> tuple[str, str]:
        """(stdout, stderr) of process ``index`` so far."""
        return (self.logs / f"process-{index}.out").read_text(), (self.logs / f"process-{index}.err").read_text()

    def wait(self, timeout: float = 600) -> list[int]:
        """Every process's exit status; all are killed if the job outlives ``timeout`` seconds."""
        try:
            return [process.wait(timeout=timeout) for process in self.processes]
        finally:
            self.kill_all()

    def kill_all(self) -> None:
        for process in self.processes:
            process.kill()  # a no-op on a process that has ended
            process.wait()
