"""One canonical spelling of registry hosts (``worker.core.hostnames``), proved over generated
spellings: every spelling of a Docker Hub host is Docker Hub, every spelling of an ordinary host
is that host, and what cannot be kept exactly is refused."""

from __future__ import annotations

import pytest
from docker.auth import resolve_repository_name
from hypothesis import given
from hypothesis import strategies as st

from worker.core.errors import InvalidRegistry
from worker.core.hostnames import DOCKER_HUB_HOSTS, canonical_host, parse_address
from worker.registries import parse_registry_url
from worker.store.models import RegistryKind

#: A DNS label in Docker's domain grammar.
# IDNA reserves hyphens in the third and fourth places for its own A-labels ("xn--"): a label
# such as "ab--c" is not a host name, and is refused as one (a case of the table below).
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True).filter(
    lambda label: label[2:4] != "--"
)
TLD = st.sampled_from(["com", "net", "example", "internal", "cloud"])


def _full_width(char: str) -> str:
    # U+FF01..U+FF5E are full-width forms of U+0021..U+007E; NFKC and UTS-46 fold them back.
    return chr(ord(char) + 0xFEE0) if "!" <= char <= "~" else char


@st.composite
def spelled(draw: st.DrawFn, hostname: str) -> str:
    """``hostname`` spelled as an operator, a copy-paste or an attacker might: any case per
    letter, full-width letters, digits and dots, ideographic full stops, one trailing dot."""
    chars = []
    for char in hostname:
        variant = draw(st.sampled_from(["same", "upper", "full", "full-upper", "ideographic"]))
        if char == "." and variant == "ideographic":
            chars.append("\u3002")
        elif variant in ("upper", "full-upper"):
            upper = char.upper()
            chars.append(_full_width(upper) if variant == "full-upper" else upper)
        elif variant == "full":
            chars.append(_full_width(char))
        else:
            chars.append(char)
    return "".join(chars) + draw(st.sampled_from(["", ".", "\uff0e"]))


@st.composite
def url_of(draw: st.DrawFn, hostname: str, port: int | None, scheme: str = "https") -> str:
    """A URL of ``hostname`` with a spelled host, scheme in any case (or none for https), the
    port as given or the scheme's default written out, and an optional trailing slash."""
    host = draw(spelled(hostname))
    default = {"https": 443, "http": 80}[scheme]
    written = port if port is not None else draw(st.sampled_from([None, default]))
    if written is not None:
        digits = str(written)
        if draw(st.booleans()):
            digits = "".join(_full_width(d) for d in digits)
        colon = draw(st.sampled_from([":", "\uff1a"]))  # full-width colon too
        host = f"{host}{colon}{digits}"
    prefix = draw(st.sampled_from([f"{scheme}://", f"{scheme.upper()}://"]))
    if scheme == "https" and draw(st.booleans()):
        prefix = ""
    return f"{prefix}{host}{draw(st.sampled_from(['', '/']))}"


HUB_URL = st.sampled_from(sorted(DOCKER_HUB_HOSTS)).flatmap(lambda h: url_of(h, None))
ORDINARY = st.tuples(st.lists(LABEL, min_size=1, max_size=3), TLD).map(
    lambda parts: ".".join([*parts[0], parts[1]])
)
PORT = st.one_of(st.none(), st.integers(1, 65535))


@given(url=HUB_URL, kind=st.sampled_from(["generic", "harbor", "gitlab"]))
def test_every_spelling_of_docker_hub_is_docker_hub(url: str, kind: str) -> None:
    """Case, trailing dots, default ports, full-width forms: still Docker Hub, so refused as
    any other kind, and the one Docker Hub address for kind dockerhub."""
    with pytest.raises(InvalidRegistry, match="Docker Hub"):
        parse_registry_url(url, kind=kind, insecure=False)
    address = parse_registry_url(url, kind=RegistryKind.DOCKERHUB, insecure=False)
    assert (address.url, address.host) == ("https://registry-1.docker.io", "docker.io")


@given(data=st.data(), hostname=ORDINARY, port=PORT)
def test_every_spelling_of_an_ordinary_host_is_that_host(
    data: st.DataObject, hostname: str, port: int | None
) -> None:
    """Any spelling of host[:port] normalises to lower-case ASCII without a trailing dot or a
    default port; Docker reads the result as exactly that host; normalising again changes
    nothing."""
    url = data.draw(url_of(hostname, port))
    address = parse_registry_url(url, kind="generic", insecure=False)
    expected = hostname if port in (None, 443) else f"{hostname}:{port}"
    assert address.host == expected
    assert address.url == f"https://{expected}"
    assert resolve_repository_name(f"{address.host}/team/app") == (address.host, "team/app")
    assert parse_registry_url(address.url, kind="generic", insecure=False) == address
    assert canonical_host(address.host) == address.host


@given(data=st.data(), hostname=ORDINARY)
def test_plain_http_drops_only_its_own_default_port(data: st.DataObject, hostname: str) -> None:
    """:80 is http's default (dropped), :443 is not (kept): the port a connection uses stays."""
    url = data.draw(url_of(hostname, None, scheme="http"))
    assert parse_registry_url(url, kind="generic", insecure=True).host == hostname
    kept = parse_registry_url(f"http://{hostname}:443", kind="generic", insecure=True)
    assert kept.host == f"{hostname}:443"


