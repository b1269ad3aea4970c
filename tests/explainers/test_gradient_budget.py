"""Time budgets of integrated gradients and SmoothGrad: the steps / noisy samples are planned
up front from the cost of a gradient evaluation, so the call ends within its budget, uses a
fair share of it, and a budget too small for one evaluation is refused before any gradient.

The model sleeps a fixed time per input in its forward and again in its backward, so the cost
of a gradient evaluation is known (2 ms per input) whatever else this machine runs.
"""

from __future__ import annotations

import time

import pytest
import torch
from torch import Tensor, nn

import xai_serve
from xai_serve.errors import BudgetTooSmall, InvalidInput
from xai_serve.explainers import gradients

SLEEP_S = 1e-3


class _SlowLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor) -> Tensor:  # type: ignore[override]
        time.sleep(SLEEP_S * x.shape[0])
        ctx.save_for_backward(x, w)
        return x.flatten(1) @ w

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        time.sleep(SLEEP_S * x.shape[0])
        return (grad @ w.T).view_as(x), x.flatten(1).T @ grad


class Slow(nn.Module):
    """A linear classifier of 3x8x8 inputs, 1 ms per input forward and 1 ms backward."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = nn.Parameter(torch.randn(3 * 8 * 8, 4, generator=g))
        self.inputs = 0

    def forward(self, x: Tensor) -> Tensor:
        self.inputs += x.shape[0]
        return _SlowLinear.apply(x, self.w)


def _explain(model: nn.Module, method: str, **kw) -> xai_serve.Explanation:
    x = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return xai_serve.explain(model, x, method, target=0, **kw)


METHODS = [("integrated_gradients", "steps"), ("smoothgrad", "samples")]


@pytest.mark.parametrize(("method", "knob"), METHODS)
def test_budget_is_honoured_and_used(method: str, knob: str) -> None:
    """Without a budget 2 images x 512 evaluations take > 2 s; with 600 ms the call ends within
    15% + 50 ms of the budget, having used at least half of it (the plan divides the time left
    by the cost of one gradient evaluation of the images, measured in the same call)."""
    model = Slow()
    t0 = time.perf_counter()
    out = _explain(model, method, budget_ms=600, batch_size=16, **{knob: 512})
    elapsed = time.perf_counter() - t0
    assert elapsed <= 0.6 * 1.15 + 0.05, elapsed
    assert elapsed >= 0.6 * 0.5, elapsed
    assert 1 <= out.samples < 512 and out.budget_limited
    assert bool(torch.isfinite(out.maps).all())


@pytest.mark.parametrize(("method", "knob"), METHODS)
def test_budgeted_answer_equals_the_unbudgeted_one_with_its_sample_count(
    method: str, knob: str
) -> None:
    """A budget only chooses the count: the answer is the one for that many steps / samples
    (SmoothGrad's noise depends on its seed and the count), so it can be reproduced."""
    model = Slow()
    got = _explain(model, method, budget_ms=300, seed=4, **{knob: 512})
    again = _explain(model, method, seed=4, **{knob: got.samples})
    assert got.budget_limited and not again.budget_limited
    torch.testing.assert_close(got.maps, again.maps)


@pytest.mark.parametrize(("method", "knob"), METHODS)
def test_a_budget_too_small_is_refused_before_any_step(method: str, knob: str) -> None:
    model = Slow()
    with pytest.raises(BudgetTooSmall, match=r"budget_ms=3 is too small.*at least"):
        _explain(model, method, budget_ms=3)
    # the timed gradient of the two images, measured twice (the shorter kept); no path step
    assert model.inputs == 4
    assert issubclass(BudgetTooSmall, InvalidInput)


def test_a_pause_during_the_timing_does_not_shrink_the_plan(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """One slow timed evaluation (a pause of the machine) would plan a third of the steps; the
    shorter of two measurements keeps the plan: the call still uses most of its budget."""
    model = Slow()
    calls = {"n": 0}
    real = gradients._image_gradients

    def first_one_slow(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            time.sleep(0.05)  # 50 ms: about ten times the evaluation itself
        return real(*args, **kwargs)

    monkeypatch.setattr(gradients, "_image_gradients", first_one_slow)
    t0 = time.perf_counter()
    out = _explain(model, "integrated_gradients", budget_ms=600, batch_size=16, steps=512)
    elapsed = time.perf_counter() - t0
    assert 0.6 * 0.5 <= elapsed <= 0.6 * 1.15 + 0.05, elapsed
    assert out.budget_limited and calls["n"] == 2


@pytest.mark.parametrize("method", ["integrated_gradients", "smoothgrad"])
@pytest.mark.parametrize("bad", [0, -3, 1.5, True, "100"])
def test_bad_budgets_are_clear_errors(method: str, bad: object) -> None:
    with pytest.raises(InvalidInput, match="budget_ms"):
        _explain(Slow(), method, budget_ms=bad)


def test_no_budget_runs_every_step() -> None:
    out = _explain(Slow(), "integrated_gradients", steps=4)
    assert out.samples == 4 and not out.budget_limited
    roomy = _explain(Slow(), "integrated_gradients", steps=4, budget_ms=60_000)
    assert roomy.samples == 4 and not roomy.budget_limited
    torch.testing.assert_close(roomy.maps, out.maps)
