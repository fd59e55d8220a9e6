"""``pushctl``: the operator's command line for registries, pushes, jobs and the event log.

Commands are thin: they parse, call the library, and print (rich tables for people, ``--json``
for programs). Library errors are ``PushWorkerError``s; ``_Pushctl.invoke`` turns every one of
them into ``error:``/``hint:`` lines on stderr and the error's exit code, in one place.
Secrets are read from stdin or a hidden prompt only, and never printed.

``common`` holds the root group and shared helpers; each command module attaches its commands
to that group when imported, which happens here.
"""

from worker.cli import api, db, doctor, events, jobs, push, registry, tokens, webhooks
from worker.cli.common import cli, main

__all__ = [
    "api", "cli", "db", "doctor", "events", "jobs", "main", "push", "registry", "tokens",
    "webhooks",
]  # fmt: skip
