"""The target reference guard: a push can only ever name the registry record's own host."""

from __future__ import annotations

import pytest
from docker.auth import resolve_repository_name
from hypothesis import given
from hypothesis import strategies as st

from worker.core.errors import InvalidReference, ReferenceHostMismatch
from worker.core.reference import assert_resolves_to, build_target, check_registry_host

COMPONENT = st.from_regex(r"[a-z0-9]{1,8}(?:[._-][a-z0-9]{1,8}){0,2}", fullmatch=True)
REPOSITORY = st.lists(COMPONENT, min_size=1, max_size=4).map("/".join)
TAG = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,20}", fullmatch=True)
#: A DNS label in Docker's domain grammar (letters, digits, inner hyphens).
LABEL = st.from_regex(r"[a-z0-9](?:[a-z0-9-]{0,6}[a-z0-9])?", fullmatch=True)
#: Registry hosts in canonical spelling (worker.core.hostnames), as records store them.
HOST = st.one_of(
    st.builds(
        lambda a, b, p: f"{a}.{b}:{p}",
        LABEL,
        st.sampled_from(["com", "io"]),
        st.integers(1, 65535).filter(lambda p: p != 443),
    ),
    st.builds(lambda p: f"127.0.0.1:{p}", st.integers(1, 65535)),
    st.just("localhost:5000"),
)


@given(host=HOST, repository=REPOSITORY, tag=TAG)
def test_built_reference_resolves_to_the_registry_host(
    host: str, repository: str, tag: str
) -> None:
    """Whatever the repository, Docker resolves the built reference to the registry's host."""
    first = repository.split("/", 1)[0]
    if "/" in repository and "." in first:
        with pytest.raises(InvalidReference):
            build_target(host, repository, tag)
        return
    target = build_target(host, repository, tag)
    assert resolve_repository_name(target.name) == (host, repository)
    assert str(target) == f"{host}/{repository}:{tag}"


@pytest.mark.parametrize(
    ("repository", "tag", "why"),
    [
        ("", "v1", "empty"),
        ("Team/App", "v1", "upper case"),
        ("team/../app", "v1", ".."),
        ("team/app;rm -rf /", "v1", "shell metacharacters"),
        ("t\u0435am/app", "v1", "cyrillic e, a look-alike"),
        ("evil.example.com/app", "v1", "names another host"),
        ("localhost/app", "v1", "names localhost"),
        ("registry-1.docker.io/library/app", "v1", "names Docker Hub"),
        ("team/app", "", "empty tag"),
        ("team/app", "-v1", "tag starting with -"),
        ("team/app", "v1@sha256:abc", "digest in tag"),
        ("team/app", "x" * 129, "tag too long"),
        ("a/" * 130 + "b", "v1", "name too long"),
    ],
)
def test_bad_references_are_refused(repository: str, tag: str, why: str) -> None:
    """Malformed or hostile references get a specific error before anything is tagged."""
    with pytest.raises(InvalidReference):
        build_target("127.0.0.1:5000", repository, tag)


def test_an_unqualified_name_is_refused_because_it_means_docker_hub() -> None:
    """The incident's mechanism: a bare name resolves to docker.io, so the guard refuses it."""
    with pytest.raises(ReferenceHostMismatch, match=r"docker\.io"):
        assert_resolves_to("team/app", "reg.cyfee.com:10443", "team/app")


def test_docker_hub_record_resolves_to_docker_io() -> None:
    """An explicit Docker Hub record (host docker.io) passes the guard for its own pushes."""
    target = build_target("docker.io", "someone/app", "v1")
    assert resolve_repository_name(target.name)[0] == "docker.io"


@given(repository=st.text(max_size=80), tag=st.text(max_size=40))
def test_any_text_is_refused_or_resolves_to_the_registry(repository: str, tag: str) -> None:
    """Whatever a producer sends, the guard either refuses it or pins it to the registry host."""
    host = "reg.cyfee.com:10443"
    try:
        target = build_target(host, repository, tag)
    except InvalidReference:
        return
    assert resolve_repository_name(target.name) == (host, repository)


@pytest.mark.parametrize(
    "host",
    [
        "registry-1.docker.io.",  # a record saved before trailing dots were normalised
        "Registry-1.Docker.IO",
        "index.docker.io:443",
        "registry-1.docker.io",  # Docker's own, but only "docker.io" is a dockerhub record
        "auth.docker.io",
        "reg.example.com:443",  # default port: the canonical form leaves it out
        "reg.example.com.",
        "myregistry",  # Docker reads it as a Docker Hub namespace
        "::1:5000",  # what urlsplit once stored for https://[::1]:5000
        "127.1:5000",
        "reg.example.com:0",
        "xn--zz.example.com",
        "\uff44ocker.io",  # full-width d
    ],
)
def test_a_registry_host_not_in_canonical_spelling_is_refused(host: str) -> None:
    """The guard compares canonical spellings only: any other host is refused before a
    reference is built, whatever Docker would make of it."""
    with pytest.raises(ReferenceHostMismatch):
        build_target(host, "team/app", "v1")
    with pytest.raises(ReferenceHostMismatch):
        assert_resolves_to(f"{host}/team/app", host, "team/app")


@pytest.mark.parametrize(
    "host", ["docker.io", "reg.example.com", "myregistry:5000", "localhost", "127.0.0.1:5000"]
)
def test_canonical_hosts_pass_the_host_check(host: str) -> None:
    assert check_registry_host(host) == host
