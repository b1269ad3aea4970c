"""Ray Serve: the explanation server as a Ray Serve application, built from the server config.

One deployment, ``Explainer``; each of its replicas loads every model of the server config
(``[[models]]``, ``model_dirs``, ``warmup``, ``tuning_dir``) and checks requests against its
``[limits]`` exactly as ``xai-serve serve`` does (the same request -> job translation and the
same response building as the gRPC servicer, :mod:`xai_serve.serving.servicer`).

Ingress (Serve's proxies, one per node or on the head only: ``proxy_location``):

- gRPC, port ``grpc_port``: the ``xai_serve.v1.Explainer`` service's ``Explain``,
  ``ExplainStream`` (answers as they are done, each request's error in its own answer; no
  ``progress``) and ``ListModels`` with our protos (``xai-serve explain --server`` and
  ``xai-serve models --server`` work against it); errors carry the status codes
  ``xai-serve serve`` gives (INVALID_ARGUMENT, NOT_FOUND, RESOURCE_EXHAUSTED, ...). With more
  than one Serve application on the cluster, clients add the metadata
  ``application: <app_name>``. The trailing metadata ``xai-serve-replica`` (an HTTP header
  over HTTP) names the node and replica that answered.
- HTTP, port ``http_port``, under ``route_prefix``: KServe v1, as ``xai-serve serve``'s HTTP
  listener takes it: ``GET /v1/models`` -> ``{"models": [names]}``;
  ``POST /v1/models/{m}:explain`` with ``{"instances": [{"b64": "<encoded image>"} or a
  preprocessed tensor as nested lists [C][H][W], ...], "parameters": {"method": "gradcam",
  "target": 3, "seed": 7, ...}}`` -> ``{"explanations": [{"method", "target", "layer", "map",
  "top_k", "seed"?, ...}]}``. Errors: ``{"error": "<message>"}`` with 400, 404, 429, 503, ...

Batching: ``@serve.batch`` per model and replica, ``max_batch_size`` and
``batch_wait_timeout_s = max_delay_ms / 1000`` from the model's config; a batch holding several
kinds of job (methods, layers, options) is computed as one batched call per kind, on the
device's worker thread.

Resources and scaling, from the ``[ray]`` table of the same config file (:class:`RayConfig`)::

    [ray]
    address = "auto"            # the Ray cluster to join; leave out to start a local one
    num_replicas = 2            # or an [ray.autoscaling] table (then num_replicas is ignored)
    num_cpus = 1.0              # per replica (Ray also sets OMP threads to it)
    num_gpus = 1.0              # per replica; default 1 if a model's device is "cuda...", else 0
    resources = { gpu_node = 1 }   # custom Ray resources each replica takes
    max_ongoing_requests = 64   # requests one replica holds at once (its batches fill from them)
    proxy_location = "EveryNode"   # "HeadOnly", "Disabled"
    http_port = 8000
    grpc_port = 9000

    [ray.autoscaling]           # Serve's autoscaling_config
    min_replicas = 1
    max_replicas = 4
    target_ongoing_requests = 8.0   # per replica; keep it below max_ongoing_requests
    upscale_delay_s = 30.0
    downscale_delay_s = 600.0

``limits.max_queue`` becomes the deployment's ``max_queued_requests`` (requests waiting for a
replica; more are refused with UNAVAILABLE / 503 by Serve's router).

Not served through Ray (use ``xai-serve serve``): partial answers (``progress``), Evaluate,
the concept RPCs, the Open Inference Protocol, the answer cache, quality sampling, TLS and
bearer tokens (Serve's proxies own the connections: put them behind an ingress that
terminates TLS and checks tokens).

Two ways to run it, both from one config file:

- ``xai-serve ray up --config FILE`` joins (``[ray].address`` / ``--address``) or starts a Ray
  cluster, starts Serve with the ports above and deploys the application;
- ``xai-serve ray config --config FILE > serve.yaml`` writes Serve's own config file, whose
  application builder is :func:`build_app` (``args: {config: FILE}``), for
  ``serve deploy serve.yaml`` / ``serve run serve.yaml`` / KubeRay's RayService.

This module imports Ray only when it builds or starts something.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from xai_serve.errors import InvalidInput, NotFound
from xai_serve.serving.config import ServerConfig, config_from_dict

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = [
    "APP_BUILDER",
    "DEPLOYMENT_NAME",
    "GRPC_SERVICER_FUNCTIONS",
    "PROXY_LOCATIONS",
    "AutoscalingConfig",
    "RayConfig",
    "add_arguments",
    "application",
    "build_app",
    "deployment_options",
    "load_ray_config",
    "ray_config_from_dict",
    "run_command",
    "serve_config",
    "start",
]

DEPLOYMENT_NAME = "Explainer"
#: Serve's application builder (``import_path`` of the Serve config file).
APP_BUILDER = "xai_serve.integrations.ray:build_app"
#: What Serve's gRPC proxy adds to its server (``grpc_options.grpc_servicer_functions``): the
#: generated function. (Serve pickles our messages between proxy and replicas; the stubs name
#: their classes' module ``xai_serve.proto.*``, which ``make protos`` sees to, so pickle finds
#: them.)
GRPC_SERVICER_FUNCTIONS = ("xai_serve.proto.explainer_pb2_grpc.add_ExplainerServicer_to_server",)
PROXY_LOCATIONS = ("EveryNode", "HeadOnly", "Disabled")


def _number(value: Any, key: str, *, minimum: float = 0.0, integer: bool = False) -> Any:
    """``value`` if it is a finite (integer when ``integer``) number >= ``minimum``."""
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value) and value >= minimum
    if integer:
        ok = ok and isinstance(value, int)
    if not ok:
        what = "an integer" if integer else "a number"
        raise InvalidInput(f"ray.{key} must be {what} >= {minimum:g}, got {value!r}")
    return value if integer else float(value)


@dataclass(frozen=True)
class AutoscalingConfig:
    """Serve's ``autoscaling_config`` of the deployment: between ``min_replicas`` and
    ``max_replicas`` replicas, aiming at ``target_ongoing_requests`` requests in each (queued in
    its batches or computing); ``upscale_delay_s`` / ``downscale_delay_s``: how long the load
    must stay above / below the target before replicas are added / removed."""

    min_replicas: int = 1
    max_replicas: int = 4
    target_ongoing_requests: float = 8.0
    upscale_delay_s: float = 30.0
    downscale_delay_s: float = 600.0

    def __post_init__(self) -> None:
        _number(self.min_replicas, "autoscaling.min_replicas", integer=True)
        _number(self.max_replicas, "autoscaling.max_replicas", minimum=1, integer=True)
        if self.min_replicas > self.max_replicas:
            raise InvalidInput(
                f"ray.autoscaling.min_replicas ({self.min_replicas}) exceeds max_replicas "
                f"({self.max_replicas})"
            )
        for name in ("target_ongoing_requests", "upscale_delay_s", "downscale_delay_s"):
            key = f"autoscaling.{name}"
            minimum = 0.001 if name == "target_ongoing_requests" else 0.0
            object.__setattr__(self, name, _number(getattr(self, name), key, minimum=minimum))

    def as_serve(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class RayConfig:
    """The ``[ray]`` table: where the application runs and how much of it (see the module
    doc). ``num_gpus`` None: one GPU per replica if any model's device is a CUDA device, else
    none (:meth:`replica_gpus`)."""

    address: str | None = None
    app_name: str = "xai_serve"
    route_prefix: str = "/"
    num_replicas: int = 1
    autoscaling: AutoscalingConfig | None = None
    num_cpus: float = 1.0
    num_gpus: float | None = None
    resources: Mapping[str, float] = field(default_factory=dict)
    max_ongoing_requests: int = 64
    proxy_location: str = "EveryNode"
    http_host: str = "0.0.0.0"
    http_port: int = 8000
    grpc_port: int = 9000
    health_check_period_s: float = 10.0
    health_check_timeout_s: float = 30.0
    graceful_shutdown_timeout_s: float = 20.0

    def __post_init__(self) -> None:
        for name in ("address", "app_name", "http_host"):
            value = getattr(self, name)
            if not (value is None and name == "address") and not (isinstance(value, str) and value):
                raise InvalidInput(f"ray.{name} must be a non-empty string, got {value!r}")
        if not isinstance(self.route_prefix, str) or not self.route_prefix.startswith("/"):
            raise InvalidInput(f"ray.route_prefix must start with '/', got {self.route_prefix!r}")
        _number(self.num_replicas, "num_replicas", minimum=1, integer=True)
        _number(self.max_ongoing_requests, "max_ongoing_requests", minimum=1, integer=True)
        object.__setattr__(self, "num_cpus", _number(self.num_cpus, "num_cpus"))
        if self.num_gpus is not None:
            object.__setattr__(self, "num_gpus", _number(self.num_gpus, "num_gpus"))
        if self.autoscaling is not None and not isinstance(self.autoscaling, AutoscalingConfig):
            raise InvalidInput(f"ray.autoscaling must be a table, got {self.autoscaling!r}")
        if not isinstance(self.resources, Mapping):
            raise InvalidInput(f"ray.resources must be a table, got {self.resources!r}")
        resources = {}
        for name, amount in self.resources.items():
            if not isinstance(name, str) or not name or name in ("CPU", "GPU", "memory"):
                raise InvalidInput(
                    f"ray.resources: {name!r} is not a custom resource name (set CPU and GPU "
                    "with num_cpus and num_gpus)"
                )
            resources[name] = _number(amount, f"resources.{name}")
        object.__setattr__(self, "resources", resources)
        if self.proxy_location not in PROXY_LOCATIONS:
            raise InvalidInput(
                f"ray.proxy_location must be one of {', '.join(PROXY_LOCATIONS)}, got "
                f"{self.proxy_location!r}"
            )
        for name in ("http_port", "grpc_port"):
            port = getattr(self, name)
            if not isinstance(port, int) or isinstance(port, bool) or not 1 <= port <= 65535:
                raise InvalidInput(f"ray.{name} must be a port in 1..65535, got {port!r}")
        for name in ("health_check_period_s", "health_check_timeout_s"):
            object.__setattr__(self, name, _number(getattr(self, name), name, minimum=0.001))
        name = "graceful_shutdown_timeout_s"
        object.__setattr__(self, name, _number(getattr(self, name), name))

    def replica_gpus(self, server: ServerConfig) -> float:
        """GPUs per replica: ``num_gpus``, or 1 when a model runs on a CUDA device."""
        if self.num_gpus is not None:
            return self.num_gpus
        return 1.0 if any(m.device.startswith("cuda") for m in server.models) else 0.0


_RAY_KEYS = tuple(f.name for f in fields(RayConfig))
_AUTOSCALING_KEYS = tuple(f.name for f in fields(AutoscalingConfig))


def _check_keys(table: Mapping[str, Any], valid: tuple[str, ...], where: str) -> None:
    unknown = [k for k in table if k not in valid]
    if unknown:
        raise InvalidInput(
            f"unknown config key {where}.{unknown[0]}; valid keys in [{where}]: " + ", ".join(valid)
        )


def ray_config_from_dict(table: Mapping[str, Any]) -> RayConfig:
    """A :class:`RayConfig` from the parsed ``[ray]`` table (unknown keys raise)."""
    if not isinstance(table, Mapping):
        raise InvalidInput(f"ray must be a table/mapping, got {table!r}")
    _check_keys(table, _RAY_KEYS, "ray")
    kwargs = dict(table)
    if "autoscaling" in kwargs:
        auto = kwargs["autoscaling"]
        if not isinstance(auto, Mapping):
            raise InvalidInput(f"ray.autoscaling must be a table, got {auto!r}")
        _check_keys(auto, _AUTOSCALING_KEYS, "ray.autoscaling")
        kwargs["autoscaling"] = AutoscalingConfig(**auto)
    return RayConfig(**kwargs)


def _read(path: Path) -> Mapping[str, Any]:
    suffix = path.suffix.lower()
    if suffix not in (".toml", ".yaml", ".yml"):
        raise InvalidInput(f"config file {str(path)!r}: unknown suffix; use .toml, .yaml or .yml")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise NotFound(f"config file {str(path)!r} does not exist") from None
    if suffix == ".toml":
        import tomllib

        try:
            data = tomllib.loads(text)
        except tomllib.TOMLDecodeError as exc:
            raise InvalidInput(f"{path}: invalid TOML: {exc}") from None
    else:
        import yaml

        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            raise InvalidInput(f"{path}: invalid YAML: {exc}") from None
    if not isinstance(data, Mapping):
        raise InvalidInput(f"{path}: the top level must be a mapping of keys")
    return data


def load_ray_config(path: str | Path) -> tuple[ServerConfig, RayConfig]:
    """The server config and the ``[ray]`` table (defaults when absent) of one TOML / YAML
    file. Relative paths are taken relative to the file's directory, as
    :func:`xai_serve.serving.config.load_config` takes them."""
    p = Path(path).expanduser()
    data = dict(_read(p))
    table = data.pop("ray", {})
    try:
        server = config_from_dict(data, base_dir=p.resolve().parent)
        return server, ray_config_from_dict(table)
    except InvalidInput as exc:
        raise InvalidInput(f"{p}: {exc}") from exc


def deployment_options(server: ServerConfig, cfg: RayConfig) -> dict[str, Any]:
    """Options of the ``Explainer`` deployment (``serve.deployment(...).options(**these)``)."""
    actor: dict[str, Any] = {"num_cpus": cfg.num_cpus, "num_gpus": cfg.replica_gpus(server)}
    if cfg.resources:
        actor["resources"] = dict(cfg.resources)
    options: dict[str, Any] = {
        "name": DEPLOYMENT_NAME,
        "ray_actor_options": actor,
        "max_ongoing_requests": cfg.max_ongoing_requests,
        "max_queued_requests": server.limits.max_queue,
        "health_check_period_s": cfg.health_check_period_s,
        "health_check_timeout_s": cfg.health_check_timeout_s,
        "graceful_shutdown_timeout_s": cfg.graceful_shutdown_timeout_s,
    }
    if cfg.autoscaling is not None:
        options["autoscaling_config"] = cfg.autoscaling.as_serve()
    else:
        options["num_replicas"] = cfg.num_replicas
    return options


def _http_options(cfg: RayConfig) -> dict[str, Any]:
    return {"host": cfg.http_host, "port": cfg.http_port}


def _grpc_options(cfg: RayConfig) -> dict[str, Any]:
    return {"port": cfg.grpc_port, "grpc_servicer_functions": list(GRPC_SERVICER_FUNCTIONS)}


def serve_config(config_file: str | Path, cfg: RayConfig) -> dict[str, Any]:
    """Serve's config file (``serve deploy``) for the application of ``config_file``: the
    cluster-wide proxy options from ``[ray]``, one application built by :func:`build_app`.
    The deployment's options are not repeated in it: the builder reads them from the file."""
    return {
        "proxy_location": cfg.proxy_location,
        "http_options": _http_options(cfg),
        "grpc_options": _grpc_options(cfg),
        "applications": [
            {
                "name": cfg.app_name,
                "route_prefix": cfg.route_prefix,
                "import_path": APP_BUILDER,
                "args": {"config": str(config_file)},
            }
        ],
    }


