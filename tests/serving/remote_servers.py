"""Real Open Inference Protocol servers that this project did not write the server side of (the
KServe SDK's ``ModelServer``), and another ``xai-serve`` process, each serving the same small
TorchScript CNN with fixed seeded weights; and the configs of models that call them
(source ``"oip"``). Used by ``test_remote_oip.py``, ``tests/models/test_remote.py`` and
``benchmarks/remote_lime.py``."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import torch
from torch import nn

from xai_serve.models import ModelConfig, RemoteConfig, TransformConfig
from xai_serve.proto import open_inference_pb2 as oip
from xai_serve.proto import open_inference_pb2_grpc as oip_grpc
from xai_serve.serving.process import ServerProcess, free_port, log_tail

__all__ = [
    "CLASSES",
    "INPUT",
    "KServeProcess",
    "TinyCNN",
    "local_config",
    "remote_config",
    "start_xai_serve",
    "write_scripted",
]

SCRIPT = Path(__file__).with_name("kserve_cnn.py")
INPUT = (3, 32, 32)
CLASSES = 5
START_TIMEOUT_S = 90.0


class TinyCNN(nn.Module):
    """Two convolutions, a pooled linear head: 3 x 32 x 32 -> 5 scores, fast on a CPU."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1),
            nn.ReLU(),
            nn.Conv2d(8, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(2),
        )
        self.head = nn.Linear(64, CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x).flatten(1))


def write_scripted(path: Path, seed: int = 0) -> Path:
    """The :class:`TinyCNN` with weights drawn from ``seed``, as a TorchScript file."""
    gen = torch.Generator().manual_seed(seed)
    model = TinyCNN()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    torch.jit.script(model.eval()).save(str(path))
    return path


def _transform(size: tuple[int, int] = INPUT[1:]) -> TransformConfig:
    return TransformConfig(resize=None, crop=size, mean=(0.5,), std=(0.25,))


def local_config(
    name: str, scripted: Path, *, size: tuple[int, int] = INPUT[1:], **kw: Any
) -> ModelConfig:
    """The scripted CNN loaded here (fp32, untuned: the same numbers as a remote server's)."""
    return ModelConfig(
        name=name,
        source="torchscript",
        path=str(scripted),
        transform=_transform(size),
        tune=False,
        precision="fp32",
        **kw,
    )


def remote_config(
    name: str,
    url: str,
    *,
    model: str | None = None,
    size: tuple[int, int] = INPUT[1:],
    **remote: Any,
) -> ModelConfig:
    """The CNN as a model served elsewhere at ``url`` (``remote`` sets RemoteConfig keys)."""
    remote.setdefault("timeout_s", 20.0)
    return ModelConfig(
        name=name,
        source="oip",
        transform=_transform(size),
        remote=RemoteConfig(url=url, model=model, **remote),
    )


def _wait_model_ready(address: str, model: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    with grpc.insecure_channel(address) as channel:
        stub = oip_grpc.GRPCInferenceServiceStub(channel)
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"the model server exited with {proc.returncode}:\n{log_tail(log)}"
                )
            try:
                if stub.ModelReady(oip.ModelReadyRequest(name=model), timeout=2).ready:
                    return
            except grpc.RpcError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the model server was not ready in time:\n{log_tail(log)}")
            time.sleep(0.2)


class KServeProcess:
    """``kserve_cnn.py`` (a KServe SDK ModelServer) in its own process on free ports;
    :meth:`close` kills it."""

    def __init__(
        self,
        d: Path,
        scripted: Path,
        *,
        name: str = "cnn",
        mode: str = "ok",
        delay_s: float = 0,
        good: int = 0,
        input_shape: tuple[int, int, int] = INPUT,
        threads: int = 1,
    ) -> None:
        self.name = name
        self.port = free_port()
        self.log_path = d / f"kserve-{mode}-{self.port}.log"
        env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS=str(threads))
        cmd = [
            sys.executable, str(SCRIPT), "--model_file", str(scripted), "--name", name,
            "--mode", mode, "--delay_s", str(delay_s), "--good", str(good),
            "--grpc_port", str(self.port),
            "--http_port", str(free_port()),
            "--input_shape", ",".join(map(str, input_shape)), "--threads", str(threads),
        ]  # fmt: skip
        with self.log_path.open("wb") as sink:
            self.proc = subprocess.Popen(
                cmd, stdout=sink, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
            )
        try:
            _wait_model_ready(self.address, name, self.proc, self.log_path)
        except BaseException:
            self.close()
            raise

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def start_xai_serve(
    d: Path,
    scripted: Path,
    name: str = "cnn",
    *,
    size: tuple[int, int] = INPUT[1:],
    threads: int = 1,
) -> ServerProcess:
    """A ``python -m xai_serve.serving`` process serving the scripted CNN as ``name`` (its
    Open Inference Protocol ModelInfer answers the logits); ready when this returns."""
    port = free_port()
    cfg = d / f"xai-serve-{port}.toml"
    cfg.write_text(
        f"""\
host = "127.0.0.1"
port = {port}
warmup = false

[[models]]
name = "{name}"
source = "torchscript"
path = "{scripted}"
tune = false
precision = "fp32"
max_batch_size = 64
max_delay_ms = 1.0
transform = {{ resize = false, crop = [{size[0]}, {size[1]}], mean = [0.5], std = [0.25] }}
"""
    )
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env.pop("XAI_SERVE_CONFIG", None)
    log = d / f"xai-serve-{port}.log"
    proc = ServerProcess(["--config", str(cfg)], port=port, log=log, env=env)
    proc.start()
    try:
        proc.wait_ready(START_TIMEOUT_S)
    except BaseException:
        proc.kill()
        raise
    return proc
