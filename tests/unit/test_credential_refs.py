"""Credential references are confined to the deployment's namespace: an environment prefix and a
credentials directory. Nothing else the worker can read (its settings, its process secrets, any
file outside the directory) is ever returned as a password, at save time or at use."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.cli import cli
from worker.core import credential_refs
from worker.core.credential_refs import check_env_name, check_file_path, read_env, read_file
from worker.core.credentials import parse_reference, resolve_credential
from worker.core.errors import CredentialError
from worker.core.settings import (
    DEFAULT_CREDENTIAL_ENV_PREFIX,
    SETTINGS_ENV_NAMES,
    Settings,
    get_settings,
)
from worker.registries import RegistrySpec, create_registry, list_registries
from worker.store.db import session_scope
from worker.store.models import Registry

BASE = Settings.from_env({})  # every default, none of the developer's environment
OUTSIDE_SECRET = "outside-secret-never-returned"


def with_ns(
    prefix: str = DEFAULT_CREDENTIAL_ENV_PREFIX, directory: str = "/run/secrets"
) -> Settings:
    return dataclasses.replace(BASE, credential_env_prefix=prefix, credentials_dir=directory)


# --- environment variables ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "refusal"),
    [
        ("REGISTRY_CREDENTIAL_HARBOR", None),
        ("REGISTRY_CREDENTIAL_gitlab_2", None),
        ("REGISTRY_CREDENTIAL_", "outside the credential namespace"),  # the prefix alone
        ("GITLAB_TOKEN", "outside the credential namespace"),
        ("registry_credential_harbor", "outside the credential namespace"),  # case differs
        ("PUSHWORKER_SECRET_KEY", "worker's own configuration"),
        ("PUSHWORKER_DATABASE_URL", "worker's own configuration"),
        ("pushworker_secret_key", "worker's own configuration"),
        ("DOCKER_HOST", "worker's own configuration"),
        ("DOCKER_AUTH_CONFIG", "worker's own configuration"),
        ("AWS_SECRET_ACCESS_KEY", "worker's own configuration"),
        ("PGPASSWORD", "worker's own configuration"),
        ("REDIS_PASSWORD", "worker's own configuration"),
        ("", "not an environment variable name"),
        ("REGISTRY_CREDENTIAL_A\0B", "not an environment variable name"),
        ("REGISTRY_CREDENTIAL_A=B", "not an environment variable name"),
        ("REGISTRY_CREDENTIAL_A B", "not an environment variable name"),
        ("1REGISTRY_CREDENTIAL_A", "not an environment variable name"),
        ("REGISTRY_CREDENTIAL_É", "not an environment variable name"),
    ],
)
def test_env_names_table(name: str, refusal: str | None) -> None:
    """Under the default prefix exactly the prefixed, portable, non-reserved names pass."""
    if refusal is None:
        check_env_name(name, with_ns())
    else:
        with pytest.raises(CredentialError, match=refusal):
            check_env_name(name, with_ns())


PREFIXES = ["", "P", "PUSHWORKER_", "pushworker_", "DOCKER_", "AWS_", "PG", "REGISTRY_"]


@pytest.mark.parametrize("prefix", PREFIXES)
@pytest.mark.parametrize("name", [*SETTINGS_ENV_NAMES, "PUSHWORKER_OPERATOR", "DOCKER_CERT_PATH"])
def test_the_workers_settings_are_refused_whatever_the_prefix(prefix: str, name: str) -> None:
    """Even a deployment that sets a prefix covering them cannot read the worker's settings."""
    with pytest.raises(CredentialError, match="worker's own configuration"):
        check_env_name(name, with_ns(prefix))
    with pytest.raises(CredentialError):
        read_env(name, with_ns(prefix), {name: "the-value"})


