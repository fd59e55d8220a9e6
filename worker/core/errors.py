"""The project's error tree.

Every foreign exception (docker-py, requests, SQLAlchemy, the OS) is turned into one of these at a
seam, so the rest of the code, the event log and the CLI speak one language. Each error has a
stable ``code`` (recorded in the event log and documented in docs/operations.md), a message that
says what to fix, and a ``retryable`` flag that the retry policy reads. Messages never contain
credentials: they are built from names, hosts and the registry's own words only.
"""

from __future__ import annotations

from typing import Any


class PushWorkerError(Exception):
    """Root of every error this project raises on purpose."""

    code = "internal_error"
    retryable = False
    #: Exit code of ``pushctl`` when this error ends a command.
    exit_code = 1

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint
        #: What was seen on the way to this error (the engine's and the registry's words when a
        #: refusal was checked), recorded under ``observed``. Descriptions only, never secrets.
        self.observed: dict[str, str] = {}

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_payload(self) -> dict[str, Any]:
        """What the event log keeps of this error."""
        payload: dict[str, Any] = {"error_code": self.code, "error_message": self.message}
        if self.hint:
            payload["hint"] = self.hint
        if self.observed:
            payload["observed"] = dict(self.observed)
        return payload


# --- Input and configuration: the caller must change something; never retried. ---------------


class ValidationError(PushWorkerError):
    """Input that can never succeed as given."""

    code = "invalid_input"
    exit_code = 2


class InvalidMessage(ValidationError):
    """A ``pushworker.submit`` message that does not match the push-request schema."""

    code = "invalid_message"


class UnknownDockerHost(ValidationError):
    """A job names a Docker host that no worker serves."""

    code = "unknown_docker_host"


class InvalidReference(ValidationError):
    code = "invalid_reference"


class ReferenceHostMismatch(ValidationError):
    """The reference would resolve to a host other than the job's registry (the incident)."""

    code = "reference_host_mismatch"


class InvalidRegistry(ValidationError):
    code = "invalid_registry"


class InvalidFallbackChain(ValidationError):
    code = "invalid_fallback_chain"


class NotFound(PushWorkerError):
    code = "not_found"
    exit_code = 3


class RegistryNotFound(NotFound):
    code = "registry_not_found"


class JobNotFound(NotFound):
    code = "job_not_found"


class SourceImageNotFound(NotFound):
    code = "source_image_not_found"


class CredentialError(PushWorkerError):
    """The registry's credential is missing or cannot be read."""

    code = "credential_unavailable"
    exit_code = 4


class SecretKeyMissing(CredentialError):
    code = "secret_key_missing"


class InvalidStateTransition(PushWorkerError):
    """An operator asked for something the job's state does not allow (retry a running job)."""

    code = "invalid_state"
    exit_code = 5


# --- The registry. ------------------------------------------------------------------------------


class RegistryError(PushWorkerError):
    """The registry answered, and refused."""

    code = "registry_error"
    exit_code = 6


class AuthenticationError(RegistryError):
    """The registry rejected the credentials (401/403, unauthorized, denied).

    Its own branch: the fallback chain keys on it, and it is never retried, because the same
    credentials will be rejected again.
    """

    code = "authentication_failed"
    exit_code = 7


class RegistryUnavailable(RegistryError):
    """DNS, TCP, timeout or 5xx: the registry could not be reached. Retried with backoff."""

    code = "registry_unavailable"
    retryable = True
    exit_code = 8


class RegistryThrottled(RegistryUnavailable):
    """HTTP 429 / ``TOOMANYREQUESTS``: the registry asks us to slow down. Retried, and never
    sooner than the registry's ``Retry-After`` (bounded by ``PUSHWORKER_RETRY_MAX``)."""

    code = "registry_throttled"

    def __init__(
        self, message: str, *, hint: str | None = None, retry_after: float | None = None
    ) -> None:
        super().__init__(message, hint=hint)
        #: Seconds the registry asked us to wait (its ``Retry-After``), when it said.
        self.retry_after = retry_after

    def to_payload(self) -> dict[str, Any]:
        payload = super().to_payload()
        if self.retry_after is not None:
            payload["retry_after"] = round(self.retry_after, 3)
        return payload


class RegistryMisbehaved(RegistryError):
    """The engine reported the credential refused, but the registry's own API accepts it when
    asked at once: a flaky registry (or a proxy in front of it), not a wrong password. Retried;
    never a reason to fall back."""

    code = "registry_misbehaved"
    retryable = True
    exit_code = 8


class SourceAuthenticationFailed(RegistryError):
    """The registry a promotion reads from rejected its credential (confirmed over HTTP).

    Not an ``AuthenticationError`` on purpose: the fallback chain is about where an image goes,
    and a source that refuses is never a reason to send the image to another destination.
    Never retried: the same credential will be rejected again."""

    code = "source_authentication_failed"
    exit_code = 7


class RegistryTLSError(RegistryError):
    """The TLS handshake failed (unknown CA, wrong name). Retrying does not fix a certificate."""

    code = "registry_tls_error"
    exit_code = 8


class PushVerificationFailed(RegistryError):
    """The push reported success but the registry does not serve the tag at the pushed digest."""

    code = "push_verification_failed"
    retryable = True


# --- The Docker Engine and our own storage. ------------------------------------------------------


class DockerError(PushWorkerError):
    code = "docker_error"
    exit_code = 9


class DockerUnavailable(DockerError):
    """The Docker Engine does not answer on its socket. Retried with backoff."""

    code = "docker_unavailable"
    retryable = True


class CopierError(PushWorkerError):
    """The image copier (skopeo) could not run, or failed in a way that is not the registry's:
    a missing binary, an unreadable layout or archive. Not retried."""

    code = "copier_error"
    exit_code = 9


class SourceChanged(PushWorkerError):
    """A file source no longer holds the image its job pinned: nothing was tagged. Not retried:
    a new job pins what the file holds now."""

    code = "source_changed"


class StorageError(PushWorkerError):
    code = "storage_error"
    exit_code = 10


class DatabaseUnavailable(StorageError):
    code = "database_unavailable"
    retryable = True


class EventConflict(StorageError):
    """A concurrent writer got in the way: two appends of the same (stream, seq), a deadlock
    the database broke by aborting this transaction, or a job that ended (an operator's cancel)
    after this unit of work read it. Nothing was written; retry."""

    code = "event_conflict"
    retryable = True


class FallbackExhausted(AuthenticationError):
    """Every registry of the job's chain refused the credentials."""

    code = "fallback_exhausted"


class WebhookURLRefused(ValidationError):
    """A webhook URL that may not be delivered to: not http(s), user info, or an address that is
    loopback, private, link-local or otherwise not public, without ``--allow-private`` (SSRF)."""

    code = "webhook_url_refused"


class WebhookUnreachable(PushWorkerError):
    """A webhook receiver that could not be reached, timed out or did not answer 2xx."""

    code = "webhook_unreachable"
    retryable = True
    exit_code = 8


class WorkerLost(PushWorkerError):
    """A step's worker process died too many times while running it."""

    code = "worker_lost"


class FlowStateUnavailable(StorageError):
    """The flow-control state (the broker's Redis) does not answer. The step is deferred, never
    run without its registry's limits."""

    code = "flow_state_unavailable"
    retryable = True


class ThrottledPastDeadline(RegistryThrottled):
    """The job was still waiting for its throttled (or capped) registry when its deadline
    passed. Waiting is not failing before the deadline; after it, the job fails with this."""

    code = "throttled_past_deadline"
    retryable = False
