#!/bin/sh
# Every benchmark, one after the other, each appending its section to docs/benchmarks.md.
# About 12-15 minutes on a 2-core machine. Extra arguments go to every benchmark
# (e.g. --database postgres).
set -eu
cd "$(dirname "$0")/.."
if [ -z "${DOCKER_HOST:-}" ] || [ -z "${PUSHWORKER_STACK_TLS_REGISTRY:-}" ]; then
    eval "$(scripts/stack env)"
fi
PY=.venv/bin/python
echo "bench: $(uptime)" >&2
$PY -m bench.pushes "$@"        # 1 and 2, plot docs/benchmark-pushes.png
$PY -m bench.throughput "$@"    # 3 and 6, plot docs/benchmark-throughput.png
$PY -m bench.overhead "$@"      # 4
$PY -m bench.enqueue "$@"       # 5
$PY -m bench.profile_worker "$@"
$PY -m bench.micro "$@"
$PY -m bench.contention
echo "bench: done; $(uptime)" >&2
