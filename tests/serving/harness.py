"""A real server on an ephemeral loopback port, run on its own event loop in a thread, so the
tests can drive it with ordinary (sync or asyncio) gRPC clients."""

from __future__ import annotations

import asyncio
import dataclasses
import io
import threading
from collections.abc import Sequence
from typing import Any

from xai_serve.models import LoadedModel, ModelConfig, TransformConfig, load_model
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.config import ServerConfig
from xai_serve.serving.server import XaiServer, build_server

_MODELS: dict[str, LoadedModel] = {}


def tiny_config(name: str = "tiny", **kw: Any) -> ModelConfig:
    """resnet18 (random weights, seeded) with 10 classes on 64 x 64 inputs: fast on 2 cores."""
    base = dict(
        name=name,
        source="torchvision",
        arch="resnet18",
        num_classes=10,
        transform=TransformConfig(resize=64, crop=(64, 64)),
        max_batch_size=16,
        max_delay_ms=20.0,
    )
    base.update(kw)
    return ModelConfig(**base)


def tiny_model(name: str = "tiny", **kw: Any) -> LoadedModel:
    """A loaded :func:`tiny_config` model (cached per name and settings: loading is slow)."""
    key = repr((name, sorted(kw.items())))
    if key not in _MODELS:
        import torch

        torch.manual_seed(0)
        _MODELS[key] = load_model(tiny_config(name, **kw))
    return _MODELS[key]


def oip_request(
    model: str, xs: Any, request_id: str = "", **params: str | int | bool
) -> oip.ModelInferRequest:
    """An Open Inference Protocol ``ModelInfer`` request: the float tensor ``xs`` [N, C, H, W]
    as the FP32 input ``input`` (raw little-endian), with request ``params`` such as
    ``explainer="gradcam"`` or ``target=3``."""
    xs = xs.detach().contiguous()
    req = oip.ModelInferRequest(
        model_name=model,
        id=request_id,
        inputs=[
            oip.ModelInferRequest.InferInputTensor(
                name="input", datatype="FP32", shape=list(xs.shape)
            )
        ],
        raw_input_contents=[xs.numpy().astype("<f4").tobytes()],
    )
    for key, value in params.items():
        if isinstance(value, bool):
            req.parameters[key].bool_param = value
        elif isinstance(value, int):
            req.parameters[key].int64_param = value
        else:
            req.parameters[key].string_param = value
    return req


class ServerThread:
    """``with ServerThread(config, models) as s: s.address``; stops (drains) on exit."""

    def __init__(
        self,
        config: ServerConfig | None = None,
        models: Sequence[LoadedModel] | None = None,
        wait_ready: bool = True,
        **overrides: Any,
    ) -> None:
        config = config or ServerConfig(host="127.0.0.1", port=0, warmup=False)
        self.config = dataclasses.replace(config, **overrides) if overrides else config
        self.models = models
        self.wait_ready = wait_ready
        self.server: XaiServer | None = None
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._run, daemon=True, name="test-server")
        self._started = threading.Event()
        self._error: BaseException | None = None

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.server = build_server(self.config, self.models)
            self.loop.run_until_complete(self.server.start_serving())
            if self.wait_ready:
                self.loop.run_until_complete(self.server.load_models())
            else:
                self.loop.create_task(self.server.load_models())
        except BaseException as exc:  # reported to the test thread
            self._error = exc
            self._started.set()
            return
        self._started.set()
        self.loop.run_forever()

    def __enter__(self) -> ServerThread:
        self._thread.start()
        if not self._started.wait(120):
            raise TimeoutError("test server did not start in 120 s")
        if self._error is not None:
            raise self._error
        return self

    @property
    def address(self) -> str:
        assert self.server is not None
        return f"127.0.0.1:{self.server.port}"

    def call(self, coro: Any, timeout: float = 60) -> Any:
        """Run a coroutine on the server's loop (e.g. ``server.stop``)."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def stop(self, grace: float = 1.0) -> None:
        if self.server is not None and self._thread.is_alive():
            self.call(self.server.stop(grace))
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(30)

    def __exit__(self, *exc: object) -> None:
        self.stop()


def random_png(seed: int, size: tuple[int, int]) -> bytes:
    """A PNG of seeded random RGB pixels, ``size`` = (H, W)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def grpc_infer(channel: Any, model: str, xs: Any, **params: Any) -> dict[str, Any]:
    """OIP ``ModelInfer`` of ``xs`` over gRPC: each output as a NumPy array of its shape."""
    import numpy as np

    stub = oip_grpc.GRPCInferenceServiceStub(channel)
    resp = stub.ModelInfer(oip_request(model, xs, **params))
    dtypes = {"FP32": "<f4", "INT64": "<i8"}
    return {
        out.name: np.frombuffer(raw, dtypes[out.datatype]).reshape(list(out.shape))
        for out, raw in zip(resp.outputs, resp.raw_output_contents, strict=True)
    }
