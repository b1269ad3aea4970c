"""The Open Inference Protocol (``inference.GRPCInferenceService``) through the real Triton
client, ``tritonclient[grpc]``, against a real server.

``tritonclient.grpc`` and our ``open_inference_pb2`` register the same protobuf symbols, so the
client runs in a subprocess (``oip_client_script.py``): the module runs one plan of calls there
and each test checks one part of the answers against the model run in this process.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

import xai_serve
from tests._peers import require_installed
from tests.serving.harness import ServerThread, tiny_model

# Only looked up, never imported here (see the module doc).
require_installed("tritonclient")

SCRIPT = Path(__file__).with_name("oip_client_script.py")
MODEL = "tiny"
CHUNKED = "tiny_b2"  # max_batch_size 2
TARGET = 3
SEED = 11
SAMPLES = 48


def _plan(d: Path) -> list[dict[str, Any]]:
    x, x1, x5, small, ints = (str(d / f"{n}.npy") for n in ("x", "x1", "x5", "small", "ints"))
    infer = {"op": "infer", "model": MODEL, "input": x}
    return [
        {"name": "live", "op": "live"},
        {"name": "ready", "op": "ready"},
        {"name": "model_ready", "op": "model_ready", "model": MODEL},
        {"name": "model_ready_unknown", "op": "model_ready", "model": "nope"},
        {"name": "model_ready_v1", "op": "model_ready", "model": MODEL, "version": "1"},
        {"name": "model_ready_v2", "op": "model_ready", "model": MODEL, "version": "2"},
        {"name": "server_metadata", "op": "server_metadata"},
        {"name": "model_metadata", "op": "model_metadata", "model": MODEL},
        {"name": "model_metadata_unknown", "op": "model_metadata", "model": "nope"},
        {**infer, "name": "logits", "request_id": "req-7"},
        {**infer, "name": "logits_one", "input": x1},
        {**infer, "name": "logits_chunked", "model": CHUNKED, "input": x5},
        {**infer, "name": "logits_v1", "version": "1", "priority": 3, "server_timeout_us": 10**8},
        {**infer, "name": "logits_v2", "version": "2"},
        {**infer, "name": "gradcam", "parameters": {"explainer": "gradcam", "target": TARGET}},
        {
            **infer,
            "name": "gradcam_layer3_target_only",
            "parameters": {"explainer": "gradcam", "target": TARGET, "layer": "layer3"},
            "outputs": ["explanation"],
        },
        {
            **infer,
            "name": "lime",
            "parameters": {"explainer": "lime", "seed": SEED, "samples": SAMPLES},
        },
        {**infer, "name": "unknown_explainer", "parameters": {"explainer": "nope"}},
        {**infer, "name": "unknown_layer", "parameters": {"explainer": "gradcam", "layer": "x"}},
        {**infer, "name": "unknown_model", "model": "nope"},
        {**infer, "name": "wrong_shape", "input": small},
        {**infer, "name": "int_input", "input": ints, "datatype": "INT32"},
        {**infer, "name": "target_range", "parameters": {"explainer": "gradcam", "target": 10}},
        {**infer, "name": "unknown_param", "parameters": {"explainer": "gradcam", "foo": 1}},
        {**infer, "name": "param_no_explainer", "parameters": {"target": 1}},
        {**infer, "name": "explanation_no_explainer", "outputs": ["explanation"]},
        {**infer, "name": "unknown_output", "outputs": ["probabilities"]},
        {**infer, "name": "lime_seed_string", "parameters": {"explainer": "lime", "seed": "x"}},
        {**infer, "name": "too_many_samples", "parameters": {"explainer": "lime", "samples": 99}},
        {**infer, "name": "explainer_int", "parameters": {"explainer": 1}},
        {**infer, "name": "classification", "outputs": ["logits"], "class_count": 3},
        {**infer, "name": "shared_memory", "shared_memory": True},
        {
            **infer,
            "name": "server_timeout",
            "server_timeout_us": 1,
            "parameters": {"explainer": "lime", "samples": 64, "seed": 1},
        },
    ]


@pytest.fixture(scope="module")
def oip(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    d = tmp_path_factory.mktemp("oip")
    model = tiny_model(MODEL)
    chunked = tiny_model(CHUNKED, max_batch_size=2)
    sizes: list[int] = []
    hook = chunked.module.register_forward_pre_hook(lambda m, args: sizes.append(args[0].shape[0]))
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 64, 64, generator=gen)
    np.save(d / "x.npy", x.numpy())
    np.save(d / "x1.npy", x[1].numpy())
    x5 = torch.randn(5, 3, 64, 64, generator=gen)
    np.save(d / "x5.npy", x5.numpy())
    np.save(d / "small.npy", np.zeros((2, 3, 32, 32), np.float32))
    np.save(d / "ints.npy", np.zeros((2, 3, 64, 64), np.int32))
    (d / "plan.json").write_text(json.dumps(_plan(d)))
    # max_samples below the model's default: "too_many_samples" hits the limit.
    from xai_serve.serving.config import LimitsConfig

    try:
        with ServerThread(models=[model, chunked], limits=LimitsConfig(max_samples=64)) as server:
            proc = subprocess.run(
                [sys.executable, str(SCRIPT), server.address, str(d / "plan.json"), str(d)],
                capture_output=True,
                text=True,
                timeout=120,
            )
    finally:
        hook.remove()
    assert proc.returncode == 0, f"client script failed:\n{proc.stdout}\n{proc.stderr}"
    results = json.loads((d / "results.json").read_text())
    yield {
        "results": results,
        "x": x,
        "x5": x5,
        "model": model,
        "chunked": chunked,
        "chunk_sizes": sizes,
    }


def _value(oip: dict[str, Any], name: str) -> Any:
    r = oip["results"][name]
    assert "error" not in r, f"{name}: {r['error']}"
    return r["value"]


def _error(oip: dict[str, Any], name: str) -> dict[str, str]:
    r = oip["results"][name]
    assert "error" in r, f"{name} should have failed, got {r['value']}"
    return r["error"]


def _output(value: dict[str, Any], name: str) -> np.ndarray:
    return np.load(value["outputs"][name]["file"])


def test_health_calls(oip: dict[str, Any]) -> None:
    assert _value(oip, "live") is True
    assert _value(oip, "ready") is True
    assert _value(oip, "model_ready") is True
    err = _error(oip, "model_ready_unknown")
    assert err["status"] == "StatusCode.NOT_FOUND"
    assert "'nope'" in err["message"] and "'tiny'" in err["message"]
    assert _value(oip, "model_ready_v1") is True
    err = _error(oip, "model_ready_v2")
    assert err["status"] == "StatusCode.NOT_FOUND" and "'2'" in err["message"]


def test_server_metadata(oip: dict[str, Any]) -> None:
    meta = _value(oip, "server_metadata")
    assert meta["name"] == "xai_serve"
    assert meta["version"] == xai_serve.__version__
    assert "explain" in meta["extensions"]


def test_model_metadata(oip: dict[str, Any]) -> None:
    meta = _value(oip, "model_metadata")
    assert meta["name"] == MODEL
    assert meta["platform"] == "pytorch"
    # JSON of an int64 repeated field: strings (proto3 JSON mapping).
    shapes = {t["name"]: (t["datatype"], [int(s) for s in t["shape"]]) for t in meta["outputs"]}
    assert [(t["name"], t["datatype"], [int(s) for s in t["shape"]]) for t in meta["inputs"]] == [
        ("input", "FP32", [-1, 3, 64, 64])
    ]
    assert shapes == {
        "logits": ("FP32", [-1, 10]),
        "explanation": ("FP32", [-1, 64, 64]),
        "target": ("INT64", [-1]),
    }
    err = _error(oip, "model_metadata_unknown")
    assert err["status"] == "StatusCode.NOT_FOUND"


def test_infer_logits_match_the_model(oip: dict[str, Any]) -> None:
    model, x = oip["model"], oip["x"]
    with torch.no_grad():
        ref = model.module(x).numpy()
    value = _value(oip, "logits")
    assert value["id"] == "req-7"
    assert list(value["outputs"]) == ["logits"]
    meta = value["outputs"]["logits"]
    assert (meta["datatype"], meta["shape"]) == ("FP32", [2, 10])
    logits = _output(value, "logits")
    assert logits.dtype == np.float32
    np.testing.assert_allclose(logits, ref, rtol=1e-5, atol=1e-5)
    # A single [C, H, W] image is a batch of one.
    one = _output(_value(oip, "logits_one"), "logits")
    assert one.shape == (1, 10)
    np.testing.assert_allclose(one, ref[1:], rtol=1e-4, atol=1e-4)
    # Version "1" and Triton's priority / timeout parameters are accepted.
    np.testing.assert_allclose(
        _output(_value(oip, "logits_v1"), "logits"), ref, rtol=1e-5, atol=1e-5
    )
    err = _error(oip, "logits_v2")
    assert err["status"] == "StatusCode.NOT_FOUND" and "'2'" in err["message"]


def test_infer_logits_respect_max_batch_size(oip: dict[str, Any]) -> None:
    """5 images on a model loaded with max_batch_size 2: forwards of 2, 2 and 1."""
    chunked, x5 = oip["chunked"], oip["x5"]
    assert oip["chunk_sizes"] == [2, 2, 1]
    with torch.no_grad():
        ref = chunked.module(x5).numpy()
    logits = _output(_value(oip, "logits_chunked"), "logits")
    np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4)


def test_infer_gradcam_matches_in_process_explain(oip: dict[str, Any]) -> None:
    model, x = oip["model"], oip["x"]
    ref = xai_serve.explain(model.module, x, "gradcam", target=TARGET, layer="layer4")
    value = _value(oip, "gradcam")
    assert list(value["outputs"]) == ["explanation", "target", "logits"]
    assert value["outputs"]["explanation"]["shape"] == [2, 64, 64]
    assert value["outputs"]["target"]["datatype"] == "INT64"
    maps = _output(value, "explanation")
    assert maps.shape == (2, 64, 64) and maps.dtype == np.float32
    np.testing.assert_allclose(maps, ref.maps.numpy(), rtol=1e-4, atol=1e-5)
    assert _output(value, "target").tolist() == [TARGET, TARGET]
    with torch.no_grad():
        logits = model.module(x).numpy()
    np.testing.assert_allclose(_output(value, "logits"), logits, rtol=1e-4, atol=1e-4)

    # An explicit layer, and only the outputs asked for.
    ref3 = xai_serve.explain(model.module, x, "gradcam", target=TARGET, layer="layer3")
    value = _value(oip, "gradcam_layer3_target_only")
    assert list(value["outputs"]) == ["explanation"]
    maps3 = _output(value, "explanation")
    np.testing.assert_allclose(maps3, ref3.maps.numpy(), rtol=1e-4, atol=1e-5)
    assert not np.allclose(maps3, maps, atol=1e-3)


def test_infer_lime_matches_in_process_explain(oip: dict[str, Any]) -> None:
    model, x = oip["model"], oip["x"]
    ref = xai_serve.explain(model.module, x, "lime", seed=SEED, samples=SAMPLES)
    value = _value(oip, "lime")
    maps = _output(value, "explanation")
    assert maps.shape == (2, 64, 64)
    np.testing.assert_allclose(maps, ref.maps.numpy(), rtol=1e-3, atol=1e-4)
    assert _output(value, "target").tolist() == ref.targets.tolist()
    assert np.abs(maps).max() > 0


@pytest.mark.parametrize(
    ("name", "status", "words"),
    [
        ("unknown_explainer", "NOT_FOUND", ["'nope'", "gradcam"]),
        ("unknown_layer", "NOT_FOUND", ["'x'"]),
        ("unknown_model", "NOT_FOUND", ["'nope'"]),
        ("wrong_shape", "INVALID_ARGUMENT", ["[3, 32, 32]", "[3, 64, 64]"]),
        ("int_input", "INVALID_ARGUMENT", ["float"]),
        ("target_range", "INVALID_ARGUMENT", ["target 10"]),
        ("unknown_param", "INVALID_ARGUMENT", ["foo"]),
        ("param_no_explainer", "INVALID_ARGUMENT", ["target", "explainer"]),
        ("explanation_no_explainer", "INVALID_ARGUMENT", ["explainer"]),
        ("unknown_output", "INVALID_ARGUMENT", ["probabilities"]),
        ("lime_seed_string", "INVALID_ARGUMENT", ["seed"]),
        ("too_many_samples", "RESOURCE_EXHAUSTED", ["samples=99", "64"]),
        ("explainer_int", "INVALID_ARGUMENT", ["'explainer' must be a string"]),
        ("classification", "INVALID_ARGUMENT", ["classification", "not supported"]),
        ("shared_memory", "INVALID_ARGUMENT", ["shared_memory_region", "not supported"]),
        ("server_timeout", "DEADLINE_EXCEEDED", ["deadline"]),
    ],
)
def test_infer_errors(oip: dict[str, Any], name: str, status: str, words: list[str]) -> None:
    err = _error(oip, name)
    assert err["status"] == f"StatusCode.{status}", err
    for word in words:
        assert word in err["message"], err


def test_one_failed_image_cancels_the_others() -> None:
    """A ModelInfer of B images is B jobs; when one fails (e.g. the queue is full), the others
    leave the batcher's queue instead of being computed for nothing."""
    import asyncio

    from xai_serve.errors import ResourceExhausted
    from xai_serve.serving.jobs import gather_or_cancel

    cancelled: list[int] = []

    class Batcher:
        async def submit(self, job: int) -> int:
            if job == 1:
                await asyncio.sleep(0.01)
                raise ResourceExhausted("queue full")
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                cancelled.append(job)
                raise
            return job

    async def main() -> None:
        with pytest.raises(ResourceExhausted, match="queue full"):
            batcher = Batcher()
            await asyncio.wait_for(gather_or_cancel(batcher.submit(j) for j in (0, 1, 2)), 10)
        # checked here: asyncio.run would cancel leftover tasks on its way out
        assert sorted(cancelled) == [0, 2]

    asyncio.run(main())
