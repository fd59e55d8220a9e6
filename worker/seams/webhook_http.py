"""The one seam in front of webhook receivers: a foreign system reached over HTTP (httpx).

Each call sends one POST signed per Standard Webhooks (the ``standardwebhooks`` package's own
``Webhook.sign``): ``webhook-id`` (the same for every attempt of a delivery),
``webhook-timestamp`` and ``webhook-signature``. The outcome is a plain ``WebhookResult``: a
status code, the latency, and an error of the project's tree (``WebhookUnreachable``,
``WebhookURLRefused``), never an httpx exception.

SSRF: the receiver's host is resolved here, every address it resolves to is checked (loopback,
private, link-local, cloud metadata and every other non-public range are refused unless the
subscription allows private addresses), and the request is sent to the checked address itself,
with the URL's host in ``Host`` and in TLS' SNI and certificate check, so a DNS answer that
changes between the check and the connection (rebinding) cannot redirect it. Redirects are never
followed.
"""

from __future__ import annotations

import base64
import ipaddress
import secrets
import socket
import ssl
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from urllib.parse import SplitResult, urlsplit, urlunsplit

import httpx
from standardwebhooks import Webhook

from worker.core.credentials import Secret
from worker.core.errors import PushWorkerError, WebhookUnreachable, WebhookURLRefused
from worker.core.text import CONTROL

#: Longest URL a subscription may have (the column's length).
MAX_URL = 2000
#: At most this much of a receiver's answer is read (and then dropped).
MAX_ANSWER_BYTES = 64 * 1024
USER_AGENT = "pushworker-webhooks/1"
#: Cloud metadata services, named in refusals (they are link-local or private anyway).
METADATA_ADDRESSES = frozenset(
    {
        ipaddress.ip_address("169.254.169.254"),
        ipaddress.ip_address("169.254.170.2"),
        ipaddress.ip_address("100.100.100.200"),
        ipaddress.ip_address("fd00:ec2::254"),
    }
)

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def new_secret() -> str:
    """A fresh signing secret in Standard Webhooks' form: ``whsec_`` and 32 random bytes,
    base64."""
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


def sign(secret: Secret, message_id: str, timestamp: datetime, body: str) -> str:
    """The ``webhook-signature`` header's value (``v1,<base64 HMAC-SHA256>``)."""
    return Webhook(secret.reveal()).sign(message_id, timestamp, body)


def parse_url(url: str) -> SplitResult:
    """``url`` split, or ``WebhookURLRefused`` unless it is ``http(s)://host[:port]/...`` with no
    user info and no control character. Never resolves anything."""
    if not url or len(url) > MAX_URL or CONTROL.search(url) or " " in url:
        raise WebhookURLRefused(
            f"a webhook URL must be 1 to {MAX_URL} characters without spaces or control characters"
        )
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise WebhookURLRefused("the webhook URL cannot be parsed") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookURLRefused("a webhook URL must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise WebhookURLRefused(
            "a webhook URL may not carry user info (it would be shown in listings)",
            hint="authenticate the sender by its signature (docs/webhooks.md)",
        )
    if port == 0:
        raise WebhookURLRefused("a webhook URL may not name port 0")
    return parts


