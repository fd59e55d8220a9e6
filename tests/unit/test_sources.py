"""Source specs: every kind parses to one canonical spelling, and a hostile spec (control and
invisible characters, a path out of PUSHWORKER_SOURCES_DIR by ``..`` or a symlink, a registry
reference naming a host of its own) is refused with a specific error, before and at use."""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from worker.core.errors import InvalidReference, SourceImageNotFound, ValidationError
from worker.core.settings import Settings
from worker.core.sources import (
    MAX_SPEC,
    Source,
    SourceKind,
    check_path,
    confined_path,
    docker_source,
    parse_source,
    resolve_path,
)

BASE = Settings.from_env({})
DIGEST = "sha256:" + "ab" * 32


def in_dir(directory: Path | str | None) -> Settings:
    return dataclasses.replace(BASE, sources_dir=None if directory is None else str(directory))


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("docker:app:build", Source(SourceKind.DOCKER, image="app:build")),
        (
            "docker:registry:5000/app:1",
            Source(SourceKind.DOCKER, image="registry:5000/app:1"),
        ),
        (
            "registry:3/team/app:1.2.3",
            Source(SourceKind.REGISTRY, registry_id=3, repository="team/app", tag="1.2.3"),
        ),
        (
            f"registry:3/team/app@{DIGEST}",
            Source(SourceKind.REGISTRY, registry_id=3, repository="team/app", digest=DIGEST),
        ),
        ("oci-layout:app", Source(SourceKind.OCI_LAYOUT, path="app")),
        ("oci-layout:/srv/sources/app", Source(SourceKind.OCI_LAYOUT, path="/srv/sources/app")),
        ("docker-archive:app.tar", Source(SourceKind.DOCKER_ARCHIVE, path="app.tar")),
    ],
)
def test_specs_parse_to_one_canonical_spelling(spec: str, expected: Source) -> None:
    parsed = parse_source(spec)
    assert parsed == expected
    assert str(parsed) == spec
    assert parse_source(str(parsed)) == parsed


def test_a_docker_source_is_stored_as_the_image_it_always_was() -> None:
    assert docker_source("app:build").stored == "app:build"
    assert parse_source("docker:app:build").stored == "app:build"
    assert parse_source("oci-layout:app").stored == "oci-layout:app"
    assert SourceKind.DOCKER.engine == "docker"
    assert {k.engine for k in SourceKind if k is not SourceKind.DOCKER} == {"skopeo"}


@pytest.mark.parametrize(
    ("spec", "error", "words"),
    [
        ("", ValidationError, "1 to 300 characters"),
        ("x" * (MAX_SPEC + 1), ValidationError, "1 to 300 characters"),
        ("app:build", ValidationError, "does not start with a kind"),
        ("Registry:3/app:1", ValidationError, "does not start with a kind"),
        ("oci:app", ValidationError, "does not start with a kind"),
        ("docker:", ValidationError, "is not an image reference"),
        ("docker:app build", ValidationError, "is not an image reference"),
        ("registry:3/team/app", InvalidReference, "neither a tag nor a digest"),
        ("registry:team/app:1", InvalidReference, "does not start with a registry id"),
        ("registry:0/app:1", InvalidReference, "does not start with a registry id"),
        ("registry:03/app:1", InvalidReference, "does not start with a registry id"),
        ("registry:99999999999/app:1", InvalidReference, "does not start with a registry id"),
        ("registry:3/app@sha256:abc", InvalidReference, "64 lower-case hex"),
        (f"registry:3/app@{DIGEST.upper()}", InvalidReference, "64 lower-case hex"),
        ("registry:3/evil.example.com/app:1", InvalidReference, "names a host of its own"),
        ("registry:3/localhost/app:1", InvalidReference, "names a host of its own"),
        ("registry:3/Team/app:1", InvalidReference, "not a valid Docker repository"),
        ("registry:3/app:-bad", InvalidReference, "not a valid Docker tag"),
        ("oci-layout:", ValidationError, "names no path"),
        ("oci-layout:app:latest", ValidationError, "contains ':'"),
        ("docker-archive:a.tar:other/ref", ValidationError, "contains ':'"),
        ("oci-layout:app\nx", ValidationError, "U+000A"),
        ("oci-layout:app\x1b[2J", ValidationError, "U+001B"),
        ("docker:app\x00", ValidationError, "U+0000"),
        ("oci-layout:app\x85", ValidationError, "U+0085"),
        ("oci-layout:app\u2028x", ValidationError, "U+2028"),
        ("oci-layout:\u202eraw.tar", ValidationError, "U+202E"),
        ("oci-layout:a\ud800", ValidationError, "lone surrogate"),
    ],
)
def test_hostile_and_malformed_specs_are_refused(
    spec: str, error: type[ValidationError], words: str
) -> None:
    with pytest.raises(error) as refused:
        parse_source(spec)
    assert words in str(refused.value)


