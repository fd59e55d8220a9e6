"""Per-registry flow control: when a step may talk to its registry, and how the limit adapts.

The policy (this module) decides; where the counters live is a seam
(``worker.seams.protocols.FlowState``, Redis in ``worker.seams.limiter``), so every worker on every
host sees the same slots.

- **Slots**: the push step holds one of its registry's slots for its upload only (``upload``):
  taken after the step's claim has committed and its image was inspected, right before the
  engine's (or skopeo's) first request, and released as soon as that call returns, after the
  registry's last write and before the step checks the digest the registry serves and records
  its outcome; the registry counts nothing else. Whether a slot is free is asked before the
  claim (``admit``), so a step that would wait is not claimed and its wait is not a try; a slot
  taken by someone else between that answer and the upload (the claim and the inspect take
  tens of milliseconds) gives the claim back and waits (``SlotTaken``). The lease is renewed
  every third of ``PUSHWORKER_FLOW_LEASE`` while the upload runs; a dead worker's slot frees
  when its lease runs out, and every other way out of the upload releases it. The limit is the
  registry's ``max_concurrent``, lowered by the adaptive cap below. A registry with no cap still
  takes a slot (with no limit), so the concurrency a 429 arrived at is known.
- **Rate**: login and push each count one request against ``rate_per_second`` (a moving window
  of the ``limits`` library). It paces step starts, not every HTTP request the engine makes.
- **Waiting**: a step refused a slot or a request is not run and not counted as a try: the task
  is re-queued with a countdown, so the worker's pool slot serves other registries meanwhile.
  Up to the job's deadline; then ``throttled_past_deadline``.
- **Hand-over**: a released slot (success or failure) is reserved, in the same Redis script
  that frees it, for the registry's first waiter, whose step the releasing worker publishes at
  once (``wake``, under a ``WAKE_PREFIX`` message id). Only that waiter may take the reserved
  slot (its wake message or its own, whichever comes first), so the slot is neither idle until
  a countdown ends nor taken by whoever polls first, and the cap holds (a reservation counts as
  a holder). A wake message that finds no slot for it stops quietly: it never waits, its
  waiter's own message does. A reservation not taken within ``_reservation()`` seconds frees
  the slot and drops that waiter from the queue. The waiter's own message asks again after
  ``PUSHWORKER_FLOW_POLL`` per round of pushes ahead of it (see ``_poll``). When the hand-over's
  run ends the job (succeeded, failed, moved to a fallback), that own message has nothing left
  to do: it is marked (``supersede``) and stops on arrival without a database transaction;
  while the job goes on (a retry), it stays the waiter's safety net.
- **AIMD**: a 429 halves the registry's effective limit (from the concurrency it arrived at, at
  most once per ``DECREASE_COOLDOWN`` seconds after the last decrease, floor 1); each success
  met while the limit was full adds 1/limit, so the limit grows by one per "limit" such
  successes (8 times more slowly once it is one below the concurrency the registry last
  refused), up to the configured cap (or, for a registry with none, up to
  ``PUSHWORKER_FLOW_UNCAPPED_CEILING``, where the adaptive cap is dropped). Each change of the
  whole-number limit is reported (``CapChange``) for a ``registry.throttled`` /
  ``registry.unthrottled`` event.
"""

from __future__ import annotations

import math
import random
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Literal

from worker.core.errors import FlowStateUnavailable, RegistryThrottled
from worker.core.logs import get_logger
from worker.core.settings import Settings
from worker.seams.limiter import SlotGrant
from worker.seams.protocols import FlowState
from worker.store.models import PushJob, Registry

log = get_logger("pushworker.flow")

