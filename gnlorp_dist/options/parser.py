"""The one way every command line is made: transformers' ``HfArgumentParser`` over a config
dataclass, plus ``--config FILE`` (YAML or JSON) on every CLI.

- A field is a flag (``max_steps`` -> ``--max-steps``; ``HfArgumentParser`` also accepts
  ``--max_steps``), helped by the field's docstring (:func:`~gnlorp_dist.options.fields.
  field_docs`) with its default appended when the docstring does not state it; a bool field
  defaulting to True also gets ``--no-<flag>``; the field's metadata gives choices, a metavar
  and aliases (:func:`~gnlorp_dist.options.fields.option`).
- A ``tuple[X, ...]`` field takes one or more values, space- or comma-separated.
- ``--config run.yaml`` (or ``.json``): a mapping of field names (``max_steps: 200``) read
  before the command line, whose flags override it; unknown keys and values outside a flag's
  choices are usage errors.

transformers is imported inside :func:`build_parser` only (the import rules keep new modules from
importing it at module level).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gnlorp_dist.options.fields import field_docs

CONFIG_FLAG = "--config"
_METAVARS = {int: "N", float: "X", str: "STR"}


def _split(values: Sequence[str]) -> list[str]:
    """``--methods a b``, ``--methods a,b`` and mixtures of both."""
    return [part for value in values for part in str(value).split(",") if part]


def _optional_inner(hint: Any) -> Any:
    """``X`` for ``X | None``; ``hint`` otherwise."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return hint


def _help(field: dataclasses.Field, text: str) -> str:
    default = field.default
    if not any(default is v for v in (None, False, True, dataclasses.MISSING)):
        if "default" not in text:
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            text += f" (default: {shown})"
    return text.replace("%", "%%")  # argparse formats help with %


@functools.cache
def _parser_class() -> type[argparse.ArgumentParser]:
    from transformers import HfArgumentParser  # noqa: PLC0415  (see the module docstring)

    class OptionsParser(HfArgumentParser):
        """``HfArgumentParser`` with docstring help, tuple fields and untouched field types (the
        stock one resolves ``field.type`` in place on the dataclass's own fields)."""

        def _add_dataclass_arguments(self, dtype: Any) -> None:
            hints = typing.get_type_hints(dtype)
            docs = field_docs(dtype)
            for field in dataclasses.fields(dtype):
                if not field.init:
                    continue
                field = _copy_field(field)
                field.type = _optional_inner(hints[field.name])
                metadata = {**field.metadata, "help": _help(field, docs.get(field.name, ""))}
                if typing.get_origin(field.type) is tuple:
                    self._add_tuple_argument(field, metadata)
                    continue
                if field.type in _METAVARS and "choices" not in metadata:
                    metadata.setdefault("metavar", _METAVARS[field.type])
                field.metadata = types.MappingProxyType(metadata)
                self._parse_dataclass_field(self, field)

        def _add_tuple_argument(self, field: dataclasses.Field, metadata: dict) -> None:
            flags = [f"--{field.name.replace('_', '-')}", *metadata.pop("aliases", [])]
            metadata.setdefault("metavar", field.name.upper().rstrip("S"))
            nargs = metadata.pop("nargs", "+")  # "*": the flag alone gives an empty tuple
            self.add_argument(*flags, dest=field.name, nargs=nargs, default=None, **metadata)

    return OptionsParser


def _copy_field(field: dataclasses.Field) -> dataclasses.Field:
    copy = dataclasses.field(default=field.default, default_factory=field.default_factory)
    copy.name, copy.metadata = field.name, field.metadata
    return copy


def build_parser(
    config_type: type, *, prog: str, description: str, epilog: str | None = None
) -> argparse.ArgumentParser:
    """The command line of ``config_type``: one flag per field, and ``--config FILE``."""
    parser = _parser_class()(
        config_type, prog=prog, description=description, epilog=epilog,
        formatter_class=argparse.HelpFormatter,
    )  # fmt: skip
    for action in parser._actions:  # --max-steps before --max_steps in usage and help
        action.option_strings.sort(key=lambda flag: "_" in flag)
    parser.add_argument(
        CONFIG_FLAG,
        metavar="FILE",
        help="A YAML or JSON file of options (field names: max_steps: 200, or the flag's name "
        "with - or _), read first: flags on the command line override it.",
    )
    return parser


def read_config_file(path: str) -> dict[str, Any]:
    """The mapping a ``--config`` file holds (``.yaml``/``.yml`` or ``.json``)."""
    file = Path(path)
    if not file.is_file():
        raise ValueError(f"{CONFIG_FLAG} {path!r} does not exist")
    text = file.read_text(encoding="utf-8")
    if file.suffix.lower() in (".yaml", ".yml"):
        import yaml  # noqa: PLC0415  (a dependency of transformers)

        data = yaml.safe_load(text)
    elif file.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{CONFIG_FLAG} {path!r}: use a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"{CONFIG_FLAG} {path!r} holds a {type(data).__name__}, not a mapping")
    return {str(key).replace("-", "_"): value for key, value in data.items()}


def _file_defaults(parser: argparse.ArgumentParser, path: str) -> dict[str, Any]:
    """The file's values as parser defaults: each key a flag's dest, each value in its choices."""
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    values = read_config_file(path)
    for key, value in values.items():
        action = actions.get(key)
        if action is None:
            raise ValueError(
                f"{CONFIG_FLAG} {path}: unknown option {key!r}; known: {', '.join(sorted(actions))}"
            )
        if action.nargs in ("+", "*") and not isinstance(value, list | tuple):
            values[key] = [value]
        items = values[key] if action.nargs in ("+", "*") else [value]  # each in the choices
        if action.choices is not None and any(
            v is not None and v not in action.choices for v in items
        ):
            raise ValueError(
                f"{CONFIG_FLAG} {path}: {key}={value!r}; choose one of "
                f"{', '.join(map(str, action.choices))}"
            )
    return values


def parse_namespace(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None = None
) -> argparse.Namespace:
    """``argv`` parsed over the ``--config`` file's values (flags win). A bad file is a usage
    error (exit status 2)."""
    early = argparse.ArgumentParser(add_help=False)
    early.add_argument(CONFIG_FLAG)
    known, _ = early.parse_known_args(argv)
    if known.config is not None:
        try:
            parser.set_defaults(**_file_defaults(parser, known.config))
        except (ValueError, OSError) as err:
            parser.error(str(err))
        # A required flag the file gives is no longer required on the command line.
        for action in parser._actions:
            if action.required and action.default is not None:
                action.required = False
    namespace = parser.parse_args(argv)
    del namespace.config
    return namespace


def config_from_namespace(config_type: type, namespace: argparse.Namespace) -> Any:
    """``config_type`` from the parsed flags of its fields (tuples split at commas; other
    entries of ``namespace`` are ignored)."""
    hints = typing.get_type_hints(config_type)
    values: dict[str, Any] = {}
    for field in dataclasses.fields(config_type):
        if not field.init or not hasattr(namespace, field.name):
            continue
        value = getattr(namespace, field.name)
        hint = _optional_inner(hints[field.name])
        if typing.get_origin(hint) is tuple:
            if value is None:
                continue  # the field's own default
            item = typing.get_args(hint)[0]
            value = tuple(_to_item(item, part, field.name) for part in _split(value))
        values[field.name] = value
    return config_type(**values)


def _to_item(item: type, text: str, name: str) -> Any:
    try:
        return item(text)
    except ValueError:
        flag = f"--{name.replace('_', '-')}"
        raise ValueError(f"{flag}: {text!r} is not a valid {item.__name__}") from None
