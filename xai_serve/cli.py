"""The ``xai-serve`` command line.

``xai-serve serve [--config FILE] [flags]`` runs the gRPC server; flags override the file, and
``XAI_SERVE_CONFIG`` names the file when ``--config`` is not given. ``python -m
xai_serve.serving`` is the same as ``xai-serve serve``.

Each subcommand registers itself with :func:`build_parser` through an ``_add_<name>`` function
that sets ``func`` (``(args) -> int``), so more subcommands slot in beside ``serve``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from xai_serve import __version__
from xai_serve.errors import InvalidInput, Unavailable, XaiServeError

if TYPE_CHECKING:
    from xai_serve.models import ModelConfig
    from xai_serve.serving.config import ServerConfig

__all__ = ["build_parser", "main"]

PROG = "xai-serve"
CONFIG_ENV = "XAI_SERVE_CONFIG"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"

_log = logging.getLogger("xai_serve.cli")


def _port(text: str) -> int:
    """argparse type: a TCP port, 0 = ephemeral."""
    value = int(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in 0..65535, got {value}")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1, by the check the method options and the servers use."""
    from xai_serve.explainers.base import positive_int

    try:
        return positive_int(int(text), "")
    except InvalidInput as exc:  # before ValueError, which it may derive from
        raise argparse.ArgumentTypeError(str(exc)) from None
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}") from None


def _non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be an integer >= 0, got {value}")
    return value


