"""Registry addresses in one canonical spelling, so that every comparison compares like with like.

A host name has many spellings that reach the same place: ``Registry-1.Docker.IO.``,
``registry-1.docker.io:443``, ``docker.io`` in full-width letters. A check that compares one
spelling while the network (DNS, TLS, dockerd) reads another is no check at all: that is how a
Docker Hub host was once saved as a "generic" registry and sent a credential.

``parse_address`` is the one place that turns what an operator typed (or what an old record
stored) into the spelling every other module compares: Docker Hub detection and registry URLs
(``worker.registries``), the reference guard (``worker.core.reference``), the login address and the
connection test.

What it refuses, it refuses rather than guess: user info (``user:pw@``), IPv6 literals (the
engine's reference grammar has no brackets), port 0 or out of range, control characters, and a
dotless host without a port, which Docker reads as a Docker Hub namespace.
"""

from __future__ import annotations

import functools
import re
import unicodedata
from dataclasses import dataclass

import idna

from worker.core.errors import InvalidRegistry
from worker.core.text import has_control

#: Docker Hub's names; every spelling of them (any case, trailing dot, port, IDNA) is Docker Hub.
DOCKER_HUB_HOSTS = frozenset(
    {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}
)
#: Domains whose every host is Docker's own (``auth.docker.io``, ``hub.docker.com`` ...): never
#: a generic registry either.
DOCKER_DOMAINS = ("docker.io", "docker.com")
DEFAULT_PORTS = {"https": 443, "http": 80}

_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", re.DOTALL)
_PORT = re.compile(r"[0-9]{1,5}")
#: A label of digits (or 0x hex) at the end of a host: resolvers read such a host as an IPv4
#: address in any of several spellings (``127.1``, ``0x7f.1``), Docker as a domain name.
_NUMERIC_LABEL = re.compile(r"(?:0x[0-9a-f]*|[0-9]+)")
_DECIMAL_OCTET = re.compile(r"(?:0|[1-9][0-9]{0,2})")


@dataclass(frozen=True)
class Address:
    """A registry's network address in its one canonical spelling."""

    scheme: str  # "https" or "http"
    hostname: str  # lower-case ASCII (IDNA A-labels), no trailing dot
    port: int | None  # None only when it is the scheme's default and may be left out

    @property
    def host(self) -> str:
        """``hostname[:port]``: the canonical form Docker reads as this host."""
        return f"{self.hostname}:{self.port}" if self.port is not None else self.hostname

    @property
    def url(self) -> str:
        return f"{self.scheme}://{self.host}"

    @property
    def connect_port(self) -> int:
        """The TCP port a connection goes to."""
        return self.port if self.port is not None else DEFAULT_PORTS[self.scheme]

    @property
    def is_docker_hub(self) -> bool:
        """Docker Hub or another host of Docker's own, whatever the port."""
        return is_docker_hostname(self.hostname)


def is_docker_hostname(hostname: str) -> bool:
    """True for Docker Hub's names and every host of Docker's own domains (canonical input)."""
    return hostname in DOCKER_HUB_HOSTS or any(
        hostname == domain or hostname.endswith(f".{domain}") for domain in DOCKER_DOMAINS
    )


#: Inputs longer than this are parsed every time, never kept: a valid address is far shorter
#: (IDNA limits a host name to 253 characters), so only padding could make one longer.
_CACHED_LENGTH = 512


def parse_address(url: str) -> Address:
    """The canonical address of ``url`` (``[scheme://]host[:port][/]``), or ``InvalidRegistry``
    saying what to change. Messages never echo user info (it may hold a password)."""
    # A pure function of its text, asked about the same few registries 20 times a job (every
    # reference check, every target built): UTS-46 mapping is most of a step's Python.
    # Refusals are not kept (functools.lru_cache keeps results only), so each says its reason.
    if len(url) <= _CACHED_LENGTH:
        return _parse_address_cached(url)
    return _parse_address(url)


@functools.lru_cache(maxsize=1024)
def _parse_address_cached(url: str) -> Address:
    return _parse_address(url)


