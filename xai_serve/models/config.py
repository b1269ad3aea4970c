"""Model configuration: what to load, how to preprocess its images, how to serve it.

Two frozen dataclasses, :class:`TransformConfig` and :class:`ModelConfig`, validate and
normalise themselves on construction (lists become tuples, ints become floats where a float is
meant), so a config built in Python and one read from a file behave the same.
:func:`model_config_from_dict` reads one ``[[models]]`` table of a TOML/YAML file; every error
names the offending key as ``models[<name>].<key>``.
"""

from __future__ import annotations

import difflib
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from xai_serve.errors import InvalidInput, NotFound, positive_int

#: Values of ModelConfig.precision, .memory_format, .compile and .linear.
PRECISION_CHOICES = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "channels_last", "contiguous")
COMPILE_MODES = ("auto", "on", "off")
LINEAR_BACKENDS = ("auto", "aten", "onednn")

__all__ = [
    "BUNDLED_MODELS",
    "REMOTE_DTYPES",
    "REMOTE_LAYOUTS",
    "SOURCES",
    "ModelConfig",
    "RemoteConfig",
    "TransformConfig",
    "bundled_model_config",
    "model_config_from_dict",
]

#: Where a model comes from.
SOURCES = ("bundled", "torchvision", "timm", "torchscript", "export", "oip")

#: Values of RemoteConfig.dtype ("auto": the datatype the remote's metadata gives its input).
REMOTE_DTYPES = ("auto", "FP32", "FP16", "BF16", "FP64")
#: Values of RemoteConfig.layout.
REMOTE_LAYOUTS = ("NCHW", "NHWC")

#: The models that ship with installable weights (see :func:`bundled_model_config`).
BUNDLED_MODELS = ("efficientnet_lite0",)

#: The special ``class_names`` value for the bundled ImageNet-1k list.
IMAGENET = "imagenet"

# EfficientNet-Lite0 was trained (TF) on (pixel - 127) / 128, i.e. mean 127/255 and std
# 128/255 on [0, 1] pixels, at 224 x 224 after resizing the short side to 256.
_LITE_MEAN = (127.0 / 255.0,) * 3
_LITE_STD = (128.0 / 255.0,) * 3


# --------------------------------------------------------------------------------------------
# Value checkers: each takes the raw value and where it came from, returns the normalised value
# --------------------------------------------------------------------------------------------


def _type_name(v: object) -> str:
    return type(v).__name__


def _size(v: object, where: str) -> tuple[int, int]:
    """``n`` or ``[h, w]`` (positive ints) as ``(h, w)``."""
    if isinstance(v, int) and not isinstance(v, bool):
        n = positive_int(v, where)
        return (n, n)
    if isinstance(v, (list, tuple)) and len(v) == 2:
        return (positive_int(v[0], where), positive_int(v[1], where))
    raise InvalidInput(f"{where} must be [height, width] (two positive integers), got {v!r}")


def _number(v: object, where: str) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InvalidInput(f"{where} must be a finite number, got {v!r}")
    return float(v)


def _floats(v: object, where: str) -> tuple[float, ...]:
    """A number or a non-empty list of numbers as a tuple of floats."""
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return (_number(v, where),)
    if isinstance(v, (list, tuple)) and len(v) > 0:
        return tuple(_number(x, where) for x in v)
    raise InvalidInput(f"{where} must be a number or a non-empty list of numbers, got {v!r}")


def _opt_str(v: object, where: str) -> str | None:
    if v is None:
        return None
    if isinstance(v, os.PathLike):
        v = os.fspath(v)
    if not isinstance(v, str) or not v.strip():
        raise InvalidInput(f"{where} must be a non-empty string, got {v!r}")
    return v


def _off(v: object) -> bool:
    """None, or ``false`` (TOML has no null), switches a transform step off."""
    return v is None or v is False


