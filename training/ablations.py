"""carp-ablations: the paper's ablations (Tables 5-7) at small scale, one carp-pretrain run per row, as one table.

Rows (each a set of carp-pretrain flags on top of ``--preset``):

- ``random``: the preset as it is (random partition, small blocks, teacher momentum 0.99 -> 1);
- ``block-<n>``: a second small block size (Table 5: N_B from 128 to 4096 all learn);
- ``one-block``: N_B = K, no partition (Table 5: collapses, k-NN at chance);
- ``fixed``: blocks made once, sequentially (Table 7: learns, below random);
- ``no-momentum``: m = 0, the teacher is the previous step's student (Table 5: learns, below the momentum
  encoder at most block sizes; Table 6: 51.0 vs 51.3 % for m 0.99 -> 1).

Each row's run directory is ``OUTPUT_DIR/<row>``; a row whose ``summary.json`` exists is read, not rerun
(an interrupted row resumes from its checkpoint). The table (k-NN top-1, prototypes used, the paper's
direction, whether ours agrees, the command) is printed and written to ``OUTPUT_DIR/ablations.md`` and
``ablations.json``. Extra arguments after ``--`` go to every run before the row's own flags (e.g.
``-- --epochs 10``).
"""

from __future__ import annotations

import csv
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from training.cli import CommandConfig, option, parse
from training.config import available_presets

# name -> (flags beyond the preset, the paper's finding, the check of our result against the baseline row)
ROWS = {
    "random": ([], "baseline: random partition, small blocks, m 0.99 -> 1", None),
    "one-block": (["--block-size", "{K}"], "Table 5: N_B = K collapses (k-NN 0.11 %)", "collapses"),
    "fixed": (["--partition", "fixed"], "Table 7: fixed blocks learn, below random (53.3 vs 56.4 %)", "below"),
    "no-momentum": (["--base-teacher-momentum", "0", "--final-teacher-momentum", "0"],
                    "Tables 5-6: m = 0 learns, below m 0.99 -> 1 (46.2 vs 51.3 % at N_B 512; 51.0 vs 51.3 %)",
                    "below"),
    "block-{B}": (["--block-size", "{B}"], "Table 5: N_B 128 to 4096 within 0.3 % of each other", "similar"),
}  # fmt: skip
SIMILAR_POINTS = 1.5  # k-NN points within which two rows count as "similar" at this scale


def row_names(second_block_size: int) -> list[str]:
    """The rows' names, ``block-{B}`` filled in."""
    return [name.format(B=second_block_size) for name in ROWS]


@dataclass(kw_only=True)
class AblationsConfig(CommandConfig):
    """carp-ablations' options: one flag per field; the words after ``--`` go to every carp-pretrain run."""

    preset: str = option("digits", "carp-pretrain preset for every row")
    output_dir: str = option("runs/ablations", "one run directory per row inside")
    second_block_size: int = option(32, "the block-<n> row's N_B")
    rows: tuple[str, ...] | None = option(
        None, "comma list: a subset of the rows (the random baseline always runs; default: all)", separator=",",
        metavar="ROW,...",
    )  # fmt: skip
    pretrain_args: tuple[str, ...] = option(
        (), "carp-pretrain flags for every run, before the row's own (e.g. -- --epochs 10)", remainder=True
    )

    def validate(self) -> None:
        self.positive("second_block_size")
        presets = available_presets()
        self.require(self.preset in presets, f"unknown --preset {self.preset!r}; available: {', '.join(presets)}")
        names = row_names(self.second_block_size)
        unknown = sorted(set(self.rows or ()) - set(names))
        self.require(not unknown, f"unknown rows {unknown}; choose from {names}")


def parse_config(argv: list[str] | None = None) -> AblationsConfig:
    """carp-ablations' command line as an ``AblationsConfig``; bad values stop here in one line (exit status 2)."""
    return parse(AblationsConfig, argv, "carp-ablations", __doc__.splitlines()[0])


def row_flags(name: str, flags: list[str], num_prototypes: int, second_block: int) -> tuple[str, list[str]]:
    fill = {"K": str(num_prototypes), "B": str(second_block)}
    return name.format(**fill), [flag.format(**fill) for flag in flags]


