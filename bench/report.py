"""Write docs/benchmarks.md from the stored results (bench/results/*.jsonl): the published tables are the records.

    python -m bench.report            # regenerate docs/benchmarks.md
    python -m bench.report --check    # exit 1 when docs/benchmarks.md is not what the records give (CI, tests)

One section per benchmark, one table per run (the records sharing ``run``). Each table's heading says the
machine, the date, the software, the backend and the settings its rows share; the columns are what varies
between the rows, then the measured figures. The output depends on the records only, so it is reproducible.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from bench.results import MEASURED, RESULTS_DIR, load_all, validate

ROOT = Path(__file__).resolve().parents[1]
OUTPUT = ROOT / "docs" / "benchmarks.md"
# Sections in this order (the most important first), then any other benchmark in name order.
DESCRIPTIONS = {
    "train_step": "The whole compiled CARP training step (student on all crops, teacher on the 2 global crops, "
    "partition, loss, LARS, teacher EMA) on synthetic device-resident batches, beside the PyTorch baseline "
    "(`bench.torch_baseline`). `x ref`: images/s over the fastest baseline run of the same configuration.",
    "torch_baseline": "The PyTorch baseline alone: the CARP step written directly in PyTorch, as the authors run it.",
    "profile_step": "The JAX step compiled as `fit` compiles it, timed per variant in one process; the breakdown "
    "compiles the loss's forward and forward + backward alone.",
    "loss_formulations": "The CARP loss alone, forward and backward: the library's per-crop formulation against a "
    "fused one that was tried and not kept.",
    "cost_growth": "How the step and the partition + loss (permutation, float32 block softmax, consistency + entropy, "
    "forward and backward) grow with K, N_B, the local crops and the batch; each variable varied alone.",
    "fit_pipeline": "`fit` with the views made on the host (tf.data) or on the device (`DeviceMultiCrop` in the "
    "step), on real JPEGs, beside the input alone, the step alone and the plain step on device-resident crops.",
    "device_views": "The views alone: `DeviceMultiCrop` compiled on the backend, one batch of stretched uint8 images.",
    "input_pipeline": "images/s of `keras_carp.data.multicrop_dataset` (median of interleaved rounds).",
    "cpu_settings": "The step's compile settings on a CPU, each in a fresh process (`CARP.compile(jit_compile=...)`).",
    "head_change": "The released step (head once on all crops, teacher update before the optimizer step, torchvision "
    "initialisation) against the step before it, with `bench.train_step --worker keras`.",
    "logits_formulation": "Gathering the logits' columns against permuting the prototype rows (TensorFlow, XLA).",
    "teacher_ema": "The per-step cost of the teacher EMA inside the compiled step.",
    "export_and_convert": "Converting a released-layout checkpoint, saving, exporting and serving it.",
}
RUNNERS = {"head_change": "`python -m bench.train_step --worker keras` (a study: before / after a change)"}


def label(key: str) -> str:
    """A column label from a record key: ``images_per_s`` -> ``images/s``, ``median_ms`` -> ``median ms``."""
    return key.replace("_per_s", "/s").replace("_gib", " GiB").replace("_mib", " MiB").replace("_", " ")


def cell(key: str, value: object) -> str:
    """A table cell: floats rounded for reading (losses and differences to 6 significant digits), pipes escaped."""
    if value is None:
        text = "–"
    elif isinstance(value, bool):
        text = "yes" if value else "no"
    elif isinstance(value, float):
        if "loss" in key or "difference" in key:
            text = f"{value:.6g}"
        elif abs(value) >= 100:
            text = f"{value:.1f}"
        else:
            text = f"{value:.4g}"
    elif isinstance(value, (dict, list)):
        text = (
            ", ".join(f"{k} {v}" for k, v in value.items()) if isinstance(value, dict) else ", ".join(map(str, value))
        )
    else:
        text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def shared(dicts: list[dict]) -> tuple[dict, list[str]]:
    """(the items every dict has with the same value, the other keys in order of first appearance)."""
    keys = list(dict.fromkeys(key for d in dicts for key in d))
    common = {}
    for key in keys:
        values = [d.get(key, KeyError) for d in dicts]
        if all(v is not KeyError and v == values[0] for v in values):
            common[key] = values[0]
    return common, [key for key in keys if key not in common]


def describe_machine(machine: dict) -> str:
    """``cpu, N cores, accelerator`` (+ the free-text description of transcribed records)."""
    parts = [machine.get("cpu") or "unknown CPU", f"{machine.get('cores')} CPU cores"]
    parts.append(machine.get("accelerator") or "no accelerator")
    text = ", ".join(str(part) for part in parts)
    return f"{text} ({machine['description']})" if machine.get("description") else text


def dates(records: list[dict]) -> str:
    """The run's date (UTC), or its first and last dates."""
    days = sorted({record["timestamp"][:10] for record in records})
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def table(records: list[dict]) -> list[str]:
    """One run's heading lines and Markdown table."""
    first = records[0]
    title = first.get("title") or f"Run of {first['run'].replace('T', ' ').replace('Z', ' UTC')}"
    lines = [f"### {title}", ""]
    machines = {describe_machine(record["machine"]) for record in records}
    lines.append(f"- Machine: {'; '.join(sorted(machines))}")
    lines.append(f"- Date: {dates(records)}")
    common_versions, _ = shared([record["versions"] for record in records])
    if common_versions:
        lines.append(f"- Software: {', '.join(f'{name} {version}' for name, version in common_versions.items())}")
    backends = list(dict.fromkeys(record["backend"] for record in records))
    if len(backends) == 1 and backends[0]:
        lines.append(f"- Backend: {backends[0]}")
    common_config, varying = shared([record["config"] for record in records])
    if common_config:
        lines.append(f"- Settings: {', '.join(f'{key} {cell(key, value)}' for key, value in common_config.items())}")
    sources = list(dict.fromkeys(record["source"] for record in records if record["source"] != MEASURED))
    if sources:
        lines.append(f"- Source: {'; '.join(sources)}")
    for note in dict.fromkeys(record["notes"] for record in records if record.get("notes")):
        lines.append(f"- Note: {note}")
    columns = (["backend"] if len(backends) > 1 else []) + varying
    figures = list(dict.fromkeys(key for record in records for key in record["figures"]))
    lines += ["", "| " + " | ".join(label(key) for key in columns + figures) + " |"]
    lines.append("|" + "---|" * (len(columns) + len(figures)))
    for record in records:
        row = [cell(key, record["backend"] if key == "backend" else record["config"].get(key)) for key in columns]
        row += [cell(key, record["figures"].get(key)) for key in figures]
        lines.append("| " + " | ".join(row) + " |")
    return lines + [""]


