"""Choose a model's fastest faithful forward path by measuring it on the device at hand.

:func:`tune` measures, in one process and interleaved (this machine's speed drifts):

1. the baseline: fp32, contiguous (NCHW) inputs, batch 64 (at most ``max_batch``) -- what every
   forward ran before tuning existed;
2. the memory format: contiguous vs ``channels_last`` (exact same maths), at a probe batch,
   then the linear layers: ATen's vs oneDNN's packed fp32 kernels (the model's twin, exact same
   maths; see :mod:`xai_serve.explainers.onednn`), kept if it is at least 3% faster and its
   logits agree with the model's to float rounding;
3. the precision: fp32 and each reduced precision the device runs natively (bf16 on CPUs with
   AVX512-BF16 or AMX and on GPUs, fp16 on GPUs); a reduced precision is kept only if it is at
   least ``min_speedup`` faster AND passes the fidelity guard (:func:`check_fidelity`: top-1
   agreement and a logit-error bound on probe inputs, and the rank correlation of LIME
   attributions with fp32's on a probe image);
4. the no-grad forward batch (powers of two up to ``max_batch``: the smallest one within 5% of
   the best throughput) and, at the chosen precision only, the batch of differentiated
   forwards (4, 8 or 16);
5. ``compile``: an ahead-of-time inductor build of the no-grad forward at that batch
   (``torch.export`` + AOTInductor with frozen weights), kept in ``cache_dir`` so that a restart
   loads it in about a second; kept only if it is ``min_speedup`` faster and passes the guard.
   "auto" skips it when one eager forward of a batch takes under 20 ms (a build costs tens of
   seconds, which such a model never earns back) or when the model cannot be exported;
6. verify: the chosen path and the baseline are measured again, interleaved, and the reported
   speed-up is their ratio; a chosen path that is not faster than the baseline then gives way
   to it (unless a setting forced the choice). The verification is kept with the
   measurements, so a restart with a warm cache measures nothing.

Measurements depend on the model's structure, the input shape, the device and torch, not on the
weights' values, so they are kept in ``cache_dir`` under a digest of those and reused on the
next start (the guard, which depends on the weights, runs again). Every choice and every
rejected candidate with its reason is in the :class:`TuneReport`.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.errors import InvalidInput
from xai_serve.explainers.base import explain, model_device, positive_int
from xai_serve.explainers.forward import (
    ForwardPath,
    autocast,
    forward_logits,
    precision_dtype,
    remember,
)
from xai_serve.explainers.onednn import onednn_twin
from xai_serve.machine import cpu_flags
from xai_serve.models.config import (
    COMPILE_MODES,
    LINEAR_BACKENDS,
    MEMORY_FORMATS,
    PRECISION_CHOICES,
)

__all__ = [
    "COMPILE_MODES",
    "LINEAR_BACKENDS",
    "MEMORY_FORMATS",
    "PRECISION_CHOICES",
    "Candidate",
    "Fidelity",
    "TuneReport",
    "TuneSettings",
    "check_fidelity",
    "default_cache_dir",
    "probe_images",
    "resolve_cache_dir",
    "structure_digest",
    "tune",
    "weights_digest",
]

log = logging.getLogger(__name__)


_BASELINE_BATCH = 64  # the forward batch every method used before tuning
_PROBE_BATCH = 16
_COMPILE_MIN_FORWARD_S = 0.020
_CACHE_VERSION = 4
_TWIN_TOLERANCE = 1e-4  # largest |twin - model| logit difference, x the logits' std


# --------------------------------------------------------------------------------------------
# Settings and results
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TuneSettings:
    """What :func:`tune` may choose. Fixed values force a choice; ``"auto"`` measures.

    Attributes:
        memory_format: ``"auto"``, ``"channels_last"`` or ``"contiguous"``.
        precision: ``"auto"`` (the fastest native precision that passes the guard), ``"fp32"``
            (never reduced), ``"bf16"`` or ``"fp16"`` (forced: used even if the guard fails,
            with a warning).
        forward_batch: inputs per no-grad forward; None measures it.
        compile: ``"auto"``, ``"on"`` (build even for a fast model; still guarded) or ``"off"``.
        linear: ``"auto"`` (measure ATen's and oneDNN's fp32 linear layers), ``"aten"`` or
            ``"onednn"`` (forced where the twin can be built).
        max_batch: the largest forward batch tried.
        min_speedup: how much faster a reduced precision or a compiled forward must be to be
            chosen automatically.
        top1_agreement: the guard's least share of probe inputs whose top-1 class must agree
            with fp32's, among the probes whose fp32 top-1 leads the runner-up by more than
            twice ``logit_error`` (a flip of a closer call is within the error allowed).
        logit_error: the guard's largest ``|logit - fp32 logit|`` over the probes and fp32's
            top 5 classes of each (those explanations are asked about), as a fraction of the
            fp32 logits' standard deviation. bf16 autocast shows 0.04-0.16 on EfficientNet-Lite0
            and five photos, up to 0.26 on the synthetic probes; a model that loses its logits
            to bf16 rounding shows several. The rank correlation below is the finer check.
        rank_correlation: the guard's least Spearman correlation of LIME segment weights with
            fp32's on a probe image (the perturbation methods' check); 0 skips it.
    """

    memory_format: str = "auto"
    precision: str = "auto"
    forward_batch: int | None = None
    compile: str = "auto"
    max_batch: int = 64
    min_speedup: float = 1.1
    top1_agreement: float = 0.9
    logit_error: float = 0.35
    rank_correlation: float = 0.9
    linear: str = "auto"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("memory_format", MEMORY_FORMATS),
            ("precision", PRECISION_CHOICES),
            ("compile", COMPILE_MODES),
            ("linear", LINEAR_BACKENDS),
        ):
            if getattr(self, name) not in allowed:
                raise InvalidInput(
                    f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}"
                )
        for name in ("forward_batch", "max_batch"):
            if getattr(self, name) is not None:
                positive_int(getattr(self, name), name)


@dataclass
class Fidelity:
    """The guard's verdict on one candidate against fp32 eager forwards."""

    top1_agreement: float
    logit_error: float
    rank_correlation: float | None
    passed: bool
    reason: str = ""