#: The steps that hold a registry slot while they act (the upload), and those that count against
#: the registry's request rate. Login is one /v2/ round trip: paced by the rate, not by a slot.
SLOT_STEPS = frozenset({"push"})
RATE_STEPS = frozenset({"login", "push"})
#: Seconds after a decrease during which further 429s do not lower the limit again (the 429s of
#: requests already in flight answer the old limit).
DECREASE_COOLDOWN = 5.0
#: The "cap" of a registry without one: a slot is still taken, to know the concurrency.
UNLIMITED = 1_000_000
#: How much more slowly the limit grows once it is one below the concurrency last refused.
PROBE_SLOWDOWN = 8.0
#: The message id of a step published to take a reserved slot starts with this.
WAKE_PREFIX = "flow-wake-"
#: The longest countdown of a waiting step, in ``PUSHWORKER_FLOW_POLL`` units.
MAX_POLL_ROUNDS = 10.0


#: Publishes a woken waiter's step at once: (job_id, step, registry_id, message_id).
Waker = Callable[[str, str, int, str], None]


@dataclass(frozen=True)
class Admission:
    granted: bool
    countdown: float = 0.0
    reason: str = ""
    ahead: int = 0
    holders: int = 0
    limit: int | None = None
    #: True on the first refusal of a wait: record ``step.waiting`` once per wait.
    first: bool = False
    #: True when the refused message is a wake (``WAKE_PREFIX``): it stops, never waits.
    woken: bool = False
    #: What the step waits for: "slot" (the concurrency) or "rate" (the request rate).
    kind: Literal["slot", "rate", ""] = ""


@dataclass(frozen=True)
class CapChange:
    type: Literal["registry.throttled", "registry.unthrottled"]
    registry_id: int
    previous_limit: int | None
    limit: int | None
    max_concurrent: int | None
    reason: str

    def payload(self) -> dict[str, object]:
        return {
            "previous_limit": self.previous_limit,
            "effective_limit": self.limit,
            "max_concurrent": self.max_concurrent,
            "reason": self.reason,
        }


@dataclass
class Upload:
    """What one step's ``upload`` did with its registry's slot, for the step's runner."""

    #: Whether the step asked for its slot. One that never did (the registry served the tag
    #: already, or the step failed before its upload) leaves its place in the queue, and a slot
    #: kept for it, to the next waiter.
    asked: bool = False
    #: The limit's changes its upload met, to record once the slot is free.
    changes: list[CapChange] = field(default_factory=list)


class SlotTaken(Exception):  # control flow, as dramatiq's Retry: not an error
    """The slot a step was told was free before its claim went to another step before its
    upload: the step gives its claim back and waits (``admission`` says how long and why)."""

    def __init__(self, admission: Admission) -> None:
        super().__init__(admission.reason)
        self.admission = admission


def deadline_of(job: PushJob, settings: Settings) -> datetime:
    """The job's own deadline, or its creation plus ``PUSHWORKER_FLOW_DEADLINE``."""
    if job.deadline_at is not None:
        return job.deadline_at
    return job.created_at + timedelta(seconds=settings.flow_deadline)


