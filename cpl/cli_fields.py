"""Command-line flags generated from a pydantic config's fields: one source for each setting.

A config class (`cpl.config.SearchConfig`, the training configs) holds each setting's type, default, bounds and
description. `add_field_flags` turns the fields into argparse flags whose help is the field's description and
whose shown default is the field's default; `given_fields` returns only the values the user actually typed, so
a preset (``--round 2``) is overridden by every flag given on the command line, even one equal to the default.
"""

from __future__ import annotations

import argparse
import enum
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from pydantic.fields import FieldInfo


@dataclass(frozen=True)
class FieldFlag:
    """How one field appears on the command line.

    ``flag``: the option string (default ``--field-name``). ``negate``: a boolean field whose default is true
    gets a ``--no-...`` switch that sets it false. ``parse``: the argparse ``type`` (default: from the field's
    annotation). ``zero_means_none``: for an optional number, 0 on the command line means None.
    """

    field: str
    flag: str | None = None
    negate: bool = False
    parse: Callable[[str], Any] | None = None
    zero_means_none: bool = False
    help: str | None = None

    def option(self) -> str:
        if self.flag:
            return self.flag
        name = self.field.replace("_", "-")
        return f"--no-{name}" if self.negate else f"--{name}"


def positive_int(value: str) -> int:
    number = int(value)
    if number < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return number


def _base_type(annotation: Any) -> Any:
    """``int | None`` -> int; ``Literal[...]`` and enums are returned as they are."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation


def _choices(annotation: Any) -> list[str] | None:
    if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
        return [str(m.value) for m in annotation]
    if typing.get_origin(annotation) is typing.Literal:
        return [str(a) for a in typing.get_args(annotation)]
    return None


def _parser_for(annotation: Any, info: FieldInfo) -> Callable[[str], Any]:
    if annotation is bool:
        raise TypeError("boolean fields are switches, not typed flags")
    if annotation is int:
        lower = next((m.ge for m in info.metadata if getattr(m, "ge", None) is not None), None)
        return positive_int if lower == 1 else int
    if annotation is float:
        return float
    if typing.get_origin(annotation) is typing.Literal:
        values = typing.get_args(annotation)
        if all(isinstance(v, int) for v in values):
            return int
    return str


def shown_default(value: Any) -> str:
    if isinstance(value, enum.Enum):
        return str(value.value)
    return str(value)


def field_help(info: FieldInfo, spec: FieldFlag, presets: Mapping[str, BaseModel] | None = None) -> str:
    """The field's description and default, plus the value each preset gives it where that differs."""
    text = spec.help or info.description or ""
    if spec.negate:
        return spec.help or f"do not {text}"
    default = f"default: {shown_default(info.default)}"
    for name, preset in (presets or {}).items():
        value = getattr(preset, spec.field)
        if value != info.default:
            default += f"; {shown_default(value)} with {name}"
    return f"{text} ({default})".strip()


def add_field_flags(
    parser: argparse.ArgumentParser | argparse._ArgumentGroup,
    model: type[BaseModel],
    flags: Iterable[FieldFlag | str],
    *,
    presets: Mapping[str, BaseModel] | None = None,
) -> None:
    """Add one flag per field; values the user does not give stay off the namespace (see `given_fields`).

    ``presets`` (e.g. ``{"--round 2": SearchConfig.round_preset(2)}``) are named in the help where they change
    a default.
    """
    for spec in flags:
        spec = FieldFlag(spec) if isinstance(spec, str) else spec
        info = model.model_fields[spec.field]
        if info.description is None and spec.help is None:
            raise ValueError(f"{model.__name__}.{spec.field} has no description to use as help")
        common: dict[str, Any] = dict(dest=spec.field, default=argparse.SUPPRESS, help=field_help(info, spec, presets))
        annotation = _base_type(info.annotation)
        if annotation is bool:
            value = not spec.negate
            if spec.negate and info.default is not True:
                raise ValueError(f"--no-... flag for {spec.field}, whose default is {info.default}")
            parser.add_argument(spec.option(), action="store_const", const=value, **common)
            continue
        parse = spec.parse or _parser_for(annotation, info)
        choices = _choices(annotation)
        if choices is not None and parse is str:
            common["choices"] = choices
        elif choices is not None:
            common["choices"] = [parse(c) for c in choices]
        if spec.zero_means_none:
            inner = parse

            def parse(text: str, _inner: Callable[[str], Any] = inner) -> Any:
                value = _inner(text)
                return None if value == 0 else value

        parser.add_argument(spec.option(), type=parse, **common)


def given_fields(args: argparse.Namespace, model: type[BaseModel]) -> dict[str, Any]:
    """The fields of ``model`` that were given on the command line, with their parsed values."""
    return {name: getattr(args, name) for name in model.model_fields if hasattr(args, name)}