def _class_index(text: str) -> int:
    """argparse type: a class index (an integer >= 0)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a class index (an integer >= 0), got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be a class index (an integer >= 0), got {value}")
    return value


def _class_list(text: str) -> list[int]:
    """argparse type: distinct comma-separated class indices, ``3,5,7``."""
    items = [t.strip() for t in text.split(",")]
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated class indices, e.g. 3,5,7; got {text!r}"
        ) from None
    if any(v < 0 for v in values):
        raise argparse.ArgumentTypeError(f"class indices must be >= 0, got {text!r}")
    repeated = sorted({v for v in values if values.count(v) > 1})
    if repeated:
        raise argparse.ArgumentTypeError(f"names class {repeated[0]} twice: {text!r}")
    return values


def _non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def _positive_float(text: str) -> float:
    """argparse type: a finite number > 0."""
    value = float(text)
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------

# argparse dest -> with_overrides() key (the dests are chosen to be the same names).
_SERVE_OVERRIDES = (
    "host", "port", "metrics_port", "metrics_host", "http_port", "device", "max_batch_size",
    "max_delay_ms", "max_queue", "tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file",
    "auth_tokens_env", "grace_s", "max_connection_age_s", "warmup", "log_level", "model_dirs",
    "tune", "tuning_dir", "cache_bytes",
)  # fmt: skip


def _add_serve(subparsers: argparse._SubParsersAction) -> None:
    """Register ``serve``."""
    p = subparsers.add_parser(
        "serve",
        help="run the gRPC explanation server",
        description="Run the gRPC explanation server until SIGTERM/SIGINT. Flags override the "
        f"config file; without --config (or ${CONFIG_ENV}) the bundled model is served.",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        default=os.environ.get(CONFIG_ENV) or None,
        help=f"server config, .toml or .yaml (default: ${CONFIG_ENV})",
    )
    net = p.add_argument_group("network")
    net.add_argument("--host", metavar="HOST", help="address to listen on (default 0.0.0.0)")
    net.add_argument(
        "--port", type=_port, metavar="PORT", help="gRPC port, 0 = ephemeral (default 50051)"
    )
    net.add_argument(
        "--metrics-port",
        type=_port,
        metavar="PORT",
        help="Prometheus /metrics port, 0 = ephemeral (default off)",
    )
    net.add_argument(
        "--http-port",
        type=_port,
        metavar="PORT",
        help="KServe v1 / Open Inference Protocol REST port, 0 = ephemeral (default off)",
    )
    net.add_argument(
        "--metrics-host",
        metavar="HOST",
        help="address of the /metrics endpoint (default 127.0.0.1)",
    )
    net.add_argument(
        "--grace", dest="grace_s", type=_non_negative_float, metavar="SECONDS",
        help="time in-flight calls get to finish after SIGTERM (default 10)",
    )  # fmt: skip
    net.add_argument(
        "--max-connection-age", dest="max_connection_age_s", type=_positive_float,
        metavar="SECONDS",
        help="close each client connection after this long so clients reconnect and re-resolve "
        "(finds new replicas after a scale-out; default never)",
    )  # fmt: skip

    mdl = p.add_argument_group("models (apply to every model)")
    mdl.add_argument("--device", metavar="DEVICE", help="torch device, e.g. cpu, cuda, cuda:1")
    mdl.add_argument(
        "--max-batch-size", type=_positive_int, metavar="N", help="largest batch (default 16)"
    )
    mdl.add_argument(
        "--max-delay-ms", type=_non_negative_float, metavar="MS",
        help="longest wait for a batch to fill, in ms (default 5)",
    )  # fmt: skip
    mdl.add_argument(
        "--model-dir", dest="model_dirs", action="append", metavar="DIR",
        help="model files must lie inside this directory (repeatable; replaces model_dirs)",
    )  # fmt: skip
    mdl.add_argument(
        "--no-warmup", dest="warmup", action="store_const", const=False,
        help="skip the warm-up (tuning and the first forward/explain passes) at start",
    )  # fmt: skip
    mdl.add_argument(
        "--no-tune", dest="tune", action="store_const", const=False,
        help="do not measure forward paths at warm-up: run what the config forces, else fp32 "
        "contiguous at the methods' default batches",
    )  # fmt: skip
    mdl.add_argument(
        "--tuning-dir", dest="tuning_dir", metavar="DIR",
        help="where tuning measurements and compiled forwards are kept across restarts "
        "(default ~/.cache/xai_serve; '' keeps nothing)",
    )  # fmt: skip

    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-queue", type=_positive_int, metavar="N",
        help="waiting requests per model before RESOURCE_EXHAUSTED (default 256)",
    )  # fmt: skip
    lim.add_argument(
        "--cache-bytes", dest="cache_bytes", type=_non_negative_int, metavar="BYTES",
        help="memory for the cache of exact answers to repeated requests (seeded or "
        "deterministic methods); 0 = off (default)",
    )  # fmt: skip

    sec = p.add_argument_group("security")
    sec.add_argument("--tls-cert", metavar="PEM", help="server certificate chain")
    sec.add_argument("--tls-key", metavar="PEM", help="server private key")
    sec.add_argument(
        "--tls-client-ca", metavar="PEM", help="CA of client certificates (enables mutual TLS)"
    )
    sec.add_argument(
        "--auth-tokens-file", metavar="FILE", help="bearer tokens, one per line (enables auth)"
    )
    sec.add_argument(
        "--auth-tokens-env", metavar="VAR",
        help="environment variable with comma-separated bearer tokens (enables auth)",
    )  # fmt: skip

    p.add_argument(
        "--log-level", type=str.upper, choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="log level (default INFO)",
    )  # fmt: skip
    p.set_defaults(func=_cmd_serve)


def serve_config(args: argparse.Namespace) -> ServerConfig:
    """The :class:`~xai_serve.serving.config.ServerConfig` of parsed ``serve`` arguments."""
    from xai_serve.serving.config import ServerConfig, load_config, with_overrides

    cfg = load_config(args.config) if args.config else ServerConfig()
    return with_overrides(cfg, **{k: getattr(args, k) for k in _SERVE_OVERRIDES})


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The CLI's log handler (a class of its own so that it is added only once)."""


def _configure_logging(level: str) -> None:
    """Log to stderr with time, level and logger name; set the root level to ``level``."""
    root = logging.getLogger()
    root.setLevel(level)
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(handler)
    logging.captureWarnings(True)


def _cmd_serve(args: argparse.Namespace) -> int:
    """Build the config, configure logging and run the server until it is told to stop."""
    try:
        cfg = serve_config(args)
    except XaiServeError as exc:
        _error(exc)
        return 2
    _configure_logging(cfg.log_level)
    _log.debug("config: %r", cfg)
    from xai_serve.serving.server import serve

    try:
        return serve(cfg)
    except XaiServeError as exc:  # e.g. a model file or TLS file that cannot be loaded
        _error(exc)
        return 1
    except KeyboardInterrupt:
        return 130


# --------------------------------------------------------------------------------------------
# explain
# --------------------------------------------------------------------------------------------

TOKEN_ENV = "XAI_SERVE_TOKEN"


