"""Forward-path tuning: the fidelity guard, forced and forbidden choices, the measurement
cache, compilation, and what a loaded model reports.

The guard is checked on a model built so that bf16 is wrong (its logits pass through a
``+1000 ... -1000`` cancellation that bf16's 8-bit mantissa cannot hold) and on a plain CNN
that bf16 runs faithfully. Whether ``tune`` tries bf16 on its own depends on the CPU (AVX512-BF16
or AMX), so the tests that exercise the automatic choice declare bf16 native for the call.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from xai_serve import InvalidInput, explain
from xai_serve.explainers.forward import ForwardPath, path_of, remember
from xai_serve.models import tuning
from xai_serve.models.tuning import (
    TuneSettings,
    check_fidelity,
    probe_images,
    resolve_cache_dir,
    structure_digest,
    tune,
    weights_digest,
)

SHAPE = (3, 32, 32)
FAST = 0.01  # seconds per measurement: the tests check choices, not speeds


class SmallCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, padding=1, stride=2),
            nn.ReLU(),
        )
        self.head = nn.Linear(16, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x).mean(dim=(2, 3)))


class Cancelling(SmallCNN):
    """SmallCNN whose logits go through ``(logits + 1000) - 1000`` inside a linear layer:
    exact enough in fp32, but bf16 rounds ``logits + 1000`` to a multiple of 4."""

    def __init__(self) -> None:
        super().__init__()
        self.shift = nn.Linear(10, 10)
        with torch.no_grad():
            self.shift.weight.copy_(torch.eye(10))
            self.shift.bias.fill_(1000.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.shift(super().forward(x)) - 1000.0


def _model(cls: type[nn.Module] = SmallCNN, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return cls().eval()


class _Tagged:
    """A reduced-precision forward (marked so that a test can scale its measured speed)."""

    def __init__(self, run: Any) -> None:
        self.run = run

    def __call__(self) -> Tensor:
        return self.run()


@pytest.fixture
def bf16_native(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tuning, "_native_precisions", lambda device: ["bf16"])


def _tune(model: nn.Module, **kw: Any) -> ForwardPath:
    settings = TuneSettings(**{"compile": "off", "max_batch": 16, **kw})
    return tune(model, SHAPE, settings, min_time=FAST)


# --------------------------------------------------------------------------------------------
# The guard
# --------------------------------------------------------------------------------------------


def test_guard_rejects_a_model_whose_bf16_logits_are_wrong() -> None:
    model = _model(Cancelling)
    probes = probe_images(8, SHAPE, torch.device("cpu"))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert float((model(probes).float() - model(probes).float()).abs().max()) == 0
    verdict = check_fidelity(model, ForwardPath(precision="bf16", batch_size=8), probes)
    assert not verdict.passed
    assert verdict.logit_error > 1.0  # several times the logits' spread
    assert "logit error" in verdict.reason


def test_guard_accepts_bf16_on_a_plain_cnn() -> None:
    model = _model()
    probes = probe_images(8, SHAPE, torch.device("cpu"))
    verdict = check_fidelity(model, ForwardPath(precision="bf16", batch_size=8), probes)
    assert verdict.passed, verdict.reason
    assert verdict.top1_agreement >= 0.9
    assert verdict.rank_correlation is not None and verdict.rank_correlation >= 0.9
    # the guard compares against fp32: fp32 itself agrees exactly
    same = check_fidelity(model, ForwardPath(batch_size=8), probes)
    assert same.passed and same.logit_error == 0 and same.top1_agreement == 1


def test_tune_refuses_unfaithful_bf16_even_when_faster(bf16_native: None) -> None:
    model = _model(Cancelling)
    path = _tune(model, min_speedup=0.0)
    assert path.precision == "fp32"
    report = path.report
    (bf16,) = [c for c in report.candidates if c.precision == "bf16"]
    assert not bf16.accepted and "fidelity guard" in bf16.note
    assert bf16.fidelity is not None and not bf16.fidelity.passed
    assert path_of(model) is path  # remembered for explain()


def test_tune_keeps_faithful_bf16_when_it_is_faster(
    bf16_native: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bf16 may be emulated (slow), so every bf16 no-grad measurement is declared 10x faster:
    # more than any CPU shows, so that a busy machine cannot hide it. The guard still runs
    # real bf16 forwards.
    real_rate, real_forward = tuning._rate, tuning._no_grad_forward

    def no_grad_forward(model: nn.Module, x: Tensor, precision: str) -> Any:
        run = real_forward(model, x, precision)
        return (lambda: run()) if precision == "fp32" else _Tagged(run)

    def rate(fn: Any, n: int, device: Any, min_time: float) -> float:
        return real_rate(fn, n, device, min_time) * (10.0 if isinstance(fn, _Tagged) else 1.0)

    monkeypatch.setattr(tuning, "_no_grad_forward", no_grad_forward)
    monkeypatch.setattr(tuning, "_rate", rate)
    model = _model()
    path = _tune(model)
    assert path.precision == "bf16", path.report.summary()
    assert path.report.fidelity is not None and path.report.fidelity.passed
    assert "fidelity top-1" in path.report.summary()
    out = explain(model, probe_images(2, SHAPE, torch.device("cpu")), "saliency")
    assert out.maps.shape == (2, 32, 32)


def test_forced_precision_is_used_even_when_the_guard_fails(caplog: Any) -> None:
    model = _model(Cancelling)
    with caplog.at_level(logging.WARNING, logger="xai_serve.models.tuning"):
        path = _tune(model, precision="bf16")
    assert path.precision == "bf16"
    assert "fails the fidelity guard" in caplog.text
    assert "fails the guard" in path.report.chosen.note


def test_no_bf16_without_native_support_and_a_note_says_why(monkeypatch: Any) -> None:
    monkeypatch.setattr(tuning, "_native_precisions", lambda device: [])
    path = _tune(_model())
    assert path.precision == "fp32"
    assert any("no native bf16" in n for n in path.report.notes)


def test_forced_layout_and_batch(monkeypatch: Any) -> None:
    model = _model()
    path = _tune(model, memory_format="channels_last", forward_batch=4, precision="fp32")
    assert path.channels_last and path.batch_size == 4 and path.precision == "fp32"
    assert model.features[0].weight.is_contiguous(memory_format=torch.channels_last)
    path = _tune(model, memory_format="contiguous", forward_batch=2, precision="fp32")
    assert not path.channels_last and path.batch_size == 2
    assert model.features[0].weight.is_contiguous()
    assert path.images_per_s and path.images_per_s > 0
    assert path.grad_batch_size in (4, 8, 16) and path.grad_images_per_s


def test_tuned_explanations_equal_the_untuned_ones() -> None:
    """channels_last and the batch are exact maths: the maps agree to float rounding."""
    model = _model()
    x = probe_images(3, SHAPE, torch.device("cpu"), seed=5)
    plain = explain(model, x, "lime", samples=64, n_segments=8, segmenter="grid", seed=1,
                    path=ForwardPath())  # fmt: skip
    path = _tune(model, memory_format="channels_last", precision="fp32", forward_batch=16)
    tuned = explain(model, x, "lime", samples=64, n_segments=8, segmenter="grid", seed=1)
    assert path_of(model) is path
    torch.testing.assert_close(tuned.weights, plain.weights, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(tuned.logits, plain.logits, rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------
# The measurement cache and digests
# --------------------------------------------------------------------------------------------


def test_measurements_are_reused_from_the_cache(tmp_path: Path) -> None:
    model = _model()
    settings = TuneSettings(compile="off", max_batch=8)
    first = tune(model, SHAPE, settings, cache_dir=tmp_path, min_time=FAST)
    assert not first.report.measurements_cached
    files = list((tmp_path / "tune").glob("*.json"))
    assert len(files) == 1
    # a model of the same structure with other weights reuses the measurements
    other = _model(seed=3)
    second = tune(other, SHAPE, settings, cache_dir=tmp_path, min_time=FAST)
    assert second.report.measurements_cached
    assert second.describe() == first.describe()
    # different knobs measure again
    third = tune(other, SHAPE, TuneSettings(compile="off", max_batch=4), cache_dir=tmp_path,
                 min_time=FAST)  # fmt: skip
    assert not third.report.measurements_cached
    # a corrupt file is measured again, not an error
    files[0].write_text("{not json")
    again = tune(model, SHAPE, settings, cache_dir=tmp_path, min_time=FAST)
    assert not again.report.measurements_cached


def test_digests_see_structure_and_weights() -> None:
    a, b = _model(seed=0), _model(seed=1)
    cpu = torch.device("cpu")
    assert structure_digest(a, SHAPE, cpu) == structure_digest(b, SHAPE, cpu)
    assert structure_digest(a, SHAPE, cpu) != structure_digest(a, (3, 64, 64), cpu)
    assert structure_digest(a, SHAPE, cpu) != structure_digest(_model(Cancelling), SHAPE, cpu)
    assert weights_digest(a) != weights_digest(b)
    assert weights_digest(a) == weights_digest(_model(seed=0))


def test_cache_dir_resolution(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert resolve_cache_dir(None) == tmp_path / "xai_serve"
    assert resolve_cache_dir("") is None
    assert resolve_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_bad_settings_are_clear_errors() -> None:
    with pytest.raises(InvalidInput, match="precision"):
        TuneSettings(precision="int8")
    with pytest.raises(InvalidInput, match="max_batch"):
        TuneSettings(max_batch=0)
    with pytest.raises(InvalidInput, match="input_shape"):
        tune(_model(), (3, 32), TuneSettings(compile="off"))


# --------------------------------------------------------------------------------------------
# Compilation
# --------------------------------------------------------------------------------------------


def test_compiled_forward_is_faithful_and_cached(tmp_path: Path) -> None:
    model = _model()
    settings = TuneSettings(compile="on", forward_batch=8, precision="fp32", min_speedup=0.0)
    path = tune(model, SHAPE, settings, cache_dir=tmp_path, min_time=FAST)
    compiled = [c for c in path.report.candidates if c.compiled]
    assert len(compiled) == 1 and compiled[0].fidelity is not None
    assert compiled[0].fidelity.passed, compiled[0].fidelity.reason
    assert path.compiled is not None  # min_speedup 0: kept whenever faithful
    assert len(list((tmp_path / "compiled").glob("*.pt2"))) == 1
    x = probe_images(8, SHAPE, torch.device("cpu"), seed=9)
    with torch.no_grad():
        torch.testing.assert_close(path.compiled(x.contiguous(memory_format=torch.channels_last)
                                                 if path.channels_last else x),
                                   model(x), rtol=1e-4, atol=1e-4)  # fmt: skip
    # a restart loads the build instead of compiling again
    again = tune(_model(), SHAPE, settings, cache_dir=tmp_path, min_time=FAST)
    assert again.compiled is not None and again.report.measurements_cached
    assert len(list((tmp_path / "compiled").glob("*.pt2"))) == 1


def test_compiled_bf16_forward_computes_in_bf16(tmp_path: Path, bf16_native: None) -> None:
    """A bf16 path's compiled forward computes in bf16 (an exported program drops autocast:
    the build was fp32 under a bf16 label, which the report then showed as bf16's speed)."""
    model = _model()
    settings = TuneSettings(compile="on", forward_batch=8, precision="bf16", min_speedup=0.0)
    path = tune(model, SHAPE, settings, cache_dir=tmp_path, min_time=FAST)
    assert path.precision == "bf16" and path.compiled is not None
    x = probe_images(8, SHAPE, torch.device("cpu"), seed=9)
    x = x.contiguous(memory_format=torch.channels_last) if path.channels_last else x
    with torch.no_grad():
        fp32 = model(x)
        got = path.compiled(x)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            eager_bf16 = model(x).float()
    scale = float(fp32.abs().max())
    # bf16 keeps 8 bits of mantissa: its logits differ from fp32's by far more than fp32's
    # rounding (1e-6 of the scale), and by about as much as eager bf16 autocast's do
    assert float((got - fp32).abs().max()) > 1e-4 * scale
    assert float((got - fp32).abs().max()) < 0.1 * scale
    assert float((eager_bf16 - fp32).abs().max()) > 1e-4 * scale


