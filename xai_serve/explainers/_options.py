"""Method options: the one schema of their names and types, and the checks of their values.

:data:`OPTION_SCHEMA` is read from the wire API's ``xai_serve.v1.Options`` message (its
descriptor): a field's name is the option's name everywhere (``xai_serve.explain``'s keyword
options and arguments, the clients' keywords, ``xai-serve explain -o KEY=VALUE``, the gRPC and
Open Inference Protocol servicers), and the field's type is the option's type. The explainers'
option tables (``Explainer.options``) use the same names; options that only the Python API has
(``amp``, ``size``, ``reshape``) are simply not fields. ``seed`` and ``baseline`` are fields
too, though :func:`xai_serve.explain` takes them as arguments of their own
(:data:`ARGUMENT_OPTIONS`).

The checks raise :class:`~xai_serve.InvalidInput` naming the option and what it accepts.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from google.protobuf.descriptor import Descriptor, FieldDescriptor

from xai_serve.errors import InvalidInput, positive_int
from xai_serve.explainers.forward import ForwardPath
from xai_serve.proto import explainer_pb2 as _pb

__all__ = [
    "AMP_DTYPES",
    "AMP_VALUES",
    "ARGUMENT_OPTIONS",
    "LOCAL_OPTIONS",
    "OPTION_SCHEMA",
    "OptionSpec",
    "amp_option",
    "bool_option",
    "choice_option",
    "int_option",
    "positive_int",
]


@dataclass(frozen=True)
class OptionSpec:
    """One method option, as the schema declares it.

    ``kind``: ``"int"``, ``"float"``, ``"bool"``, ``"str"``, ``"choice"`` (one of ``choices``,
    lower-case words; on the wire an enum, whose value 0 means "the method's default") or
    ``"baseline"`` (a number, or ``"blur"``). ``enum``: for a choice, its ``(word, enum
    number on the wire)`` pairs. ``positive``: an integer that must be >= 1 (a count or a
    size; every integer option but ``seed``).
    """

    name: str
    kind: str
    number: int
    enum: tuple[tuple[str, int], ...] = ()
    positive: bool = False

    @property
    def choices(self) -> tuple[str, ...]:
        """A choice's words, in the enum's order."""
        return tuple(word for word, _ in self.enum)


LOCAL_OPTIONS = frozenset({"amp", "size", "reshape", "flow_limit"})
"""Options of the explainers that only the Python API has (not fields of ``Options``): the
server sets a model's precision and map size itself."""

ARGUMENT_OPTIONS = frozenset({"seed", "baseline"})
"""Options that :func:`xai_serve.explain` takes as arguments of their own, not as ``**options``
(whether a method takes them is its ``randomised`` / ``takes_baseline`` trait)."""

_SCALARS = {
    FieldDescriptor.TYPE_INT32: "int",
    FieldDescriptor.TYPE_INT64: "int",
    FieldDescriptor.TYPE_FLOAT: "float",
    FieldDescriptor.TYPE_DOUBLE: "float",
    FieldDescriptor.TYPE_BOOL: "bool",
    FieldDescriptor.TYPE_STRING: "str",
}


def _spec(field: FieldDescriptor) -> OptionSpec:
    if field.type in _SCALARS:
        kind = _SCALARS[field.type]
        return OptionSpec(
            field.name,
            kind,
            field.number,
            positive=kind == "int" and field.name not in ARGUMENT_OPTIONS,
        )
    if field.type == FieldDescriptor.TYPE_ENUM:
        pairs = tuple((v.name.lower(), v.number) for v in field.enum_type.values if v.number)
        return OptionSpec(field.name, "choice", field.number, enum=pairs)
    if field.type == FieldDescriptor.TYPE_MESSAGE and field.message_type.name == "Baseline":
        return OptionSpec(field.name, "baseline", field.number)
    raise TypeError(f"Options.{field.name}: no option kind for this field type")  # a new type


def _schema(message: Descriptor) -> MappingProxyType[str, OptionSpec]:
    return MappingProxyType({f.name: _spec(f) for f in message.fields})


OPTION_SCHEMA: MappingProxyType[str, OptionSpec] = _schema(_pb.Options.DESCRIPTOR)
"""Every method option by name (the fields of ``xai_serve.v1.Options``, in field order)."""


# Values of the `amp` option: the autocast dtype of the model's forwards ("auto": the
# precision of the request's forward path, see xai_serve.explainers.forward).
AMP_DTYPES: dict[str | None, torch.dtype | None] = {
    None: None,
    "fp32": None,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
}
AMP_VALUES = ("auto", "fp32", "bf16", "fp16")


def int_option(options: dict[str, Any], name: str, minimum: int) -> int:
    value = options[name]
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidInput(f"option `{name}` must be an integer, got {value!r}")
    if value < minimum:
        raise InvalidInput(f"option `{name}` must be >= {minimum}, got {value}")
    return int(value)


def choice_option(options: dict[str, Any], name: str, choices: tuple[str, ...]) -> str:
    value = options[name]
    if not isinstance(value, str) or value not in choices:
        raise InvalidInput(f"option `{name}` must be one of {', '.join(choices)}; got {value!r}")
    return value


def bool_option(options: dict[str, Any], name: str) -> bool:
    value = options[name]
    if not isinstance(value, bool):
        raise InvalidInput(f"option `{name}` must be True or False, got {value!r}")
    return value


def amp_option(options: dict[str, Any], path: ForwardPath) -> torch.dtype | None:
    """The autocast dtype of the ``amp`` option: ``"auto"`` is the forward path's precision;
    None or ``"fp32"`` full precision; ``"bf16"``, ``"fp16"`` those."""
    value = options["amp"]
    if value == "auto":
        return path.amp
    if not (value is None or isinstance(value, str)) or value not in AMP_DTYPES:
        raise InvalidInput(
            f"option `amp` must be 'auto', None, 'fp32', 'bf16' or 'fp16'; got {value!r}"
        )
    return AMP_DTYPES[value]
