"""pushworker: pushes container images to explicitly named registries, one recorded step at a time.

The package is layered; each layer imports only the layers below it (``tests/unit/test_layers.py``
checks this on every run, and docs/architecture.md draws it):

- ``worker.core``: settings, the error tree, logging, text and hostname rules, the reference
  guard, credentials. No database, no foreign system.
- ``worker.seams``: the foreign systems (Docker Engine, registry HTTP API), each behind a
  Protocol, turning foreign errors into the error tree. They take plain values.
- ``worker.store``: the database: models, the append-only event log, claims, audit, migrations.
- ``worker.engine``: runs a job's steps: the step registry, claims, retry and fallback policy,
  the dispatcher seam that the Celery layer (``tasks``) fills in.
- the services, at the top of ``worker``: the producer API (``worker.producer``), jobs,
  registries, the message contract, reconcile, health, the registry probe, metrics.
- ``worker.cli``: ``pushctl``, a front door to the services.
"""
