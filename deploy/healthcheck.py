"""Exit 0 when an xai-serve server reports SERVING on grpc.health.v1, else 1.

The container image's HEALTHCHECK (Docker, Podman, Compose) runs it; Kubernetes uses its own
native ``grpc:`` probe instead. Usage::

    python healthcheck.py [ADDRESS] [--service NAME] [--timeout SECONDS]

ADDRESS defaults to ``$XAI_SERVE_HEALTH_ADDRESS`` or ``127.0.0.1:50051``; ``--service ""``
(the default) is the server as a whole, which turns SERVING only once every model is loaded and
warmed, and back to NOT_SERVING when the server starts draining. Plaintext only: with TLS on,
probe from a sidecar that holds the client certificates instead.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

DEFAULT_ADDRESS = "127.0.0.1:50051"


def check(address: str, service: str = "", timeout: float = 3.0) -> tuple[bool, str]:
    """``(serving, status name or error)`` of one grpc.health.v1 Check call."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument(
        "address", nargs="?", default=os.environ.get("XAI_SERVE_HEALTH_ADDRESS", DEFAULT_ADDRESS)
    )
    parser.add_argument("--service", default="", help='health service name (default "")')
    parser.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")
    args = parser.parse_args(argv)
    serving, status = check(args.address, args.service, args.timeout)
    print(f"{args.address} service {args.service!r}: {status}")
    return 0 if serving else 1


if __name__ == "__main__":
    sys.exit(main())
