"""Drive a server's Open Inference Protocol with the real ``tritonclient[grpc]`` client.

Run in its own process (``tritonclient.grpc`` and ``xai_serve.proto.open_inference_pb2`` both
register the ``inference.*`` protobuf symbols, so they cannot share one)::

    python oip_client_script.py ADDRESS PLAN.json OUT_DIR

``PLAN.json`` is a list of calls, each ``{"name": ..., "op": ..., ...}``:

- ``live``, ``ready``: ``is_server_live()`` / ``is_server_ready()``;
- ``model_ready``: ``is_model_ready(model[, version])``;
- ``server_metadata``, ``model_metadata``: ``get_*_metadata(..., as_json=True)``;
- ``infer``: ``infer(model, [input])`` with ``input`` (a ``.npy`` path), optional
  ``datatype`` (default FP32), ``shape`` (default the array's), ``parameters``, ``outputs``,
  ``version``, ``request_id``, ``priority``, ``server_timeout_us`` (Triton's ``timeout``),
  ``class_count`` (of every output), ``shared_memory`` (true: the input names a region).

Optional keys of every call: ``headers`` (dict). The script writes ``OUT_DIR/results.json``:
``{name: {"value": ...}}`` or ``{name: {"error": {"status": ..., "message": ...}}}``; an
``infer`` value maps each output name to ``{"file": <.npy path>, "datatype", "shape"}``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as tc
from tritonclient.utils import InferenceServerException


def _infer(client: tc.InferenceServerClient, call: dict[str, Any], out_dir: Path) -> Any:
    x = np.load(call["input"])
    datatype = call.get("datatype", "FP32")
    shape = call.get("shape", list(x.shape))
    inp = tc.InferInput(call.get("input_name", "input"), shape, datatype)
    if call.get("shared_memory"):  # only sets the input's parameters; nothing is registered
        inp.set_shared_memory("region", x.nbytes)
    else:
        inp.set_data_from_numpy(x)
    outputs = None
    if "outputs" in call:
        count = call.get("class_count", 0)
        outputs = [tc.InferRequestedOutput(n, class_count=count) for n in call["outputs"]]
    result = client.infer(
        call["model"],
        [inp],
        model_version=call.get("version", ""),
        outputs=outputs,
        priority=call.get("priority", 0),
        timeout=call.get("server_timeout_us"),
        parameters=call.get("parameters"),
        headers=call.get("headers"),
        request_id=call.get("request_id", ""),
        client_timeout=call.get("timeout", 120.0),
    )
    response = result.get_response(as_json=True)
    value: dict[str, Any] = {"id": response.get("id", ""), "outputs": {}}
    for out in response["outputs"]:
        arr = result.as_numpy(out["name"])
        path = out_dir / f"{call['name']}.{out['name']}.npy"
        np.save(path, arr)
        value["outputs"][out["name"]] = {
            "file": str(path),
            "datatype": out["datatype"],
            "shape": [int(s) for s in out["shape"]],
        }
    return value


def run(address: str, plan: list[dict[str, Any]], out_dir: Path) -> dict[str, Any]:
    client = tc.InferenceServerClient(address)
    results: dict[str, Any] = {}
    for call in plan:
        op, headers = call["op"], call.get("headers")
        try:
            if op == "live":
                value: Any = client.is_server_live(headers=headers)
            elif op == "ready":
                value = client.is_server_ready(headers=headers)
            elif op == "model_ready":
                value = client.is_model_ready(
                    call["model"], call.get("version", ""), headers=headers
                )
            elif op == "server_metadata":
                value = client.get_server_metadata(headers=headers, as_json=True)
            elif op == "model_metadata":
                value = client.get_model_metadata(call["model"], headers=headers, as_json=True)
            elif op == "infer":
                value = _infer(client, call, out_dir)
            else:
                raise SystemExit(f"unknown op {op!r}")
            results[call["name"]] = {"value": value}
        except InferenceServerException as exc:
            results[call["name"]] = {"error": {"status": exc.status(), "message": exc.message()}}
    client.close()
    return results


def main(argv: list[str]) -> int:
    address, plan_path, out_dir = argv[1], Path(argv[2]), Path(argv[3])
    results = run(address, json.loads(plan_path.read_text()), out_dir)
    (out_dir / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
