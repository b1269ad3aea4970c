"""Shared pieces of the reliability suite.

* :func:`write_models` / :func:`write_config`: two small models on disk (a torchvision resnet18
  state dict and a TorchScript CNN) and a TOML server config for them, so that a test can run
  the real ``python -m xai_serve.serving`` in its own process (:class:`ServerProcess`) and
  measure that process from outside: resident memory, open file descriptors and threads, read
  from ``/proc/<pid>``.
* :class:`Catalogue`: a fixed set of request kinds (model, method, options, input, target) with
  their answers computed in this process, so that every answer the server gives under load can
  be checked against its own request's reference.
* :func:`record`: the figures a test measured, collected for the report that
  ``tests/reliability/conftest.py`` prints and writes at the end of the run.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torchvision
from PIL import Image

import xai_serve
from tests.serving.served import Served
from xai_serve.client import decode_tensor
from xai_serve.models import TransformConfig
from xai_serve.models.registry import preprocess_image
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.serving import codec
from xai_serve.serving.process import free_port

__all__ = [
    "RESNET",
    "SCRIPTED",
    "Catalogue",
    "Kind",
    "RssSampler",
    "ServerProcess",
    "SmallCNN",
    "check_answer",
    "free_port",
    "load_reference_modules",
    "proc_status",
    "record",
    "write_config",
    "write_figures",
    "write_models",
]

RESNET = "tiny"  # torchvision resnet18, 10 classes, 3 x 64 x 64
SCRIPTED = "tinyts"  # TorchScript CNN, 6 classes, 3 x 48 x 48 (no hookable layers: no CAM)

# --------------------------------------------------------------------------------------------
# Figures for the report
# --------------------------------------------------------------------------------------------

FIGURES: dict[str, dict[str, Any]] = {}
_FIGURES_LOCK = threading.Lock()


def record(test: str, **figures: Any) -> None:
    """Keep ``figures`` (numbers a test measured) under ``test`` for the run's report."""
    with _FIGURES_LOCK:
        FIGURES.setdefault(test, {}).update(figures)


def write_figures(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with _FIGURES_LOCK:
        path.write_text(json.dumps(FIGURES, indent=2, sort_keys=True) + "\n")


# --------------------------------------------------------------------------------------------
# Models and config on disk
# --------------------------------------------------------------------------------------------


class SmallCNN(torch.nn.Module):
    """What the TorchScript model is traced from: conv-bn-relu x 3, pooled, linear."""

    def __init__(self, classes: int = 6) -> None:
        super().__init__()
        chans = [3, 16, 32, 32]
        layers: list[torch.nn.Module] = []
        for cin, cout in itertools.pairwise(chans):
            layers += [
                torch.nn.Conv2d(cin, cout, 3, stride=2, padding=1),
                torch.nn.BatchNorm2d(cout),
                torch.nn.ReLU(),
            ]
        self.body = torch.nn.Sequential(*layers)
        self.head = torch.nn.Linear(chans[-1], classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).mean(dim=(2, 3)))


def write_models(d: Path) -> dict[str, Path]:
    """Seeded weights in ``d/models``: ``{name: file}``."""
    models = d / "models"
    models.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    resnet = models / "resnet18.pt"
    torch.save(torchvision.models.resnet18(num_classes=10).state_dict(), resnet)
    torch.manual_seed(1)
    cnn = SmallCNN().eval()
    scripted = models / "small_cnn.pt"
    with warnings.catch_warnings():  # TorchScript is deprecated; the server still loads it
        warnings.simplefilter("ignore", FutureWarning)
        torch.jit.trace(cnn, torch.zeros(1, 3, 48, 48)).save(str(scripted))
    return {RESNET: resnet, SCRIPTED: scripted}


def load_reference_modules(files: dict[str, Path]) -> dict[str, torch.nn.Module]:
    """The same models, loaded in this process (the references' side)."""
    resnet = torchvision.models.resnet18(num_classes=10)
    resnet.load_state_dict(torch.load(files[RESNET], weights_only=True))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        scripted = torch.jit.load(str(files[SCRIPTED]))
    return {RESNET: resnet.eval(), SCRIPTED: scripted.eval()}


