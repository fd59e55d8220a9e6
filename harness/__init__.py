"""The harness: the real local stack, worker processes and test images, for the tests, the
benchmarks and the demo.

``tests/`` and ``bench/`` both import it (neither imports the other's support code for these);
it is not part of the installed product (pyproject installs ``worker`` and ``tasks`` only), and
is run from the repository root.

- ``harness.stack``: the services ``scripts/stack up`` starts, and where they listen.
- ``harness.worker``: Celery worker and beat processes as children, with their own environment,
  log, process group, pool, queues and Docker host.
- ``harness.images``: distinct images built from nothing, and the daemon's record of pushes.
- ``harness.publish``: a job's chain published on a broker of the caller's choice.
"""