def test_compile_auto_skips_a_model_too_quick_to_earn_it(monkeypatch: Any) -> None:
    # the threshold (20 ms per forward) raised so that a busy machine cannot cross it
    monkeypatch.setattr(tuning, "_COMPILE_MIN_FORWARD_S", 10.0)
    path = _tune(_model(), compile="auto")
    assert path.compiled is None
    assert any("too little to earn back" in n for n in path.report.notes)


# --------------------------------------------------------------------------------------------
# Loaded models
# --------------------------------------------------------------------------------------------


def test_loaded_model_tunes_at_warmup_within_its_config(tmp_path: Path) -> None:
    from xai_serve.models import ModelConfig, TransformConfig, load_model

    file = tmp_path / "small.pt2"
    batch = torch.export.Dim("batch", min=1, max=8)
    program = torch.export.export(_model(), (torch.randn(2, *SHAPE),), dynamic_shapes=({0: batch},))
    torch.export.save(program, str(file))
    cfg = ModelConfig(
        name="small",
        source="export",
        path=str(file),
        transform=TransformConfig(crop=(32, 32)),
        compile="off",
        precision="fp32",
    )
    model = load_model(cfg)
    assert model.path.report is None and model.path.batch_size == 8  # the export bound
    model.warmup(cache_dir=tmp_path / "cache")
    assert model.path.report is not None
    assert model.path.precision == "fp32"
    assert model.path.batch_size is not None and model.path.batch_size <= 8
    assert list((tmp_path / "cache" / "tune").glob("*.json"))
    untuned = load_model(ModelConfig(**{**cfg.__dict__, "tune": False}))
    untuned.warmup()
    assert untuned.path.report is None


def test_remembered_path_is_per_model() -> None:
    a, b = _model(), _model()
    remember(a, ForwardPath(batch_size=3))
    assert path_of(a).batch_size == 3
    assert path_of(b).batch_size is None
