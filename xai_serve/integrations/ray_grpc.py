"""What Serve's gRPC proxy imports (``grpc_options.grpc_servicer_functions``) to serve
``xai_serve.v1.Explainer``.

Serve pickles each request and answer between its proxy and the replicas, and pickle finds a
protobuf class by its ``__module__``, which protobuf names after the ``.proto`` file
(``xai_serve/v1/explainer.proto`` -> ``xai_serve.v1.explainer_pb2``), not after the module the
generated stubs live in (:mod:`xai_serve.proto.explainer_pb2`). Importing this module (the
proxy does, and so does the replica's module) registers the stubs under that name too.
"""

from __future__ import annotations

import sys
from typing import Any

from xai_serve.proto import explainer_pb2, explainer_pb2_grpc

__all__ = ["add_ExplainerServicer_to_server", "register_proto_modules"]


def register_proto_modules() -> None:
    """Make the messages' own module name (``xai_serve.v1.explainer_pb2``) importable."""
    sys.modules.setdefault(explainer_pb2.ExplainRequest.__module__, explainer_pb2)


def add_ExplainerServicer_to_server(servicer: Any, server: Any) -> None:
    """The generated ``add_ExplainerServicer_to_server``, for Serve's gRPC proxy."""
    explainer_pb2_grpc.add_ExplainerServicer_to_server(servicer, server)


register_proto_modules()