def _unknown_keys(given: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [k for k in given if k not in valid]
    if not unknown:
        return
    valid_list = ", ".join(valid)
    if len(unknown) > 1:
        keys = ", ".join(map(repr, unknown))
        raise InvalidInput(f"{where}: unknown keys {keys}; valid keys: {valid_list}")
    close = difflib.get_close_matches(str(unknown[0]), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise InvalidInput(f"{where}: unknown key {unknown[0]!r}{hint}; valid keys: {valid_list}")


# --------------------------------------------------------------------------------------------
# TransformConfig
# --------------------------------------------------------------------------------------------


def _transform_fields(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check and normalise the fields of a :class:`TransformConfig`; ``where`` prefixes errors."""
    out: dict[str, Any] = {}
    resize = values["resize"]
    out["resize"] = None if _off(resize) else positive_int(resize, f"{where}.resize")
    crop = values["crop"]
    out["crop"] = None if _off(crop) else _size(crop, f"{where}.crop")
    grayscale = values["grayscale"]
    if not isinstance(grayscale, bool):
        raise InvalidInput(f"{where}.grayscale must be true or false, got {grayscale!r}")
    out["grayscale"] = grayscale
    channels = 1 if grayscale else 3
    for key in ("mean", "std"):
        v = _floats(values[key], f"{where}.{key}")
        if len(v) not in (1, channels):
            raise InvalidInput(
                f"{where}.{key} must have 1 or {channels} values (one per input channel"
                f"{', grayscale' if grayscale else ''}), got {len(v)}"
            )
        out[key] = v
    if any(s <= 0 for s in out["std"]):
        raise InvalidInput(f"{where}.std must be positive, got {out['std']}")
    return out


@dataclass(frozen=True)
class TransformConfig:
    """How an RGB image becomes the model's input tensor.

    Steps, in order: uint8 to float in ``[0, 1]``; resize so the short side is ``resize``
    pixels (bilinear, antialiased; the long side is truncated as torchvision's ``Resize``
    does); centre crop to ``crop`` ``(H, W)`` (an image smaller than the crop is first scaled
    up until the crop fits); ITU-R 601 luma if ``grayscale``; ``(x - mean) / std``.

    ``resize`` and ``crop`` may be None (or ``false`` in a file) to skip the step. ``mean`` and
    ``std`` have one value per model input channel (3, or 1 with ``grayscale``), or one value for
    all.
    """

    resize: int | None = 256
    crop: tuple[int, int] | None = (224, 224)
    mean: tuple[float, ...] = (0.485, 0.456, 0.406)
    std: tuple[float, ...] = (0.229, 0.224, 0.225)
    grayscale: bool = False

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in _transform_fields(values, "transform").items():
            object.__setattr__(self, key, value)

    @property
    def channels(self) -> int:
        """The number of channels of the model input: 1 with ``grayscale``, else 3."""
        return 1 if self.grayscale else 3


_TRANSFORM_KEYS = tuple(f.name for f in fields(TransformConfig))

#: The preprocessing EfficientNet-Lite0 was trained with.
LITE0_TRANSFORM = TransformConfig(resize=256, crop=(224, 224), mean=_LITE_MEAN, std=_LITE_STD)


# --------------------------------------------------------------------------------------------
# RemoteConfig
# --------------------------------------------------------------------------------------------


def _remote_fields(values: Mapping[str, Any], where: str) -> dict[str, Any]:
    """Check and normalise the fields of a :class:`RemoteConfig`; ``where`` prefixes errors."""
    out: dict[str, Any] = {}
    url = _opt_str(values["url"], f"{where}.url")
    if url is None:
        raise InvalidInput(f'{where}.url is required (the gRPC endpoint, "host:port")')
    if url.startswith(("http://", "https://")):
        raise InvalidInput(
            f'{where}.url {url!r} is an HTTP URL; give the gRPC endpoint as "host:port" '
            "(with tls = true for TLS)"
        )
    out["url"] = url
    for key in ("model", "input", "output", "ca_file", "token_env"):
        out[key] = _opt_str(values[key], f"{where}.{key}")
    if not isinstance(values["version"], str):
        raise InvalidInput(f"{where}.version must be a string, got {values['version']!r}")
    out["version"] = values["version"]
    dtype = values["dtype"]
    if isinstance(dtype, str):
        dtype = "auto" if dtype.lower() == "auto" else dtype.upper()
    for key, value, allowed in (
        ("dtype", dtype, REMOTE_DTYPES),
        ("layout", values["layout"], REMOTE_LAYOUTS),
    ):
        if value not in allowed:
            raise InvalidInput(
                f"{where}.{key} must be one of {', '.join(map(repr, allowed))}, got {value!r}"
            )
        out[key] = value
    batch = values["max_batch"]
    out["max_batch"] = None if _off(batch) else positive_int(batch, f"{where}.max_batch")
    out["in_flight"] = positive_int(values["in_flight"], f"{where}.in_flight")
    timeout = _number(values["timeout_s"], f"{where}.timeout_s")
    if timeout <= 0:
        raise InvalidInput(f"{where}.timeout_s must be > 0, got {timeout}")
    out["timeout_s"] = timeout
    if not isinstance(values["tls"], bool):
        raise InvalidInput(f"{where}.tls must be true or false, got {values['tls']!r}")
    out["tls"] = values["tls"]
    return out


@dataclass(frozen=True)
class RemoteConfig:
    """Where a model of source ``"oip"`` is served: an Open Inference Protocol (KServe v2 /
    Triton) gRPC endpoint. Perturbation methods send their perturbed batches there.

    Attributes:
        url: the gRPC target, ``"host:port"`` (any target grpc takes, e.g. ``"dns:///h:p"``).
        model: the remote model's name; None: the config's ``name``.
        version: the remote model's version; ``""``: the server's default.
        input: the remote model's input name; None: its only input (from ModelMetadata).
        output: the output with the ``[B, classes]`` scores; None: the only output, else the
            one named ``"logits"`` (from ModelMetadata).
        dtype: the datatype sent (``"FP32"``, ``"FP16"``, ``"BF16"``, ``"FP64"``); ``"auto"``:
            the one the remote's metadata gives its input (FP32 if it says none).
        layout: ``"NCHW"`` or ``"NHWC"``: how the remote model takes images.
        max_batch: the most images one call sends; None: the remote input's batch dimension
            when the metadata fixes it, else 32. A larger forward is split into several calls.
        in_flight: calls outstanding at once, so that the network and the remote's compute
            overlap the building of the next batches here.
        timeout_s: the time each call may take when the request has no deadline (with one,
            a call gets the time the deadline leaves); also the limit of the checks at load.
        tls: connect with TLS (system root certificates unless ``ca_file``).
        ca_file: PEM root certificates to verify the server with (implies ``tls``).
        token_env: the name of an environment variable holding a bearer token, sent as
            ``authorization: Bearer <token>`` on every call (the token itself never goes in
            a config file).
    """

    url: str
    model: str | None = None
    version: str = ""
    input: str | None = None
    output: str | None = None
    dtype: str = "auto"
    layout: str = "NCHW"
    max_batch: int | None = None
    in_flight: int = 4
    timeout_s: float = 30.0
    tls: bool = False
    ca_file: str | None = None
    token_env: str | None = None

    def __post_init__(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        for key, value in _remote_fields(values, "remote").items():
            object.__setattr__(self, key, value)

    @property
    def secure(self) -> bool:
        """Whether the channel uses TLS (``tls``, or a ``ca_file`` given)."""
        return self.tls or self.ca_file is not None


_REMOTE_KEYS = tuple(f.name for f in fields(RemoteConfig))


# --------------------------------------------------------------------------------------------
# ModelConfig
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ModelConfig:
    """One servable model.

    Attributes:
        name: the name clients use.
        source: ``"bundled"`` (EfficientNet-Lite0 with its ImageNet weights, from the
            package registry), ``"torchvision"`` (an architecture of ``torchvision.models``
            and a state-dict file), ``"timm"`` (a timm model name and a state-dict file; the
            optional dependency ``timm``, never its hub), ``"torchscript"`` (a ``.pt``
            archive), ``"export"`` (a ``torch.export`` ``.pt2`` file) or ``"oip"`` (a model
            served elsewhere, reached over the Open Inference Protocol as ``remote`` says:
            only the black-box methods (LIME, KernelSHAP, occlusion) can explain it).
        arch: torchvision: the architecture, e.g. ``"resnet50"``; timm: the model name, e.g.
            ``"vit_small_patch16_224"`` or ``"deit_tiny_distilled_patch16_224"``; bundled:
            ``"efficientnet_lite0"`` (the default and the only one); else unused (None).
        path: torchvision, timm: the state-dict weights (None: random initialisation, logged
            as a warning); torchscript / export: the model file (required); bundled: None.
        num_classes: torchvision, timm: the head size (default 1000); other sources: a check
            of the model's output size, if given.
        input_size: ``(H, W)`` of a preprocessed input; default ``transform.crop`` (required
            without a crop).
        transform: the preprocessing; bundled models default to their own.
        class_names: ``"imagenet"`` (the bundled ImageNet-1k list, the default for bundled
            models) or a path to a UTF-8 text file with one name per line.
        layer: the default CAM layer (a dotted module name); None: found automatically.
        device: ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        max_batch_size: the most images one forward takes (cross-request batching).
        max_delay_ms: how long a batch waits for more requests.
        tune: measure the candidate forward paths at warm-up and run the fastest faithful one
            (:func:`xai_serve.models.tuning.tune`); false: no measuring, the path the keys
            below force (else fp32, contiguous, each method's default batch).
        precision: ``"auto"`` (a reduced precision only if the device runs it natively, it is
            faster and it passes the fidelity guard), ``"fp32"`` (never reduced), ``"bf16"``
            or ``"fp16"`` (forced).
        memory_format: ``"auto"``, ``"channels_last"`` or ``"contiguous"``.
        forward_batch: inputs per no-grad forward; None: measured.
        compile: ``"off"`` (default), ``"auto"`` (an ahead-of-time build of the forward, kept
            if it is faster and faithful; skipped for models whose forward is too quick to earn
            it back) or ``"on"`` (also ``true`` / ``false``). A build costs the first start tens
            of seconds to minutes on a CPU (later starts load it from ``tuning_dir``), which is
            why it is opt-in.
        linear: ``"auto"`` (measure whether the model's fp32 linear layers run faster on
            oneDNN's packed kernels than on ATen's, exact maths both; see
            :mod:`xai_serve.explainers.onednn`), ``"aten"`` or ``"onednn"`` (forced).
        remote: with source ``"oip"`` (required there, refused elsewhere): the endpoint
            (:class:`RemoteConfig`). Such a model is not tuned or compiled here (``tune`` is
            ignored; ``precision``, ``memory_format``, ``forward_batch``, ``compile`` and
            ``linear`` must
            keep their defaults: the remote server decides how it runs).
    """

    name: str
    source: str
    arch: str | None = None
    path: str | None = None
    num_classes: int | None = None
    input_size: tuple[int, int] | None = None
    transform: TransformConfig = TransformConfig()
    class_names: str | None = None
    layer: str | None = None
    device: str = "cpu"
    max_batch_size: int = 16
    max_delay_ms: float = 5.0
    tune: bool = True
    precision: str = "auto"
    memory_format: str = "auto"
    forward_batch: int | None = None
    compile: str = "off"
    linear: str = "auto"
    remote: RemoteConfig | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise InvalidInput(f"models[?].name must be a non-empty string, got {self.name!r}")
        where = f"models[{self.name}]"
        if self.source not in SOURCES:
            raise InvalidInput(
                f"{where}.source must be one of {', '.join(map(repr, SOURCES))}, "
                f"got {self.source!r}"
            )
        put = self._put
        arch = _opt_str(self.arch, f"{where}.arch")
        path = _opt_str(self.path, f"{where}.path")
        if self.source == "bundled":
            arch = arch or BUNDLED_MODELS[0]
            if arch not in BUNDLED_MODELS:
                raise NotFound(
                    f"{where}.arch: no bundled model {arch!r}; bundled: {', '.join(BUNDLED_MODELS)}"
                )
            if path is not None:
                raise InvalidInput(
                    f"{where}.path must not be set for a bundled model (its weights come from "
                    'its package); use source = "torchvision" or a model file instead'
                )
            if self.transform == TransformConfig():
                put("transform", LITE0_TRANSFORM)
            if self.class_names is None:
                put("class_names", IMAGENET)
        elif self.source == "oip":
            if not isinstance(self.remote, RemoteConfig):
                raise InvalidInput(
                    f'{where}.remote is required with source "oip": a table with at least '
                    'url = "host:port" (the remote Open Inference Protocol gRPC endpoint)'
                )
            for key, value in (("arch", arch), ("path", path)):
                if value is not None:
                    raise InvalidInput(
                        f'{where}.{key} must not be set with source "oip": the model runs on '
                        "the remote server"
                    )
        elif self.source in ("torchvision", "timm"):
            if arch is None:
                example = "resnet50" if self.source == "torchvision" else "vit_small_patch16_224"
                raise InvalidInput(
                    f'{where}.arch is required with source "{self.source}" (e.g. "{example}")'
                )
        else:
            if arch is not None:
                raise InvalidInput(
                    f'{where}.arch is only used with source "torchvision", "timm" or "bundled"; '
                    f"a {self.source} file carries its own architecture"
                )
            if path is None:
                raise InvalidInput(f"{where}.path is required with source {self.source!r}")
        put("arch", arch)
        put("path", path)
        if self.num_classes is not None:
            put("num_classes", positive_int(self.num_classes, f"{where}.num_classes"))
        if not isinstance(self.transform, TransformConfig):
            raise InvalidInput(
                f"{where}.transform must be a TransformConfig, got {_type_name(self.transform)}"
            )
        if self.input_size is not None:
            size = _size(self.input_size, f"{where}.input_size")
            crop = self.transform.crop
            if crop is not None and size != crop:
                raise InvalidInput(
                    f"{where}.input_size {list(size)} differs from transform.crop {list(crop)}: "
                    "the crop is the model's input; leave input_size out or make them equal"
                )
            put("input_size", size)
        elif self.transform.crop is None:
            raise InvalidInput(
                f"{where}.input_size ([height, width]) is required when transform.crop is not set"
            )
        put("class_names", _opt_str(self.class_names, f"{where}.class_names"))
        put("layer", _opt_str(self.layer, f"{where}.layer"))
        if not isinstance(self.device, str):
            raise InvalidInput(f"{where}.device must be a string, got {self.device!r}")
        try:
            put("device", str(torch.device(self.device)))
        except (RuntimeError, ValueError):
            raise InvalidInput(
                f'{where}.device must be a device name such as "cpu", "cuda" or "cuda:1", '
                f"got {self.device!r}"
            ) from None
        put("max_batch_size", positive_int(self.max_batch_size, f"{where}.max_batch_size"))
        delay = _number(self.max_delay_ms, f"{where}.max_delay_ms")
        if delay < 0:
            raise InvalidInput(f"{where}.max_delay_ms must be >= 0, got {delay}")
        put("max_delay_ms", delay)
        if not isinstance(self.tune, bool):
            raise InvalidInput(f"{where}.tune must be true or false, got {self.tune!r}")
        compile_mode = self.compile
        if isinstance(compile_mode, bool):
            compile_mode = "on" if compile_mode else "off"
        put("compile", compile_mode)
        for key, allowed in (
            ("precision", PRECISION_CHOICES),
            ("memory_format", MEMORY_FORMATS),
            ("compile", COMPILE_MODES),
            ("linear", LINEAR_BACKENDS),
        ):
            if getattr(self, key) not in allowed:
                raise InvalidInput(
                    f"{where}.{key} must be one of {', '.join(map(repr, allowed))}, "
                    f"got {getattr(self, key)!r}"
                )
        if self.forward_batch is not None:
            put("forward_batch", positive_int(self.forward_batch, f"{where}.forward_batch"))
        if self.source != "oip" and self.remote is not None:
            raise InvalidInput(
                f'{where}.remote is only used with source "oip" (a model served elsewhere); '
                f"this model's source is {self.source!r}"
            )
        if self.source == "oip":
            forced = [
                f"{key} = {getattr(self, key)!r}"
                for key, default in (
                    ("precision", "auto"),
                    ("memory_format", "auto"),
                    ("forward_batch", None),
                    ("compile", "off"),
                    ("linear", "auto"),
                )
                if getattr(self, key) != default
            ]
            if forced:
                raise InvalidInput(
                    f"{where}: {', '.join(forced)} cannot apply to a model served elsewhere "
                    '(source "oip"): the remote server runs it; leave these keys out (the '
                    "images per remote call are remote.max_batch)"
                )

    def _put(self, key: str, value: Any) -> None:
        object.__setattr__(self, key, value)

    @property
    def resolved_input_size(self) -> tuple[int, int]:
        """``input_size``, or the crop when it is not set."""
        size = self.input_size or self.transform.crop
        assert size is not None  # checked on construction
        return size


_MODEL_KEYS = tuple(f.name for f in fields(ModelConfig))


def bundled_model_config(name: str = "efficientnet_lite0") -> ModelConfig:
    """The complete config of a bundled model: its weights, transform and ImageNet class names."""
    if name not in BUNDLED_MODELS:
        close = difflib.get_close_matches(str(name), BUNDLED_MODELS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise NotFound(f"no bundled model {name!r}{hint}; bundled: {', '.join(BUNDLED_MODELS)}")
    return ModelConfig(name=name, source="bundled", arch=name)


def _resolve(value: Any, base_dir: Path | None) -> Any:
    """A relative path string made relative to ``base_dir`` (other values unchanged)."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if base_dir is None or not isinstance(value, str) or not value.strip():
        return value
    p = Path(value).expanduser()
    return str(p if p.is_absolute() else Path(base_dir) / p)


def model_config_from_dict(d: Mapping[str, Any], *, base_dir: Path | None = None) -> ModelConfig:
    """A :class:`ModelConfig` from one parsed TOML/YAML table.

    ``transform`` is a nested table (its missing keys keep the source's defaults: the bundled
    model's own transform, else :class:`TransformConfig`'s); lists become tuples; relative
    ``path`` and ``class_names`` files are taken relative to ``base_dir`` (the config file's
    folder) when given. ``{"name": "efficientnet_lite0", "source": "bundled"}`` is a complete
    config.

    Raises:
        InvalidInput: an unknown key (the message lists the valid ones), or a value of the wrong
            type or range (the message names it as ``models[<name>].<key>``).
        NotFound: an unknown bundled model.
    """
    if not isinstance(d, Mapping):
        raise InvalidInput(f"a model config must be a table (mapping), got {_type_name(d)}")
    name = d.get("name")
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(
            f"models[?].name is required and must be a non-empty string, got {name!r} "
            f"(keys given: {', '.join(map(str, d))})"
        )
    where = f"models[{name}]"
    _unknown_keys(d, _MODEL_KEYS, where)
    if "source" not in d:
        raise InvalidInput(f"{where}.source is required: one of {', '.join(map(repr, SOURCES))}")
    values = dict(d)
    source = values["source"]

    table = values.pop("transform", None)
    base = LITE0_TRANSFORM if source == "bundled" else TransformConfig()
    if table is not None:
        if not isinstance(table, Mapping):
            raise InvalidInput(
                f"{where}.transform must be a table with keys {', '.join(_TRANSFORM_KEYS)}, "
                f"got {_type_name(table)}"
            )
        _unknown_keys(table, _TRANSFORM_KEYS, f"{where}.transform")
        merged = {k: table.get(k, getattr(base, k)) for k in _TRANSFORM_KEYS}
        values["transform"] = TransformConfig(**_transform_fields(merged, f"{where}.transform"))
    else:
        values["transform"] = base

    remote = values.pop("remote", None)
    if remote is not None:
        if not isinstance(remote, Mapping):
            raise InvalidInput(
                f"{where}.remote must be a table with keys {', '.join(_REMOTE_KEYS)}, "
                f"got {_type_name(remote)}"
            )
        _unknown_keys(remote, _REMOTE_KEYS, f"{where}.remote")
        if "url" not in remote:
            raise InvalidInput(f'{where}.remote.url is required (the gRPC endpoint, "host:port")')
        defaults = {f.name: f.default for f in fields(RemoteConfig)}
        merged = {k: remote.get(k, defaults[k]) for k in _REMOTE_KEYS}
        if merged.get("ca_file") is not None:
            merged["ca_file"] = _resolve(merged["ca_file"], base_dir)
        values["remote"] = RemoteConfig(**_remote_fields(merged, f"{where}.remote"))

    if "path" in values:
        values["path"] = _resolve(values["path"], base_dir)
    names = values.get("class_names")
    if names is not None and names != IMAGENET:
        values["class_names"] = _resolve(names, base_dir)
    return ModelConfig(**values)