def write_config(
    d: Path,
    port: int,
    metrics_port: int,
    *,
    grace_s: float = 10.0,
    limits: dict[str, int] | None = None,
    tokens: list[str] | None = None,
    max_delay_ms: float = 10.0,
    log_level: str = "INFO",
) -> Path:
    """``d/server.toml`` serving both models (files in ``d/models``, the only model dir)."""
    lines = [
        'host = "127.0.0.1"',
        f"port = {port}",
        f"metrics_port = {metrics_port}",
        f"grace_s = {grace_s}",
        f'log_level = "{log_level}"',
        'model_dirs = ["models"]',
        "",
        "[limits]",
        *(f"{k} = {v}" for k, v in (limits or {}).items()),
        "",
    ]
    if tokens is not None:
        (d / "tokens.txt").write_text("".join(t + "\n" for t in tokens))
        lines += ["[auth]", 'tokens_file = "tokens.txt"', ""]
    lines += [
        "[[models]]",
        f'name = "{RESNET}"',
        'source = "torchvision"',
        'arch = "resnet18"',
        'path = "models/resnet18.pt"',
        "num_classes = 10",
        "max_batch_size = 16",
        f"max_delay_ms = {max_delay_ms}",
        "tune = false",  # tuning has its own tests; these measure the server, not paths
        "transform = { resize = 64, crop = [64, 64] }",
        "",
        "[[models]]",
        f'name = "{SCRIPTED}"',
        'source = "torchscript"',
        'path = "models/small_cnn.pt"',
        "num_classes = 6",
        "max_batch_size = 16",
        f"max_delay_ms = {max_delay_ms}",
        "tune = false",  # tuning has its own tests; these measure the server, not paths
        "transform = { resize = 48, crop = [48, 48] }",
        "",
    ]
    cfg = d / "server.toml"
    cfg.write_text("\n".join(lines))
    return cfg


# --------------------------------------------------------------------------------------------
# The server in its own process, measured through /proc
# --------------------------------------------------------------------------------------------


def proc_status(pid: int) -> dict[str, int]:
    """``rss_kb``, ``threads`` and ``fds`` of process ``pid`` (Linux ``/proc``)."""
    status = Path(f"/proc/{pid}/status").read_text()
    values = {}
    for line in status.splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "Threads"):
            values[key] = int(rest.split()[0])
    return {
        "rss_kb": values["VmRSS"],
        "threads": values["Threads"],
        "fds": len(os.listdir(f"/proc/{pid}/fd")),
    }


class ServerProcess(Served):
    """The server command in its own process (see :class:`tests.serving.served.Served`),
    with :meth:`status` from ``/proc`` and a background :class:`RssSampler`."""

    def __init__(self, d: Path, **config: Any) -> None:
        port, metrics_port = free_port(), free_port()
        cfg = write_config(d, port, metrics_port, **config)
        super().__init__(d, cfg, port, metrics_port)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def status(self) -> dict[str, int]:
        return proc_status(self.pid)

    def quiet_status(self, timeout: float = 10.0) -> dict[str, int]:
        """``status()`` once the open descriptors have not changed for half a second (a
        connection a client just closed, e.g. the start-up health checks', goes a moment
        later)."""
        deadline = time.monotonic() + timeout
        last, same = self.status(), 0
        while same < 5 and time.monotonic() < deadline:
            time.sleep(0.1)
            now = self.status()
            same = same + 1 if now["fds"] == last["fds"] else 0
            last = now
        return last

    def settle(self, key: str, at_most: int, timeout: float = 10.0) -> int:
        """Poll ``status()[key]`` until it is <= ``at_most`` (connections close and threads
        end a moment after the client's side); returns the last value read."""
        deadline = time.monotonic() + timeout
        while True:
            value = self.status()[key]
            if value <= at_most or time.monotonic() > deadline:
                return value
            time.sleep(0.05)

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RssSampler:
    """Samples a process's resident set every ``period`` seconds in a thread; ``mark(label)``
    tags the samples taken from then on (e.g. the thousand of requests they fall in)."""

    def __init__(self, pid: int, period: float = 0.05) -> None:
        self.pid, self.period = pid, period
        self.samples: list[tuple[str, int]] = []
        self.label = ""
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="rss-sampler")

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.samples.append((self.label, proc_status(self.pid)["rss_kb"]))
            except (FileNotFoundError, ProcessLookupError, KeyError):
                return
            self._stop.wait(self.period)

    def mark(self, label: str) -> None:
        self.label = label

    def of(self, label: str) -> list[int]:
        return [kb for tag, kb in self.samples if tag == label]

    @property
    def peak_kb(self) -> int:
        return max((kb for _, kb in self.samples), default=0)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


# --------------------------------------------------------------------------------------------
# Request kinds with in-process references
# --------------------------------------------------------------------------------------------