def test_a_non_string_spec_is_refused() -> None:
    with pytest.raises(ValidationError, match="must be a string, not int"):
        parse_source(3)


# --- the sources directory ----------------------------------------------------------------------


@pytest.fixture
def sources(tmp_path: Path) -> Path:
    directory = tmp_path / "sources"
    (directory / "app").mkdir(parents=True)
    (directory / "app" / "oci-layout").write_text('{"imageLayoutVersion": "1.0.0"}')
    (directory / "app.tar").write_bytes(b"tar")
    (tmp_path / "outside").mkdir()
    (tmp_path / "outside" / "oci-layout").write_text("{}")
    (tmp_path / "secret.tar").write_bytes(b"secret")
    return directory


def test_file_sources_are_off_without_the_setting() -> None:
    with pytest.raises(ValidationError, match="PUSHWORKER_SOURCES_DIR is not set"):
        check_path(parse_source("oci-layout:app"), in_dir(None))
    with pytest.raises(ValidationError, match="not an absolute directory"):
        check_path(parse_source("oci-layout:app"), in_dir("relative/dir"))


def test_paths_inside_resolve(sources: Path) -> None:
    conf = in_dir(sources)
    assert resolve_path(parse_source("oci-layout:app"), conf) == str(sources / "app")
    assert resolve_path(parse_source(f"oci-layout:{sources}/app"), conf) == str(sources / "app")
    assert resolve_path(parse_source("docker-archive:./x/../app.tar"), conf) == str(
        sources / "app.tar"
    )
    check_path(parse_source("docker-archive:not-yet-there.tar"), conf)  # may exist on the worker


@pytest.mark.parametrize(
    "path",
    ["../secret.tar", "/etc/passwd", "..", ".", "/", "x/../../secret.tar", "../outside"],
)
def test_paths_outside_are_refused_lexically(sources: Path, path: str) -> None:
    conf = in_dir(sources)
    for kind in ("oci-layout", "docker-archive"):
        source = parse_source(f"{kind}:{path}")
        with pytest.raises(ValidationError, match="outside the sources directory"):
            check_path(source, conf)
        with pytest.raises(ValidationError, match="outside the sources directory"):
            resolve_path(source, conf)


def test_symlinks_out_are_refused_when_saved_and_at_use(sources: Path, tmp_path: Path) -> None:
    conf = in_dir(sources)
    (sources / "link.tar").symlink_to(tmp_path / "secret.tar")
    (sources / "linkdir").symlink_to(tmp_path / "outside")
    (sources / "inner").symlink_to(sources / "app")  # a link that stays inside is fine
    for spec in ("docker-archive:link.tar", "oci-layout:linkdir"):
        with pytest.raises(ValidationError, match="outside the sources directory"):
            check_path(parse_source(spec), conf)
        with pytest.raises(ValidationError, match="outside the sources directory"):
            resolve_path(parse_source(spec), conf)
    assert resolve_path(parse_source("oci-layout:inner"), conf) == str(sources / "app")


def test_a_link_swapped_in_after_enqueue_is_refused_at_use(sources: Path, tmp_path: Path) -> None:
    conf = in_dir(sources)
    source = parse_source("docker-archive:later.tar")
    check_path(source, conf)  # nothing there yet: accepted when the job is created
    (sources / "later.tar").symlink_to(tmp_path / "secret.tar")
    with pytest.raises(ValidationError, match="outside the sources directory"):
        resolve_path(source, conf)