class Progress:
    """A one-line progress bar on a terminal:
    ``[#######.....]  12/40  chelsea.png 128/256 samples``.

    The bar fills with finished files and with the share of samples that the images in
    flight have used (lime and kernelshap report after each sampling round), so that a slow
    image visibly moves instead of the bar standing still until it is done. Silent when
    ``enabled`` is False (the default when the stream is not a terminal). For one file it
    draws only once sampling rounds report: a bar that jumps from empty to full says nothing.
    """

    WIDTH = 28

    def __init__(self, total: int, *, enabled: bool | None = None, stream: Any = None) -> None:
        self.total = max(0, total)
        self.done = 0
        self.stream = stream if stream is not None else sys.stderr
        if enabled is None:
            enabled = bool(getattr(self.stream, "isatty", lambda: False)())
        self.enabled = enabled and self.total > 0
        self._live = self.total > 1
        self._in_flight: dict[str, float] = {}  # source -> share of its samples used
        self._shown = False

    def partial(self, source: str, fraction: float, note: str = "") -> None:
        """Image ``source`` has used ``fraction`` (0..1) of its planned samples."""
        self._in_flight[source] = min(1.0, max(0.0, fraction))
        self._live = True
        self._draw(note)

    def advance(self, note: str = "", source: str | None = None) -> None:
        """One more file is done (``source``: the key its partial updates used)."""
        self.done = min(self.total, self.done + 1)
        if source is not None:
            self._in_flight.pop(source, None)
        self._draw(note)

    def _draw(self, note: str) -> None:
        if not (self.enabled and self._live):
            return
        if self.done >= self.total:
            filled = self.WIDTH
        else:  # never full before the last file is: floor, at most WIDTH - 1
            share = (self.done + sum(self._in_flight.values())) / self.total
            filled = min(self.WIDTH - 1, int(self.WIDTH * share))
        bar = "#" * filled + "." * (self.WIDTH - filled)
        text = f"[{bar}] {self.done:>{len(str(self.total))}}/{self.total}  {note}"
        self.stream.write("\r" + text[:100].ljust(100))
        self.stream.flush()
        self._shown = True

    def close(self) -> None:
        if self._shown:
            self.stream.write("\r" + " " * 100 + "\r")
            self.stream.flush()
            self._shown = False


def _add_model_source(
    p: argparse.ArgumentParser, server_help: str = "explain through this gRPC server instead"
) -> None:
    """``--model``, ``--config`` and the remote options."""
    p.add_argument(
        "--model",
        metavar="NAME",
        help="model name: a bundled model (default efficientnet_lite0) or one of --config's",
    )
    p.add_argument(
        "--config",
        metavar="FILE",
        help="server config (.toml/.yaml) whose models to use (default: the bundled model)",
    )
    _add_remote(p, server_help)


def _add_remote(p: argparse.ArgumentParser, server_help: str) -> None:
    """``--server`` and how to connect to it (token, TLS)."""
    remote = p.add_argument_group("remote (with --server)")
    remote.add_argument("--server", metavar="HOST:PORT", help=server_help)
    remote.add_argument(
        "--token", metavar="TOKEN", default=os.environ.get(TOKEN_ENV) or None,
        help=f"bearer token (default: ${TOKEN_ENV})",
    )  # fmt: skip
    remote.add_argument("--tls", action="store_true", help="connect with TLS")
    remote.add_argument("--ca", metavar="PEM", help="CA certificate to trust (implies --tls)")


