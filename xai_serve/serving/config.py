"""Server configuration: frozen dataclasses built from a TOML/YAML file, then command-line flags.

One frozen dataclass per component (:class:`LimitsConfig`, :class:`CacheConfig`,
:class:`QualityConfig`, :class:`ConceptsConfig`, :class:`TlsConfig`, :class:`AuthConfig`, and
:class:`ServerConfig` holding them and the models). Every field is checked when the dataclass
is built, so a config made in Python, read from a file or changed by :func:`with_overrides` is
always valid; errors are :class:`~xai_serve.errors.InvalidInput` whose message names the config
key (``limits.max_queue must be a positive integer, got 'x'``).

File layout (TOML shown; YAML has the same keys)::

    host = "0.0.0.0"
    port = 50051
    metrics_port = 9090
    model_dirs = ["models"]          # model files must lie inside these directories

    [limits]
    max_queue = 256

    [cache]
    max_bytes = 268435456            # exact answers kept for repeated requests; 0 = off

    [quality]
    sample_rate = 0.01               # share of answers whose quality is measured; 0 = off
    metrics = ["deletion"]

    [concepts]
    max_images = 512                 # images of one TCAV / dissection request
    max_jobs = 1                     # concept jobs running at once

    [concepts.sets]                  # concept sets TCAV requests may name
    stripes_photo = "concepts/stripes"

    [concepts.datasets]              # Broden-style probe folders for dissection
    broden_small = "probe/broden_small"

    [tls]
    cert = "certs/server.pem"
    key = "certs/server.key"
    client_ca = "certs/ca.pem"       # set = mutual TLS (client certificate required)

    [auth]
    tokens_file = "tokens.txt"

    [[models]]
    name = "efficientnet_lite0"
    source = "bundled"

Relative paths (``tls.*``, ``auth.tokens_file``, ``model_dirs``, the model paths and the folders
of ``concepts.sets`` / ``concepts.datasets``) are taken relative to the directory of the config
file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xai_serve.concepts.library import concept_names
from xai_serve.errors import InvalidInput, NotFound, positive_int
from xai_serve.explainers.evaluation import metric_names

if TYPE_CHECKING:
    from xai_serve.models import ModelConfig

__all__ = [
    "AuthConfig",
    "CacheConfig",
    "ConceptsConfig",
    "LimitsConfig",
    "QualityConfig",
    "ServerConfig",
    "TlsConfig",
    "config_from_dict",
    "load_config",
    "override_keys",
    "with_overrides",
]

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Keys of with_overrides() that apply to every model (ModelConfig field names).
MODEL_OVERRIDES = ("max_batch_size", "max_delay_ms", "device", "tune")
# Keys of with_overrides() that fill the [tls] / [auth] tables.
TLS_OVERRIDES = {"tls_cert": "cert", "tls_key": "key", "tls_client_ca": "client_ca"}
AUTH_OVERRIDES = {"auth_tokens_file": "tokens_file", "auth_tokens_env": "tokens_env"}
# Keys of with_overrides() that fill the [cache] table.
CACHE_OVERRIDES = {"cache_bytes": "max_bytes"}


# --------------------------------------------------------------------------------------------
# Value checks. Each takes the full config key so the message says which setting is wrong.
# --------------------------------------------------------------------------------------------


def _int(value: Any, key: str, *, minimum: int, maximum: int | None = None) -> int:
    """Return ``value`` if it is an int (not a bool) within ``[minimum, maximum]``."""
    if minimum == 1 and maximum is None:
        return positive_int(value, key)
    ok = isinstance(value, int) and not isinstance(value, bool)
    ok = ok and value >= minimum and (maximum is None or value <= maximum)
    if not ok:
        if maximum is not None:
            what = f"an integer in {minimum}..{maximum}"
        else:
            what = f"an integer >= {minimum}"
        raise InvalidInput(f"{key} must be {what}, got {value!r}")
    return value


def _float(value: Any, key: str, *, minimum: float = 0.0) -> float:
    """Return ``value`` as a float if it is a real number (not a bool) >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= minimum:
        raise InvalidInput(f"{key} must be a number >= {minimum:g}, got {value!r}")
    return float(value)