def test_a_colon_brought_in_by_a_link_is_refused_at_use(sources: Path) -> None:
    (sources / "a:b").mkdir()
    (sources / "a:b" / "oci-layout").write_text("{}")
    (sources / "plain-name").symlink_to(sources / "a:b")
    source = parse_source("oci-layout:plain-name")
    check_path(source, in_dir(sources))  # inside: accepted when the job is created
    with pytest.raises(ValidationError, match="path with ':'"):
        resolve_path(source, in_dir(sources))


def test_wrong_types_and_missing_paths_at_use(sources: Path) -> None:
    conf = in_dir(sources)
    with pytest.raises(ValidationError, match="not an OCI image layout"):
        resolve_path(parse_source("oci-layout:app.tar"), conf)
    (sources / "plain").mkdir()
    with pytest.raises(ValidationError, match="not an OCI image layout"):
        resolve_path(parse_source("oci-layout:plain"), conf)
    with pytest.raises(ValidationError, match="not a regular file"):
        resolve_path(parse_source("docker-archive:app"), conf)
    os.mkfifo(sources / "fifo.tar")
    with pytest.raises(ValidationError, match="not a regular file"):
        resolve_path(parse_source("docker-archive:fifo.tar"), conf)
    with pytest.raises(SourceImageNotFound, match="cannot be read"):
        resolve_path(parse_source("docker-archive:gone.tar"), conf)
    with pytest.raises(ValidationError, match="not a file source"):
        confined_path(parse_source("registry:3/app:1"), conf)


# --- properties ---------------------------------------------------------------------------------

_SEGMENT = st.sampled_from(["..", ".", "app", "a b", "x", "", "..."]) | st.text(
    alphabet=st.characters(exclude_characters=":/\x00", exclude_categories=["Cs"]),
    max_size=6,
)


@settings(max_examples=300, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    parts=st.lists(_SEGMENT, min_size=1, max_size=6),
    absolute=st.booleans(),
    kind=st.sampled_from(["oci-layout", "docker-archive"]),
)
def test_no_accepted_path_leaves_the_directory(
    sources: Path, parts: list[str], absolute: bool, kind: str
) -> None:
    """Whatever the segments, a path the parser and the confinement accept lies below the
    sources directory, and so does what it resolves to; anything else is a ValidationError."""
    path = ("/" if absolute else "") + "/".join(parts)
    assume(path)
    conf = in_dir(sources)
    try:
        source = parse_source(f"{kind}:{path}")
        candidate = confined_path(source, conf)
        check_path(source, conf)
    except ValidationError:
        return
    root = str(sources)
    assert os.path.commonpath([candidate, root]) == root and candidate != root
    real = os.path.realpath(candidate)
    assert os.path.commonpath([real, os.path.realpath(root)]) == os.path.realpath(root)


@settings(max_examples=300)
@given(spec=st.text(max_size=80))
def test_any_text_parses_or_is_refused_cleanly(spec: str) -> None:
    """No input makes the parser raise anything but a ValidationError, and what it accepts
    holds no control character and round-trips through its canonical spelling."""
    try:
        source = parse_source(spec)
    except ValidationError as refused:
        assert refused.message
        return
    assert not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in str(source))
    assert parse_source(str(source)) == source


@settings(max_examples=200)
@given(
    host=st.from_regex(r"[a-z]{1,8}\.[a-z]{2,4}(:[0-9]{2,5})?", fullmatch=True),
    rest=st.from_regex(r"[a-z0-9]{1,8}(/[a-z0-9]{1,8}){0,2}", fullmatch=True),
)
def test_a_registry_source_never_names_a_host(host: str, rest: str) -> None:
    """The reference guard for sources: a repository whose first part is a host is refused,
    so the host a promotion reads from always comes from the registry record."""
    with pytest.raises(InvalidReference):
        parse_source(f"registry:3/{host}/{rest}:1")