def _add_explain(subparsers: argparse._SubParsersAction) -> None:
    """Register ``explain``."""
    from xai_serve.runner import MAP_FORMATS

    p = subparsers.add_parser(
        "explain",
        help="explain image files and write overlays",
        description="Explain image files (files, folders, globs) in this process, or through "
        "a server with --server, and write one picture per image (and the maps with "
        "--save-maps) into --out; with --targets or --top-labels the picture has one panel "
        "per class. Exits 1 if any image failed (after writing the others).",
    )
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files, folders or globs")
    p.add_argument("--method", default="gradcam", help="explanation method (default gradcam)")
    _add_model_source(p)
    classes = p.add_mutually_exclusive_group()
    classes.add_argument(
        "--target", type=_class_index, metavar="N", help="class to explain (default: top-1)"
    )
    classes.add_argument(
        "--targets", type=_class_list, metavar="N,N,...",
        help="several classes to explain in every image, e.g. 3,5,7: one map each, one panel "
        "per class in the picture",
    )  # fmt: skip
    classes.add_argument(
        "--top-labels", type=_positive_int, metavar="K",
        help="explain each image's K most likely classes (one panel each, most likely first)",
    )  # fmt: skip
    p.add_argument(
        "--foil", type=_class_index, metavar="F",
        help="contrast with class F: each map explains the target's score minus F's "
        "('why the target rather than F'); panels read '<class> vs <F>'",
    )  # fmt: skip
    p.add_argument("--layer", metavar="NAME", help="CAM layer (default: the model's)")
    p.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE",
        help="method option, e.g. -o samples=128 -o n_segments=40 (repeatable; "
        "'xai-serve methods' lists each method's options)",
    )  # fmt: skip
    p.add_argument(
        "--budget-ms", type=_positive_int, metavar="MS",
        help="lime, kernelshap, integrated_gradients, smoothgrad: do the work that fits in MS "
        "ms of compute per call and answer with it (lime/kernelshap report the standard "
        "error of each segment weight); same as -o budget_ms=MS",
    )  # fmt: skip
    p.add_argument(
        "--tolerance", type=_positive_float, metavar="SE",
        help="lime, kernelshap: stop sampling an image once every segment weight's standard "
        "error is <= SE (samples is then the most it uses); same as -o tolerance=SE",
    )  # fmt: skip
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default out/)")
    p.add_argument(
        "--save-maps", choices=MAP_FORMATS, metavar="FORMAT",
        help="also save each map: npy (the float32 map) or pt (map, target, scores, segments)",
    )  # fmt: skip
    p.add_argument("--no-overlays", dest="overlays", action="store_false",
                   help="do not write the pictures (with --save-maps)")  # fmt: skip
    p.add_argument(
        "--batch-size", type=_positive_int, metavar="N",
        help="images per batch (default: the model's max_batch_size)",
    )  # fmt: skip
    p.add_argument("--device", metavar="DEVICE", help="in-process device, e.g. cpu or cuda")
    p.add_argument(
        "--progress", dest="progress", action="store_const", const=True, default=None,
        help="always show the progress bar, which also moves with the samples of lime and "
        "kernelshap (default: on a terminal)",
    )  # fmt: skip
    p.add_argument("--no-progress", dest="progress", action="store_const", const=False)
    p.set_defaults(func=_cmd_explain)


def _model_config(args: argparse.Namespace) -> ModelConfig | None:
    """The config of the model to use: --config's (named by --model, else its first), the
    bundled model of that name, or None for a remote model this side does not know."""
    from xai_serve.models import BUNDLED_MODELS, bundled_model_config

    if args.config:
        from xai_serve.serving.config import load_config

        cfg = load_config(args.config)
        return cfg.model(args.model) if args.model else cfg.models[0]
    name = args.model or BUNDLED_MODELS[0]
    if getattr(args, "server", None) and name not in BUNDLED_MODELS:
        return None  # the server knows it; its transform is unknown here
    return bundled_model_config(name)


def _client(args: argparse.Namespace) -> Any:
    from xai_serve.client import Client

    return Client(
        args.server, tls=args.tls or bool(args.ca), root_certificates=args.ca, token=args.token
    )


def _connect(client: Any, model: str | None) -> list[Any]:
    """The server's models, checked to include ``model``; Unavailable with the address when
    the server cannot be reached."""
    from xai_serve.client import RemoteError
    from xai_serve.errors import NotFound, Unavailable

    try:
        models = client.list_models(timeout=15)
    except RemoteError as exc:
        raise Unavailable(
            f"cannot use the server at {client.target}: {exc.code.name}: {exc.details}"
        ) from None
    names = [m.name for m in models]
    if model is not None and model not in names:
        raise NotFound(f"the server has no model {model!r}; it has: {', '.join(names)}")
    return models


