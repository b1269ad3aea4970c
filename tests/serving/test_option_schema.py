"""One schema of method options: the ``xai_serve.v1.Options`` message, read by every layer.

Each test walks the whole schema, so an option added to the proto (or to an explainer) that
one layer does not know, or knows under another name or type, fails here.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
from google.protobuf.descriptor import FieldDescriptor

from xai_serve import runner
from xai_serve.cli import build_parser
from xai_serve.client import OPTION_NAMES, build_options
from xai_serve.errors import InvalidInput
from xai_serve.explainers.base import (
    ARGUMENT_OPTIONS,
    LOCAL_OPTIONS,
    OPTION_SCHEMA,
    OptionSpec,
    get_method,
    list_methods,
)
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.serving import oip as oip_servicer
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.jobs import parse_options

PY_TYPES: dict[str, type] = {"int": int, "float": float, "bool": bool, "str": str, "choice": str}
STATE = SimpleNamespace(limits=ServerConfig().limits)


def value_of(spec: OptionSpec) -> Any:
    """A valid, non-default value of the option (what a caller might send)."""
    return {
        "int": 3,
        "float": 0.375,
        "bool": False,
        "str": {"rule": "riemann_left", "base": "input_x_gradient"}.get(spec.name, "x"),
        "choice": spec.choices[-1] if spec.choices else None,
        "baseline": 0.5,
    }[spec.kind]


def takers(name: str) -> list[str]:
    """The built-in methods whose option table has ``name``."""
    return [m for m in list_methods() if name in get_method(m).options]


SPECS = list(OPTION_SCHEMA.values())
IDS = [s.name for s in SPECS]


def test_schema_is_the_proto_options_message() -> None:
    fields = pb.Options.DESCRIPTOR.fields
    assert list(OPTION_SCHEMA) == [f.name for f in fields]
    kinds = {
        FieldDescriptor.TYPE_INT32: "int",
        FieldDescriptor.TYPE_INT64: "int",
        FieldDescriptor.TYPE_FLOAT: "float",
        FieldDescriptor.TYPE_BOOL: "bool",
        FieldDescriptor.TYPE_STRING: "str",
        FieldDescriptor.TYPE_ENUM: "choice",
        FieldDescriptor.TYPE_MESSAGE: "baseline",
    }
    for f in fields:
        assert OPTION_SCHEMA[f.name].kind == kinds[f.type], f.name
        assert OPTION_SCHEMA[f.name].number == f.number
    # one name per option: the explainers' name is the wire's (field 4 kept its number)
    assert "segments" not in OPTION_SCHEMA and OPTION_SCHEMA["n_segments"].number == 4
    assert OPTION_SCHEMA["segmenter"].choices == ("slic", "grid")
    assert OPTION_SCHEMA["output"].choices == ("probability", "logit")
    positive = {s.name for s in SPECS if s.positive}
    assert positive == {s.name for s in SPECS if s.kind == "int"} - {"seed"}
    assert not LOCAL_OPTIONS & set(OPTION_SCHEMA) and set(OPTION_SCHEMA) >= ARGUMENT_OPTIONS


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_client_sends_every_option_typed_by_the_schema(spec: OptionSpec) -> None:
    assert spec.name in OPTION_NAMES
    value = value_of(spec)
    message = build_options({spec.name: value})
    assert [f.name for f, _ in message.ListFields()] == [spec.name]
    sent = getattr(message, spec.name)
    if spec.kind == "choice":
        assert sent == dict(spec.enum)[value]
    elif spec.kind == "baseline":
        assert sent.value == value
    else:
        assert sent == value and type(sent) is PY_TYPES[spec.kind]
    wrong = {"int": 2.5, "float": "x", "bool": 1, "str": 3, "choice": "nope", "baseline": "x"}
    with pytest.raises(InvalidInput, match=spec.name):
        build_options({spec.name: wrong[spec.kind]})


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_command_line_parses_every_option_typed_by_the_schema(spec: OptionSpec) -> None:
    value = value_of(spec)
    text = str(value).lower() if spec.kind == "bool" else str(value)
    name, parsed = runner.parse_option(f"{spec.name}={text}")
    assert (name, parsed) == (spec.name, value)
    assert type(parsed) is (float if spec.kind == "baseline" else PY_TYPES[spec.kind])
    # what the command line parsed is what the client sends
    assert build_options({name: parsed}) == build_options({spec.name: value})


def test_command_line_option_flags_are_schema_options() -> None:
    args = build_parser().parse_args(["explain", "a.png", "--budget-ms", "5", "--tolerance", "0.1"])
    flags = {"budget_ms": 5, "tolerance": 0.1}
    assert {k: getattr(args, k) for k in flags} == flags
    assert set(flags) <= set(OPTION_SCHEMA)


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_servicer_reads_every_option_under_its_own_name(spec: OptionSpec) -> None:
    value = value_of(spec)
    message = build_options({spec.name: value})
    if spec.name == "seed":
        method = next(m for m in list_methods() if get_method(m).randomised)
        assert parse_options(message, method, STATE) == ({}, None, value)  # type: ignore[arg-type]
        return
    if spec.name == "baseline":
        method = next(m for m in list_methods() if get_method(m).takes_baseline)
        parsed, baseline, _ = parse_options(message, method, STATE)  # type: ignore[arg-type]
        assert (parsed, baseline) == ({}, value)
        return
    methods = takers(spec.name)
    assert methods, f"no method takes option {spec.name!r}"
    for method in methods:
        parsed, _, _ = parse_options(message, method, STATE)  # type: ignore[arg-type]
        assert parsed == {spec.name: value}
        assert type(parsed[spec.name]) is PY_TYPES[spec.kind]
    refusing = next(m for m in list_methods() if m not in methods)
    with pytest.raises(InvalidInput, match=f"options.{spec.name} does not apply"):
        parse_options(message, refusing, STATE)  # type: ignore[arg-type]


def _parameter(value: Any) -> oip.InferParameter:
    p = oip.InferParameter()
    if isinstance(value, bool):
        p.bool_param = value
    elif isinstance(value, int):
        p.int64_param = value
    elif isinstance(value, float):
        p.double_param = value
    else:
        p.string_param = value
    return p


@pytest.mark.parametrize("spec", SPECS, ids=IDS)
def test_oip_parameters_are_the_schema_options(spec: OptionSpec) -> None:
    assert spec.name in oip_servicer.PARAMETERS
    value = value_of(spec)
    options = pb.Options()
    oip_servicer.option_param(_parameter(value), spec, options)
    assert options == build_options({spec.name: value})
    wrong = {"int": "three", "float": "x", "bool": 1, "str": 3, "choice": "nope", "baseline": "x"}
    with pytest.raises(InvalidInput, match=spec.name):
        oip_servicer.option_param(_parameter(wrong[spec.kind]), spec, pb.Options())


def test_oip_baseline_may_be_blur() -> None:
    options = pb.Options()
    oip_servicer.option_param(_parameter("blur"), OPTION_SCHEMA["baseline"], options)
    assert options == build_options({"baseline": "blur"})


def test_explainer_options_are_schema_options_of_the_same_type() -> None:
    """Every option an explainer declares is either a schema field (exposed remotely, under
    the same name, with a default of the field's type) or one of the few local-only ones; and
    every schema field is some method's option (or an argument that a trait governs)."""
    taken: set[str] = set()
    for method in list_methods():
        for name, default in get_method(method).options.items():
            if name in LOCAL_OPTIONS:
                continue
            assert name in OPTION_SCHEMA, f"{method}: option {name!r} is not an Options field"
            taken.add(name)
            spec = OPTION_SCHEMA[name]
            if default is None:
                continue
            assert type(default) is PY_TYPES[spec.kind], (method, name, default)
            if spec.kind == "choice":
                assert default in spec.choices, (method, name, default)
    assert taken == set(OPTION_SCHEMA) - ARGUMENT_OPTIONS
    assert any(get_method(m).randomised for m in list_methods())  # seed has takers
    assert any(get_method(m).takes_baseline for m in list_methods())  # baseline has takers
