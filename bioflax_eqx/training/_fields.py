"""The machinery of the configuration's fields: each field's description and
choices (which the command line's options are made from), its type check, and the
error that names an invalid field."""

import dataclasses
import types
import typing
from collections.abc import Sequence
from typing import Any

from .._checks import is_int


class ConfigError(ValueError):
    """An invalid [`TrainConfig`][bioflax_eqx.TrainConfig] field, or argument of the
    training functions (a `batch_size` that the devices do not divide); `field`
    names it."""

    field: str
    reason: str

    def __init__(self, field: str, reason: str):
        super().__init__(f"`{field}` {reason}")
        self.field = field
        self.reason = reason


def field(default: Any, help: str, choices: Sequence[str] | None = None) -> Any:
    """A dataclass field with its description (and choices) for the command line."""
    return dataclasses.field(
        default=default, metadata={"help": help, "choices": choices}
    )


def check_choice(field: str, value: object, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(field, f"must be one of {', '.join(choices)}; got {value!r}.")


def check_batch_split(batch_size: int, devices: int, which: str) -> None:
    """The one check of a batch against devices, wherever a batch is split:
    `batch_size` must be a multiple of the `devices` that `which` describes."""
    if batch_size % devices != 0:
        raise ConfigError(
            "batch_size",
            f"must be a multiple of {which}: each device takes an equal part of "
            f"every batch; got {batch_size}.",
        )


def field_type(annotation: Any) -> tuple[type, bool]:
    """The base type of a field (`int`, `float`, `str`, `bool`) and whether `None`
    is allowed."""
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) in (
        typing.Union,
    ):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        return args[0], True
    return annotation, False


def check_type(field: str, value: object, annotation: Any) -> None:
    kind, optional = field_type(annotation)
    if value is None and optional:
        return
    if kind is bool:
        ok = isinstance(value, bool)
    elif kind is int:
        ok = isinstance(value, int) and is_int(value)  # a Python int (JSON), no bool
    elif kind is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
    else:
        ok = isinstance(value, kind)
    if not ok:
        name = kind.__name__ + (" or None" if optional else "")
        raise ConfigError(
            field, f"must be of type {name}, got {type(value).__name__} {value!r}."
        )