def test_every_variable_settings_reads_is_refused() -> None:
    """SETTINGS_ENV_NAMES is complete: every name Settings.from_env looks up is refused, so a
    setting added later cannot become readable through a reference by being forgotten."""

    class Recording(Mapping[str, str]):
        """An empty environment that notes every name looked up (``get`` goes through here)."""

        def __init__(self) -> None:
            self.read: set[str] = set()

        def __getitem__(self, key: str) -> str:
            self.read.add(key)
            raise KeyError(key)

        def __iter__(self) -> Iterator[str]:
            return iter(())

        def __len__(self) -> int:
            return 0

    environ = Recording()
    Settings.from_env(environ)
    assert environ.read and environ.read <= set(SETTINGS_ENV_NAMES)
    for name in environ.read:
        for prefix in PREFIXES:
            with pytest.raises(CredentialError):
                check_env_name(name, with_ns(prefix))


def _case_variants(name: str) -> st.SearchStrategy[str]:
    return st.lists(st.booleans(), min_size=len(name), max_size=len(name)).map(
        lambda flips: "".join(c.swapcase() if f else c for c, f in zip(name, flips, strict=True))
    )


RESERVED = st.sampled_from([*SETTINGS_ENV_NAMES, *credential_refs.REFUSED_ENV_NAMES])
ENV_NAMES = st.one_of(
    st.text(max_size=30),
    st.text(alphabet="ABCRGISTY_EDNTAL0\0=a", max_size=30),
    st.builds(lambda s: DEFAULT_CREDENTIAL_ENV_PREFIX + s, st.text(max_size=12)),
    RESERVED.flatmap(_case_variants),
    st.sampled_from(credential_refs.REFUSED_ENV_PREFIXES).flatmap(
        lambda p: st.builds(lambda s: p + s, st.text(alphabet="AZ_09az", max_size=8))
    ),
)


@settings(max_examples=400)
@given(name=ENV_NAMES, prefix=st.sampled_from([DEFAULT_CREDENTIAL_ENV_PREFIX, *PREFIXES]))
def test_property_an_accepted_name_is_inside_the_namespace(name: str, prefix: str) -> None:
    """For any name and prefix: a name is read only if it is portable, starts with the prefix
    (case-sensitively), is longer than it and is not reserved; a refused name's value is never
    returned, and an accepted one returns exactly its own value."""
    environ = {name: "value-of-" + name}
    upper = name.upper()
    inside = (
        credential_refs._ENV_NAME.fullmatch(name) is not None
        and name.startswith(prefix)
        and len(name) > len(prefix)
        and upper not in credential_refs.REFUSED_ENV_NAMES
        and not upper.startswith(credential_refs.REFUSED_ENV_PREFIXES)
        and not upper.startswith("PUSHWORKER_")
    )
    try:
        value = read_env(name, with_ns(prefix), environ)
    except CredentialError:
        assert not inside
    else:
        assert inside and value == environ[name]