def application(server: ServerConfig, cfg: RayConfig) -> Application:
    """The Serve application: the ``Explainer`` deployment bound to ``server``."""
    from ray import serve

    from xai_serve.integrations._ray_replica import ExplainerReplica

    deployment = serve.deployment(ExplainerReplica).options(**deployment_options(server, cfg))
    return deployment.bind(server)


def build_app(args: Mapping[str, Any]) -> Application:
    """Serve's application builder: ``args = {"config": "<server config file>"}``."""
    if not isinstance(args, Mapping) or not isinstance(args.get("config"), str):
        raise InvalidInput("the application's args must be {config: <server config file>}")
    unknown = sorted(set(args) - {"config"})
    if unknown:
        raise InvalidInput(f"unknown application args {unknown}; the only one is `config`")
    server, cfg = load_ray_config(args["config"])
    return application(server, cfg)


def start(server: ServerConfig, cfg: RayConfig, *, address: str | None = None) -> None:
    """Join (``address``, else ``cfg.address``) or start a Ray cluster, start Serve with the
    proxies of ``cfg`` and deploy the application; returns when its replicas are ready."""
    import ray
    from ray import serve

    address = address or cfg.address
    if not ray.is_initialized():
        if address is None:
            ray.init(include_dashboard=False, log_to_driver=False)
        else:
            ray.init(address=address, log_to_driver=False)
    serve.start(
        proxy_location=cfg.proxy_location,
        http_options=_http_options(cfg),
        grpc_options=_grpc_options(cfg),
    )
    serve.run(application(server, cfg), name=cfg.app_name, route_prefix=cfg.route_prefix)


