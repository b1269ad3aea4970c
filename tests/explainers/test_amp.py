"""The ``amp`` option reaches the model: every forward of every method that takes it runs under
autocast to the asked dtype (bf16 and fp16 included), and none does without it.

A forward hook on the model's first convolution records the dtype of its output: under
``torch.autocast`` a convolution computes in the autocast dtype, outside it in float32. So a
method that dropped the option, or applied it to some forwards only, is caught here, whatever
its numbers look like."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch
from torch import Tensor, nn

import xai_serve
from xai_serve.explainers.base import get_method, list_methods

SIZE = 16
DTYPES = {None: torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def segments() -> Tensor:
    """``[2, SIZE, SIZE]`` ids of a 2 x 4 grid of blocks."""
    y = torch.arange(SIZE)[:, None] * 2 // SIZE
    x = torch.arange(SIZE)[None, :] * 4 // SIZE
    return (y * 4 + x).expand(2, SIZE, SIZE).contiguous()


# Small settings for every method that takes `amp`.
METHOD_OPTIONS: dict[str, dict[str, object]] = {
    "saliency": {},
    "input_x_gradient": {},
    "integrated_gradients": {"steps": 4, "batch_size": 3},
    "smoothgrad": {"samples": 3, "seed": 0, "batch_size": 4},
    "lime": {"segments": segments(), "samples": 24, "seed": 0},
    "kernelshap": {"segments": segments(), "samples": 24, "seed": 0},
    "occlusion": {"window": 8, "stride": 8},
    "guided_backprop": {},
    "deconvnet": {},
    "guided_gradcam": {},
    "deeplift": {},
    "deepshap": {"baselines": 2, "seed": 0},
    "gradientshap": {"baselines": 2, "samples": 3, "seed": 0},
}


def amp_methods() -> list[str]:
    return [m for m in list_methods() if "amp" in get_method(m).options]


def test_every_method_that_takes_amp_is_checked_here() -> None:
    assert sorted(amp_methods()) == sorted(METHOD_OPTIONS)


def model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),  # the guided methods need a ReLU
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(32, 5),
    ).eval()


@pytest.fixture
def recorded() -> Iterator[tuple[nn.Module, list[torch.dtype]]]:
    """The model and the dtypes its first convolution computed in, one entry per forward."""
    net = model()
    seen: list[torch.dtype] = []
    handle = net[0].register_forward_hook(lambda m, args, out: seen.append(out.dtype))
    yield net, seen
    handle.remove()


DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[
            pytest.mark.cuda,
            pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
        ],
    ),
]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("amp", ["bf16", "fp16", None, "fp32"])
@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_every_forward_runs_in_the_asked_dtype(recorded, method, amp, device) -> None:
    net, seen = recorded
    net.to(device)
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1)).to(device)
    opts = {
        k: v.to(device) if isinstance(v, Tensor) else v for k, v in METHOD_OPTIONS[method].items()
    }
    out = xai_serve.explain(net, x, method, amp=amp, **opts)
    assert seen, seen
    assert set(seen) == {DTYPES[amp]}, (method, amp, seen)
    assert out.maps.dtype == torch.float32
    assert bool(torch.isfinite(out.maps).all())


@pytest.mark.parametrize("method", list(METHOD_OPTIONS))
def test_half_precision_changes_the_numbers_by_its_rounding(method) -> None:
    """The maps under ``amp`` differ from fp32 (the option is not ignored) by a rounding-sized
    amount, and fp16 (11 significant bits) less than bf16 (8 bits): fp16 is not bf16.

    Measured relative max differences: the gradient methods 3e-3..4e-3 (bf16) and 5e-4..1.1e-3
    (fp16); the perturbation methods, whose maps are differences of logits, 0.11..0.18 (bf16)
    and 0.010..0.017 (fp16)."""
    net = model()
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(1))
    opts = dict(METHOD_OPTIONS[method])
    if method in ("lime", "kernelshap", "occlusion"):
        opts["output"] = "logit"
    ref = xai_serve.explain(net, x, method, amp=None, **opts).maps
    rel = {}
    for amp in ("bf16", "fp16"):
        out = xai_serve.explain(net, x, method, amp=amp, **opts).maps
        rel[amp] = float((out - ref).abs().max() / ref.abs().max())
    assert 0 < rel["fp16"] < rel["bf16"], rel
    assert rel["bf16"] < 0.4 and rel["fp16"] < 0.05, rel
