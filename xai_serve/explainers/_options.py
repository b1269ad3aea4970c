"""Checks of explanation methods' keyword options, shared by the method families.

Each raises :class:`~xai_serve.InvalidInput` naming the option and what it accepts.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch

from xai_serve.errors import InvalidInput
from xai_serve.explainers.forward import ForwardPath

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