def _cmd_explain(args: argparse.Namespace) -> int:
    import time
    from pathlib import Path

    from xai_serve import runner

    try:
        options = dict(runner.parse_option(text) for text in args.option)
        for key, value in (("budget_ms", args.budget_ms), ("tolerance", args.tolerance)):
            if value is None:
                continue
            if key in options and options[key] != value:
                flag = "--" + key.replace("_", "-")
                raise InvalidInput(f"{flag} {value} and -o {key}={options[key]} disagree")
            options[key] = value
        model_cfg = _model_config(args)
        if args.device and model_cfg is not None:
            import dataclasses

            model_cfg = dataclasses.replace(model_cfg, device=args.device)
        if not args.overlays and args.save_maps is None:
            raise InvalidInput("--no-overlays writes nothing without --save-maps")
        classes = {"target": args.target, "targets": args.targets,
                   "top_labels": args.top_labels, "foil": args.foil}  # fmt: skip
        runner.check_classes(None, **classes)
    except XaiServeError as exc:
        _error(exc)
        return 2
    files, failures = runner.collect_images(args.paths)
    if not files:
        _report_failures(failures, 0)
        return 1
    start = time.monotonic()
    client = None
    try:
        if args.server:
            client = _client(args)
            name = model_cfg.name if model_cfg is not None else args.model
            served = {m.name: m for m in _connect(client, name)}
            if name in served:
                runner.check_classes(served[name].num_classes, **classes)
            view = None
            if model_cfg is not None:
                from xai_serve.models.registry import preprocess_image

                transform, size = model_cfg.transform, model_cfg.resolved_input_size

                def view(rgb: Any) -> Any:
                    return preprocess_image(rgb, transform, size)[1]

            job: Any = runner.RemoteRunner(
                client, name, args.method, layer=args.layer, options=options, view=view,
                chunk=args.batch_size or 32, **classes,
            )  # fmt: skip
            where = f"via {args.server}"
        else:
            from xai_serve.models import load_model

            assert model_cfg is not None
            model = load_model(model_cfg)
            job = runner.LocalRunner(
                model, args.method, layer=args.layer, options=options,
                batch_size=args.batch_size, **classes,
            )  # fmt: skip
            where = f"in-process on {model.device}"
            name = model.name
    except XaiServeError as exc:
        if client is not None:
            client.close()
        _error(exc)
        return 2 if not isinstance(exc, Unavailable) else 1
    out_dir = Path(args.out)
    progress = Progress(len(files), enabled=args.progress)

    def on_partial(p: runner.Partial) -> None:
        of = f"/{p.planned}" if p.planned else ""
        progress.partial(p.source, p.fraction, f"{Path(p.source).name} {p.samples}{of} samples")

    done = 0
    try:
        # partial answers are asked for only when a bar shows them (they cost traffic)
        for outcome in job.run(files, on_partial=on_partial if progress.enabled else None):
            if isinstance(outcome, runner.Failure):
                failures.append(outcome)
                progress.advance(Path(outcome.source).name, outcome.source)
                continue
            try:
                written = runner.write_result(
                    outcome, out_dir, save_map=args.save_maps, picture=args.overlays
                )
            except (OSError, XaiServeError) as exc:
                failures.append(runner.Failure(outcome.source, f"cannot write: {exc}"))
                progress.advance(Path(outcome.source).name, outcome.source)
                continue
            done += 1
            progress.close()
            sampling = runner.sampling_note(outcome)
            sampling = f" [{sampling}]" if sampling else ""
            print(
                f"{outcome.source}: {args.method} {runner.targets_note(outcome)}{sampling}"
                " -> " + ", ".join(str(w) for w in written),
                flush=True,
            )
            progress.advance(Path(outcome.source).name, outcome.source)
    except XaiServeError as exc:  # the server went away, the stream failed as a whole
        progress.close()
        _error(exc)
        _report_failures(failures, done)
        return 1
    finally:
        progress.close()
        if client is not None:
            client.close()
    elapsed = runner.format_seconds(time.monotonic() - start)
    print(
        f"explained {done} of {len(files)} image{'s' if len(files) != 1 else ''} with "
        f"{args.method} on {name} {where} in {elapsed}; wrote {out_dir}/",
        file=sys.stderr,
    )
    if failures:
        _report_failures(failures, done)
        return 1
    return 0


