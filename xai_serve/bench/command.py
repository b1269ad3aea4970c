"""The ``xai-serve bench`` subcommand's arguments and run; :mod:`xai_serve.cli` registers it
(with its remote options, table and progress line) and hands the parsed arguments here.

With ``--quality`` it compares methods instead (``--methods``): for each, its speed at one load
setting and its quality metrics over the same images (the Evaluate RPC), one table row each.

Exit codes: 0 when the benchmark ran and some request succeeded; 1 when no request succeeded
at all, or the server cannot be reached or fails to start (as ``explain`` and ``models``); 2
for bad arguments, options, images or an unknown model.
"""

from __future__ import annotations

import argparse
import math
import sys
from collections.abc import Callable, Sequence
from typing import Any

from xai_serve.bench.load import (
    DEFAULT_DURATION_S,
    NO_METHOD,
    PROTOCOLS,
    BenchProgress,
    Endpoint,
    Inputs,
    Plan,
    Workload,
    run_bench,
)
from xai_serve.bench.report import BenchReport, Setting, table_cells
from xai_serve.errors import InvalidInput, NotFound, Unavailable, XaiServeError

__all__ = [
    "EXIT_UNREACHABLE",
    "add_arguments",
    "concurrency_list",
    "rate_list",
    "run_command",
    "warmup",
]

#: Exit code when the server cannot be reached (or started): that of ``explain`` and ``models``.
EXIT_UNREACHABLE = 1
EXIT_USAGE = 2
DEFAULT_CONCURRENCY = "1,4,16"
DEFAULT_WARMUP = "1s"


def _items(text: str, what: str, example: str) -> list[str]:
    items = [t.strip() for t in text.split(",")]
    if not text.strip() or any(not t for t in items):
        raise argparse.ArgumentTypeError(f"must be comma-separated {what}, e.g. {example}; "
                                         f"got {text!r}")  # fmt: skip
    return items


def concurrency_list(text: str) -> list[int]:
    """argparse type: distinct concurrencies ``1,4,16`` (integers >= 1), kept in order."""
    items = _items(text, "concurrencies (integers >= 1)", "1,4,16")
    try:
        values = [int(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated integers >= 1, e.g. 1,4,16; got {text!r}"
        ) from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"concurrencies must be >= 1, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"names a concurrency twice: {text!r}")
    return values


def rate_list(text: str) -> list[float]:
    """argparse type: distinct request rates per second ``5,10,20`` (finite numbers > 0)."""
    items = _items(text, "rates per second (numbers > 0)", "5,10,20")
    try:
        values = [float(t) for t in items]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be comma-separated rates per second, e.g. 5,10,20; got {text!r}"
        ) from None
    if any(not 0 < v < math.inf for v in values):
        raise argparse.ArgumentTypeError(f"rates must be finite numbers > 0, got {text!r}")
    if len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(f"names a rate twice: {text!r}")
    return values