def _parse_address(url: str) -> Address:
    if has_control(url):
        raise InvalidRegistry(
            "the registry URL contains a control character",
            hint="give the URL as plain text: scheme://host[:port]",
        )
    # NFKC first, so that full-width ':' '@' '/' and digits are what they look like before
    # anything is split: a look-alike colon must not hide a port from one reader and not another.
    text = unicodedata.normalize("NFKC", url.strip())
    match = _SCHEME.fullmatch(text)
    scheme, rest = (match.group(1).lower(), match.group(2)) if match else ("https", text)
    netloc, _, tail = _split_netloc(rest)
    # Anywhere, not only in the netloc: a password holding '/' or '#' would end the netloc
    # early, and the rest of it must not be echoed in an error either.
    if "@" in text:
        raise InvalidRegistry(
            "the registry URL carries user info (user:password@)",
            hint="give scheme://host[:port] only; set the credential with --username and "
            "--password-stdin (or --credential-ref)",
        )
    shown = f"{scheme}://{netloc}"
    if scheme not in DEFAULT_PORTS:
        raise InvalidRegistry(f"registry URL {shown!r} must use https:// (or http:// if insecure)")
    if tail not in ("", "/"):
        raise InvalidRegistry(
            f"registry URL {shown!r} must be scheme://host[:port] only, without a path, query "
            "or fragment",
            hint="put project paths in the job's repository, credentials in set-credential",
        )
    hostname, port = _split_port(netloc, shown)
    return _address(scheme, _canonical_hostname(hostname, shown), port, shown)


def canonical_host(host: str) -> str:
    """``host[:port]`` (as a reference prefix or a stored record spells it) in canonical form."""
    return parse_address(f"https://{host}").host


def _split_netloc(rest: str) -> tuple[str, str, str]:
    """``(netloc, separator, tail)``: the netloc ends at the first '/', '?' or '#'."""
    for index, char in enumerate(rest):
        if char in "/?#":
            return rest[:index], char, rest[index:]
    return rest, "", ""


def _split_port(netloc: str, shown: str) -> tuple[str, int | None]:
    if netloc.startswith("[") or netloc.count(":") > 1:
        raise InvalidRegistry(
            f"registry URL {shown!r} names an IPv6 address",
            hint="Docker's image references cannot name an IPv6 literal; give the registry a "
            "host name (or an IPv4 address)",
        )
    hostname, colon, digits = netloc.partition(":")
    if not colon:
        return hostname, None
    if not _PORT.fullmatch(digits) or not 1 <= int(digits) <= 65535:
        raise InvalidRegistry(
            f"registry URL {shown!r} has an invalid port",
            hint="give a port from 1 to 65535, or none for the scheme's default",
        )
    return hostname, int(digits)


def _canonical_hostname(hostname: str, shown: str) -> str:
    if not hostname:
        raise InvalidRegistry(f"registry URL {shown!r} has no host")
    try:
        # UTS-46 maps case, full-width forms and the ideographic full stop; STD3 rules keep
        # to letters, digits and hyphens, as Docker's reference grammar does.
        ascii_name = idna.encode(hostname, uts46=True, std3_rules=True).decode("ascii")
    except (idna.IDNAError, UnicodeError):
        raise InvalidRegistry(
            f"registry URL {shown!r} has an invalid host name",
            hint="use letters, digits, '-' and '.' (an internationalised name is fine)",
        ) from None
    # One trailing dot is the DNS root: "docker.io." is docker.io.
    ascii_name = ascii_name.lower().removesuffix(".")
    labels = ascii_name.split(".")
    if "" in labels:
        raise InvalidRegistry(f"registry URL {shown!r} has an empty label in its host name")
    if _NUMERIC_LABEL.fullmatch(labels[-1]) and not _is_dotted_quad(labels):
        raise InvalidRegistry(
            f"registry URL {shown!r} spells an IPv4 address in a way resolvers and Docker read "
            "differently",
            hint="write an IPv4 address as four decimal numbers, e.g. 10.0.0.5",
        )
    return ascii_name


def _is_dotted_quad(labels: list[str]) -> bool:
    return len(labels) == 4 and all(
        _DECIMAL_OCTET.fullmatch(label) and int(label) <= 255 for label in labels
    )


def _address(scheme: str, hostname: str, port: int | None, shown: str) -> Address:
    # Docker reads a first component without '.' or ':' (other than localhost) as a Docker Hub
    # namespace: such a host is kept with an explicit port, or refused without one.
    dotless = "." not in hostname and hostname != "localhost"
    if port is None and dotless:
        raise InvalidRegistry(
            f"registry URL {shown!r} has a host without a dot, which Docker reads as a "
            "Docker Hub namespace, not a registry",
            hint="give the registry's full host name (registry.example.com) or its port "
            "(host:5000)",
        )
    if port == DEFAULT_PORTS[scheme] and not dotless:
        port = None
    return Address(scheme=scheme, hostname=hostname, port=port)
