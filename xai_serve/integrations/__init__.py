"""Adapters that run xai_serve inside other serving engines.

Each adapter module imports its engine only when it builds or starts something, so importing
it (for its config dataclasses, its command-line arguments or its config-file checks) works
without the engine installed:

- :mod:`xai_serve.integrations.ray`: a Ray Serve application (HTTP and gRPC ingress with the
  ``xai_serve.v1`` protos, ``@serve.batch`` batching, replicas and autoscaling from the
  ``[ray]`` table of the server config); ``xai-serve ray up --config FILE``.
"""

__all__: list[str] = []