#: A dotless name that is not a number (a number alone is an IPv4 address to a resolver, and
#: refused as such: see the table below).
WORD = LABEL.filter(lambda label: label != "localhost" and not label.isdigit())
WORD = WORD.filter(lambda label: not label.startswith("0x"))


@given(label=WORD, port=PORT)
def test_a_dotless_host_needs_a_port(label: str, port: int | None) -> None:
    """Docker reads a first component without '.' or ':' as a Docker Hub namespace: refused
    without a port, kept (with the port, even the default one) with it."""
    if port is None:
        with pytest.raises(InvalidRegistry, match="Docker Hub namespace"):
            parse_registry_url(f"https://{label}", kind="generic", insecure=False)
        return
    address = parse_registry_url(f"https://{label}:{port}", kind="generic", insecure=False)
    assert address.host == f"{label}:{port}"
    assert resolve_repository_name(f"{address.host}/app")[0] == address.host


def test_international_names_become_a_labels() -> None:
    """IDNA (UTS-46): what the resolver and TLS will use, in the form Docker's grammar takes."""
    assert canonical_host("B\u00fccher.Example:5000") == "xn--bcher-kva.example:5000"
    assert canonical_host("xn--bcher-kva.example:5000") == "xn--bcher-kva.example:5000"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("https://[::1]:5000", "IPv6"),
        ("https://::1:5000", "IPv6"),
        ("https://[2001:db8::1]", "IPv6"),
        ("https://:pw@reg.example.com", "user info"),
        ("https://user:pw@reg.example.com", "user info"),
        ("https://user:p/w@reg.example.com", "user info"),  # '/' in the password
        ("https://user:p#w@reg.example.com", "user info"),
        ("https://reg.example.com\uff20evil.com", "user info"),  # full-width '@'
        ("https://reg.example.com:0", "invalid port"),
        ("https://reg.example.com:65536", "invalid port"),
        ("https://reg.example.com:", "invalid port"),
        ("https://reg.example.com:-1", "invalid port"),
        ("https://reg.example.com:+5", "invalid port"),
        ("https://reg.example.com:5000:6000", "IPv6"),
        ("https://myregistry", "Docker Hub namespace"),
        ("myregistry", "Docker Hub namespace"),
        ("https://reg\x00.example.com", "control character"),
        ("https://reg.example.com\x1b[2J", "control character"),
        ("https://reg.example.com\n", "control character"),
        ("https://reg_1.example.com", "invalid host name"),
        ("https://-reg.example.com", "invalid host name"),
        ("https://reg..example.com", "invalid host name"),
        ("https://reg.example.com..", "invalid host name"),
        ("https://xn--zz.example.com", "invalid host name"),
        ("https://ab--c.example.com", "invalid host name"),
        ("https://127.1:5000", "IPv4"),
        ("https://0x7f.0.0.1:5000", "IPv4"),
        ("https://2130706433:5000", "IPv4"),
        ("https://127.0.0.01:5000", "IPv4"),
        ("https://256.0.0.1:5000", "IPv4"),
        ("https://0:5000", "IPv4"),
        ("https://", "no host"),
        ("https://reg.example.com/v2/", "without a path"),
        ("https://reg.example.com?x=1", "without a path"),
        ("ftp://reg.example.com", "https://"),
    ],
)
def test_what_cannot_be_kept_exactly_is_refused(url: str, message: str) -> None:
    """User info, IPv6 literals, bad ports, control characters, odd IPv4 spellings, paths."""
    with pytest.raises(InvalidRegistry, match=message) as refused:
        parse_address(url)
    for secret in ("pw", "p/w", "p#w"):
        assert f":{secret}@" not in str(refused.value)


@pytest.mark.parametrize(
    "url", ["https://registry-1.docker.io:5000", "http://docker.io", "https://hub.docker.com"]
)
def test_docker_hub_is_only_its_one_address(url: str) -> None:
    """A Docker host on another port or another of Docker's names is no dockerhub record."""
    with pytest.raises(InvalidRegistry):
        parse_registry_url(url, kind=RegistryKind.DOCKERHUB, insecure=True)
    with pytest.raises(InvalidRegistry, match="Docker"):
        parse_registry_url(url, kind="generic", insecure=True)


def test_a_remembered_answer_is_the_same_answer_and_a_refusal_is_never_remembered() -> None:
    """``parse_address`` keeps its answers (a job asks about the same registry 20 times): a kept
    answer equals a fresh parse, a refusal is raised again with its reason, and a text padded
    beyond any valid address is parsed without being kept."""
    from worker.core import hostnames

    url = "https://Reg.Example.COM.:5000/"
    assert parse_address(url) is parse_address(url)  # the second one was kept
    assert parse_address(url) == hostnames._parse_address(url)
    for _ in range(2):
        with pytest.raises(InvalidRegistry, match="user info"):
            parse_address("https://u:pw@reg.example.com")
    padded = "https://reg.example.com" + " " * 600
    before = hostnames._parse_address_cached.cache_info().currsize
    assert parse_address(padded).host == "reg.example.com"
    assert hostnames._parse_address_cached.cache_info().currsize == before
