"""Generated gRPC stubs (``make protos`` regenerates them from ``protos/``; do not edit).

* ``explainer_pb2`` / ``explainer_pb2_grpc``: the ``xai_serve.v1`` API.
* ``open_inference_pb2`` / ``open_inference_pb2_grpc``: the Open Inference Protocol subset
  (package ``inference``). Import it only in a process that does not also import another
  generated copy of that protocol (e.g. ``tritonclient.grpc``): protobuf keeps one global
  registry of message names.
"""
