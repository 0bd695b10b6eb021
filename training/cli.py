"""Command lines from typed dataclasses, the way carp-pretrain's come from ``training.config``.

Each command's options are one dataclass (``EvalConfig``, ``FinetuneConfig``,
``ExportConfig``, ``ConvertConfig``, ``VisualizeConfig``, ``AblationsConfig``):
every field has a type, a default and a help text (``option``) and is a flag
named after it (``knn_k`` -> ``--knn-k``). ``parse`` builds the parser from
the fields and returns the dataclass, validated by its ``validate``; a bad
value is refused in one line (``carp-eval: --knn-k must be positive, got 0``,
exit status 2) before any work. Booleans are spelled as carp-pretrain's:
``--flag true`` / ``--flag false``. Python callers build the same dataclass
(``evaluate(EvalConfig(model="run/model.keras", knn_k=(20,)))``).

Nothing here imports Keras or TensorFlow: ``--help`` and bad values answer at
once; the commands (carp-pretrain too) call ``quiet_startup_logs`` afterwards.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import logging
import sys
import types
import typing
from typing import Any, NoReturn

__all__ = [
    "CommandConfig",
    "Refused",
    "build_parser",
    "flag_name",
    "optional_type",
    "option",
    "parse",
    "parse_boolean",
    "quiet_startup_logs",
    "refuse",
]

BOOLEAN_WORDS = ("1", "true", "yes", "on", "0", "false", "no", "off")  # true words, then false words
MISSING = dataclasses.MISSING


def parse_boolean(text: str) -> bool:
    """A boolean flag's value: one of ``BOOLEAN_WORDS`` (every command spells booleans ``--flag true|false``)."""
    if text.lower() in BOOLEAN_WORDS[:4]:
        return True
    if text.lower() in BOOLEAN_WORDS[4:]:
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {text!r}")


def optional_type(kind: type):
    """An argparse type for ``kind | None``: ``none`` (or nothing) is None."""

    def parse(text: str):
        return None if text.lower() in ("none", "") else kind(text)

    parse.__name__ = kind.__name__
    return parse


def _tensorflow_installed() -> bool:
    try:
        return importlib.util.find_spec("tensorflow") is not None
    except ImportError:  # an import hook that refuses it
        return False


def quiet_startup_logs() -> None:
    """Start-up without TensorFlow's C++ banner lines; warnings and errors still show.

    TensorFlow writes its start-up lines (oneDNN, CUDA stubs, the CUDA probe of
    a host without a GPU) before its logging is configured, so no setting
    silences them: they are held back while it is imported and looks for GPUs,
    and shown if that fails.
    """
    import os
    import tempfile

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    logging.getLogger("absl").setLevel(logging.ERROR)
    logging.getLogger("tensorflow").setLevel(logging.WARNING)  # e.g. "Assets written to" on every export
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)  # "Unable to initialize backend 'tpu'"
    if "tensorflow" in sys.modules or not _tensorflow_installed():  # JAX/PyTorch machines may have none
        return
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as held:
        os.dup2(held.fileno(), 2)
        try:
            import tensorflow as tf

            tf.config.list_physical_devices("GPU")  # CUDA's probe logs "failed call to cuInit" on CPU-only hosts
        except Exception:
            os.dup2(saved, 2)
            held.seek(0)
            sys.stderr.write(held.read().decode(errors="replace"))
            raise
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def option(
    default: Any = MISSING,
    help: str = "",
    choices: tuple | None = None,
    *,
    positional: bool = False,
    nargs: str | int | None = None,
    metavar: str | tuple | None = None,
    group: str | None = None,
    separator: str | None = None,
    remainder: bool = False,
) -> Any:
    """A command's field: its default (none: required), help text and allowed values, as ``training.config.option``.

    ``positional``: an argument without a ``--`` name; ``nargs`` for ``tuple[X, ...]`` fields ("+" unless given);
    ``separator``: a tuple given as one word (``--datasets cifar10,stl10``); ``remainder``: the words after ``--``;
    ``group``: the --help section.
    """
    if isinstance(default, (list, dict)):
        raise TypeError("use tuples for sequence defaults")
    metadata = {
        "help": help,
        "choices": choices,
        "resumable": False,
        "cli": {
            "positional": positional,
            "nargs": nargs,
            "metavar": metavar,
            "group": group,
            "separator": separator,
            "remainder": remainder,
        },  # fmt: skip
    }
    return dataclasses.field(default=default, metadata=metadata)


