"""Benchmark results as JSON lines: one record per measured configuration, in ``bench/results/<benchmark>.jsonl``.

Every benchmark appends its records here (``--results-dir`` elsewhere, ``--no-record`` not at all), and
``python -m bench.report`` turns them into docs/benchmarks.md, so the published tables are always the stored
records. A record (``SCHEMA`` 1):

    {"schema": 1, "benchmark": "train_step", "run": "2026-11-26T10:02:11Z",
     "timestamp": "2026-11-26T10:04:53Z", "source": "measured",
     "machine": {"cpu": "AMD EPYC 7B13", "cores": 2, "accelerator": "NVIDIA H200", "description": ...},
     "versions": {"python": "3.11.9", "keras": "3.15.1", "jax": "0.10.2", ...},
     "backend": "jax",
     "config": {"backbone": "resnet50", "batch": 256, ...},    # what was measured
     "figures": {"median_ms": 135.9, "images_per_s": 1883.9, ...},   # what came out
     "title": "...", "notes": "..."}                           # optional, for the report's table heading

``run`` is shared by the records of one invocation, so that they form one table. Records transcribed from
earlier hand-written tables say so in ``source`` and carry the machine and date stated with them.
Only the standard library is imported: reading results and writing the report need no framework.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

SCHEMA = 1
RESULTS_DIR = Path(__file__).resolve().parent / "results"
MEASURED = "measured"
REQUIRED = ("schema", "benchmark", "run", "timestamp", "source", "machine", "versions", "backend", "config", "figures")
PACKAGES = ("keras", "keras-hub", "tensorflow", "jax", "jaxlib", "torch", "torchvision", "numpy", "keras-carp")


def utc_now() -> str:
    """The current UTC time, to the second, ISO 8601 with a Z."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo (Linux), else what ``platform`` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def cpu_cores() -> int:
    """CPU cores this process may run on (the affinity mask, as a container limits it)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def accelerator() -> str | None:
    """The NVIDIA GPU(s), from nvidia-smi (no framework import), e.g. "NVIDIA H200 (143771 MiB)"; None without."""
    if not shutil.which("nvidia-smi"):
        return None
    try:
        done = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30)  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        return None
    names = [", ".join(part.strip() for part in line.split(",")) for line in done.stdout.splitlines() if line.strip()]
    if done.returncode or not names:
        return None
    return f"{len(names)} x {names[0]}" if len(names) > 1 else names[0]


def machine() -> dict:
    """What the figures were measured on: CPU model, cores, accelerator (None: CPU only), OS."""
    return {"cpu": cpu_model(), "cores": cpu_cores(), "accelerator": accelerator(),
            "os": f"{platform.system()} {platform.release()}"}  # fmt: skip


def versions() -> dict:
    """Python and the installed versions of the libraries a benchmark may use (package metadata, no imports)."""
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def add_record_arguments(parser: argparse.ArgumentParser) -> None:
    """``--results-dir`` and ``--no-record``: where a benchmark appends its records, or not at all (smoke runs)."""
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR,
                        help="append one JSON record per measured configuration to <benchmark>.jsonl here "
                             "(default: bench/results)")  # fmt: skip
    parser.add_argument("--no-record", action="store_true", help="write no result record")


class Recorder:
    """Appends the records of one benchmark invocation (one ``run``) to ``<results_dir>/<benchmark>.jsonl``.

    The machine and versions are looked up once per invocation. ``results_dir=None`` records nothing.
    """

    def __init__(self, benchmark: str, results_dir: Path | str | None, title: str | None = None):
        self.benchmark, self.title, self.run = benchmark, title, utc_now()
        self.path = Path(results_dir) / f"{benchmark}.jsonl" if results_dir is not None else None
        self._context: tuple[dict, dict] | None = None

    @classmethod
    def from_args(cls, benchmark: str, args: argparse.Namespace, title: str | None = None) -> Recorder:
        """The recorder ``add_record_arguments``' flags ask for."""
        return cls(benchmark, None if args.no_record else args.results_dir, title)

    def record(self, config: dict, figures: dict, backend: str | None = None, notes: str | None = None) -> dict:
        """Build one record and append it (when recording); returns it."""
        if self._context is None:
            self._context = machine(), versions()
        record = make_record(self.benchmark, config, figures, backend=backend, run=self.run, title=self.title,
                             notes=notes, machine_info=self._context[0], version_info=self._context[1])  # fmt: skip
        if self.path is not None:
            append(self.path, record)
        return record


def make_record(
    benchmark: str,
    config: dict,
    figures: dict,
    *,
    backend: str | None = None,
    run: str | None = None,
    timestamp: str | None = None,
    source: str = MEASURED,
    machine_info: dict | None = None,
    version_info: dict | None = None,
    title: str | None = None,
    notes: str | None = None,
) -> dict:
    """One record of the schema above; machine and versions default to this process's."""
    record = {
        "schema": SCHEMA, "benchmark": benchmark, "run": run or utc_now(), "timestamp": timestamp or utc_now(),
        "source": source, "machine": machine() if machine_info is None else machine_info,
        "versions": versions() if version_info is None else version_info, "backend": backend,
        "config": dict(config), "figures": dict(figures),
    }  # fmt: skip
    if title:
        record["title"] = title
    if notes:
        record["notes"] = notes
    return record


def append(path: Path | str, record: dict) -> None:
    """Append ``record`` as one JSON line, creating the folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")


def load(path: Path | str) -> list[dict]:
    """The records of one .jsonl file, in file order."""
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def load_all(results_dir: Path | str = RESULTS_DIR) -> dict[str, list[dict]]:
    """{benchmark file stem: records}, files in name order."""
    return {path.stem: load(path) for path in sorted(Path(results_dir).glob("*.jsonl"))}


def validate(record: dict) -> None:
    """Raise ValueError when ``record`` does not follow the schema."""
    missing = [key for key in REQUIRED if key not in record]
    if missing:
        raise ValueError(f"record lacks {missing}: {str(record)[:200]}")
    if record["schema"] != SCHEMA:
        raise ValueError(f"unknown schema {record['schema']!r}")
    for key in ("machine", "versions", "config", "figures"):
        if not isinstance(record[key], dict):
            raise ValueError(f"record[{key!r}] must be an object")
    if not {"cpu", "cores", "accelerator"} <= set(record["machine"]):
        raise ValueError(f"record['machine'] needs cpu, cores and accelerator: {record['machine']}")
    if not record["figures"]:
        raise ValueError("a record without figures measured nothing")