def _report_failures(failures: list[Any], done: int) -> None:
    if not failures:
        print(f"{PROG}: error: no images to explain", file=sys.stderr)
        return
    total = len(failures) + done
    print(
        f"{PROG}: error: {len(failures)} of {total} input{'s' if total != 1 else ''} failed:",
        file=sys.stderr,
    )
    for f in failures:
        print(f"  {f.source}: {f.reason}", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# models, methods
# --------------------------------------------------------------------------------------------


def _add_models(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "models",
        help="list the models (bundled, a config's, or a server's) and their forward paths",
        description="List models: the bundled ones, those of --config (loaded to find their "
        "layers), or those a running --server holds, each with its forward path (memory "
        "format, precision, batch, compiled or not): a server's as it measured it at warm-up; "
        "in this process the configured one, or the measured one with --tune.",
    )
    p.add_argument("--config", metavar="FILE", help="server config whose models to list")
    p.add_argument(
        "--tune", action="store_true",
        help="in this process: measure each model's forward path as the server's warm-up does "
        "(reusing and filling the tuning cache: --config's tuning_dir, default "
        "~/.cache/xai_serve); slow the first time",
    )  # fmt: skip
    _add_remote(p, "list a running server's models")
    p.set_defaults(func=_cmd_models)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in (header, *rows)]  # fmt: skip
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _local_path_summary(path: Any) -> str:
    """The one-line summary of an in-process model's forward path, made the way the server
    makes ListModels' ``forward_path.summary``, so both listings read the same."""
    from xai_serve.client import parse_forward_path
    from xai_serve.proto import explainer_pb2 as pb
    from xai_serve.serving.servicer import path_to_proto

    message = pb.ForwardPath()
    path_to_proto(path, message)
    return parse_forward_path(message).summary


def _cmd_models(args: argparse.Namespace) -> int:
    header = ("name", "input", "classes", "default layer", "device", "methods")
    rows = []
    paths: list[tuple[str, str]] = []
    try:
        if args.server:
            if args.tune:
                raise InvalidInput("--tune measures in this process; a server tunes at warm-up")
            with _client(args) as client:
                for m in _connect(client, None):
                    rows.append((
                        m.name, "x".join(map(str, m.input_shape)), str(m.num_classes),
                        m.default_layer or "-", m.device, ", ".join(m.methods),
                    ))  # fmt: skip
                    fp = m.forward_path
                    paths.append((m.name, fp.summary if fp is not None else "not reported"))
        else:
            from xai_serve.models import BUNDLED_MODELS, bundled_model_config, load_model
            from xai_serve.models.tuning import resolve_cache_dir

            tuning_dir = None
            if args.config:
                from xai_serve.serving.config import load_config

                server_cfg = load_config(args.config)
                configs = list(server_cfg.models)
                tuning_dir = server_cfg.tuning_dir
            else:
                configs = [bundled_model_config(n) for n in BUNDLED_MODELS]
            for cfg in configs:
                m = load_model(cfg)
                if args.tune and cfg.tune:
                    m.tune(resolve_cache_dir(tuning_dir))
                rows.append((
                    m.name, "x".join(map(str, m.input_shape)), str(m.num_classes),
                    m.default_layer or "-", str(m.device), ", ".join(m.methods),
                ))  # fmt: skip
                paths.append((m.name, _local_path_summary(m.path)))
    except XaiServeError as exc:
        _error(exc)
        return 1 if isinstance(exc, Unavailable) else 2
    print(_table(header, rows))
    print("\nforward paths:")
    for name, summary in paths:
        print(f"  {name}: {summary}")
    return 0


def _add_methods(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "methods",
        help="list the explanation methods and their options (or the quality metrics)",
        description="List the explanation methods with their options and defaults; with "
        "--metrics, the quality metrics that `xai-serve bench --quality`, the Evaluate RPC and "
        "ExplainRequest.quality take.",
    )
    p.add_argument(
        "--metrics", action="store_true", help="list the quality metrics instead of the methods"
    )
    p.set_defaults(func=_cmd_methods)


def _cmd_methods(args: argparse.Namespace) -> int:
    from xai_serve.explainers.base import get_method, list_methods

    if args.metrics:
        from xai_serve.explainers.evaluation import metric_info

        rows = [
            (
                info.name,
                "higher" if info.higher_is_better else "lower",
                info.description,
                ", ".join(f"{k}={v!r}" for k, v in info.settings.items()) or "-",
            )
            for info in metric_info().values()
        ]
        print(_table(("metric", "better", "what", "settings (defaults)"), rows))
        return 0
    rows = []
    for name in list_methods():
        cls = get_method(name)
        doc = (cls.__doc__ or "").strip().splitlines()
        summary = doc[0].split(":")[0].rstrip(".") if doc else ""
        opts = ", ".join(f"{k}={v!r}" for k, v in cls.options.items() if k != "amp")
        rows.append((name, _traits(cls), summary, opts or "-"))
    print(_table(("method", "traits", "what", "options (defaults)"), rows))
    return 0