def png_bytes(seed: int, h: int, w: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    rgb = torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


@dataclass
class Kind:
    """One kind of request; :meth:`request` makes a fresh one of it with a given id."""

    model: str
    method: str
    input: torch.Tensor  # the preprocessed input the server explains
    target: int | None = None
    options: dict[str, Any] = field(default_factory=dict)  # pb.Options fields
    png: bytes | None = None  # sent instead of the tensor when set
    reference: Any = None  # the in-process Explanation

    def request(self, request_id: str) -> pb.ExplainRequest:
        req = pb.ExplainRequest(
            model=self.model,
            method=self.method,
            request_id=request_id,
            options=pb.Options(**self.options),
            top_k=3,
        )
        if self.target is not None:
            req.target = self.target
        if self.png is not None:
            req.image = self.png
        else:
            req.tensor.CopyFrom(codec.tensor_to_proto(self.input.contiguous()))
        return req


# the pb.Options fields (explain() options of the same names) that the catalogue uses
_EXPLAIN_OPTIONS = ("steps", "samples", "n_segments")


class Catalogue:
    """Request kinds over both models, every kind's answer computed here once, before any load
    (the server's model and this process's are separate copies, so this never races it)."""

    def __init__(self, modules: dict[str, torch.nn.Module], *, inputs: int = 3) -> None:
        self.modules = modules
        shapes = {RESNET: (3, 64, 64), SCRIPTED: (3, 48, 48)}
        methods: dict[str, list[tuple[str, dict[str, Any]]]] = {
            RESNET: [
                ("gradcam", {}),
                ("gradcam++", {}),
                ("saliency", {}),
                ("integrated_gradients", {"steps": 4}),
                ("lime", {"samples": 16, "n_segments": 9, "segmenter": pb.GRID, "seed": 3}),
            ],
            SCRIPTED: [
                ("saliency", {}),
                ("input_x_gradient", {}),
                ("integrated_gradients", {"steps": 4}),
                ("kernelshap", {"samples": 16, "n_segments": 9, "segmenter": pb.GRID, "seed": 5}),
            ],
        }
        classes = {RESNET: 10, SCRIPTED: 6}
        self.kinds: list[Kind] = []
        rng = random.Random(1234)
        for model, entries in methods.items():
            for method, options in entries:
                for i in range(inputs):
                    g = torch.Generator().manual_seed(rng.randrange(2**31))
                    x = torch.randn(shapes[model], generator=g)
                    target = None if i == 0 else rng.randrange(classes[model])
                    self.kinds.append(Kind(model, method, x, target, dict(options)))
        # encoded images too: the server decodes and preprocesses them (resize, crop, normalise)
        # as a client's photo, so the reference runs on the same preprocessing here
        transform = TransformConfig(resize=64, crop=(64, 64))
        for seed, (h, w) in enumerate([(80, 96), (64, 64)]):
            png = png_bytes(seed, h, w)
            x, _ = preprocess_image(codec.decode_image(png, max_pixels=10**6), transform, (64, 64))
            self.kinds.append(Kind(RESNET, "gradcam", x, seed + 1, {}, png=png))
        for kind in self.kinds:
            kind.reference = self._explain(kind)

    def _explain(self, kind: Kind) -> Any:
        options = {k: v for k, v in kind.options.items() if k in _EXPLAIN_OPTIONS}
        if "segmenter" in kind.options:
            options["segmenter"] = "grid"
        seed = kind.options.get("seed")
        layer = "layer4" if kind.method.startswith("gradcam") else None
        return xai_serve.explain(
            self.modules[kind.model],
            kind.input[None],
            kind.method,
            target=kind.target,
            layer=layer,
            seed=seed,
            **options,
        )


def map_problem(got: torch.Tensor, want: torch.Tensor) -> str | None:
    """What is wrong with map ``got`` against the in-process ``want``, or None: a batched
    forward's rounding passes, a mix-up of two requests' answers does not."""
    if got.shape != want.shape:
        return f"map shape {list(got.shape)} != {list(want.shape)}"
    scale = float(want.abs().max()) or 1.0
    max_err = float((got - want).abs().max()) / scale
    rel_l2 = float((got - want).norm()) / (float(want.norm()) or 1.0)
    if max_err > 0.02 or rel_l2 > 0.01:
        return f"map differs: max {max_err:.3g} of its range, relative L2 {rel_l2:.3g}"
    return None


def check_answer(resp: pb.ExplainResponse, kind: Kind, request_id: str) -> str | None:
    """None if ``resp`` is the right answer to a request of ``kind`` with ``request_id``, else
    what is wrong. The map may differ from the one computed alone by the float rounding of a
    batched forward (see tests.serving.test_server.assert_close_batched); a mix-up of two
    requests' answers is off by ~100%."""
    ref = kind.reference
    if resp.HasField("error"):
        return f"error {resp.error.code}: {resp.error.message}"
    if resp.request_id != request_id:
        return f"request_id {resp.request_id!r} != {request_id!r}"
    if (resp.model, resp.method) != (kind.model, kind.method):
        return f"answered {resp.model}/{resp.method} for {kind.model}/{kind.method}"
    want_target = int(ref.targets[0])
    if resp.target != want_target:
        return f"target {resp.target} != {want_target}"
    problem = map_problem(decode_tensor(resp.map), ref.maps[0].detach().float())
    if problem is not None:
        return problem
    top = int(ref.logits[0].argmax())
    if not resp.top_k or resp.top_k[0].index != top:
        return f"top-1 {[c.index for c in resp.top_k]} != {top}"
    if "seed" in kind.options and resp.seed != kind.options["seed"]:
        return f"seed {resp.seed} != {kind.options['seed']}"
    return None