def warmup(text: str) -> tuple[int, float]:
    """argparse type: a warm-up of ``N`` requests or ``Ns`` seconds, as ``(requests,
    seconds)``."""
    word = text.strip().lower()
    try:
        if word.endswith("s"):
            seconds = float(word[:-1])
            if not 0 <= seconds < math.inf:
                raise ValueError
            return 0, seconds
        count = int(word)
        if count < 0:
            raise ValueError
        return count, 0.0
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"must be a number of requests (e.g. 20) or of seconds (e.g. 2s), got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    """argparse type: distinct comma-separated names ``gradcam,saliency``."""
    items = _items(text, "names", "gradcam,saliency")
    if len(set(items)) != len(items):
        raise argparse.ArgumentTypeError(f"names a name twice: {text!r}")
    return items


def _names_or_all(text: str) -> list[str]:
    """argparse type of ``--quality``: metric names, or none (every supported metric)."""
    return [] if not text.strip() else _names(text)


def _positive(kind: type) -> Callable[[str], Any]:
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 0 < value < math.inf:
            raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}")
        return value

    return parse


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Everything of ``bench`` but the remote options (``--server``, TLS, token)."""
    p.add_argument(
        "--config", metavar="FILE",
        help="without --server: start a server in this process from this config (plaintext, "
        "loopback, ephemeral port) and measure it (default: the bundled model)",
    )  # fmt: skip
    what = p.add_argument_group("requests")
    what.add_argument(
        "--protocol", choices=PROTOCOLS, default="explain",
        help="explain: unary Explain; stream: ExplainStream; oip: Open Inference Protocol "
        "ModelInfer with the explainer parameter (default explain)",
    )  # fmt: skip
    what.add_argument("--model", metavar="NAME", help="model (default: the server's first)")
    what.add_argument(
        "--method", default="gradcam",
        help=f"explanation method (default gradcam; '{NO_METHOD}' with --protocol oip: plain "
        "inference)",
    )  # fmt: skip
    what.add_argument("--layer", metavar="NAME", help="CAM layer (default: the model's)")
    what.add_argument(
        "-o", "--option", action="append", default=[], metavar="KEY=VALUE",
        help="method option, as 'xai-serve explain' takes them (repeatable)",
    )  # fmt: skip
    what.add_argument(
        "--timeout", type=_positive(float), default=60.0, metavar="SECONDS",
        help="deadline of each request (default 60)",
    )  # fmt: skip
    images = what.add_mutually_exclusive_group()
    images.add_argument(
        "--images", nargs="+", metavar="PATH",
        help="image files, folders or globs, sent in turn (default: the bundled photos)",
    )  # fmt: skip
    images.add_argument(
        "--synthetic", nargs="?", const=8, type=_positive(int), metavar="N",
        help="send N (default 8) seeded random tensors of the model's input shape instead",
    )  # fmt: skip
    load = p.add_argument_group("load")
    sweep = load.add_mutually_exclusive_group()
    sweep.add_argument(
        "--concurrency", type=concurrency_list, metavar="C,C,...",
        help="closed loop: requests in flight, one setting each "
        f"(default {DEFAULT_CONCURRENCY})",
    )  # fmt: skip
    sweep.add_argument(
        "--rate", type=rate_list, metavar="R,R,...",
        help="open loop: requests per second sent on schedule whatever the answers, one "
        "setting each; latency counts from the scheduled time, so queueing shows",
    )  # fmt: skip
    load.add_argument(
        "--arrivals", choices=("fixed", "poisson"), default="fixed",
        help="with --rate: fixed intervals or Poisson arrivals (default fixed)",
    )  # fmt: skip
    length = load.add_mutually_exclusive_group()
    length.add_argument(
        "--duration", type=_positive(float), metavar="SECONDS",
        help=f"measure each setting this long (default {DEFAULT_DURATION_S:g})",
    )  # fmt: skip
    length.add_argument(
        "--requests", type=_positive(int), metavar="N", help="measure N requests per setting"
    )
    load.add_argument(
        "--warmup", type=warmup, default=warmup(DEFAULT_WARMUP), metavar="N|Ns",
        help=f"warm-up before each setting, not measured: N requests or N seconds "
        f"(default {DEFAULT_WARMUP})",
    )  # fmt: skip
    load.add_argument("--seed", type=int, default=0, help="seed of --synthetic and Poisson")
    quality = p.add_argument_group("quality (speed and faithfulness side by side)")
    quality.add_argument(
        "--quality", nargs="?", const="", type=_names_or_all, metavar="METRIC,...",
        help="compare methods: for each of --methods, its speed at the first load setting and "
        "these quality metrics (default: every metric the method supports) over the images, "
        "via the Evaluate RPC; `xai-serve methods --metrics` lists them",
    )  # fmt: skip
    quality.add_argument(
        "--methods", type=_names, metavar="M,M,...",
        help="with --quality: the methods compared (default: --method)",
    )  # fmt: skip
    out = p.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write the rows and settings as JSON")
    out.add_argument("--csv", metavar="FILE", help="write the rows as CSV")
    out.add_argument(
        "--plot", metavar="FILE.png",
        help="draw latency percentiles and throughput against the settings",
    )  # fmt: skip
    out.add_argument(
        "--progress", dest="progress", action="store_const", const=True, default=None,
        help="always show the live progress line (default: on a terminal)",
    )  # fmt: skip
    out.add_argument("--no-progress", dest="progress", action="store_const", const=False)


