"""How a job's chain reaches the broker, as the layers below Celery see it: a ``Dispatcher``.

``worker`` never imports the Celery layer (``tasks``), which sits above it. As with dramatiq's
``set_broker``, the dispatcher is provided by whoever owns the broker: the Celery one is the
``celery`` entry point of the ``pushworker.dispatchers`` group (pyproject.toml), loaded by name
on first use, so that a producer process which imports only ``worker.producer`` publishes through
Celery without this package importing it. Tests set their own with ``set_dispatcher``.
"""

from __future__ import annotations

from importlib.metadata import entry_points
from typing import Protocol, runtime_checkable

from worker.core.errors import PushWorkerError

ENTRY_POINT_GROUP = "pushworker.dispatchers"
DEFAULT_DISPATCHER = "celery"


class Dispatcher(Protocol):
    """Starts a job's chain of step tasks against one registry."""

    def start_chain(self, job_id: str, registry_id: int) -> None: ...


@runtime_checkable
class StepWaker(Protocol):
    """A dispatcher that can also publish one waiting step at once (flow control's hand-over of
    a released slot), from that step to the end of the chain, under ``message_id``."""

    def wake_step(self, job_id: str, step: str, registry_id: int, message_id: str) -> None: ...


_current: Dispatcher | None = None


def set_dispatcher(dispatcher: Dispatcher | None) -> None:
    """Use ``dispatcher`` from now on in this process (None: the installed default again)."""
    global _current
    _current = dispatcher


def get_dispatcher() -> Dispatcher:
    """The process's dispatcher: the one set, else the installed ``celery`` entry point."""
    global _current
    if _current is None:
        _current = load_dispatcher(DEFAULT_DISPATCHER)
    return _current


def load_dispatcher(name: str) -> Dispatcher:
    """The dispatcher installed under ``name`` in the ``pushworker.dispatchers`` group."""
    found = entry_points(group=ENTRY_POINT_GROUP, name=name)
    if not found:
        raise PushWorkerError(
            f"no dispatcher named {name!r} is installed ({ENTRY_POINT_GROUP})",
            hint="install pushworker as a package (pip install pushworker, or pip install -e . "
            "in a checkout): the Celery dispatcher is registered by its metadata",
        )
    factory = next(iter(found)).load()
    dispatcher: Dispatcher = factory()
    return dispatcher
