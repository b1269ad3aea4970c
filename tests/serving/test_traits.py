"""Method traits are declared once, on the explainer classes, and the server derives from them.

A method registered by a user (here, two toy methods registered by the test) gets a seed, a
baseline and a layer from the server's job building, and the answer cache's seed rule, with no
edit anywhere else; a method without those traits is refused them.
"""

from __future__ import annotations

from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest
import torch

from tests.serving.harness import tiny_model
from xai_serve.errors import InvalidInput
from xai_serve.explainers import base
from xai_serve.explainers.base import Explainer, Explanation, Request, get_method, list_methods
from xai_serve.models import LoadedModel
from xai_serve.proto import explainer_pb2 as pb
from xai_serve.serving.cache import cacheable
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.engine import ExplainJob, run_batch
from xai_serve.serving.jobs import build_job

SEEDED = "toy_seeded_layer_baseline"
PLAIN = "toy_plain"
X = torch.linspace(-1, 1, 3 * 64 * 64).reshape(3, 64, 64)


def _seed_map(seed: int, baseline: float, layer: str) -> float:
    """The value every pixel of the toy map takes: a function of what the method received."""
    return float(seed % 1009) + 10_000 * baseline + len(layer)


class ToySeededLayerBaseline(Explainer):
    """A toy method with every trait the server acts on: its map says what it was given."""

    uses_layer = True
    randomised = True
    takes_baseline = True
    options: ClassVar[dict[str, Any]] = {"samples": 3}

    def explain(self, request: Request) -> Explanation:
        with torch.no_grad():
            logits = request.model(request.images).float()
        b, _, h, w = request.images.shape
        values = [
            _seed_map(s, float(request.baseline), request.layer_name or "") for s in request.seeds
        ]
        maps = torch.tensor(values).view(b, 1, 1).expand(b, h, w).clone()
        maps += request.options["samples"] * 1e6  # the option reached the method too
        targets = request.target if request.target is not None else logits.argmax(1)
        return Explanation(
            maps=maps, targets=targets, logits=logits, method=self.name, layer=request.layer_name
        )


class ToyPlain(Explainer):
    """A toy method with none of those traits."""

    options: ClassVar[dict[str, Any]] = {}

    def explain(self, request: Request) -> Explanation:  # pragma: no cover - never run
        raise AssertionError("not called")


@pytest.fixture(scope="module")
def model() -> Iterator[LoadedModel]:
    """A model loaded while the toy methods are registered (a model lists the methods known at
    its load); the toys are unregistered afterwards, so no other test sees them."""
    base.register(SEEDED)(ToySeededLayerBaseline)
    base.register(PLAIN)(ToyPlain)
    try:
        loaded = tiny_model("tiny_traits")
        assert {SEEDED, PLAIN} <= set(loaded.methods)
        yield loaded
    finally:
        base._REGISTRY.pop(SEEDED, None)
        base._REGISTRY.pop(PLAIN, None)


def _job(model: LoadedModel, method: str, **kw: Any) -> ExplainJob:
    state = SimpleNamespace(limits=ServerConfig().limits)
    return build_job(state, model, X, None, request_id="r", method=method, **kw)  # type: ignore[arg-type]


def test_builtin_traits_are_declared_on_the_classes() -> None:
    """The sets the server used to list by hand are exactly what the classes now declare."""

    def having(trait: str) -> set[str]:
        return {m for m in list_methods() if getattr(get_method(m), trait)}

    assert having("uses_layer") == {
        "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "eigencam", "scorecam",
        "cam", "guided_gradcam",
    }  # fmt: skip
    assert having("randomised") == {"lime", "kernelshap", "smoothgrad", "deepshap", "gradientshap"}
    assert having("takes_baseline") == {
        "integrated_gradients", "lime", "kernelshap", "occlusion", "deeplift", "deepshap",
        "gradientshap",
    }  # fmt: skip
    assert having("takes_blur_baseline") == {
        "lime", "kernelshap", "occlusion", "deepshap", "gradientshap",
    }  # fmt: skip
    assert having("produces_segments") == {"lime", "kernelshap"}
    assert {m for m in list_methods() if not get_method(m).needs_gradients} == {
        "lime", "kernelshap", "occlusion", "eigencam", "scorecam", "cam", "attention_rollout",
        "attention_flow",
    }  # fmt: skip
    assert having("pixel_level") == {
        "saliency", "input_x_gradient", "integrated_gradients", "smoothgrad", "guided_backprop",
        "deconvnet", "guided_gradcam", "deeplift", "deepshap", "gradientshap",
    }  # fmt: skip
    assert {m for m in list_methods() if not get_method(m).uses_target} == {
        "eigencam", "attention_rollout", "attention_flow",
    }  # fmt: skip
    assert having("multi_target") == {
        "gradcam", "gradcam++", "xgradcam", "hirescam", "layercam", "saliency",
        "input_x_gradient", "integrated_gradients", "smoothgrad", "lime", "kernelshap",
        "occlusion", "gradientshap",
    }  # fmt: skip