def _workload(args: argparse.Namespace) -> Workload:
    from xai_serve.runner import parse_option

    options = tuple(parse_option(text) for text in args.option)
    if args.synthetic is not None:
        inputs = Inputs("synthetic", count=args.synthetic, seed=args.seed)
    elif args.images:
        inputs = Inputs("files", paths=tuple(args.images))
    else:
        inputs = Inputs("bundled")
    return Workload(
        model=args.model, method=args.method, protocol=args.protocol, options=options,
        layer=args.layer, inputs=inputs, timeout_s=args.timeout,
    )  # fmt: skip


def _settings(args: argparse.Namespace) -> list[Setting]:
    if args.rate:
        return [Setting("rate", r) for r in args.rate]
    values = args.concurrency or concurrency_list(DEFAULT_CONCURRENCY)
    return [Setting("concurrency", c) for c in values]


def _plan(args: argparse.Namespace) -> Plan:
    count, seconds = args.warmup
    return Plan(
        requests=args.requests, duration_s=args.duration, warmup_requests=count,
        warmup_s=seconds, arrivals=args.arrivals, seed=args.seed,
    )  # fmt: skip


def _progress_line(bar: Any) -> Callable[[BenchProgress], None]:
    """A :class:`BenchProgress` report drawn on ``bar`` (the CLI's progress line): one step per
    setting, moving with the share of the setting done."""

    finished: set[int] = set()

    def show(p: BenchProgress) -> None:
        if p.index in finished:
            return
        phase = "warm-up" if p.warming_up else f"{p.requests} requests, {p.errors} errors"
        note = f"{p.setting.label}: {phase}"
        if p.fraction >= 1.0 and not p.warming_up:
            finished.add(p.index)
            bar.advance(note, p.setting.label)
        else:
            bar.partial(p.setting.label, 0.0 if p.warming_up else p.fraction, note)

    return show


