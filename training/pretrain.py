"""carp-pretrain: pretrain a CARP encoder from a preset, then score it with weighted k-NN.

With no arguments it runs the ``digits`` preset: a small ResNet on
scikit-learn's bundled digits, a few minutes on 2 CPU cores. Every field of
the configuration has its own flag, valid on every preset (``--epochs 5``,
``--block-size 64``...); ``--print-config`` prints the resolved configuration
and exits. The run directory (``--output-dir``, default ``runs/<preset>``) is
described in ``training.run_directory``; rerunning the same command after a
crash or ``kill -9`` resumes from the newest complete checkpoint.

This module only parses the command line; ``training.config`` holds the
schema and ``training.run`` the run's stages.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import types
import typing

from training.cli import optional_type, parse_boolean, quiet_startup_logs
from training.config import SECTIONS, PretrainConfig, available_presets, load_preset
from training.run import run

__all__ = ["available_presets", "build_parser", "load_preset", "main", "parse_config", "run"]


def _add_field(group, spec: dataclasses.Field, annotation, default) -> None:
    """One flag for one config field: its type, arity and choices from the schema, the preset's value in --help."""
    kwargs: dict = dict(
        dest=spec.name,
        default=argparse.SUPPRESS,
        choices=spec.metadata["choices"],
        help=f"{spec.metadata['help']} (default: {_shown(default)})",
    )
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        kind = next(a for a in args if a is not type(None))
        kwargs.update(type=optional_type(kind), metavar=kind.__name__.upper())
    elif typing.get_origin(annotation) is tuple:
        kwargs.update(type=args[0], nargs=len(args), metavar=tuple(f"{args[0].__name__.upper()}" for _ in args))
    elif annotation is bool:
        kwargs.update(type=parse_boolean, metavar="BOOL")
    else:
        kwargs.update(type=annotation)
    group.add_argument("--" + spec.name.replace("_", "-"), **kwargs)


def _shown(value) -> str:
    return " ".join(map(str, value)) if isinstance(value, tuple) else str(value)


def build_parser(preset: PretrainConfig) -> argparse.ArgumentParser:
    """The carp-pretrain parser: one flag per config field, grouped by section, showing ``preset``'s values."""
    parser = argparse.ArgumentParser(prog="carp-pretrain", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--preset", default="digits", help=f"a preset ({', '.join(available_presets())}); every flag below overrides it"
    )
    parser.add_argument("--print-config", action="store_true", help="print the resolved configuration and exit")
    for name, section in SECTIONS.items():
        group = parser.add_argument_group(name, section.__doc__.splitlines()[0].replace("``", ""))
        hints = typing.get_type_hints(section)
        values = getattr(preset, name)
        for spec in dataclasses.fields(section):
            _add_field(group, spec, hints[spec.name], getattr(values, spec.name))
    return parser


def parse_config(argv: list[str] | None = None) -> PretrainConfig:
    """The preset named by ``--preset`` (old names are aliases) with every flag given applied on top."""
    argv = sys.argv[1:] if argv is None else list(argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default="digits")
    known, _ = pre.parse_known_args(argv)
    try:
        preset = load_preset(known.preset)
    except ValueError as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    args = vars(build_parser(preset).parse_args(argv))
    args.pop("preset")
    print_config = args.pop("print_config")
    epochs = args.get("epochs", preset.optimizer.epochs)
    if "warmup_epochs" not in args and preset.optimizer.warmup_epochs > epochs / 2:  # a short trial run
        args["warmup_epochs"] = epochs / 2
        logging.getLogger("keras_carp").warning(
            "the preset's %g warm-up epochs do not fit a %d-epoch run: warming up for %g (set --warmup-epochs to "
            "choose).",
            preset.optimizer.warmup_epochs,
            epochs,
            epochs / 2,
        )
    try:
        config = preset.replace(**args)
    except ValueError as error:
        raise SystemExit(f"carp-pretrain: {error}") from None
    if print_config:
        print(json.dumps(config.to_dict(), indent=2))
        raise SystemExit(0)
    return config


def main(argv: list[str] | None = None) -> int:
    quiet_startup_logs()
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = parse_config(argv)
    summary = run(config)
    if summary.get("process_index", 0) != 0:  # another process of a multi-process job
        print(f"\nprocess {summary['process_index']} of {summary['processes']}: the chief (process 0) wrote "
              f"the run directory {summary['output_dir']}")  # fmt: skip
        return 0
    if "knn_top1" in summary:
        evaluation = config.evaluation
        print(
            f"\nweighted k-NN (k={evaluation.knn_k}, T={evaluation.knn_temperature}) top-1 on the "
            f"{config.data.dataset} {summary['eval_split']} split:"
        )
        print(f"  CARP encoder (teacher):     {summary['knn_top1']:.2f}%")
        print(f"  same encoder, random init:  {summary['knn_top1_random_init']:.2f}%")
    else:
        print("\nno labelled evaluation split: k-NN skipped")
    print(f"summary and model.keras in {summary['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