# --- files ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tree(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``creds/`` (the credentials directory) next to ``outside/``, with links both ways::

    creds/a               "inside-a"
    creds/sub/b           "inside-b"
    creds/link_in   -> a
    creds/link_out  -> ../outside/secret
    creds/abs_out   -> /<root>/outside/secret
    creds/dir_out   -> ../outside
    creds/fifo            a FIFO
    creds/big             larger than any password
    creds-evil/pw         a sibling whose name starts like the directory's
    outside/secret        OUTSIDE_SECRET
    """
    root = tmp_path_factory.mktemp("refs")
    creds, outside = root / "creds", root / "outside"
    (creds / "sub").mkdir(parents=True)
    outside.mkdir()
    (root / "creds-evil").mkdir()
    (root / "creds-evil" / "pw").write_text(OUTSIDE_SECRET)
    (outside / "secret").write_text(OUTSIDE_SECRET + "\n")
    (creds / "a").write_text("inside-a\n")
    (creds / "sub" / "b").write_text("inside-b")
    (creds / "link_in").symlink_to("a")
    (creds / "link_out").symlink_to("../outside/secret")
    (creds / "abs_out").symlink_to(outside / "secret")
    (creds / "dir_out").symlink_to("../outside")
    os.mkfifo(creds / "fifo")
    (creds / "big").write_bytes(b"x" * (credential_refs.MAX_FILE_BYTES + 1))
    return root


def ns(tree: Path) -> Settings:
    return with_ns(directory=str(tree / "creds"))


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("a", "inside-a"),
        ("{creds}/a", "inside-a"),
        ("sub/b", "inside-b"),
        ("sub/../a", "inside-a"),
        ("./sub/./b", "inside-b"),
        ("link_in", "inside-a"),
        ("{creds}//sub//b", "inside-b"),
    ],
)
def test_files_inside_the_directory_are_read(tree: Path, path: str, expected: str) -> None:
    """Relative paths are taken inside the directory; links that stay inside are followed."""
    path = path.format(creds=tree / "creds")
    check_file_path(path, ns(tree))
    assert read_file(path, ns(tree)) == expected


@pytest.mark.parametrize(
    ("path", "refusal", "at_save"),
    [
        ("../outside/secret", "outside the credentials directory", True),
        ("sub/../../outside/secret", "outside the credentials directory", True),
        ("{root}/outside/secret", "outside the credentials directory", True),
        ("{root}/creds-evil/pw", "outside the credentials directory", True),
        ("/etc/hostname", "outside the credentials directory", True),
        ("{creds}", "outside the credentials directory", True),
        (".", "outside the credentials directory", True),
        ("link_out", "outside the credentials directory", True),
        ("abs_out", "outside the credentials directory", True),
        ("dir_out/secret", "outside the credentials directory", True),
        ("", "not a file path", True),
        ("a\0", "not a file path", True),
        ("sub", "cannot be read|not a regular file", False),
        ("fifo", "not a regular file", False),
        ("big", "larger than", False),
        ("missing", "cannot be read", False),
    ],
)
def test_files_outside_or_unusable_are_refused(
    tree: Path, path: str, refusal: str, at_save: bool
) -> None:
    """Escapes by ``..``, absolute paths, look-alike siblings and links pointing out are refused
    when saved and when read; a directory, FIFO, huge or missing file is refused when read."""
    path = path.format(root=tree, creds=tree / "creds")
    if at_save:
        with pytest.raises(CredentialError, match=refusal):
            check_file_path(path, ns(tree))
    else:
        check_file_path(path, ns(tree))  # may exist only on the worker's host: saved
    with pytest.raises(CredentialError, match=refusal) as refused:
        read_file(path, ns(tree))
    assert OUTSIDE_SECRET not in str(refused.value)


@pytest.mark.parametrize("directory", ["", "run/secrets", "./creds", "/run/\0secrets"])
def test_a_relative_credentials_dir_refuses_every_file(directory: str) -> None:
    """A directory that would depend on the working directory makes no file readable."""
    with pytest.raises(CredentialError, match="PUSHWORKER_CREDENTIALS_DIR"):
        read_file("/etc/hostname", with_ns(directory=directory))


SEGMENTS = st.sampled_from(
    ["..", ".", "", "a", "sub", "b", "link_in", "link_out", "abs_out", "dir_out", "secret",
     "outside", "creds", "creds-evil", "pw", "etc", "hostname", "\0", "A", "LINK_OUT"]
)  # fmt: skip


@settings(max_examples=400, deadline=None)
@given(segments=st.lists(SEGMENTS, max_size=6), absolute=st.booleans(), text=st.text(max_size=8))
def test_property_no_path_reads_outside_the_directory(
    tree: Path, segments: list[str], absolute: bool, text: str
) -> None:
    """For any path built of ``..``, links out, look-alikes, NUL and case tricks (absolute from
    the tree's root, or relative): a read either refuses or returns a file whose real path is
    inside the directory, never the outside secret."""
    path = "/".join([*segments, text] if text else segments)
    if absolute:
        path = f"{tree}/{path}"
    settings_ = ns(tree)
    try:
        value = read_file(path, settings_)
    except CredentialError:
        return
    assert value != OUTSIDE_SECRET and value in ("inside-a", "inside-b")
    real = os.path.realpath(os.path.join(settings_.credentials_dir, path))
    assert real.startswith(str(tree / "creds") + os.sep)


# --- save time and use time through the records -----------------------------------------------


@pytest.fixture
def namespace(tree: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.setenv("PUSHWORKER_CREDENTIALS_DIR", str(tree / "creds"))
    monkeypatch.delenv("PUSHWORKER_CREDENTIAL_ENV_PREFIX", raising=False)
    get_settings.cache_clear()
    yield tree


@pytest.mark.parametrize(
    ("reference", "setting"),
    [
        ("env:PUSHWORKER_SECRET_KEY", "PUSHWORKER_CREDENTIAL_ENV_PREFIX"),
        ("env:GITLAB_TOKEN", "PUSHWORKER_CREDENTIAL_ENV_PREFIX"),
        ("file:/etc/hostname", "PUSHWORKER_CREDENTIALS_DIR"),
        ("file:link_out", "PUSHWORKER_CREDENTIALS_DIR"),
    ],
)
def test_saving_a_reference_outside_is_refused_naming_the_setting(
    namespace: Path, sqlite_url: str, reference: str, setting: str
) -> None:
    """``registry add``/``update`` refuse it with a hint naming the setting to change."""
    with pytest.raises(CredentialError) as refused:
        parse_reference(reference)
    assert setting in (refused.value.hint or "")
    spec = RegistrySpec(
        name="r", url="https://r.example.com", username="u", credential_ref=reference
    )
    with (
        pytest.raises(CredentialError, match=r"outside|own configuration"),
        session_scope() as session,
    ):
        create_registry(session, spec)
    with session_scope() as session:
        assert list_registries(session) == []


def old_record(kind: str, target: str) -> Registry:
    """A record as stored before the confinement existed: kind and target, never checked."""
    return Registry(
        id=7, name="old", url="http://127.0.0.1:9", host="127.0.0.1:9", username="u",
        auth_required=True, credential_kind=kind, credential_ref=target,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("kind", "target"),
    [
        ("env", "PUSHWORKER_SECRET_KEY"),
        ("env", "pushworker_secret_key"),
        ("env", "DOCKER_HOST"),
        ("file", "/etc/hostname"),
        ("file", "../outside/secret"),
        ("file", "link_out"),
    ],
)
def test_a_stored_reference_outside_is_refused_at_use(
    namespace: Path, monkeypatch: pytest.MonkeyPatch, kind: str, target: str
) -> None:
    """The authoritative check: resolving an old record refuses it, and the error names the
    registry and the reference but carries no value."""
    monkeypatch.setenv("pushworker_secret_key", "lower-case-copy")
    secret_key = get_settings().secret_key or ""
    with pytest.raises(CredentialError, match=r"registry 7 \(old\)") as refused:
        resolve_credential(old_record(kind, target))
    text = f"{refused.value} {refused.value.to_payload()}"
    for value in (secret_key, "lower-case-copy", OUTSIDE_SECRET, Path("/etc/hostname").read_text()):
        assert value.strip() not in text


def test_a_reference_inside_resolves_at_use(
    namespace: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The namespace is usable: an allowed variable and file give the password."""
    monkeypatch.setenv("REGISTRY_CREDENTIAL_OLD", "pw-from-env")
    from_env = resolve_credential(old_record("env", "REGISTRY_CREDENTIAL_OLD"))
    from_file = resolve_credential(old_record("file", "sub/b"))
    assert from_env is not None and from_env.password.reveal() == "pw-from-env"
    assert from_file is not None and from_file.password.reveal() == "inside-b"


@pytest.mark.parametrize(
    ("reference", "setting"),
    [
        ("env:PUSHWORKER_SECRET_KEY", "PUSHWORKER_CREDENTIAL_ENV_PREFIX"),
        ("file:/etc/hostname", "PUSHWORKER_CREDENTIALS_DIR"),
    ],
)
def test_registry_add_refuses_a_reference_outside_with_exit_4_and_the_hint(
    namespace: Path, sqlite_url: str, reference: str, setting: str
) -> None:
    """``pushctl registry add --credential-ref`` outside the namespace: exit code 4 (credential
    error), the hint names the setting, and nothing is saved."""
    args = ["registry", "add", "r", "https://r.example.com", "--username", "u", "--no-test",
            "--credential-ref", reference]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == CredentialError.exit_code, result.output
    assert setting in result.output + result.stderr
    with session_scope() as session:
        assert list_registries(session) == []
