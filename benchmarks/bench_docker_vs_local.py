"""Time to ready for each service, docker backend against local backend, in one run on the
same machine, printed as ratios (docker / local).

"Ready" is what each backend's ``start`` waits for before it returns: a query answered by
Postgres, PING by Redis, metadata naming the broker from Kafka, an AMQP connection and the
management API from RabbitMQ. Each service is started once per backend untimed first (the
local backend makes its initdb / Kafka storage templates, the docker backend finds its
image), then ``--rounds`` times timed, alternating backends; the median is reported.

    python benchmarks/bench_docker_vs_local.py [--rounds 3] [--services postgres,redis]
                                               [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from labrunner.services import SERVICE_NAMES
from labrunner.services.manager import ServiceSet, make_backend


def time_to_ready(backend_name: str, service: str) -> float:
    """One start as a run does it (a fresh service set), timed until ready; then stopped."""
    service_set = ServiceSet.ephemeral(backend_name)
    try:
        started = time.perf_counter()
        service_set.ensure([service])
        return time.perf_counter() - started
    finally:
        service_set.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--services", default=",".join(SERVICE_NAMES))
    parser.add_argument("--json", type=Path, help="also write the numbers here")
    args = parser.parse_args(argv)
    services = [s for s in args.services.split(",") if s]

    reason = make_backend("docker").available()
    if reason:
        print(f"no docker backend here: {reason}", file=sys.stderr)
        return 2
    results: dict[str, dict[str, list[float]]] = {}
    for service in services:
        times: dict[str, list[float]] = {"local": [], "docker": []}
        for backend in ("local", "docker"):
            time_to_ready(backend, service)
        for round_no in range(args.rounds):
            order = ("local", "docker") if round_no % 2 == 0 else ("docker", "local")
            for backend in order:
                times[backend].append(round(time_to_ready(backend, service), 3))
        results[service] = times
        print(f"  {service}: local {times['local']}, docker {times['docker']}",
              file=sys.stderr)

    print(f"time to ready, median of {args.rounds} (same machine, one run)")
    print(f"{'service':<10} {'local s':>9} {'docker s':>9} {'docker/local':>13}")
    summary = {}
    for service, times in results.items():
        local = statistics.median(times["local"])
        docker = statistics.median(times["docker"])
        ratio = docker / local if local > 0 else float("inf")
        summary[service] = {"local_s": round(local, 3), "docker_s": round(docker, 3),
                            "ratio": round(ratio, 2), "local_all": times["local"],
                            "docker_all": times["docker"]}
        print(f"{service:<10} {local:>9.2f} {docker:>9.2f} {ratio:>12.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