@dataclass
class Candidate:
    """One measured path."""

    channels_last: bool
    precision: str
    batch_size: int
    compiled: bool
    images_per_s: float
    accepted: bool = False
    fidelity: Fidelity | None = None
    note: str = ""
    linear: str = "aten"

    def describe(self) -> str:
        fmt = "channels_last" if self.channels_last else "contiguous"
        linear = "" if self.linear == "aten" else f" {self.linear}-linear"
        return f"{fmt} {self.precision}{linear} batch {self.batch_size}" + (
            " compiled" if self.compiled else ""
        )


@dataclass
class TuneReport:
    """What :func:`tune` measured and chose (attached to the path as ``path.report``)."""

    path: str
    baseline: Candidate
    chosen: Candidate
    speedup: float
    candidates: list[Candidate] = field(default_factory=list)
    grad_batch_size: int | None = None
    grad_images_per_s: float | None = None
    fidelity: Fidelity | None = None
    seconds: float = 0.0
    measurements_cached: bool = False
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        """One line for logs and ``xai-serve models``."""
        parts = [f"{self.path}: {self.speedup:.2f}x the fp32 contiguous batch-64 forward"]
        if self.fidelity is not None:
            f = self.fidelity
            rank = "" if f.rank_correlation is None else f", rank corr {f.rank_correlation:.3f}"
            parts.append(
                f"fidelity top-1 {f.top1_agreement:.2f}, logit err {f.logit_error:.3g}{rank}"
            )
        parts.extend(self.notes)
        return "; ".join(parts)

    def as_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# --------------------------------------------------------------------------------------------
# Digests and the cache folder
# --------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/xai_serve`` (default ``~/.cache/xai_serve``)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "xai_serve"


def resolve_cache_dir(value: str | os.PathLike[str] | None) -> Path | None:
    """A configured cache folder: None is :func:`default_cache_dir`, ``""`` keeps nothing
    (None), anything else that folder (``~`` expanded)."""
    if value is None:
        return default_cache_dir()
    text = os.fspath(value)
    return Path(text).expanduser() if text.strip() else None


def structure_digest(model: nn.Module, input_shape: tuple[int, ...], device: torch.device) -> str:
    """A digest of what a forward's speed depends on: the modules' types and order, the
    parameters' and buffers' names, shapes and dtypes, the input shape, the device, torch and
    the CPU threads -- not the weights' values."""
    h = hashlib.blake2b(digest_size=16)
    for name, module in model.named_modules():
        h.update(f"{name}:{type(module).__module__}.{type(module).__qualname__};".encode())
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
    h.update(repr((tuple(input_shape), _device_name(device), torch.__version__)).encode())
    h.update(repr((torch.get_num_threads(), platform.machine(), _cpu_flags())).encode())
    return h.hexdigest()


def weights_digest(model: nn.Module) -> str:
    """A digest of every parameter's and buffer's name, shape, dtype and bytes."""
    h = hashlib.blake2b(digest_size=16)
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        data = t.detach().to("cpu").contiguous()
        if data.numel():
            h.update(data.view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _cpu_flags() -> str:
    flags = sorted(f for f in cpu_flags() if "avx" in f or "amx" in f)
    return ",".join(flags) if flags else torch.backends.cpu.get_cpu_capability()


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type}:{platform.processor() or platform.machine()}"


