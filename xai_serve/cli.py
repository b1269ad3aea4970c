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
from typing import TYPE_CHECKING

from xai_serve import __version__
from xai_serve.errors import XaiServeError

if TYPE_CHECKING:
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
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {value}")
    return value


def _non_negative_float(text: str) -> float:
    """argparse type: a number >= 0."""
    value = float(text)
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


# --------------------------------------------------------------------------------------------
# serve
# --------------------------------------------------------------------------------------------

# argparse dest -> with_overrides() key (the dests are chosen to be the same names).
_SERVE_OVERRIDES = (
    "host", "port", "metrics_port", "metrics_host", "device", "max_batch_size", "max_delay_ms",
    "max_queue", "tls_cert", "tls_key", "tls_client_ca", "auth_tokens_file", "auth_tokens_env",
    "grace_s", "warmup", "log_level", "model_dirs",
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
        "--metrics-host",
        metavar="HOST",
        help="address of the /metrics endpoint (default 127.0.0.1)",
    )
    net.add_argument(
        "--grace", dest="grace_s", type=_non_negative_float, metavar="SECONDS",
        help="time in-flight calls get to finish after SIGTERM (default 10)",
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
        help="skip the warm-up forward/explain passes at start",
    )  # fmt: skip

    lim = p.add_argument_group("limits")
    lim.add_argument(
        "--max-queue", type=_positive_int, metavar="N",
        help="waiting requests per model before RESOURCE_EXHAUSTED (default 256)",
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