def flag_name(name: str) -> str:
    """A field's flag: ``knn_k`` -> ``--knn-k``."""
    return "--" + name.replace("_", "-")


def _unwrapoptional_type(annotation: Any) -> tuple[Any, bool]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return next(a for a in typing.get_args(annotation) if a is not type(None)), True
    return annotation, False


def _is_tuple(annotation: Any) -> bool:
    return typing.get_origin(_unwrapoptional_type(annotation)[0]) is tuple


def _split(separator: str, kind: type):
    def parse(text: str) -> tuple:
        return tuple(kind(item.strip()) for item in text.split(separator) if item.strip())

    parse.__name__ = kind.__name__
    return parse


@dataclasses.dataclass(kw_only=True)
class CommandConfig:
    """A command's options; subclasses are ``@dataclass(kw_only=True)`` and check themselves in ``validate``."""

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            separator = spec.metadata.get("cli", {}).get("separator")
            if separator and isinstance(value, str):  # EvalConfig(datasets="cifar10,stl10")
                kind = typing.get_args(_unwrapoptional_type(hints[spec.name])[0])[0]
                value = _split(separator, kind)(value)
            elif isinstance(value, list) and _is_tuple(hints[spec.name]):
                value = tuple(value)
            elif _is_tuple(hints[spec.name]) and isinstance(value, (int, float)):  # knn_k=20 -> (20,)
                value = (value,)
            setattr(self, spec.name, value)
            choices = spec.metadata.get("choices")
            if choices and value not in choices:
                raise ValueError(f"{flag_name(spec.name)} must be one of {', '.join(map(str, choices))}, "
                                 f"got {value!r}")  # fmt: skip
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the flag (``--knn-k must be positive, got 0``)."""

    # helpers for validate()
    def require(self, condition: bool, message: str) -> None:
        if not condition:
            raise ValueError(message)

    def positive(self, *names: str) -> None:
        """Each field (or each item of a tuple field) is None or > 0."""
        for name in names:
            value = getattr(self, name)
            for item in value if isinstance(value, tuple) else (value,):
                self.require(item is None or item > 0, f"{flag_name(name)} must be positive, got {item}")

    def fraction(self, *names: str) -> None:
        """Each field is None or in (0, 1]."""
        for name in names:
            value = getattr(self, name)
            self.require(value is None or 0 < value <= 1, f"{flag_name(name)} must be in (0, 1], got {value}")


def _shown(value: Any) -> str:
    if isinstance(value, tuple):
        return " ".join(map(str, value)) if value else "none"
    return str(value)


def _add_field(parser: argparse.ArgumentParser, group, spec: dataclasses.Field, annotation: Any) -> None:
    """One argument for one field: type, arity and choices from the annotation, help with the default."""
    cli = spec.metadata["cli"]
    required = spec.default is MISSING and spec.default_factory is MISSING
    help_text = spec.metadata["help"].replace("%", "%%")
    if not required and "default" not in help_text:  # else the help says what the default means
        help_text += f" (default: {_shown(spec.default)})"
    kind, optional = _unwrapoptional_type(annotation)
    kwargs: dict = {"help": help_text, "choices": spec.metadata["choices"]}
    if typing.get_origin(kind) is tuple:
        items = typing.get_args(kind)
        item = items[0]
        if cli["separator"]:
            kwargs.update(type=_split(cli["separator"], item), metavar=cli["metavar"] or f"{item.__name__.upper()},...")
        elif len(items) == 2 and items[1] is Ellipsis:
            kwargs.update(type=item, nargs=cli["nargs"] or "+")
        else:
            kwargs.update(type=item, nargs=len(items), metavar=cli["metavar"] or (item.__name__.upper(),) * len(items))
    elif kind is bool:
        kwargs.update(type=parse_boolean, metavar="BOOL")
    else:
        kwargs.update(type=optional_type(kind) if optional and not cli["positional"] else kind)
    if cli["metavar"] and "metavar" not in kwargs:
        kwargs["metavar"] = cli["metavar"]
    target = group or parser
    if cli["positional"]:
        kwargs.update(default=argparse.SUPPRESS, nargs=None if required else "?")
        kwargs.setdefault("metavar", spec.name.upper())
        target.add_argument(spec.name, **kwargs)
    else:
        kwargs.update(dest=spec.name, default=argparse.SUPPRESS, required=required)
        target.add_argument(flag_name(spec.name), **kwargs)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (``carp-eval: ...``, exit status 2), as the dataclass's refusals."""

    def error(self, message: str) -> NoReturn:
        refuse(self.prog, f"{message} (see {self.prog} --help)")