# --------------------------------------------------------------------------------------------
# Probes and timing
# --------------------------------------------------------------------------------------------


def probe_images(
    count: int, shape: tuple[int, int, int], device: torch.device, seed: int = 0
) -> Tensor:
    """``Tensor[count, C, H, W]``: deterministic smooth random images, about zero mean and unit
    variance per channel like preprocessed photos (noise at four scales, upsampled and summed),
    with a few flat colour blobs."""
    c, h, w = shape
    g = torch.Generator().manual_seed(seed)
    out = torch.zeros(count, c, h, w)
    for cells in (2, 4, 8, 32):
        coarse = torch.randn(count, c, min(cells, h), min(cells, w), generator=g)
        out += (
            F.interpolate(coarse, size=(h, w), mode="bilinear", align_corners=False) / cells**0.25
        )
    out = (out - out.mean(dim=(2, 3), keepdim=True)) / out.std(dim=(2, 3), keepdim=True).clamp_min(
        1e-6
    )
    ys = torch.arange(h).view(1, h, 1)
    xs = torch.arange(w).view(1, 1, w)
    for i in range(count):
        for _ in range(3):
            cy, cx = torch.randint(0, h, (2,), generator=g).tolist()
            r = max(1, int(min(h, w) * (0.1 + 0.2 * torch.rand(1, generator=g).item())))
            blob = ((ys - cy) ** 2 + (xs - cx) ** 2) <= r * r
            colour = torch.randn(c, 1, 1, generator=g) * 1.5
            out[i] = torch.where(blob, colour, out[i])
    return out.to(device)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate(fn: Callable[[], Any], n: int, device: torch.device, min_time: float) -> float:
    """Inputs per second of ``fn`` (which processes ``n`` inputs): best of repeated calls, at
    least two calls and ``min_time`` seconds."""
    best = math.inf
    spent, calls = 0.0, 0
    while calls < 2 or spent < min_time:
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        dt = time.perf_counter() - t
        best, spent, calls = min(best, dt), spent + dt, calls + 1
        if calls >= 50:
            break
    return n / max(best, 1e-9)


def _set_format(model: nn.Module, channels_last: bool) -> None:
    """The model's 4-D weights in that memory format (the same values)."""
    model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


def _layout(x: Tensor, channels_last: bool) -> Tensor:
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    return x.contiguous(memory_format=fmt)


def _no_grad_forward(model: nn.Module, x: Tensor, precision: str) -> Callable[[], Tensor]:
    amp = precision_dtype(precision)

    def run() -> Tensor:
        with torch.no_grad(), autocast(x.device, amp):
            return model(x)

    return run


def _grad_forward(model: nn.Module, x: Tensor, precision: str) -> Callable[[], Tensor]:
    amp = precision_dtype(precision)

    def run() -> Tensor:
        inp = x.detach().requires_grad_(True)
        with torch.enable_grad(), autocast(x.device, amp):
            out = model(inp)
        (g,) = torch.autograd.grad(out.float().max(dim=1).values.sum(), inp)
        return g

    return run


def _native_precisions(device: torch.device) -> list[str]:
    """Reduced precisions the device runs natively (others are emulated and slower)."""
    if device.type == "cuda":
        out = ["fp16"]
        if torch.cuda.is_bf16_supported():
            out.insert(0, "bf16")
        return out
    if device.type == "cpu":
        native = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        return ["bf16"] if native else []
    return []


def _batches(limit: int) -> list[int]:
    out, b = [], 1
    while b < limit:
        out.append(b)
        b *= 2
    out.append(limit)
    return out


def _sweep(rate_at: Callable[[int], float], sizes: list[int]) -> dict[int, float]:
    """Throughput at ascending batch sizes, stopping at the device's memory limit or once two
    sizes in a row fall below 85% of the best so far (throughput is unimodal in the batch on
    CPUs and GPUs alike); then the two best are measured once more (this machine's speed
    drifts) and keep their better figure."""
    out: dict[int, float] = {}
    worse = 0
    for b in sizes:
        try:
            out[b] = rate_at(b)
        except Exception as e:
            if not _is_oom(e) or not out:
                raise
            break
        worse = worse + 1 if out[b] < 0.85 * max(out.values()) else 0
        if worse >= 2:
            break
    for b in sorted(out, key=out.__getitem__, reverse=True)[:2]:
        out[b] = max(out[b], rate_at(b))
    return out