def render(results: dict[str, list[dict]]) -> str:
    """The whole Markdown page from {benchmark file stem: records}."""
    lines = [
        "# Benchmarks",
        "",
        "<!-- Generated by `python -m bench.report` from bench/results/*.jsonl: edit the records, not this page. -->",
        "",
        "Every benchmark in `bench/` appends one JSON record per measured configuration to "
        "`bench/results/<benchmark>.jsonl` (schema in `bench/results.py`); this page is generated from those "
        "records by `python -m bench.report`, and a test checks that it is up to date. Run a benchmark with "
        "`python -m bench.<benchmark>` (`--help` for its options). Tables whose source says *transcribed* were "
        "measured before the records existed and copied from the project's earlier README tables, with the "
        "machine and date stated there.",
        "",
    ]
    order = [name for name in DESCRIPTIONS if name in results] + sorted(set(results) - set(DESCRIPTIONS))
    for name in order:
        records = results[name]
        if not records:
            continue
        for record in records:
            validate(record)
        lines += [f"## {name}", ""]
        if name in DESCRIPTIONS:
            lines += [DESCRIPTIONS[name], ""]
        lines += [f"Command: {RUNNERS.get(name, f'`python -m bench.{name}`')}.", ""]
        runs: dict[str, list[dict]] = {}
        for record in records:
            runs.setdefault(f"{record['benchmark']}\0{record['run']}", []).append(record)
        for group in runs.values():
            lines += table(group)
    return "\n".join(lines).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    """Write (or, with --check, compare) the page; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results-dir", type=Path, default=RESULTS_DIR, help="where the .jsonl records are")
    parser.add_argument("--output", type=Path, default=OUTPUT, help="the Markdown page to write")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 if --output differs")
    args = parser.parse_args(argv)
    text = render(load_all(args.results_dir))
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(f"{args.output} is out of date: run python -m bench.report", file=sys.stderr)
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output} from {sum(map(len, load_all(args.results_dir).values()))} records")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