def _traits(cls: Any) -> str:
    """A method's traits, as ``xai-serve methods`` shows them: what it takes besides its
    options (a layer, a seed, a baseline), whether it answers with segments, and whether it
    works without gradients."""
    takes = [
        word
        for word, trait in (
            ("layer", cls.uses_layer),
            ("seed", cls.randomised),
            ("baseline", cls.takes_baseline),
            ("segments", cls.produces_segments),
            ("no gradients", not cls.needs_gradients),
        )
        if trait
    ]
    return ", ".join(takes)


def _add_demo(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="run the server on the bundled model and explain sample photos through it",
        description="Start the gRPC server on the bundled EfficientNet-Lite0, explain five "
        "photos from scikit-image through it with one method of each family (Grad-CAM, CAM, "
        "integrated gradients, guided backprop, Guided Grad-CAM, DeepLIFT, DeepSHAP, LIME, "
        "KernelSHAP), write one picture per photo and method and a contact sheet into --out, "
        "print the latency of each method, and stop the server. With --vit-weights, a vision "
        "transformer is served too and explained with attention rollout and gradient-weighted "
        "rollout.",
    )
    p.add_argument("--out", default="out", metavar="DIR", help="output folder (default out/)")
    p.add_argument("--port", type=_port, metavar="PORT", help="server port (default: a free one)")
    p.add_argument(
        "--startup-timeout", type=_non_negative_float, default=300.0, metavar="SECONDS",
        help="how long the server may take to load and warm up (default 300)",
    )  # fmt: skip
    p.add_argument(
        "--request-timeout", type=_non_negative_float, default=600.0, metavar="SECONDS",
        help="deadline of each request (default 600)",
    )  # fmt: skip
    p.add_argument(
        "--vit-weights", metavar="FILE",
        help="ImageNet weights (a state dict) of a vision transformer to explain too",
    )  # fmt: skip
    p.add_argument(
        "--vit-arch", default="vit_b_16", metavar="NAME",
        help="its architecture: a torchvision or timm model name (default vit_b_16)",
    )  # fmt: skip
    p.add_argument(
        "--vit-source", choices=("torchvision", "timm"), default="torchvision",
        help="where the architecture comes from (default torchvision)",
    )  # fmt: skip

    def run(args: argparse.Namespace) -> int:
        from xai_serve.demo import main_cli

        return main_cli(args)

    p.set_defaults(func=run)


# --------------------------------------------------------------------------------------------
# bench
# --------------------------------------------------------------------------------------------


def _add_bench(subparsers: argparse._SubParsersAction) -> None:
    from xai_serve.bench.command import add_arguments

    p = subparsers.add_parser(
        "bench",
        help="measure a server's latency and throughput under load",
        description="Send explain requests (Explain, ExplainStream or Open Inference Protocol "
        "ModelInfer) to a running server (--server) or to one started in this process "
        "(--config, default the bundled model), at each concurrency of a sweep (closed loop) "
        "or each request rate (open loop), and print per setting the throughput, latency "
        "percentiles, errors by status code and the server's queue / compute / batch split.",
    )
    _add_remote(p, "measure this running gRPC server")
    add_arguments(p)
    p.set_defaults(func=_cmd_bench)


def _cmd_bench(args: argparse.Namespace) -> int:
    from xai_serve.bench.command import run_command

    return run_command(args, table=_table, progress_bar=Progress, error=_error)


def _add_ray(subparsers: argparse._SubParsersAction) -> None:
    from xai_serve.integrations.ray import add_arguments

    p = subparsers.add_parser(
        "ray",
        help="run the server config as a Ray Serve application",
        description="`ray up`: deploy the models of a server config on a Ray cluster with "
        "Ray Serve (replicas, resources and autoscaling from its [ray] table; HTTP and gRPC "
        "ingress). `ray config`: print the Serve config file (serve deploy) for it.",
    )
    add_arguments(p)
    p.set_defaults(func=_cmd_ray)