def _twin_problem(model: nn.Module, twin: nn.Module, probes: Tensor, batch: int) -> str:
    """Why the oneDNN twin's fp32 logits are not the model's to float rounding ("" if they
    are): the largest difference on the probes, as a fraction of the logits' std."""
    with torch.no_grad():
        x = probes[:batch]
        want, got = model(x).float(), twin(x).float()
    if want.shape != got.shape:
        return f"its logits have shape {tuple(got.shape)}, the model's {tuple(want.shape)}"
    err = float(((got - want).abs() / want.std().clamp_min(1e-12)).max())
    if not math.isfinite(err) or err > _TWIN_TOLERANCE:
        return f"its logits differ from the model's by {err:.3g} x their std"
    return ""


def _is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


# --------------------------------------------------------------------------------------------
# The fidelity guard
# --------------------------------------------------------------------------------------------


def _spearman(a: Tensor, b: Tensor) -> float:
    ra = a.double().argsort().argsort().double()
    rb = b.double().argsort().argsort().double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 1.0


def check_fidelity(
    model: nn.Module,
    candidate: ForwardPath,
    probes: Tensor,
    settings: TuneSettings = TuneSettings(),
    *,
    reference: ForwardPath | None = None,
) -> Fidelity:
    """Compare the forwards of ``candidate`` with fp32 eager forwards (``reference``, default
    fp32 on the candidate's memory format) on ``probes``: top-1 agreement, the largest logit
    error relative to the fp32 logits' standard deviation, and (unless
    ``settings.rank_correlation`` is 0) the Spearman correlation of LIME's segment weights on
    the first probe (16 grid segments, 128 samples, the same seed on both paths)."""
    ref = reference or ForwardPath(channels_last=candidate.channels_last)
    # Never a forward larger than the model takes (an exported program's batch bound).
    chunk = min(candidate.batch_size or probes.shape[0], settings.max_batch)

    def logits(path: ForwardPath) -> Tensor:
        outs = []
        with torch.no_grad():
            for s in range(0, probes.shape[0], chunk):
                x = probes[s : s + chunk]
                n = x.shape[0]
                if path.compiled is not None and path.batch_size and n < path.batch_size:
                    # the compiled forward takes exactly batch_size inputs: pad, then drop
                    x = torch.cat([x, x[:1].expand(path.batch_size - n, *x.shape[1:])])
                outs.append(forward_logits(model, x, path.amp, "tuning", path)[:n])
        return torch.cat(outs).float()

    want, got = logits(ref), logits(candidate)
    if not bool(torch.isfinite(got).all()):
        return Fidelity(0.0, math.inf, None, False, "non-finite logits")
    scale = want.std(dim=1, keepdim=True).clamp_min(1e-12)
    # The error on the classes explanations are asked about: fp32's top 5 of each probe.
    top = want.topk(min(5, want.shape[1]), dim=1).indices
    err = float(((got - want).abs() / scale).gather(1, top).max())
    # Top-1 agreement over the probes whose fp32 top-1 is decisive: a lead over the runner-up
    # of more than twice the logit error allowed (a flip inside that is the allowed error).
    lead = want.gather(1, top[:, :1]).squeeze(1) - (
        want.topk(2, dim=1).values[:, 1] if want.shape[1] > 1 else want[:, 0] - math.inf
    )
    decisive = lead / scale.squeeze(1) > 2 * settings.logit_error
    agree = got.argmax(1) == want.argmax(1)
    top1 = float(agree[decisive].float().mean()) if bool(decisive.any()) else 1.0
    rank: float | None = None
    if settings.rank_correlation > 0:
        opts = dict(segmenter="grid", n_segments=16, samples=128, seed=0, output="probability")
        opts["batch_size"] = min(candidate.batch_size or settings.max_batch, settings.max_batch)
        a = explain(model, probes[:1], "lime", path=ref, amp="auto", **opts)
        b = explain(model, probes[:1], "lime", path=candidate, amp="auto", **opts)
        rank = _spearman(a.weights[0], b.weights[0])
    reasons = []
    if top1 < settings.top1_agreement:
        reasons.append(f"top-1 agreement {top1:.2f} < {settings.top1_agreement}")
    if err > settings.logit_error:
        reasons.append(f"logit error {err:.3g} > {settings.logit_error} (x the logits' std)")
    if rank is not None and rank < settings.rank_correlation:
        reasons.append(f"LIME rank correlation {rank:.3f} < {settings.rank_correlation}")
    return Fidelity(top1, err, rank, not reasons, "; ".join(reasons))


# --------------------------------------------------------------------------------------------
# Compilation (AOTInductor, cached)
# --------------------------------------------------------------------------------------------