class Refused(SystemExit):
    """A refused command line: exit status 2 (argparse's), the one-line message as ``str()``."""

    def __init__(self, message: str):
        super().__init__(2)
        self.message = message

    def __str__(self) -> str:
        return self.message


def refuse(prog: str, message: Any) -> NoReturn:
    """Stop in one line on stderr with argparse's exit status 2: ``carp-eval: --knn-k must be positive, got 0``."""
    line = f"{prog}: {str(message).rstrip('.')}"
    sys.stderr.write(line + "\n")
    raise Refused(line)


def _remainder(config_class: type) -> dataclasses.Field | None:
    return next((f for f in dataclasses.fields(config_class) if f.metadata["cli"]["remainder"]), None)


def build_parser(config_class: type, prog: str, description: str | None = None) -> argparse.ArgumentParser:
    """The parser of a command: one argument per field of ``config_class``, grouped by their ``group``."""
    remainder = _remainder(config_class)
    epilog = None
    if remainder is not None:
        epilog = f"-- {remainder.name.upper()}...: {remainder.metadata['help']}".replace("%", "%%")
    parser = _Parser(prog=prog, description=description, epilog=epilog)
    hints = typing.get_type_hints(config_class)
    groups: dict[str, Any] = {}
    for spec in dataclasses.fields(config_class):
        if spec.metadata["cli"]["remainder"]:
            continue
        title = spec.metadata["cli"]["group"]
        if title and title not in groups:
            groups[title] = parser.add_argument_group(title)
        _add_field(parser, groups.get(title), spec, hints[spec.name])
    return parser


def boolean_flags(config_class: type) -> list[str]:
    """The flags of ``config_class``'s bool fields."""
    hints = typing.get_type_hints(config_class)
    return [flag_name(f.name) for f in dataclasses.fields(config_class) if hints[f.name] is bool]


def _check_spelling(config_class: type, argv: list[str], prog: str, renamed: dict[str, str]) -> None:
    """Old spellings and bare booleans get a one-line pointer to the one spelling (``--flag true``)."""
    booleans = set(boolean_flags(config_class))
    for index, word in enumerate(argv):
        if word in renamed:
            refuse(prog, f"{word} is now {renamed[word]}")
        if word in booleans:
            following = argv[index + 1] if index + 1 < len(argv) else None
            if following is None or (following.startswith("-") and following.lower() not in BOOLEAN_WORDS):
                refuse(prog, f"{word} takes true or false ({word} true), as every boolean flag")


def parse(
    config_class: type,
    argv: list[str] | None,
    prog: str,
    description: str | None = None,
    renamed: dict[str, str] | None = None,
) -> Any:
    """``argv`` (default: ``sys.argv[1:]``) as a validated ``config_class``; bad input stops in one line, exit 2.

    ``renamed`` maps flags that no longer exist to their spelling now (``{"--no-resize": "--resize false"}``).
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    values: dict[str, Any] = {}
    remainder = _remainder(config_class)
    if remainder is not None and "--" in argv:
        values[remainder.name] = tuple(argv[argv.index("--") + 1 :])
        argv = argv[: argv.index("--")]
    _check_spelling(config_class, argv, prog, renamed or {})
    namespace = build_parser(config_class, prog, description).parse_args(argv)
    values.update({key: tuple(value) if isinstance(value, list) else value for key, value in vars(namespace).items()})
    try:
        return config_class(**values)
    except ValueError as error:
        refuse(prog, error)
