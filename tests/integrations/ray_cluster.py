"""A Ray cluster of several nodes on loopback, for tests: each node is a ``ray start --block``
process in a session of its own, so that one node can be killed alone (every process of its
session: the raylet, its workers, the replicas on it) and the whole cluster can be stopped
without touching any other Ray on the machine (``ray stop`` would stop them all).

Faster failure detection than Ray's defaults (a lost node is declared dead after
``health_check_failure_threshold`` missed checks, ``health_check_period_ms`` apart) is set
through the nodes' environment (:data:`CLUSTER_ENV`).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RAY = str(Path(sys.executable).with_name("ray"))
CLUSTER_ENV = {
    # Serve's proxy sends every request to a replica on its own node while that one has room;
    # off, it spreads them over all replicas (as proxies on every node behind a load
    # balancer would)
    "RAY_SERVE_PROXY_PREFER_LOCAL_NODE_ROUTING": "0",
    "RAY_health_check_initial_delay_ms": "1000",
    "RAY_health_check_period_ms": "500",
    "RAY_health_check_timeout_ms": "500",
    "RAY_health_check_failure_threshold": "4",
}


# Ports for the cluster and Serve's proxies come from below Linux's ephemeral range (32768+)
# and above Ray's worker ports (10002-19999): a port the kernel hands out as ephemeral (port 0)
# is free only until something else's outgoing connection or Ray's own processes take it, and
# a clean-clone CI run once lost Serve's HTTP port that way ("Failed to bind to address").
_PORTS = range(20000, 32768)
_rng = random.Random()


def free_port() -> int:
    """A port in ``_PORTS`` that nothing listens on or is bound to now."""
    for _ in range(200):
        port = _rng.choice(_PORTS)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise RuntimeError(f"no free port in {_PORTS}")


def _session_pids(sid: int) -> list[int]:
    """Processes of session ``sid`` (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[3]) == sid:  # fields after "(comm)": state ppid pgrp session ...
            pids.append(int(entry))
    return pids


def _pids_mentioning(text: str) -> list[int]:
    """Processes whose command line contains ``text`` (our temp dir: nobody else's)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if text.encode() in cmdline:
            pids.append(int(entry))
    return pids


def _kill(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


class Node:
    """One ``ray start --block`` process (its own session) and everything it started."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                [RAY, "start", "--block", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )

    def kill(self) -> int:
        """SIGKILL every process of the node's session; returns how many there were."""
        pids = _session_pids(self.proc.pid)
        _kill(pids)
        self.proc.wait(timeout=30)
        return len(pids)

    def alive(self) -> bool:
        return self.proc.poll() is None


class LoopbackCluster:
    """``with LoopbackCluster() as c: c.add_worker(...)``: a head node (``head_cpus`` CPUs,
    ``head_resources``) on 127.0.0.1 with no dashboard; workers join it with their own CPUs
    and custom resources. On exit every process of every node, and any process whose command
    line names the cluster's temp dir, is killed."""

    def __init__(self, head_cpus: int = 1, head_resources: dict[str, float] | None = None):
        # short: Ray's socket paths under it must stay below 108 bytes
        self.temp_dir = tempfile.mkdtemp(prefix="xrt", dir="/tmp")
        self.port = free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.head_cpus = head_cpus
        self.head_resources = head_resources or {}
        self.nodes: list[Node] = []
        self.env = {**os.environ, **CLUSTER_ENV, "RAY_USAGE_STATS_ENABLED": "0"}

    def __enter__(self) -> LoopbackCluster:
        try:
            self.head = self._start(
                [
                    "--head",
                    f"--port={self.port}",
                    f"--ray-client-server-port={free_port()}",
                    f"--temp-dir={self.temp_dir}",
                    "--include-dashboard=false",
                    "--disable-usage-stats",
                ],
                self.head_cpus,
                self.head_resources,
                "head",
            )
            self._wait_for_nodes(1)
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start(self, args: list[str], cpus: int, resources: dict[str, float], name: str) -> Node:
        args = [
            *args,
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={cpus}",
            "--num-gpus=0",
            f"--resources={json.dumps(resources)}",
        ]
        node = Node(args, self.env, Path(self.temp_dir) / f"{name}-{len(self.nodes)}.log")
        self.nodes.append(node)
        return node

    def add_worker(self, cpus: int = 1, resources: dict[str, float] | None = None) -> Node:
        """Start a worker node; returns once the cluster counts it alive."""
        alive = self.alive_nodes()
        node = self._start([f"--address={self.address}"], cpus, resources or {}, "worker")
        self._wait_for_nodes(alive + 1)
        return node

    def ray_status(self) -> str:
        out = subprocess.run(
            [RAY, "status", f"--address={self.address}"],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
        )
        return out.stdout

    def alive_nodes(self) -> int:
        """Nodes the head counts alive (``ray status``'s "Active" list)."""
        text = self.ray_status()
        if "Active:" not in text:
            return 0
        active = text.split("Active:", 1)[1].split("Pending:", 1)[0]
        return sum(1 for line in active.splitlines() if line.strip().startswith("1 node_"))

    def _wait_for_nodes(self, n: int, timeout: float = 120.0) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(not node.alive() for node in self.nodes[-1:]):
                raise RuntimeError(f"ray start exited: {self.nodes[-1].log.read_text()[-2000:]}")
            if self.alive_nodes() >= n:
                return
            time.sleep(0.5)
        raise TimeoutError(f"the cluster did not reach {n} nodes in {timeout:.0f} s")

    def stop(self) -> None:
        """Kill every node's processes, then anything left that names the temp dir; remove
        the temp dir (Ray's logs: set ``XAI_SERVE_KEEP_RAY_LOGS=1`` to keep them)."""
        for node in reversed(self.nodes):
            if node.alive() or _session_pids(node.proc.pid):
                node.kill()
        _kill(_pids_mentioning(self.temp_dir))
        if os.environ.get("XAI_SERVE_KEEP_RAY_LOGS") != "1":
            shutil.rmtree(self.temp_dir, ignore_errors=True)