def _str(value: Any, key: str) -> str:
    """Return ``value`` if it is a non-empty string."""
    if not isinstance(value, str) or not value:
        raise InvalidInput(f"{key} must be a non-empty string, got {value!r}")
    return value


def _opt_str(value: Any, key: str) -> str | None:
    """Return ``value`` if it is None or a non-empty string."""
    return None if value is None else _str(value, key)


def _bool(value: Any, key: str) -> bool:
    """Return ``value`` if it is a bool."""
    if not isinstance(value, bool):
        raise InvalidInput(f"{key} must be true or false, got {value!r}")
    return value


def _str_tuple(value: Any, key: str) -> tuple[str, ...]:
    """Return ``value`` (a list/tuple of non-empty strings) as a tuple."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise InvalidInput(f"{key} must be a list of strings, got {value!r}")
    return tuple(_str(v, f"{key}[{i}]") for i, v in enumerate(value))


def _resolve(path: str, base_dir: Path | None) -> str:
    """Expand ``~`` and make a relative ``path`` relative to ``base_dir`` (when given)."""
    p = Path(path).expanduser()
    if not p.is_absolute() and base_dir is not None:
        p = base_dir / p
    return str(p)


def _check_keys(d: Mapping[str, Any], valid: Sequence[str], prefix: str) -> None:
    """Raise InvalidInput naming the first key of ``d`` not in ``valid``, listing the valid ones."""
    for key in d:
        if key not in valid:
            full = f"{prefix}{key}"
            hint = difflib.get_close_matches(str(key), valid, n=1)
            did_you_mean = f" (did you mean {prefix + hint[0]!r}?)" if hint else ""
            where = f"in [{prefix[:-1]}]" if prefix else "at the top level"
            raise InvalidInput(
                f"unknown config key {full!r}{did_you_mean}; valid keys {where}: "
                + ", ".join(valid)
            )


def _table(value: Any, key: str) -> Mapping[str, Any]:
    """Return ``value`` if it is a mapping (a TOML table / YAML mapping)."""
    if not isinstance(value, Mapping):
        raise InvalidInput(f"{key} must be a table/mapping, got {value!r}")
    return value


# --------------------------------------------------------------------------------------------
# Components
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LimitsConfig:
    """Per-request and per-model limits; requests beyond them are refused, not truncated."""

    max_message_bytes: int = 64 * 1024 * 1024  # gRPC max receive/send message size
    max_image_pixels: int = 40_000_000  # decoded width * height of an encoded image
    max_tensor_elements: int = 3 * 4096 * 4096  # elements of a raw tensor input
    max_samples: int = 4096  # samples (lime, kernelshap, smoothgrad, ...) and baselines
    max_steps: int = 1024  # integrated_gradients steps
    max_queue: int = 256  # waiting requests per model before RESOURCE_EXHAUSTED
    max_top_k: int = 100  # top-k classes returned with a prediction
    max_targets: int = 16  # classes explained per image (targets, top_labels)
    max_evaluate_inputs: int = 64  # images of one Evaluate request

    def __post_init__(self) -> None:
        for f in fields(self):
            _int(getattr(self, f.name), f"limits.{f.name}", minimum=1)


@dataclass(frozen=True)
class CacheConfig:
    """The server's cache of exact answers (:mod:`xai_serve.serving.cache`).

    ``max_bytes``: the most memory its answers (maps, logits, segments, overlays) may take;
    the least recently used go first. 0 (the default) turns it off: a cache changes what an
    operator sees (a repeated request costs nothing and shows no batch) and holds memory, so
    it is opt-in, sized to the answers worth keeping (a 224 x 224 map with its overlay is
    about 300 KB).
    """

    max_bytes: int = 0

    def __post_init__(self) -> None:
        _int(self.max_bytes, "cache.max_bytes", minimum=0)

    @property
    def enabled(self) -> bool:
        return self.max_bytes > 0


@dataclass(frozen=True)
class QualityConfig:
    """Explanation quality measured on live traffic, for the Prometheus histogram
    ``xai_serve_explanation_quality`` (per model, method and metric).

    ``sample_rate``: the share of successful ``Explain`` / ``ExplainStream`` answers whose
    quality is measured (0, the default, turns it off; 1 measures every one). The sampled
    answer is sent first; its metrics are computed afterwards on the model's device worker,
    between batches, so they delay later batches by their own cost (each metric's model
    evaluations) and never the sampled answer. ``metrics``: which metrics (names from
    ``xai-serve methods --metrics`` / ListModels) are measured on a sampled answer.
    """

    sample_rate: float = 0.0
    metrics: tuple[str, ...] = ("deletion",)

    def __post_init__(self) -> None:
        rate = _float(self.sample_rate, "quality.sample_rate")
        if rate > 1.0:
            raise InvalidInput(f"quality.sample_rate must be in [0, 1], got {rate!r}")
        object.__setattr__(self, "sample_rate", rate)
        names = _str_tuple(self.metrics, "quality.metrics")
        if not names:
            raise InvalidInput("quality.metrics must name at least one metric")
        known = metric_names()
        for name in names:
            if name not in known:
                raise InvalidInput(
                    f"quality.metrics: unknown metric {name!r}; known: {', '.join(known)}"
                )
        object.__setattr__(self, "metrics", names)

    @property
    def enabled(self) -> bool:
        return self.sample_rate > 0


#: Names a request gives for the bundled procedural probe set of dissection.
PROCEDURAL_DATASET_NAMES = ("", "procedural")


def _folders(value: Any, key: str, reserved: Sequence[str], what: str) -> dict[str, str]:
    """``value`` (a mapping of names to folder paths) as a dict, each name a non-empty string
    not in ``reserved`` and each path a non-empty string."""
    table = _table(value, key)
    out: dict[str, str] = {}
    for name, path in table.items():
        if not isinstance(name, str) or not name.strip() or name != name.strip():
            raise InvalidInput(f"{key}: a name must be a non-empty string, got {name!r}")
        if name in reserved:
            raise InvalidInput(f"{key}: {name!r} is the name of a bundled {what}; pick another")
        if what == "concept" and name.startswith("random_"):
            raise InvalidInput(
                f"{key}: {name!r}: names starting with 'random_' are TCAV's random sets"
            )
        out[name] = _str(path, f"{key}.{name}")
    return out


@dataclass(frozen=True)
class ConceptsConfig:
    """The concept RPCs (``Tcav``, ``Dissect``, ``Visualize``; :mod:`xai_serve.serving.concepts`).

    Limits, beyond which a request is refused with RESOURCE_EXHAUSTED: ``max_images``, the
    images one TCAV request makes the model see (its inputs, the concept images it sends, the
    bundled sets' ``concept_size`` each, the configured sets' files and ``runs * random_size``
    random images) or one dissection of the procedural probe set (``per_concept`` times the
    number of procedural concepts); ``max_units``, the units (channels) of a dissected layer;
    ``max_steps``, ``max_objectives`` and ``max_size``, a visualisation's Adam steps,
    objectives and image side (a request that leaves ``steps`` or ``size`` unset gets the
    smaller of the default, 256 and 128, and the limit).

    Sharing the device: each job runs on its own copy of the model in a concept worker thread,
    never on the model's device worker, so explanation batches never wait behind it (on one
    device the two share its compute). ``max_jobs`` jobs run at once; up to ``max_waiting``
    more wait for a free worker (their progress says "queued"), and one beyond that is refused
    with RESOURCE_EXHAUSTED. ``threads``: intra-op threads of each concept worker on the CPU
    (0, the default: half the device workers' threads, at least 1, so that a concept job
    leaves cores to the explanation batches).

    ``sets``: concept sets that TCAV requests may name, name -> folder of images (PNG, JPEG,
    WebP); ``datasets``: probe datasets that dissection requests may name, name -> a
    Broden-style folder (``images/``, ``masks/<concept>/``, optional ``concepts.csv``). Names
    may not shadow the bundled ones.
    """

    max_images: int = 512
    max_units: int = 4096
    max_steps: int = 1024
    max_objectives: int = 64
    max_size: int = 512
    max_jobs: int = 1
    max_waiting: int = 4
    threads: int = 0
    sets: Mapping[str, str] = field(default_factory=dict)
    datasets: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("max_images", "max_units", "max_steps", "max_objectives", "max_size"):
            _int(getattr(self, name), f"concepts.{name}", minimum=1)
        _int(self.max_jobs, "concepts.max_jobs", minimum=1)
        _int(self.max_waiting, "concepts.max_waiting", minimum=0)
        _int(self.threads, "concepts.threads", minimum=0)
        if self.max_size < 8:
            raise InvalidInput(f"concepts.max_size must be at least 8, got {self.max_size}")
        sets = _folders(self.sets, "concepts.sets", concept_names(), "concept")
        datasets = _folders(
            self.datasets, "concepts.datasets", PROCEDURAL_DATASET_NAMES, "probe dataset"
        )
        object.__setattr__(self, "sets", sets)
        object.__setattr__(self, "datasets", datasets)


@dataclass(frozen=True)
class TlsConfig:
    """Server TLS files (PEM). ``client_ca`` set means mutual TLS: clients must present a
    certificate signed by that CA."""

    cert: str
    key: str
    client_ca: str | None = None

    def __post_init__(self) -> None:
        _str(self.cert, "tls.cert")
        _str(self.key, "tls.key")
        _opt_str(self.client_ca, "tls.client_ca")


@dataclass(frozen=True)
class AuthConfig:
    """Where the accepted bearer tokens come from (at least one source must be set).

    ``tokens_file``: one token per line; blank lines and lines starting with ``#`` are ignored.
    ``tokens_env``: the name of an environment variable holding comma-separated tokens.
    Tokens from both sources are accepted.
    """

    tokens_file: str | None = None
    tokens_env: str | None = None

    def __post_init__(self) -> None:
        _opt_str(self.tokens_file, "auth.tokens_file")
        _opt_str(self.tokens_env, "auth.tokens_env")
        if self.tokens_file is None and self.tokens_env is None:
            raise InvalidInput("auth needs auth.tokens_file or auth.tokens_env (or both)")

    def load_tokens(self, environ: Mapping[str, str] | None = None) -> frozenset[str]:
        """Read the tokens now (the file and/or the environment variable).

        Raises NotFound if ``tokens_file`` cannot be read, InvalidInput if a token is not
        printable ASCII without spaces or if no token is found at all. Messages never contain
        a token.
        """
        env = os.environ if environ is None else environ
        tokens: set[str] = set()
        if self.tokens_file is not None:
            try:
                text = Path(self.tokens_file).read_text(encoding="utf-8")
            except FileNotFoundError:
                raise NotFound(f"auth.tokens_file: no such file {self.tokens_file!r}") from None
            except (OSError, UnicodeDecodeError) as exc:
                raise NotFound(
                    f"auth.tokens_file: cannot read {self.tokens_file!r}: {exc}"
                ) from None
            for lineno, line in enumerate(text.splitlines(), 1):
                token = line.strip()
                if token and not token.startswith("#"):
                    _check_token(token, f"auth.tokens_file {self.tokens_file!r} line {lineno}")
                    tokens.add(token)
        if self.tokens_env is not None:
            for i, part in enumerate(env.get(self.tokens_env, "").split(","), 1):
                token = part.strip()
                if token:
                    _check_token(token, f"auth.tokens_env ${self.tokens_env} item {i}")
                    tokens.add(token)
        if not tokens:
            sources = []
            if self.tokens_file is not None:
                sources.append(f"auth.tokens_file {self.tokens_file!r} has none")
            if self.tokens_env is not None:
                sources.append(f"auth.tokens_env ${self.tokens_env} is unset or empty")
            raise InvalidInput("auth: no tokens (" + "; ".join(sources) + ")")
        return frozenset(tokens)


def _resolved(path: str, key: str) -> Path:
    """``path`` with ``~`` expanded and symlinks followed; InvalidInput naming ``key`` when it
    cannot be (a symlink loop, a NUL byte, an unknown user's ``~``)."""
    try:
        return Path(path).expanduser().resolve()
    except (OSError, RuntimeError, ValueError) as exc:
        raise InvalidInput(f"{key} {path!r} cannot be resolved: {exc}") from None


def _check_token(token: str, where: str) -> None:
    """Raise InvalidInput (without echoing the token) unless it is printable ASCII, no spaces."""
    if not all(33 <= ord(c) <= 126 for c in token):
        raise InvalidInput(f"{where}: a token must be printable ASCII without spaces")


def _default_models() -> tuple[ModelConfig, ...]:
    """The default model list: the bundled model only."""
    from xai_serve.models import bundled_model_config

    return (bundled_model_config(),)


@dataclass(frozen=True)
class ServerConfig:
    """Everything ``xai-serve serve`` needs.

    ``port=0`` and ``metrics_port=0`` pick ephemeral ports (tests); ``metrics_port=None``
    turns the Prometheus endpoint off. ``http_port`` is the HTTP listener (KServe v1 and Open
    Inference Protocol REST, on ``host``, with the same TLS and auth as gRPC): None (the
    default, as for metrics) turns it off, 0 picks an ephemeral port; the example configs
    set 8080. ``model_dirs``: when non-empty, every model file must
    lie inside one of these directories; when empty there is no restriction beyond the paths
    written in the config. ``grace_s`` is how long in-flight calls may finish after SIGTERM.
    ``max_connection_age_s`` (None = never) ends each client connection after that long
    (a GOAWAY: calls already on it run to completion, new ones need a new connection):
    clients reconnect and re-resolve, so long-lived round-robin clients find pods added by a
    scale-out. ``tuning_dir`` keeps each model's tuning measurements and compiled forwards
    across restarts (None: ``$XDG_CACHE_HOME/xai_serve``, default ``~/.cache/xai_serve``;
    ``""``: nothing is kept, every start measures again).
    """

    host: str = "0.0.0.0"
    port: int = 50051
    models: tuple[ModelConfig, ...] = field(default_factory=_default_models)
    model_dirs: tuple[str, ...] = ()
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
    quality: QualityConfig = field(default_factory=QualityConfig)
    concepts: ConceptsConfig = field(default_factory=ConceptsConfig)
    tls: TlsConfig | None = None
    auth: AuthConfig | None = None
    metrics_port: int | None = None
    metrics_host: str = "127.0.0.1"
    http_port: int | None = None
    grace_s: float = 10.0
    max_connection_age_s: float | None = None
    warmup: bool = True
    log_level: str = "INFO"
    tuning_dir: str | None = None

    def __post_init__(self) -> None:
        _str(self.host, "host")
        _int(self.port, "port", minimum=0, maximum=65535)
        if self.metrics_port is not None:
            _int(self.metrics_port, "metrics_port", minimum=0, maximum=65535)
        if self.http_port is not None:
            _int(self.http_port, "http_port", minimum=0, maximum=65535)
        _str(self.metrics_host, "metrics_host")
        object.__setattr__(self, "grace_s", _float(self.grace_s, "grace_s"))
        if self.max_connection_age_s is not None:
            age = _float(self.max_connection_age_s, "max_connection_age_s", minimum=0.001)
            if not math.isfinite(age):
                raise InvalidInput(
                    "max_connection_age_s must be a finite number of seconds (leave it out for "
                    f"never), got {self.max_connection_age_s!r}"
                )
            object.__setattr__(self, "max_connection_age_s", age)
        _bool(self.warmup, "warmup")
        if self.tuning_dir is not None and not isinstance(self.tuning_dir, str):
            raise InvalidInput(
                f'tuning_dir must be a folder path ("" keeps nothing), got {self.tuning_dir!r}'
            )
        level = _str(self.log_level, "log_level").upper()
        if level not in LOG_LEVELS:
            raise InvalidInput(
                f"log_level must be one of {', '.join(LOG_LEVELS)}, got {self.log_level!r}"
            )
        object.__setattr__(self, "log_level", level)
        object.__setattr__(self, "model_dirs", _str_tuple(self.model_dirs, "model_dirs"))
        tables = (
            ("limits", LimitsConfig), ("cache", CacheConfig), ("quality", QualityConfig),
            ("concepts", ConceptsConfig), ("tls", TlsConfig), ("auth", AuthConfig),
        )  # fmt: skip
        for name, cls in tables:
            value = getattr(self, name)
            optional = name in ("tls", "auth")
            if not isinstance(value, cls) and not (optional and value is None):
                raise InvalidInput(f"{name} must be a {cls.__name__}, got {value!r}")
        if isinstance(self.models, (str, bytes)) or not isinstance(self.models, Sequence):
            raise InvalidInput(f"models must be a sequence of ModelConfig, got {self.models!r}")
        models = tuple(self.models)
        object.__setattr__(self, "models", models)
        if not models:
            raise InvalidInput("models must list at least one model")
        from xai_serve.models import ModelConfig

        seen: set[str] = set()
        for m in models:
            if not isinstance(m, ModelConfig):
                raise InvalidInput(f"models must hold ModelConfig objects, got {m!r}")
            if m.name in seen:
                raise InvalidInput(f"models: the name {m.name!r} is used twice")
            seen.add(m.name)
        self._check_model_dirs()

    def _check_model_dirs(self) -> None:
        """Every model file must lie inside one of ``model_dirs`` (when any are given)."""
        if not self.model_dirs:
            return
        dirs = [_resolved(d, f"model_dirs[{i}]") for i, d in enumerate(self.model_dirs)]
        for m in self.models:
            path = getattr(m, "path", None)
            if path is None:
                continue
            p = _resolved(path, f"models[{m.name!r}].path")
            if not any(p.is_relative_to(d) for d in dirs):
                raise InvalidInput(
                    f"models[{m.name!r}].path {str(path)!r} is not inside any of model_dirs "
                    f"({', '.join(map(str, dirs))})"
                )

    def model(self, name: str) -> ModelConfig:
        """The model config called ``name`` (NotFound lists the configured names)."""
        for m in self.models:
            if m.name == name:
                return m
        raise NotFound(
            f"no model {name!r} in the config; models: {', '.join(m.name for m in self.models)}"
        )


# --------------------------------------------------------------------------------------------
# From a mapping / file
# --------------------------------------------------------------------------------------------

_TOP_KEYS = tuple(f.name for f in fields(ServerConfig))
_LIMIT_KEYS = tuple(f.name for f in fields(LimitsConfig))
_CACHE_KEYS = tuple(f.name for f in fields(CacheConfig))
_QUALITY_KEYS = tuple(f.name for f in fields(QualityConfig))
_CONCEPTS_KEYS = tuple(f.name for f in fields(ConceptsConfig))
_TLS_KEYS = tuple(f.name for f in fields(TlsConfig))
_AUTH_KEYS = tuple(f.name for f in fields(AuthConfig))
# Top-level keys that hold a plain value (taken as written; ServerConfig checks them).
_TOP_SCALARS = (
    "host", "port", "metrics_port", "metrics_host", "http_port", "grace_s",
    "max_connection_age_s", "warmup", "log_level", "tuning_dir",
)  # fmt: skip


def config_from_dict(d: Mapping[str, Any], *, base_dir: Path | None = None) -> ServerConfig:
    """Build a :class:`ServerConfig` from a parsed TOML/YAML document.

    Top-level keys are the :class:`ServerConfig` fields; ``limits``, ``cache``, ``quality``,
    ``concepts``, ``tls`` and ``auth`` are tables; ``models`` is an array of tables, each checked by
    :func:`xai_serve.models.model_config_from_dict` (absent = the bundled model). Relative
    paths are resolved against ``base_dir``. Unknown keys and wrong types raise InvalidInput.
    """
    d = _table(d, "the config")
    # [ray] belongs to xai_serve.integrations.ray (load_ray_config checks it); serve ignores it
    _check_keys(d, (*_TOP_KEYS, "ray"), "")
    kwargs: dict[str, Any] = {k: d[k] for k in _TOP_SCALARS if k in d}

    if "limits" in d:
        limits = _table(d["limits"], "limits")
        _check_keys(limits, _LIMIT_KEYS, "limits.")
        kwargs["limits"] = LimitsConfig(**limits)

    if "cache" in d:
        cache = _table(d["cache"], "cache")
        _check_keys(cache, _CACHE_KEYS, "cache.")
        kwargs["cache"] = CacheConfig(**cache)

    if "quality" in d:
        quality = _table(d["quality"], "quality")
        _check_keys(quality, _QUALITY_KEYS, "quality.")
        kwargs["quality"] = QualityConfig(**quality)

    if "concepts" in d:
        concepts = dict(_table(d["concepts"], "concepts"))
        _check_keys(concepts, _CONCEPTS_KEYS, "concepts.")
        for key in ("sets", "datasets"):
            if key in concepts:
                folders = _table(concepts[key], f"concepts.{key}")
                concepts[key] = {
                    name: _resolve(_str(path, f"concepts.{key}.{name}"), base_dir)
                    for name, path in folders.items()
                }
        kwargs["concepts"] = ConceptsConfig(**concepts)

    if d.get("tls") is not None:
        tls = _table(d["tls"], "tls")
        _check_keys(tls, _TLS_KEYS, "tls.")
        for k in ("cert", "key"):
            if k not in tls:
                raise InvalidInput(f"tls.{k} is required when [tls] is given")
        resolved = {
            k: None if v is None else _resolve(_str(v, f"tls.{k}"), base_dir)
            for k, v in tls.items()
        }
        kwargs["tls"] = TlsConfig(**resolved)

    if d.get("auth") is not None:
        auth = dict(_table(d["auth"], "auth"))
        _check_keys(auth, _AUTH_KEYS, "auth.")
        if auth.get("tokens_file") is not None:
            auth["tokens_file"] = _resolve(_str(auth["tokens_file"], "auth.tokens_file"), base_dir)
        kwargs["auth"] = AuthConfig(**auth)

    if "model_dirs" in d:
        dirs = _str_tuple(d["model_dirs"], "model_dirs")
        kwargs["model_dirs"] = tuple(_resolve(p, base_dir) for p in dirs)

    if "models" in d:
        kwargs["models"] = _models_from_list(d["models"], base_dir)

    return ServerConfig(**kwargs)


def _models_from_list(value: Any, base_dir: Path | None) -> tuple[ModelConfig, ...]:
    """Parse the ``[[models]]`` array through the model registry's own validator."""
    from xai_serve.models import model_config_from_dict

    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Sequence):
        raise InvalidInput(
            "models must be an array of tables ([[models]] in TOML, a list of mappings in "
            f"YAML), got {value!r}"
        )
    # model_config_from_dict's messages already name the model ("models[<name>].<key> ...").
    return tuple(
        model_config_from_dict(_table(item, f"models[{i}]"), base_dir=base_dir)
        for i, item in enumerate(value)
    )