# --------------------------------------------------------------------------------------------
# xai-serve ray ...
# --------------------------------------------------------------------------------------------


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``xai-serve ray`` subcommands."""
    sub = p.add_subparsers(dest="ray_command", metavar="ACTION", required=True)
    up = sub.add_parser(
        "up",
        help="deploy the server config as a Ray Serve application",
        description="Join the Ray cluster at --address (or [ray].address; neither: start a "
        "local one), start Serve's HTTP and gRPC proxies on [ray].http_port / grpc_port and "
        "deploy the models of --config with the replicas and resources of its [ray] table. "
        "Stays in the foreground (Ctrl-C removes the application) unless --detach.",
    )
    up.add_argument("--config", required=True, help="server config file (.toml/.yaml)")
    up.add_argument("--address", help="Ray cluster address (e.g. auto, 10.0.0.5:6379)")
    up.add_argument(
        "--detach", action="store_true", help="return once deployed; the app keeps running"
    )
    conf = sub.add_parser(
        "config",
        help="print Serve's config file (serve deploy) for a server config",
        description="Print the Ray Serve config file (YAML) that deploys --config: the proxies "
        "of its [ray] table and one application built by " + APP_BUILDER + ".",
    )
    conf.add_argument("--config", required=True, help="server config file (.toml/.yaml)")
    conf.add_argument(
        "--config-path",
        help="the path the cluster reads the config file from (default: --config's absolute "
        "path here), e.g. where a container mounts it",
    )


def run_command(args: argparse.Namespace) -> int:
    """Run ``xai-serve ray up`` / ``xai-serve ray config``; returns the exit code."""
    try:
        server, cfg = load_ray_config(args.config)
    except (InvalidInput, NotFound) as exc:
        print(f"xai-serve: error: {exc}", file=sys.stderr)
        return 2
    if args.ray_command == "config":
        import yaml

        path = args.config_path or str(Path(args.config).resolve())
        sys.stdout.write(yaml.safe_dump(serve_config(path, cfg), sort_keys=False))
        return 0
    if args.detach and not (args.address or cfg.address):
        print("xai-serve: error: --detach needs a running cluster (--address or [ray].address): "
              "a Ray started here ends with this command", file=sys.stderr)  # fmt: skip
        return 2
    try:
        import ray  # noqa: F401
    except ImportError:
        print("xai-serve: error: Ray Serve is not installed: pip install 'ray[serve]'",
              file=sys.stderr)  # fmt: skip
        return 1
    start(server, cfg, address=args.address)
    print(
        f"deployed {cfg.app_name!r}: {', '.join(m.name for m in server.models)}; "
        f"HTTP {cfg.http_host}:{cfg.http_port}{cfg.route_prefix}, gRPC port {cfg.grpc_port}",
        flush=True,
    )
    if args.detach:
        return 0
    from ray import serve

    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        serve.delete(cfg.app_name)
    return 0