def test_registered_method_gets_seed_baseline_and_layer_from_the_server(
    model: LoadedModel,
) -> None:
    layer = model.layers[-2]
    options = pb.Options(seed=1234, samples=2, baseline=pb.Baseline(value=0.5))
    job = _job(model, SEEDED, layer=layer, options=options)
    assert (job.seed, job.baseline, job.layer, job.options) == (1234, 0.5, layer, {"samples": 2})
    assert not job.fresh_seed

    # no layer given: the model's default, as for the built-in layer methods
    default = _job(model, SEEDED, options=pb.Options(baseline=pb.Baseline(value=0.0)))
    assert default.layer == model.default_layer and default.layer
    # no seed given: the server draws one for a randomised method, and says so
    assert default.seed is not None and default.fresh_seed

    # run through the engine (one batch per batch key, as the batcher does): the method
    # receives the seed, the baseline, the layer and the option
    assert job.batch_key() != default.batch_key()
    [got], [got_default] = run_batch([job]), run_batch([default])
    assert not isinstance(got, Exception) and not isinstance(got_default, Exception)
    assert got.seed == 1234 and got.layer == layer
    expected = _seed_map(1234, 0.5, layer) + 2e6
    torch.testing.assert_close(got.map, torch.full((64, 64), expected))
    expected = _seed_map(default.seed, 0.0, model.default_layer) + 3e6  # default samples=3
    assert got_default.seed == default.seed
    torch.testing.assert_close(got_default.map, torch.full((64, 64), expected))


def test_answer_cache_refuses_the_registered_method_unseeded(model: LoadedModel) -> None:
    seeded = _job(model, SEEDED, options=pb.Options(seed=7, baseline=pb.Baseline(value=0.0)))
    drawn = _job(model, SEEDED, options=pb.Options(baseline=pb.Baseline(value=0.0)))
    assert cacheable(seeded)
    assert not cacheable(drawn)
    # a job made elsewhere without any seed is not cached either
    assert not cacheable(ExplainJob(request_id="r", model=model, method=SEEDED, image=X))


def test_method_without_the_traits_is_refused_them(model: LoadedModel) -> None:
    with pytest.raises(InvalidInput, match=r"options\.seed does not apply"):
        _job(model, PLAIN, options=pb.Options(seed=1))
    with pytest.raises(InvalidInput, match=r"options\.baseline does not apply"):
        _job(model, PLAIN, options=pb.Options(baseline=pb.Baseline(value=0.0)))
    with pytest.raises(InvalidInput, match="`layer` applies to methods that explain a layer"):
        _job(model, PLAIN, layer=model.default_layer)
    with pytest.raises(InvalidInput, match=r"options\.baseline\.blur does not apply"):
        _job(model, SEEDED, options=pb.Options(baseline=pb.Baseline(blur=True)))
    with pytest.raises(InvalidInput, match=r"options\.steps does not apply"):
        _job(model, SEEDED, options=pb.Options(steps=3))
    plain = _job(model, PLAIN)
    assert (plain.seed, plain.baseline, plain.layer, plain.fresh_seed) == (None, None, None, False)
    assert cacheable(plain)


def test_cli_methods_table_shows_the_registered_traits(
    model: LoadedModel, capsys: pytest.CaptureFixture[str]
) -> None:
    from xai_serve.cli import main

    assert main(["methods"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["method", "traits"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert f"{SEEDED}  layer, seed, baseline  " in rows[SEEDED]
    assert "seed, baseline, segments, no gradients" in rows["lime"]
    assert "layer, no gradients" in rows["scorecam"]


def test_a_method_that_finds_its_own_layer_gets_none_from_the_server(model: LoadedModel) -> None:
    """``cam`` explains the feature map before the pooling, whatever the model's default
    (Grad-CAM) layer is: the server passes no default layer to it (``takes_default_layer``),
    and a configured earlier layer does not make every CAM request fail."""
    assert _job(model, "gradcam").layer == model.default_layer
    job = _job(model, "cam")
    assert job.layer is None
    [result] = run_batch([job])
    assert not isinstance(result, Exception) and result.layer == "layer4"