def _parse_toml(text: str, path: Path) -> Any:
    """Parse TOML with tomllib (or tomli on Python 3.10)."""
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover - Python 3.10 only
        try:
            import tomli as tomllib
        except ImportError:
            raise InvalidInput(
                f"{path}: reading TOML on Python 3.10 needs the 'tomli' package "
                "(pip install tomli), or use a .yaml config"
            ) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message ends with "(at line L, column C)".
        raise InvalidInput(f"{path}: invalid TOML: {exc}") from None


def _parse_yaml(text: str, path: Path) -> Any:
    """Parse YAML with yaml.safe_load; an empty document is an empty mapping."""
    import yaml

    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise InvalidInput(f"{path}: invalid YAML{where}: {problem}") from None
    return {} if data is None else data


def load_config(path: str | Path) -> ServerConfig:
    """Read a ``.toml``, ``.yaml`` or ``.yml`` server config file.

    Relative paths inside the file are taken relative to the file's directory. A missing file
    raises NotFound; another suffix, a syntax error (with its line) or a bad value raise
    InvalidInput naming the file.
    """
    p = Path(path).expanduser()
    suffix = p.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise InvalidInput(
            f"config file {str(p)!r}: unknown suffix {p.suffix!r}; use .toml, .yaml or .yml"
        )
    try:
        text = p.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"config file {str(p)!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise NotFound(f"config file {str(p)!r} cannot be read: {exc}") from None
    data = _parse_toml(text, p) if suffix == ".toml" else _parse_yaml(text, p)
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{p}: the top level must be a mapping of keys, got {data!r}")
    try:
        return config_from_dict(data, base_dir=p.resolve().parent)
    except InvalidInput as exc:
        raise InvalidInput(f"{p}: {exc}") from exc


