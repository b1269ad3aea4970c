"""A KServe SDK model server (``kserve.ModelServer``, Open Inference Protocol gRPC v2) serving a
TorchScript CNN, for the tests of models served elsewhere (``test_remote_oip.py``).

Run as a script in its own process (the KServe SDK's protobuf stubs register the same
``inference.*`` symbols as ours, so it must not share a process with ``xai_serve``)::

    python kserve_cnn.py --model_file cnn.pt --name cnn --grpc_port P --http_port Q
        [--mode ok|shape|bytes|error|fp64] [--delay_s S]

``--mode`` makes it misbehave on purpose for the bad-answer tests: ``shape`` answers the
scores flattened to one dimension, ``bytes`` a non-numeric BYTES output, ``error`` fails every
inference (the SDK answers an error status), ``fp64`` answers correct scores as FP64 (a
datatype a client must convert); ``--good N`` answers the first N inferences right (e.g. a
load's probe). ``--delay_s`` sleeps before each answer (a slow model). The model is served
with its metadata: input ``input`` FP32 ``[-1, C, H, W]``, output ``logits`` FP32.
"""

from __future__ import annotations

import argparse
import asyncio

import numpy as np
import torch
from kserve import InferOutput, InferRequest, InferResponse, Model, ModelServer


class TorchScriptCNN(Model):
    def __init__(
        self, name: str, path: str, mode: str, delay_s: float, shape: list[int], good: int
    ):
        super().__init__(name)
        self.path, self.mode, self.delay_s, self.shape = path, mode, delay_s, shape
        self.good = good  # answers given correctly before the mode applies
        self.module: torch.jit.ScriptModule | None = None
        self.load()

    def load(self) -> bool:
        self.module = torch.jit.load(self.path, map_location="cpu").eval()
        self.ready = True
        return self.ready

    def get_input_types(self) -> list[dict]:
        return [{"name": "input", "datatype": "FP32", "shape": [-1, *self.shape]}]

    def get_output_types(self) -> list[dict]:
        return [{"name": "logits", "datatype": "FP32", "shape": [-1, -1]}]

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        mode = "ok" if self.good > 0 else self.mode
        self.good -= 1
        if mode == "error":
            raise ValueError("this model fails on purpose")
        x = torch.from_numpy(np.ascontiguousarray(payload.inputs[0].as_numpy()))
        assert self.module is not None
        with torch.no_grad():
            scores = self.module(x.float()).numpy()
        name, datatype = "logits", "FP32"
        if mode == "shape":
            scores = scores.reshape(-1)
        elif mode == "fp64":
            scores, datatype = scores.astype(np.float64), "FP64"
        out = InferOutput(name=name, shape=list(scores.shape), datatype=datatype)
        if mode == "bytes":
            out = InferOutput(name=name, shape=[len(scores)], datatype="BYTES")
            out.set_data_from_numpy(np.array([b"cat"] * len(scores), dtype=np.object_))
        else:
            out.set_data_from_numpy(scores)
        return InferResponse(response_id=payload.id, model_name=self.name, infer_outputs=[out])


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model_file", required=True)
    p.add_argument("--name", default="cnn")
    p.add_argument("--mode", default="ok", choices=("ok", "shape", "bytes", "error", "fp64"))
    p.add_argument("--delay_s", type=float, default=0.0)
    p.add_argument("--good", type=int, default=0, help="answers given right before --mode")
    p.add_argument("--input_shape", default="3,32,32")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--grpc_port", type=int, required=True)
    p.add_argument("--http_port", type=int, required=True)
    args, _ = p.parse_known_args()  # the SDK reads its own flags from sys.argv too
    torch.set_num_threads(args.threads)
    shape = [int(v) for v in args.input_shape.split(",")]
    model = TorchScriptCNN(args.name, args.model_file, args.mode, args.delay_s, shape, args.good)
    ModelServer(
        http_port=args.http_port, grpc_port=args.grpc_port, enable_grpc=True, workers=1
    ).start([model])


if __name__ == "__main__":
    main()