class _InDtype(nn.Module):
    """A copy of ``model`` with its floating-point weights in ``dtype``, taking and returning
    float32 (what AOTInductor builds for a reduced-precision path; see :func:`_compile`)."""

    def __init__(self, model: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.model = copy.deepcopy(model).to(dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.model(x.to(self.dtype)).float()


def _compile(
    model: nn.Module,
    example: Tensor,
    precision: str,
    cache_dir: Path | None,
    key: str,
) -> Callable[[Tensor], Tensor]:
    """An AOTInductor build of the no-grad forward at ``example``'s shape and layout, with
    frozen weights, loaded from ``cache_dir/compiled/<key>.pt2`` when it is there."""
    import torch._inductor

    path = None
    if cache_dir is not None:
        path = cache_dir / "compiled" / f"{key}.pt2"
        if path.is_file():
            try:
                return torch._inductor.aoti_load_package(str(path))
            except Exception as e:  # a stale or truncated file: build again
                log.warning("could not load the compiled forward %s (%s); rebuilding", path, e)
    amp = precision_dtype(precision)
    # An exported program does not keep autocast (neither one around the export nor one inside
    # the forward: measured, the "bf16" build computed fp32 and was 0.6x eager bf16). A
    # reduced-precision build is the model with its weights in that dtype instead; the
    # fidelity guard then judges what it really computes.
    program = model if amp is None else _InDtype(model, amp)
    with torch.no_grad():
        ep = torch.export.export(program, (example,))
    target = str(path) if path is not None else None
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        target = str(path.with_suffix(f".{os.getpid()}.tmp.pt2"))
    built = torch._inductor.aoti_compile_and_package(
        ep, package_path=target, inductor_configs={"freezing": True}
    )
    if path is not None:
        os.replace(built, path)
        built = str(path)
    return torch._inductor.aoti_load_package(built)


# --------------------------------------------------------------------------------------------
# tune()
# --------------------------------------------------------------------------------------------


def _load_measurements(file: Path | None) -> dict[str, Any] | None:
    if file is None or not file.is_file():
        return None
    try:
        data = json.loads(file.read_text())
    except (OSError, ValueError):
        return None
    return data if data.get("version") == _CACHE_VERSION else None


def _save_measurements(file: Path | None, data: dict[str, Any]) -> None:
    if file is None:
        return
    try:
        file.parent.mkdir(parents=True, exist_ok=True)
        tmp = file.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(data, indent=1))
        os.replace(tmp, file)
    except OSError as e:
        log.warning("could not keep the tuning measurements in %s: %s", file, e)


def tune(
    model: nn.Module,
    input_shape: tuple[int, int, int],
    settings: TuneSettings = TuneSettings(),
    *,
    probes: Tensor | None = None,
    cache_dir: Path | str | None = None,
    min_time: float = 0.15,
    remember_path: bool = True,
) -> ForwardPath:
    """Measure and choose ``model``'s forward path (see the module doc) and return it.

    The model is left in the chosen memory format (its weights converted in place: the same
    values), and, with ``remember_path``, :func:`xai_serve.explain` uses the path for it from
    now on. ``input_shape`` is ``(C, H, W)`` of one preprocessed input. ``probes``
    (``Tensor[N, C, H, W]``, preprocessed) are the guard's inputs; default
    :func:`probe_images`. ``cache_dir`` keeps measurements and compiled forwards across
    restarts (None: nothing kept). The report is ``path.report`` (a :class:`TuneReport`).
    """
    if not isinstance(settings, TuneSettings):
        raise InvalidInput(f"settings must be a TuneSettings, got {type(settings).__name__}")
    if not isinstance(model, nn.Module):
        raise InvalidInput(f"model must be an nn.Module, got {type(model).__name__}")
    began = time.perf_counter()
    device = model_device(model)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 3 or min(shape) < 1:
        raise InvalidInput(f"input_shape must be (C, H, W), got {input_shape!r}")
    cache = Path(cache_dir) if cache_dir is not None else None
    structure = structure_digest(model, shape, device)
    measured_file = cache / "tune" / f"{structure}.json" if cache is not None else None
    default_probes = probes is None
    if probes is None:
        probes = probe_images(8, shape, device)  # type: ignore[arg-type]
    probes = probes.to(device)
    has_conv = any(p.dim() == 4 for p in model.parameters())
    top = settings.max_batch
    bases = min(_BASELINE_BATCH, top)
    notes: list[str] = []
    knobs = dataclasses.astuple(settings)
    cached = _load_measurements(measured_file)
    if cached is not None and cached.get("knobs") != list(knobs):
        cached = None

    def data(batch: int, channels_last: bool) -> Tensor:
        reps = math.ceil(batch / probes.shape[0])
        x = probes.repeat(reps, 1, 1, 1)[:batch] if reps > 1 else probes[:batch]
        return _layout(x, channels_last)

    twins: list[nn.Module | None] = []

    def the_twin() -> nn.Module | None:
        """The model's oneDNN twin, built on first need (never with ``linear="aten"``, nor
        when cached measurements chose ATen's layers)."""
        if not twins:
            twins.append(onednn_twin(model) if settings.linear != "aten" else None)
            if settings.linear == "onednn" and twins[0] is None:
                notes.append(
                    "linear onednn: no oneDNN twin for this model or PyTorch; ATen's layers run"
                )
        return twins[0]

    def measure(
        channels_last: bool, precision: str, batch: int, grad: bool = False, linear: str = "aten"
    ) -> float:
        _set_format(model, channels_last)
        x = data(batch, channels_last)
        if grad:
            fn = _grad_forward(model, x, precision)  # differentiated forwards: the model's
        else:
            fn = _no_grad_forward(the_twin() if linear == "onednn" else model, x, precision)
        fn()  # warm-up (lazy initialisation, oneDNN kernel selection)
        return _rate(fn, batch, device, min_time)

    if cached is None:
        record: dict[str, Any] = {"version": _CACHE_VERSION, "knobs": list(knobs)}
        # Baseline and memory format, interleaved.
        formats = [False]
        if settings.memory_format == "channels_last" or (
            settings.memory_format == "auto" and has_conv
        ):
            formats.append(True)
        if settings.memory_format == "channels_last":
            formats = [True]
        probe_batch = min(_PROBE_BATCH, top)
        fmt_rate = {f: 0.0 for f in formats}
        for _ in range(2):
            for f in formats:
                fmt_rate[f] = max(fmt_rate[f], measure(f, "fp32", probe_batch))
        baseline_rate = measure(False, "fp32", bases)
        channels_last = max(formats, key=lambda f: fmt_rate[f])
        if len(formats) == 2 and fmt_rate[True] < 1.03 * fmt_rate[False]:
            channels_last = False
        record["baseline"] = baseline_rate
        record["formats"] = {str(f): r for f, r in fmt_rate.items()}
        record["channels_last"] = channels_last
        # Linear layers: ATen's vs oneDNN's (the twin), exact maths both.
        linear_rate: dict[str, float] = {}
        twin = the_twin()
        if twin is not None:
            for _ in range(2):
                for name in ("aten", "onednn"):
                    rate = measure(channels_last, "fp32", probe_batch, linear=name)
                    linear_rate[name] = max(linear_rate.get(name, 0.0), rate)
        record["linear_rates"] = linear_rate
        record["linear"] = (
            "onednn"
            if twin is not None
            and (settings.linear == "onednn" or linear_rate["onednn"] >= 1.03 * linear_rate["aten"])
            else "aten"
        )
        if twin is not None and record["linear"] == "onednn":
            problem = _twin_problem(model, twin, probes, min(probe_batch, probes.shape[0]))
            if problem:
                notes.append(f"onednn-linear rejected: {problem}")
                record["linear"] = "aten"
        linear = record["linear"]
        # Precision.
        native = _native_precisions(device)
        if device.type == "cpu" and not native and settings.precision == "auto":
            notes.append(
                "bf16 not tried: this CPU has no native bf16 (AVX512-BF16 or AMX), and "
                "emulated bf16 is slower than fp32"
            )
        if settings.precision == "auto":
            wanted = ["fp32", *native]
        elif settings.precision == "fp32":
            wanted = ["fp32"]
        else:
            wanted = ["fp32", settings.precision]
        rates: dict[str, float] = {}
        for p in wanted:
            try:
                rates[p] = max(
                    measure(channels_last, p, probe_batch, linear=linear) for _ in range(2)
                )
            except Exception as e:  # e.g. fp16 kernels a CPU lacks
                notes.append(f"{p}: failed ({type(e).__name__}: {str(e)[:120]})")
        record["precisions"] = rates
        # Batch sizes for each precision (ascending; see _sweep).
        sweeps: dict[str, dict[int, float]] = {}
        for p in rates:
            if settings.forward_batch is not None:
                b = settings.forward_batch
                sweeps[p] = {b: measure(channels_last, p, b, linear=linear)}
            else:
                sweeps[p] = _sweep(
                    lambda b, p=p: measure(channels_last, p, b, linear=linear), _batches(top)
                )
        record["batches"] = {p: {str(b): r for b, r in s.items()} for p, s in sweeps.items()}
        record["notes"] = list(notes)
        _save_measurements(measured_file, record)
    else:
        record = cached
        notes.extend(record.get("notes", []))
    measurements_cached = cached is not None

    # Guard verdicts depend on the weights (and the default probes): kept per weights digest.
    use_kept = measured_file is not None and default_probes
    kept_verdicts: dict[str, Any] = {}
    if use_kept:
        kept_verdicts = record.setdefault("fidelity", {}).setdefault(weights_digest(model), {})
    changed = [False]

    def guard(trial: ForwardPath, reference: ForwardPath | None = None) -> Fidelity:
        name = trial.describe()
        if name in kept_verdicts:
            return Fidelity(**kept_verdicts[name])
        verdict = check_fidelity(model, trial, probes, settings, reference=reference)
        if use_kept:
            kept_verdicts[name] = dataclasses.asdict(verdict)
            changed[0] = True
        return verdict

    # Decide from the measurements.
    channels_last = bool(record["channels_last"])
    linear = str(record.get("linear", "aten"))
    runner = the_twin() if linear == "onednn" else None
    if runner is None:  # no twin here (measurements of the same structure chose one: rare)
        linear = "aten"
    _set_format(model, channels_last)
    baseline = Candidate(False, "fp32", bases, False, float(record["baseline"]), note="baseline")
    candidates: list[Candidate] = []

    def best_batch(sweep: dict[str, float]) -> tuple[int, float]:
        items = sorted((int(b), r) for b, r in sweep.items())
        top_rate = max(r for _, r in items)
        return next((b, r) for b, r in items if r >= 0.95 * top_rate)

    per_precision: dict[str, Candidate] = {}
    for p, sweep in record["batches"].items():
        if not sweep:
            continue
        b, r = best_batch(sweep)
        cand = Candidate(channels_last, p, b, False, r, linear=linear)
        per_precision[p] = cand
        candidates.append(cand)
    fp32 = per_precision["fp32"]
    chosen = fp32
    chosen_fidelity: Fidelity | None = None
    for p in [p for p in per_precision if p != "fp32"]:
        cand = per_precision[p]
        forced = settings.precision == p
        if not forced and cand.images_per_s < settings.min_speedup * fp32.images_per_s:
            cand.note = (
                f"not faster: {cand.images_per_s / fp32.images_per_s:.2f}x fp32 "
                f"(needs {settings.min_speedup}x)"
            )
            continue
        path = ForwardPath(
            channels_last=channels_last,
            precision=p,
            batch_size=cand.batch_size,
            linear=linear,
            runner=runner,
        )
        cand.fidelity = guard(path)
        if not cand.fidelity.passed and not forced:
            cand.note = f"rejected by the fidelity guard: {cand.fidelity.reason}"
            continue
        if not cand.fidelity.passed:
            log.warning(
                "precision %s is forced although it fails the fidelity guard: %s",
                p,
                cand.fidelity.reason,
            )
            cand.note = f"forced; fails the guard: {cand.fidelity.reason}"
        if forced or cand.images_per_s > chosen.images_per_s:
            chosen, chosen_fidelity = cand, cand.fidelity
    if settings.precision == "fp32" or (settings.precision == "auto" and chosen is fp32):
        chosen_fidelity = None
    chosen.accepted = True
    if settings.precision in ("bf16", "fp16") and chosen.precision != settings.precision:
        notes.append(f"precision {settings.precision} could not be measured; using fp32")

    # Differentiated forwards: a short sweep at the chosen precision only (kept).
    grads = record.setdefault("grad", {})
    if chosen.precision not in grads:
        sizes = [b for b in (4, 8, 16) if b <= top] or [top]
        try:
            sweep = _sweep(lambda b: measure(channels_last, chosen.precision, b, grad=True), sizes)
            grads[chosen.precision] = {str(b): r for b, r in sweep.items()}
        except Exception as e:  # a model that cannot be differentiated w.r.t. its input
            notes.append(f"gradients at {chosen.precision}: {type(e).__name__}")
            grads[chosen.precision] = {}
        changed[0] = True
    grad_sweep = grads[chosen.precision]
    grad_b, grad_r = best_batch(grad_sweep) if grad_sweep else (None, None)
    path = ForwardPath(
        channels_last=channels_last,
        precision=chosen.precision,
        batch_size=chosen.batch_size,
        grad_batch_size=grad_b,
        images_per_s=chosen.images_per_s,
        grad_images_per_s=grad_r,
        linear=linear,
        runner=runner,
    )

    # Compilation.
    forward_s = chosen.batch_size / chosen.images_per_s
    want_compile = settings.compile == "on" or (
        settings.compile == "auto" and forward_s >= _COMPILE_MIN_FORWARD_S
    )
    if settings.compile == "auto" and not want_compile:
        notes.append(
            f"not compiled: a forward takes {forward_s * 1e3:.1f} ms, too little to earn back a "
            "build"
        )
    if want_compile:
        key = hashlib.blake2b(
            repr((structure, weights_digest(model), path.describe(), _CACHE_VERSION)).encode(),
            digest_size=16,
        ).hexdigest()
        example = data(chosen.batch_size, channels_last)
        try:
            compiled = _compile(model, example, chosen.precision, cache, key)
            trial = path.with_(compiled=compiled)
            # compiled vs eager, interleaved; kept with the measurements (speed does not
            # depend on the weights' values)
            speeds = record.setdefault("compiled", {})
            if trial.describe() not in speeds:
                rate = eager = 0.0
                for _ in range(2):
                    run_compiled = lambda: compiled(example)  # noqa: E731
                    rate = max(rate, _rate(run_compiled, chosen.batch_size, device, min_time))
                    eager = max(
                        eager,
                        measure(channels_last, chosen.precision, chosen.batch_size, linear=linear),
                    )
                speeds[trial.describe()] = [rate, eager]
                changed[0] = True
            rate, eager = speeds[trial.describe()]
            cand = Candidate(
                channels_last, chosen.precision, chosen.batch_size, True, rate, linear=linear
            )
            candidates.append(cand)
            cand.fidelity = guard(trial, ForwardPath(channels_last=channels_last))
            speedup = rate / eager
            if not cand.fidelity.passed:
                cand.note = f"rejected by the fidelity guard: {cand.fidelity.reason}"
            elif settings.compile == "auto" and speedup < settings.min_speedup:
                cand.note = f"not faster: {speedup:.2f}x eager (needs {settings.min_speedup}x)"
            else:
                cand.note = f"{speedup:.2f}x eager"
                chosen.accepted = False
                cand.accepted = True
                chosen = cand
                chosen_fidelity = cand.fidelity
                path = trial.with_(images_per_s=rate)
        except Exception as e:  # export or build failures: eager stays
            notes.append(f"not compiled: {type(e).__name__}: {str(e).splitlines()[0][:160]}")

    # Verify: the chosen path against the baseline, interleaved, so that the reported speed-up
    # is a ratio of two measurements from the same stretch of time (this machine's speed
    # drifts, and the candidates above were measured one after the other). A chosen path that
    # is not faster than the baseline here gives way to it, unless a setting forced it.
    x_chosen = data(chosen.batch_size, channels_last)
    if path.compiled is not None:
        compiled_fn = path.compiled

        def run_chosen() -> float:
            return _rate(lambda: compiled_fn(x_chosen), chosen.batch_size, device, min_time)

    else:

        def run_chosen() -> float:
            return measure(channels_last, chosen.precision, chosen.batch_size, linear=linear)

    verified = record.setdefault("verified", {})
    if path.describe() in verified:  # measured at an earlier start: a restart stays quick
        base_rate, chosen_rate = verified[path.describe()]
    else:
        base_rate = chosen_rate = 0.0
        for _ in range(2):
            base_rate = max(base_rate, measure(False, "fp32", bases))
            chosen_rate = max(chosen_rate, run_chosen())
        verified[path.describe()] = [base_rate, chosen_rate]
        changed[0] = True
    _set_format(model, channels_last)
    baseline.images_per_s = base_rate
    chosen.images_per_s = chosen_rate
    path = path.with_(images_per_s=chosen_rate)
    forced = (
        settings.memory_format != "auto"
        or settings.precision not in ("auto", "fp32")
        or settings.forward_batch is not None
        or settings.compile == "on"
        or (settings.linear == "onednn" and linear == "onednn")
    )
    if chosen_rate < base_rate and not forced:
        notes.append(
            f"{chosen.describe()} measured {chosen_rate / base_rate:.2f}x the baseline when "
            "verified: the baseline is kept"
        )
        chosen.accepted = False
        chosen = baseline
        chosen.accepted = True
        chosen_fidelity = None
        channels_last = False
        _set_format(model, False)
        path = ForwardPath(
            channels_last=False,
            precision="fp32",
            batch_size=bases,
            grad_batch_size=grad_b,
            images_per_s=base_rate,
            grad_images_per_s=grad_r,
        )

    if changed[0]:
        _save_measurements(measured_file, record)

    report = TuneReport(
        path=path.describe(),
        baseline=baseline,
        chosen=chosen,
        speedup=chosen.images_per_s / max(baseline.images_per_s, 1e-12),  # verified above
        candidates=candidates,
        grad_batch_size=grad_b,
        grad_images_per_s=grad_r,
        fidelity=chosen_fidelity,
        seconds=time.perf_counter() - began,
        measurements_cached=measurements_cached,
        notes=notes,
    )
    path = path.with_(report=report)
    if remember_path:
        remember(model, path)
    return path