def refusal_reason(address: Address) -> str | None:
    """Why ``address`` is not a public one (None: it is)."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return refusal_reason(address.ipv4_mapped)
    if address in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_private:
        return "a private address"
    if address.is_multicast or address.is_unspecified or address.is_reserved:
        return "not a unicast address"
    if not address.is_global:
        return "not a public address"
    return None


def resolve(host: str, port: int) -> list[Address]:
    """Every address ``host`` resolves to (an IP literal: itself), or ``WebhookUnreachable``."""
    try:
        return [ipaddress.ip_address(host.strip("[]"))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        raise WebhookUnreachable(f"the webhook host {host} does not resolve: {exc}") from None
    found: list[Address] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%", 1)[0])
        if address not in found:
            found.append(address)
    if not found:
        raise WebhookUnreachable(f"the webhook host {host} resolves to no address")
    return found


def checked_addresses(url: str, *, allow_private: bool) -> list[Address]:
    """The addresses a delivery to ``url`` may connect to: every address of its host, each
    checked by the SSRF rule (one refused address refuses the URL)."""
    parts = parse_url(url)
    host = parts.hostname or ""
    port = parts.port or (443 if parts.scheme == "https" else 80)
    addresses = resolve(host, port)
    if not allow_private:
        for address in addresses:
            reason = refusal_reason(address)
            if reason is not None:
                raise WebhookURLRefused(
                    f"the webhook host {host} resolves to {address}, {reason}",
                    hint="give a public URL, or --allow-private for a receiver you run on purpose",
                )
    return addresses


@dataclass(frozen=True)
class WebhookRequest:
    """One attempt of one delivery: plain values, never a database row."""

    url: str
    #: The ``webhook-id`` header: the delivery's, the same on every attempt.
    message_id: str
    #: The JSON body, exactly as signed and sent.
    body: str
    secret: Secret
    allow_private: bool
    #: Seconds the whole attempt may take (resolve, connect, send, answer).
    timeout: float


@dataclass(frozen=True)
class WebhookResult:
    """What one attempt gave: the receiver's status code (None: no answer), the time it took,
    and the error (None: a 2xx answer)."""

    status_code: int | None
    latency_ms: float
    error: PushWorkerError | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


class HttpxSender:
    """The real receiver seam: httpx, one short-lived client per attempt (no pooled connection
    outlives the address check it was made for)."""

    def __init__(self, *, verify: bool | ssl.SSLContext = True) -> None:
        #: True: the system's CAs; an ``ssl.SSLContext`` for a private CA (the tests').
        self.verify = verify

    def send(self, request: WebhookRequest) -> WebhookResult:
        started = time.monotonic()
        try:
            status = self._send(request, started)
        except PushWorkerError as error:
            return WebhookResult(None, _since(started), error)
        latency = _since(started)
        if 200 <= status < 300:
            return WebhookResult(status, latency)
        return WebhookResult(
            status, latency, WebhookUnreachable(f"the receiver answered HTTP {status}")
        )

    def _send(self, request: WebhookRequest, started: float) -> int:
        deadline = started + request.timeout
        addresses = checked_addresses(request.url, allow_private=request.allow_private)
        parts = urlsplit(request.url)
        now = datetime.now(UTC)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": parts.netloc,
            "webhook-id": request.message_id,
            "webhook-timestamp": str(int(now.timestamp())),
            "webhook-signature": sign(request.secret, request.message_id, now, request.body),
        }
        refused: httpx.ConnectError | None = None
        # Each checked address in turn while none accepts a connection (``localhost`` may
        # resolve to ::1 first and listen on 127.0.0.1 only); any other failure ends the attempt.
        for address in addresses:
            if time.monotonic() >= deadline:
                break
            try:
                return self._post(request, parts, address, headers, deadline)
            except httpx.ConnectError as exc:
                refused = exc
            except httpx.TimeoutException:
                raise WebhookUnreachable(
                    f"the receiver did not answer within {request.timeout:g} s"
                ) from None
            except httpx.HTTPError as exc:
                raise WebhookUnreachable(_unreachable(exc)) from None
        if refused is not None:
            raise WebhookUnreachable(_unreachable(refused)) from None
        raise WebhookUnreachable(f"the receiver did not answer within {request.timeout:g} s")

    def _post(
        self,
        request: WebhookRequest,
        parts: SplitResult,
        address: Address,
        headers: dict[str, str],
        deadline: float,
    ) -> int:
        """One POST to ``address`` itself, with the URL's host in ``Host``, SNI and the
        certificate check."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        netloc = f"{literal}:{parts.port}" if parts.port else literal
        pinned = urlunsplit((parts.scheme, netloc, parts.path or "/", parts.query, ""))
        remaining = max(deadline - time.monotonic(), 0.001)
        with (
            httpx.Client(
                timeout=httpx.Timeout(remaining), verify=self.verify, follow_redirects=False,
                trust_env=False,
            ) as client,
            client.stream(
                "POST", pinned, content=request.body.encode(), headers=headers,
                extensions={"sni_hostname": parts.hostname or ""},
            ) as response,
        ):  # fmt: skip
            read = 0
            for chunk in response.iter_raw():
                read += len(chunk)
                if read >= MAX_ANSWER_BYTES or time.monotonic() > deadline:
                    break  # the status is known; a long or trickled answer is not waited on
            if time.monotonic() > deadline and read < MAX_ANSWER_BYTES:
                raise WebhookUnreachable(
                    f"the receiver took more than {request.timeout:g} s to answer"
                )
            return response.status_code


def _unreachable(exc: Exception) -> str:
    return f"the receiver could not be reached: {type(exc).__name__}: {_short(exc)}"


def _since(started: float) -> float:
    return round((time.monotonic() - started) * 1000, 3)


def _short(exc: Exception) -> str:
    return str(exc).replace("\n", " ")[:200]