def read_result(run_dir: Path) -> dict:
    """k-NN top-1 and the last epoch's prototype counts of a finished run."""
    summary = json.loads((run_dir / "summary.json").read_text())
    with open(run_dir / "training_log.csv") as handle:
        last = list(csv.DictReader(handle))[-1]
    return {
        "knn_top1": summary.get("knn_top1"),
        "knn_top1_random_init": summary.get("knn_top1_random_init"),
        "prototypes_used": float(last["prototypes_used"]),
        "largest_assignment_share": float(last.get("largest_assignment_share", "nan")),
        "train_seconds": summary.get("train_seconds"),
    }


def verdict(check: str | None, result: dict, baseline: dict, chance: float) -> str:
    """Whether this row's k-NN moves from the baseline row's the way the paper's did."""
    if check is None:
        return "-"
    ours, base = result["knn_top1"], baseline["knn_top1"]
    if check == "collapses":
        agrees = ours < chance + 0.5 * (base - chance) and result["prototypes_used"] < 0.5 * baseline["prototypes_used"]
    elif check == "below":
        agrees = ours < base
    else:
        agrees = abs(ours - base) <= SIMILAR_POINTS
    return "agrees" if agrees else "DIFFERS"


def markdown(rows: list[dict], preset: str) -> str:
    lines = [f"CARP ablations on the `{preset}` preset (k-NN top-1 on its evaluation split; prototypes used: "
             "distinct teacher assignments per training batch, last epoch's mean)", "",
             "| row | k-NN top-1 | prototypes used | largest share | paper | ours vs paper | command |",
             "|---|---|---|---|---|---|---|"]  # fmt: skip
    for row in rows:
        lines.append(f"| {row['row']} | {row['knn_top1']:.2f} % | {row['prototypes_used']:.1f} / {row['K']} | "
                     f"{100 * row['largest_assignment_share']:.0f} % | {row['paper']} | {row['verdict']} | "
                     f"`{row['command']}` |")  # fmt: skip
    return "\n".join(lines) + "\n"


def ablations(args: AblationsConfig) -> list[dict]:
    """Run (or read back) every row of ``args``; write ablations.md and ablations.json; the rows' results."""
    from training.pretrain import parse_config as parse_pretrain_config

    extra = list(args.pretrain_args)
    num_prototypes = int(parse_pretrain_config(["--preset", args.preset, *extra])["num_prototypes"])
    if num_prototypes % args.second_block_size:
        raise SystemExit(f"carp-ablations: --second-block-size {args.second_block_size} must divide K = "
                         f"{num_prototypes}.")  # fmt: skip
    out = Path(args.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SystemExit(f"carp-ablations: cannot create {out}: {error}") from None
    rows = [(*row_flags(name, flags, num_prototypes, args.second_block_size), paper, check)
            for name, (flags, paper, check) in ROWS.items()]  # fmt: skip
    if args.rows:
        rows = [row for row in rows if row[0] in args.rows or row[0] == "random"]

    results = []
    for name, flags, paper, check in rows:
        run_dir = out / name
        command = ["carp-pretrain", "--preset", args.preset, *extra, *flags, "--output-dir", str(run_dir),
                   "--export", "false"]  # fmt: skip
        if not (run_dir / "summary.json").is_file():
            print(f"carp-ablations: {name}: {shlex.join(command)}", flush=True)
            done = subprocess.run([sys.executable, "-m", "training.pretrain", *command[1:]],
                                  env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))  # fmt: skip
            if done.returncode:
                raise SystemExit(f"carp-ablations: the {name} run failed (exit {done.returncode}); rerun to resume.")
        result = read_result(run_dir)
        if result["knn_top1"] is None:
            raise SystemExit(f"carp-ablations: the {args.preset} preset has no labelled split for k-NN.")
        results.append({"row": name, "K": num_prototypes, "paper": paper, "check": check,
                        "command": shlex.join(command), **result})  # fmt: skip

    chance = 100.0 / json.loads((out / rows[0][0] / "summary.json").read_text())["num_classes"]
    baseline = results[0]
    for result in results:
        result["verdict"] = verdict(result["check"], result, baseline, chance)
    (out / "ablations.json").write_text(json.dumps(results, indent=2))
    table = markdown(results, args.preset)
    (out / "ablations.md").write_text(table)
    print("\n" + table)
    print(f"carp-ablations: {out / 'ablations.md'} and ablations.json")
    return results


def main(argv: list[str] | None = None) -> int:
    """The table of every row; its own process imports no TensorFlow (each row is a carp-pretrain process)."""
    ablations(parse_config(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