def _cmd_ray(args: argparse.Namespace) -> int:
    from xai_serve.integrations.ray import run_command

    return run_command(args)


# --------------------------------------------------------------------------------------------
# tcav, dissect, visualize (xai_serve/concepts_cli.py)
# --------------------------------------------------------------------------------------------


def _one_line_errors(p: argparse.ArgumentParser) -> None:
    """Report ``p``'s usage errors as one line, ``xai-serve tcav: error: ...`` (exit 2),
    without argparse's usage block."""

    def error(message: str) -> Any:
        p.exit(2, f"{p.prog}: error: {message}\n")

    p.error = error  # type: ignore[method-assign]


def _concepts_kit() -> Any:
    from xai_serve.concepts_cli import Kit

    return Kit(table=_table, progress_bar=Progress, error=_error, model_config=_model_config,
               client=_client, connect=_connect)  # fmt: skip


def _add_tcav(subparsers: argparse._SubParsersAction) -> None:
    from xai_serve.concepts_cli import add_tcav_arguments, run_tcav

    p = subparsers.add_parser(
        "tcav",
        help="TCAV: how much a class depends on concepts, with a t-test against random sets",
        description="Testing with concept activation vectors (Kim et al. 2018): for class "
        "--target at --layer, the share of --images whose logit rises towards each concept "
        "(procedural ones, or folders of your own images), over --runs CAVs each fitted "
        "against its own random set, and a t-test against random-vs-random CAVs. Prints a "
        "table and writes tcav.png (mean scores with error bars, * for significant concepts, "
        "the random baseline) into --out.",
    )
    _add_model_source(p, "run on this gRPC server instead")
    add_tcav_arguments(p)
    _one_line_errors(p)
    p.set_defaults(func=lambda args: run_tcav(args, _concepts_kit()))


def _add_dissect(subparsers: argparse._SubParsersAction) -> None:
    from xai_serve.concepts_cli import add_dissect_arguments, run_dissect

    p = subparsers.add_parser(
        "dissect",
        help="Network Dissection: which concept each unit of a layer detects",
        description="Network Dissection (Bau et al. 2017) of --layer over probe images with "
        "concept masks (default the procedural concepts): prints the --top units (best "
        "concept, category, IoU) and the detectors per category, and writes dissect.png into "
        "--out. In this process the picture shows each concept's best unit on the probe "
        "images where it fires, its thresholded activation outlined, above the detectors per "
        "category; with --server (which returns only the table) it shows the detectors per "
        "category and the unit list.",
    )
    _add_model_source(p, "run on this gRPC server instead")
    add_dissect_arguments(p)
    _one_line_errors(p)
    p.set_defaults(func=lambda args: run_dissect(args, _concepts_kit()))


def _add_visualize(subparsers: argparse._SubParsersAction) -> None:
    from xai_serve.concepts_cli import add_visualize_arguments, run_visualize

    p = subparsers.add_parser(
        "visualize",
        help="feature visualisation: images that maximise channels, units or class logits",
        description="Optimise one image per OBJECTIVE (Lucid's recipe: FFT parameterisation, "
        "decorrelated colour, random jitter, scale and rotation), all in one batch; prints "
        "each objective's value and writes visualize.png, a grid of the images labelled with "
        "their objectives, into --out.",
    )
    _add_model_source(p, "run on this gRPC server instead")
    add_visualize_arguments(p)
    _one_line_errors(p)
    p.set_defaults(func=lambda args: run_visualize(args, _concepts_kit()))


# --------------------------------------------------------------------------------------------


def _error(exc: BaseException) -> None:
    """Print ``xai-serve: error: <message>`` to stderr (no traceback)."""
    print(f"{PROG}: error: {exc}", file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Fast, batched explanations of PyTorch vision models, served over gRPC.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(subparsers)
    _add_explain(subparsers)
    _add_models(subparsers)
    _add_methods(subparsers)
    _add_demo(subparsers)
    _add_bench(subparsers)
    _add_ray(subparsers)
    _add_tcav(subparsers)
    _add_dissect(subparsers)
    _add_visualize(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code (argparse errors and ``--help`` included)."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 2)
    if getattr(args, "func", None) is None:
        parser.print_help(sys.stderr)
        return 2
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