class FlowControl:
    def __init__(
        self,
        state: FlowState,
        settings: Settings,
        *,
        clock: Callable[[], float] = time.time,
        rng: random.Random | None = None,
        wake: Waker | None = None,
    ) -> None:
        self.state, self.settings, self.clock = state, settings, clock
        self.rng = rng or random.Random()
        #: Publishes a woken waiter's step now: (job_id, step, registry_id, message_id).
        self.wake = wake
        #: True: a release keeps the waiters it reserved slots for in ``handed`` (the worker
        #: process that released runs their steps itself, see tasks/push.py), not published.
        self.keep_handed = False
        self.handed: list[tuple[int, str]] = []

    @staticmethod
    def applies(step: str) -> bool:
        return step in SLOT_STEPS or step in RATE_STEPS

    # --- the limit -------------------------------------------------------------------------------

    def limit(self, registry: Registry) -> int | None:
        """The registry's effective limit now: its cap, lowered by the adaptive cap."""
        adaptive = self.state.adaptive_cap(registry.id)
        configured = registry.max_concurrent
        if adaptive is None:
            return configured
        lowered = max(1, math.floor(adaptive.cap))
        return lowered if configured is None else min(configured, lowered)

    # --- admission -------------------------------------------------------------------------------

    def admit(
        self,
        registry: Registry,
        job_id: str,
        step: str,
        *,
        message_id: str | None = None,
        requeued_as: str | None = None,
    ) -> Admission:
        """Before a step's claim: whether its registry has a slot for it now (push; asked, not
        taken: ``upload`` takes it) and a request of the rate (login, push, taken), or how long
        to wait. ``message_id``: the delivering message's id (a first delivery's), to know a
        wake. ``requeued_as``: the id the step is re-queued under if it must wait (the
        delivering message's own), kept for ``supersede``."""
        limit = self.limit(registry)
        wake = message_id is not None and message_id.startswith(WAKE_PREFIX)
        if step in SLOT_STEPS:
            grant = self.state.acquire(
                registry.id, f"{job_id}:{step}:ask", f"{job_id}:{step}",
                UNLIMITED if limit is None else limit,
                lease=self.settings.flow_lease, waiter_ttl=self._waiter_ttl(), wake=wake,
                take=False, message_id=None if wake else requeued_as,
            )  # fmt: skip
            if not grant.granted:
                return self._refused(registry, grant, limit, wake=wake)
        if step in RATE_STEPS and registry.rate_per_second:
            wait = self.state.take_request(registry.id, registry.rate_per_second)
            if wait > 0:
                return Admission(
                    False,
                    countdown=wait + self.rng.uniform(0, 0.1),
                    reason=f"registry {registry.id} at its rate of {registry.rate_per_second:g}/s",
                    limit=limit,
                    first=self.state.first_rate_wait(
                        registry.id, f"{job_id}:{step}", ttl=max(self._waiter_ttl(), wait * 3)
                    ),
                    kind="rate",
                )
        return Admission(True, limit=limit)

    def _refused(
        self, registry: Registry, grant: SlotGrant, limit: int | None, *, wake: bool
    ) -> Admission:
        return Admission(
            False,
            countdown=self._poll(grant.ahead, limit),
            reason=f"registry {registry.id} at its limit of {limit}, {grant.ahead} ahead",
            ahead=grant.ahead,
            holders=grant.holders,
            limit=limit,
            first=grant.first_refusal,
            woken=wake,
            kind="slot",
        )

    @contextmanager
    def upload(self, registry: Registry, job_id: str, step: str, use: Upload) -> Iterator[None]:
        """Hold one of the registry's slots while the body runs: the requests the registry
        counts as a push (the engine's or skopeo's upload, up to its manifest), and nothing
        before or after them. Taken on entry (``SlotTaken`` if it went to someone else since
        ``admit`` said it was free); released on every way out, handed over to the first
        waiter. A confirmed 429 in the body, or its success, adjusts the limit while the slot
        is still held (the concurrency it met); ``use`` says that the step asked and keeps the
        limit's changes for the caller to record once the slot is free."""
        use.asked = True
        limit = self.limit(registry)
        holder = f"{job_id}:{step}:{uuid.uuid4().hex[:12]}"
        grant = self.state.acquire(
            registry.id, holder, f"{job_id}:{step}", UNLIMITED if limit is None else limit,
            lease=self.settings.flow_lease, waiter_ttl=self._waiter_ttl(),
        )  # fmt: skip
        if not grant.granted:
            raise SlotTaken(self._refused(registry, grant, limit, wake=False))
        with self.holding(registry, holder):
            try:
                yield
            except RegistryThrottled as throttled:
                if type(throttled) is RegistryThrottled:  # not a subclass (a source's 429)
                    use.changes.extend(_quietly(self.on_throttled, registry, throttled.message))
                raise
            use.changes.extend(_quietly(self.on_success, registry))

    def forget(self, registry: Registry, job_id: str, step: str) -> None:
        """The job stops waiting (it failed, moved, or its step is done or runs elsewhere): its
        place in the queue goes, and a slot reserved for it goes to the next waiter at once
        (else it would idle until the reservation's lease ends)."""
        self.state.forget_waiter(registry.id, f"{job_id}:{step}")
        if self.wake is not None:
            self.release(registry, "")  # no holder: only hands free slots over

    def release(self, registry: Registry, holder: str) -> None:
        """Free the slot and hand it over: reserve it for the registry's first waiter and
        publish that waiter's step now (with no way to publish, a plain release)."""
        try:
            if self.wake is None:
                self.state.release(registry.id, holder)
                return
            limit = self.limit(registry)
            waiters = self.state.hand_over(
                registry.id, holder, UNLIMITED if limit is None else limit,
                reservation=self._reservation(), waiter_ttl=self._waiter_ttl(),
                # A limit that grew since the last release frees more than this slot.
                most=max(1, limit or 1),
            )  # fmt: skip
        except FlowStateUnavailable as exc:
            # The lease frees it; nothing is leaked.
            log.warning("flow.release_failed", registry_id=registry.id, error=exc.message)
            return
        for waiter in waiters:
            if self.keep_handed:
                self.handed.append((registry.id, waiter))
            else:
                self.wake_waiter(registry.id, waiter)

    def supersede(self, registry: Registry, job_id: str, step: str) -> None:
        """A hand-over's run (a wake message, or a take-over) ended the waiter's job: the
        message the waiter was re-queued under will only find it ended, so it is marked to stop
        on arrival (``superseded``) instead of opening a transaction to record a skip."""
        self.state.supersede(registry.id, f"{job_id}:{step}", ttl=self._waiter_ttl())

    def superseded(self, registry: Registry, job_id: str, step: str, message_id: str) -> bool:
        """True, once, for the waiter's message a hand-over's run made pointless."""
        return self.state.take_superseded(registry.id, f"{job_id}:{step}", message_id)

    def take_handed(self) -> list[tuple[int, str]]:
        """The (registry id, waiter) pairs released slots were reserved for since the last call."""
        handed, self.handed = self.handed, []
        return handed

    def wake_waiter(self, registry_id: int, waiter: str) -> None:
        """Publish a waiter's step to take the slot reserved for it."""
        assert self.wake is not None
        job_id, _, step = waiter.rpartition(":")
        try:
            self.wake(job_id, step, registry_id, WAKE_PREFIX + uuid.uuid4().hex)
        except Exception as exc:  # the broker may be down: the waiter's countdown still runs
            log.warning("flow.wake_failed", registry_id=registry_id, error=type(exc).__name__)
            with suppress(FlowStateUnavailable):  # else the reservation's own lease frees it
                self.state.cancel_reservation(registry_id, waiter)

    @contextmanager
    def holding(self, registry: Registry, holder: str | None) -> Iterator[None]:
        """Keep the slot's lease alive while the body runs, then release it."""
        if holder is None:
            yield
            return
        registry_id = registry.id
        stop = threading.Event()
        lease = self.settings.flow_lease

        def renew() -> None:
            while not stop.wait(lease / 3):
                try:
                    if not self.state.renew(registry_id, holder, lease=lease):
                        log.warning("flow.lease_lost", registry_id=registry_id, holder=holder)
                except FlowStateUnavailable as exc:
                    log.warning("flow.renew_failed", registry_id=registry_id, error=exc.message)

        renewer = threading.Thread(target=renew, name="flow-lease", daemon=True)
        renewer.start()
        try:
            yield
        finally:
            stop.set()
            renewer.join(timeout=5)
            self.release(registry, holder)

    # --- AIMD ------------------------------------------------------------------------------------

    def on_throttled(self, registry: Registry, reason: str) -> CapChange | None:
        """A confirmed 429: halve the effective limit (from the concurrency it arrived at)."""
        current = self.state.adaptive_cap(registry.id)
        previous = self.limit(registry)
        if current is not None and self._now() - current.decreased_at < DECREASE_COOLDOWN:
            # Only a decrease starts the cooldown: increases come with every success, and a
            # 429 right after one must still lower the limit.
            return None
        # The concurrency the registry refused: its holders (this step's slot included).
        holders = self.state.holders(registry.id)
        if current is not None:
            base = current.cap
        else:
            base = float(min(filter(None, (registry.max_concurrent, holders)), default=1))
        new = max(1.0, math.floor(base / 2))
        if registry.max_concurrent is not None:
            new = min(new, float(registry.max_concurrent))
        if current is not None and new >= current.cap:
            return None
        expected = None if current is None else current.cap
        if not self.state.swap_cap(registry.id, expected, new, refused_at=max(holders, 1)):
            return None  # another worker reacted to the same 429 first
        limit = self.limit(registry)
        if limit == previous:
            return None
        return CapChange(
            "registry.throttled", registry.id, previous, limit, registry.max_concurrent, reason
        )

    def on_success(self, registry: Registry) -> CapChange | None:
        """A push went through: additive increase, one per ``limit`` successes."""
        current = self.state.adaptive_cap(registry.id)
        if current is None:
            return None
        previous = self.limit(registry)
        if previous is not None and self.state.holders(registry.id) < previous:
            # Fewer pushes than the limit: no evidence the registry takes more (RFC 7661's
            # reasoning for an idle congestion window), so the limit does not grow meanwhile.
            return None
        ceiling = registry.max_concurrent or self.settings.flow_uncapped_ceiling
        step = 1.0 / max(current.cap, 1.0)
        if current.refused_at is not None and current.cap + 1 >= current.refused_at:
            # Near the concurrency the registry last refused: probe it PROBE_SLOWDOWN times more
            # slowly, so a registry with a fixed limit is not pushed over it every few pushes.
            step /= PROBE_SLOWDOWN
        raised = current.cap + step
        new: float | None = None if raised >= ceiling else raised
        if not self.state.swap_cap(registry.id, current.cap, new):
            return None
        limit = self.limit(registry)
        if limit == previous:
            return None
        reason = "back at its configured limit" if new is None else "pushes succeed again"
        return CapChange(
            "registry.unthrottled", registry.id, previous, limit, registry.max_concurrent, reason
        )

    # --- helpers ---------------------------------------------------------------------------------

    def _poll(self, ahead: int, limit: int | None) -> float:
        """About when a slot may be free for this waiter: ``PUSHWORKER_FLOW_POLL`` per round of
        ``limit`` pushes ahead of it, from a fifth to ``MAX_POLL_ROUNDS`` polls, jittered. The
        first waiters ask again soon: a wake message is published behind every message already
        queued, while a countdown's message runs when it is due, so the head of the queue often
        takes the slot reserved for it by its own message."""
        rounds = (ahead + 1) / max(limit or 1, 1)
        base = self.settings.flow_poll * min(max(rounds, 0.2), MAX_POLL_ROUNDS)
        return base * self.rng.uniform(0.8, 1.2)

    def _waiter_ttl(self) -> float:
        # Well over the longest countdown with its jitter (it was under it: the queue's tail
        # lost its place between two polls and recorded its wait again); a waiter that stopped
        # asking is dropped when a reservation for it goes untaken anyway.
        return max(10.0, self.settings.flow_poll * MAX_POLL_ROUNDS * 3)

    def _reservation(self) -> float:
        # Long enough for the wake message to come through a busy queue, short enough that a
        # lost one idles the slot briefly; never longer than a holder's own lease.
        return min(self.settings.flow_lease, max(3.0, 3 * self.settings.flow_poll))

    def _now(self) -> float:
        return self.clock()


def _quietly(function: Callable[..., CapChange | None], *args: object) -> list[CapChange]:
    """A limit adjustment whose failure (Redis away) must not fail the step: the limit stays."""
    try:
        change = function(*args)
    except FlowStateUnavailable as exc:
        log.warning("flow.unavailable", error=exc.message)
        return []
    return [] if change is None else [change]