# --------------------------------------------------------------------------------------------
# Flags
# --------------------------------------------------------------------------------------------

_SCALAR_OVERRIDES = (*_TOP_SCALARS, "model_dirs")


def override_keys() -> tuple[str, ...]:
    """Every key :func:`with_overrides` accepts."""
    return (
        *_SCALAR_OVERRIDES, *MODEL_OVERRIDES, *_LIMIT_KEYS, *CACHE_OVERRIDES, *TLS_OVERRIDES,
        *AUTH_OVERRIDES,
    )  # fmt: skip


def with_overrides(cfg: ServerConfig, **flags: Any) -> ServerConfig:
    """Return ``cfg`` with command-line style overrides applied; a ``None`` value is ignored.

    - top-level fields: ``host``, ``port``, ``metrics_port``, ``metrics_host``, ``http_port``,
      ``grace_s``, ``max_connection_age_s``, ``warmup``, ``log_level``, ``model_dirs``,
      ``tuning_dir``;
    - ``max_batch_size``, ``max_delay_ms``, ``device``, ``tune``: set on every model;
    - any :class:`LimitsConfig` field (``max_queue``, ``max_samples``, ...): set in ``limits``;
    - ``cache_bytes``: ``cache.max_bytes`` (0 turns the answer cache off);
    - ``tls_cert``, ``tls_key``, ``tls_client_ca``: fields of ``tls`` (cert and key are needed
      together when the config has no ``[tls]`` yet);
    - ``auth_tokens_file``, ``auth_tokens_env``: fields of ``auth``.

    Unknown keys and bad values raise InvalidInput.
    """
    valid = override_keys()
    _check_keys(flags, valid, "")
    given = {k: v for k, v in flags.items() if v is not None}
    top = {k: v for k, v in given.items() if k in _SCALAR_OVERRIDES}
    if "model_dirs" in top:
        top["model_dirs"] = _str_tuple(top["model_dirs"], "model_dirs")

    limits = {k: v for k, v in given.items() if k in _LIMIT_KEYS}
    if limits:
        top["limits"] = dataclasses.replace(cfg.limits, **limits)

    cache = {CACHE_OVERRIDES[k]: v for k, v in given.items() if k in CACHE_OVERRIDES}
    if cache:
        top["cache"] = dataclasses.replace(cfg.cache, **cache)

    tls = {TLS_OVERRIDES[k]: v for k, v in given.items() if k in TLS_OVERRIDES}
    if tls:
        if cfg.tls is not None:
            top["tls"] = dataclasses.replace(cfg.tls, **tls)
        elif "cert" in tls and "key" in tls:
            top["tls"] = TlsConfig(**tls)
        else:
            raise InvalidInput(
                "tls_cert and tls_key (--tls-cert, --tls-key) must be given together when the "
                "config has no [tls] table"
            )

    auth = {AUTH_OVERRIDES[k]: v for k, v in given.items() if k in AUTH_OVERRIDES}
    if auth:
        top["auth"] = dataclasses.replace(cfg.auth, **auth) if cfg.auth else AuthConfig(**auth)

    per_model = {k: v for k, v in given.items() if k in MODEL_OVERRIDES}
    if per_model:
        if "max_batch_size" in per_model:
            _int(per_model["max_batch_size"], "max_batch_size", minimum=1)
        if "max_delay_ms" in per_model:
            per_model["max_delay_ms"] = _float(per_model["max_delay_ms"], "max_delay_ms")
        if "device" in per_model:
            _str(per_model["device"], "device")
        if "tune" in per_model:
            _bool(per_model["tune"], "tune")
        top["models"] = tuple(dataclasses.replace(m, **per_model) for m in cfg.models)

    return dataclasses.replace(cfg, **top) if top else cfg