def run_command(
    args: argparse.Namespace,
    *,
    table: Callable[[Sequence[str], Sequence[Sequence[str]]], str],
    progress_bar: Callable[..., Any],
    error: Callable[[BaseException], None],
) -> int:
    """Run ``xai-serve bench`` with parsed ``args``; ``table`` formats the rows,
    ``progress_bar(total, enabled=...)`` makes the live line and ``error`` prints a failure."""
    try:
        workload = _workload(args)
        settings = _settings(args)
        plan = _plan(args)
        if args.server and args.config:
            raise InvalidInput("--server measures a running server, --config starts one: not "
                               "both")  # fmt: skip
        if args.methods and args.quality is None:
            raise InvalidInput("--methods compares methods with --quality; without it, name "
                               "one --method")  # fmt: skip
        if args.quality is not None and (args.plot or args.csv):
            raise InvalidInput("--quality writes its table as --json; --plot and --csv are for "
                               "the load sweep")  # fmt: skip
        if args.quality is not None and workload.protocol == "oip":
            raise InvalidInput("--quality measures over the Explain API, not --protocol oip")
    except XaiServeError as exc:
        error(exc)
        return EXIT_USAGE
    local = None
    methods = args.methods or [args.method]
    steps = len(methods) if args.quality is not None else len(settings)
    bar = progress_bar(steps, enabled=args.progress)
    try:
        if args.server:
            endpoint = Endpoint(args.server, tls=args.tls, ca=args.ca, token=args.token)
        else:
            from xai_serve.bench.local import LocalServer
            from xai_serve.serving.config import ServerConfig, load_config

            config = load_config(args.config) if args.config else ServerConfig()
            print(f"starting a server in this process from {args.config or 'the defaults'} "
                  f"({', '.join(m.name for m in config.models)}) ...", file=sys.stderr)  # fmt: skip
            local = LocalServer(config).start()
            endpoint = Endpoint(local.address)
        if args.quality is not None:
            from xai_serve.bench.quality import run_quality

            finished: set[str] = set()

            def quality_progress(method: str, stage: str, fraction: float) -> None:
                if method in finished:
                    return
                if stage == "done":
                    finished.add(method)
                    bar.advance(f"{method}: done", method)
                else:
                    bar.partial(method, fraction, f"{method}: {stage}")

            quality = run_quality(endpoint, workload, methods, args.quality or None,
                                  settings[0], plan, progress=quality_progress)  # fmt: skip
            bar.close()
            return _show_quality(quality, args, table, error)
        report = run_bench(endpoint, workload, settings, plan, progress=_progress_line(bar))
    except Unavailable as exc:
        bar.close()
        error(exc)
        return EXIT_UNREACHABLE
    except (InvalidInput, NotFound, XaiServeError) as exc:
        bar.close()
        error(exc)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return 130
    finally:
        bar.close()
        if local is not None:
            local.stop()
    return _show(report, args, table, error)


def _show_quality(
    report: Any,
    args: argparse.Namespace,
    table: Callable[[Sequence[str], Sequence[Sequence[str]]], str],
    error: Callable[[BaseException], None],
) -> int:
    from xai_serve.bench.quality import quality_cells

    info = report.info
    print(
        f"{info['model']} at {info['server']}, speed at {info['setting']}; quality over "
        f"{info['inputs']} (mean ± standard error; ↑ higher is better, ↓ lower)",
        file=sys.stderr,
    )
    header, rows = quality_cells(report)
    print(table(header, rows), flush=True)
    for row in report.rows:
        if row.error:
            print(f"{row.method}: {row.error}", file=sys.stderr)
    try:
        if args.json:
            report.to_json(args.json)
    except XaiServeError as exc:
        error(exc)
        return EXIT_USAGE
    if not any(row.metrics for row in report.rows):
        error(InvalidInput("no method could be evaluated (see the errors above)"))
        return 1
    return 0


def _show(
    report: BenchReport,
    args: argparse.Namespace,
    table: Callable[[Sequence[str], Sequence[Sequence[str]]], str],
    error: Callable[[BaseException], None],
) -> int:
    info = report.info
    layer = f" layer {info['layer']}" if info.get("layer") else ""
    options = " ".join(f"{k}={v}" for k, v in info["options"].items())
    print(
        f"{info['model']} {info['method']}{layer}{' ' + options if options else ''} via "
        f"{info['protocol']} at {info['server']}; {info['inputs']}",
        file=sys.stderr,
    )
    header, rows = table_cells(report)
    print(table(header, rows), flush=True)
    try:
        for path, write in ((args.json, report.to_json), (args.csv, report.to_csv)):
            if path:
                write(path)
        if args.plot:
            from xai_serve.bench.plot import plot_png

            plot_png(report, args.plot)
    except XaiServeError as exc:
        error(exc)
        return EXIT_USAGE
    cached = sum(r.cache_hits for r in report.rows)
    if cached:
        print(
            f"note: {cached} answers came from the server's cache of exact answers, not from "
            "computing: send more distinct inputs (--synthetic N, --images) or turn the cache "
            "off for figures of the model's cost",
            file=sys.stderr,
        )
    if not any(r.ok for r in report.rows):
        error(InvalidInput("no request succeeded (the errors column says why)"))
        return 1
    return 0
