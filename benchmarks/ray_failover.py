"""Run the two-node Ray Serve failover test and keep what it measured.

    .venv/bin/python benchmarks/ray_failover.py [--out FILE] [--requests N]

Runs ``tests/integrations/test_ray_failover.py`` (a head and a worker node on loopback, one
replica each, N gRPC requests from 8 clients, the worker node killed after N/3 answers, a
new node joining afterwards) with ``XAI_SERVE_RAY_RESULTS`` set, so that the test writes its
figures (requests answered and retried, failures by status code, time until the lost replica
answers again) to FILE, then writes a markdown summary beside it. The figures are counts and
times of one run on this machine, not a speed comparison: the test asserts the correctness
(every answer equal to the in-process one); this records how the recovery went.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT = (
    ROOT / "benchmarks" / "results" / f"{time.strftime('%Y-%m-%d')}-cpu-2core-ray-failover.json"
)

ROWS = (
    ("requests", "requests sent (8 clients)"),
    ("answered_correctly", "answered, equal to xai_serve.explain in-process"),
    ("killed_after_answers", "answers before the worker node was killed"),
    ("answers_by_node_before_kill", "answers per node before the kill"),
    ("requests_retried", "requests retried by the client (in flight on the lost node)"),
    ("failed_attempts_by_code", "failed attempts by status code"),
    ("max_attempts", "most attempts one request took"),
    ("first_failure_after_kill_s", "first failure after the kill (s)"),
    ("failures_window_s", "first to last failure (s)"),
    ("replicas_after_kill", "Serve's replica states after the traffic"),
    ("traffic_s", "traffic wall time (s)"),
    ("requests_per_s", "requests per second (one replica for two thirds)"),
    ("new_node_join_s", "`ray start` of the new node until the cluster counts it (s)"),
    ("replica_back_after_join_s", "new node counted until its replica answers (s)"),
    ("replica_back_after_kill_s", "kill until a replica on the new node answers (s)"),
    ("after_recovery_first_try", "answered first try after recovery (of 40)"),
    ("deploy_s", "deploying the application, two replicas (s)"),
    ("test_s", "whole test (s)"),
)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=DEFAULT)
    p.add_argument("--requests", type=int, default=300)
    args = p.parse_args()
    env = {
        **os.environ,
        "XAI_SERVE_RAY_RESULTS": str(args.out),
        "XAI_SERVE_RAY_REQUESTS": str(args.requests),
    }
    test = "tests/integrations/test_ray_failover.py"
    cmd = [sys.executable, "-m", "pytest", test, "-q", "-m", "slow", "-p", "no:cacheprovider"]
    if subprocess.run(cmd, cwd=ROOT, env=env).returncode != 0:
        print("the failover test failed; nothing recorded", file=sys.stderr)
        return 1
    record = json.loads(args.out.read_text())
    figures = record["figures"]
    lines = [
        "# Ray Serve: losing a node mid-traffic",
        "",
        f"`python benchmarks/ray_failover.py` on {record['machine']['cpus']} "
        f"CPUs, Ray {record['machine']['ray']}, torch {record['machine']['torch']}. "
        f"Setup: {record['setup']['nodes']}; {record['setup']['model']}; methods "
        f"{', '.join(record['setup']['methods'])}; Ray health check "
        f"{record['setup']['ray_health_check']}; {record['setup']['serve_routing']}.",
        "",
        "| figure | value |",
        "|---|---|",
        *(f"| {label} | {figures[key]} |" for key, label in ROWS if key in figures),
        "",
    ]
    args.out.with_suffix(".md").write_text("\n".join(lines))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
