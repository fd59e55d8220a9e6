"""Runs one step of one job, exactly once in effect: the step registry, claims, retry and
fallback policy, liveness of claim owners, and the dispatcher seam the Celery layer fills in.
Imports ``worker.core``, ``worker.seams`` and ``worker.store``."""
