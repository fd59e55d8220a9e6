"""The skopeo seam: what each call hands skopeo (private files, never a secret on the command
line, nothing of the host's configuration) and how skopeo's own words become the error tree.

The stderr lines below were captured from skopeo 1.9.3 against the project's stack (the TLS and
plain Distribution registries with htpasswd, and small HTTP servers answering 429/503/401)."""

from __future__ import annotations

import os
import stat
import subprocess
from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.support.oci import write_docker_archive, write_oci_layout
from worker.core.credentials import Credential, Secret
from worker.core.errors import (
    AuthenticationError,
    CopierError,
    PushWorkerError,
    RegistryThrottled,
    RegistryTLSError,
    RegistryUnavailable,
    SourceAuthenticationFailed,
    SourceChanged,
    SourceImageNotFound,
)
from worker.seams.registry_http import RegistryEndpoint
from worker.seams.skopeo import (
    CopySource,
    RegistryAccess,
    Skopeo,
    auth_file,
    classify_failure,
    fatal_message,
)

PASSWORD = "s3cret-never-on-argv"
DEST = RegistryAccess(
    RegistryEndpoint(5, "https://127.0.0.1:59837", "127.0.0.1:59837", ca_cert="PEM CA"),
    Credential("pushuser", Secret(PASSWORD), "secret"),
)
SRC_ACCESS = RegistryAccess(
    RegistryEndpoint(4, "http://127.0.0.1:38999", "127.0.0.1:38999", insecure=True),
    Credential("altuser", Secret("other-secret"), "secret"),
)
PROMOTION = CopySource("docker", "127.0.0.1:38999/team/app@sha256:" + "a" * 64, SRC_ACCESS)
LAYOUT = CopySource("oci", "/srv/sources/app")
BLOB = "sha256:736c47c6f3f693afcd71054e3011cf0e81b20b37bc7a47eb4d851f4d3c7dd99f"


def fatal(msg: str) -> str:
    escaped = msg.replace("\\", "\\\\").replace('"', '\\"')
    return f'time="2026-11-30T00:36:01Z" level=fatal msg="{escaped}"\n'


# Captured on the stack (see the module's docstring).
DEST_UNAUTHORIZED = (
    f"copying image 1/2 from manifest list: trying to reuse blob {BLOB} at destination: "
    f"checking whether a blob {BLOB} exists in 127.0.0.1:59837/team/bad: unauthorized: "
    "authentication required"
)
DEST_REFUSED_CONNECTION = (
    f"copying image 1/2 from manifest list: trying to reuse blob {BLOB} at destination: "
    'pinging container registry 127.0.0.1:1: Get "https://127.0.0.1:1/v2/": dial tcp '
    "127.0.0.1:1: connect: connection refused"
)
DEST_503 = (
    f"copying image 1/2 from manifest list: trying to reuse blob {BLOB} at destination: "
    "pinging container registry 127.0.0.1:47503: invalid status code from registry 503 "
    "(Service Unavailable)"
)
DEST_429 = (
    f"copying image 1/2 from manifest list: trying to reuse blob {BLOB} at destination: "
    "pinging container registry 127.0.0.1:47430: too many requests to registry"
)
DEST_UNKNOWN_CA = (
    f"copying image 1/2 from manifest list: trying to reuse blob {BLOB} at destination: "
    'pinging container registry 127.0.0.1:59837: Get "https://127.0.0.1:59837/v2/": x509: '
    "certificate signed by unknown authority"
)
DEST_TIMEOUT = (
    f"copying image 1/2 from manifest list: trying to reuse blob {BLOB} at destination: "
    'pinging container registry 127.0.0.1:59837: Get "https://127.0.0.1:59837/v2/": context '
    "deadline exceeded"
)
SRC_UNAUTHORIZED = (
    "initializing source docker://127.0.0.1:38999/team/app:1: reading manifest 1 in "
    "127.0.0.1:38999/team/app: unauthorized: authentication required"
)
SRC_MISSING = (
    "initializing source docker://127.0.0.1:38999/team/nope:1: reading manifest 1 in "
    "127.0.0.1:38999/team/nope: manifest unknown: manifest unknown"
)
SRC_UNAVAILABLE = (
    'Error parsing image name "docker://127.0.0.1:47401/team/x:1": reading manifest 1 in '
    "127.0.0.1:47401/team/x: unavailable: down"
)
LAYOUT_MISSING = (
    "initializing source oci:/tmp/srcx/nothere:: open /tmp/srcx/nothere/index.json: no such "
    "file or directory"
)
ARCHIVE_IS_DIR = (
    'initializing source docker-archive:/tmp/srcx/app: detecting compression for file "/tmp/srcx/'
    'app": detecting compression: read /tmp/srcx/app: is a directory'
)
DIGEST_MISMATCH = "Digest of source image's manifest would not match destination reference"


@pytest.mark.parametrize(
    ("message", "source", "error", "words"),
    [
        (DEST_UNAUTHORIZED, LAYOUT, AuthenticationError, "registry 5 (127.0.0.1:59837) rejected"),
        (DEST_UNAUTHORIZED, PROMOTION, AuthenticationError, "registry 5"),
        (DEST_REFUSED_CONNECTION, LAYOUT, RegistryUnavailable, "connection refused"),
        (DEST_503, LAYOUT, RegistryUnavailable, "503"),
        (DEST_429, LAYOUT, RegistryThrottled, "too many requests"),
        (DEST_UNKNOWN_CA, LAYOUT, RegistryTLSError, "unknown authority"),
        (DEST_TIMEOUT, LAYOUT, RegistryUnavailable, "deadline exceeded"),
        (SRC_UNAUTHORIZED, PROMOTION, SourceAuthenticationFailed, "source registry 4"),
        (SRC_MISSING, PROMOTION, SourceImageNotFound, "registry 4 (127.0.0.1:38999) has no image"),
        (SRC_UNAVAILABLE, PROMOTION, RegistryUnavailable, "registry 4"),
        (LAYOUT_MISSING, LAYOUT, SourceImageNotFound, "cannot be read"),
        (
            ARCHIVE_IS_DIR,
            CopySource("docker-archive", "/tmp/srcx/app"),
            SourceImageNotFound,
            "is a directory",
        ),
        (DIGEST_MISMATCH, LAYOUT, SourceChanged, "no longer holds the image its job pinned"),
        ("something new", LAYOUT, PushWorkerError, "something new"),
    ],
)
def test_skopeo_words_become_the_error_tree(
    message: str, source: CopySource, error: type[PushWorkerError], words: str
) -> None:
    found = classify_failure(fatal(message), source=source, dest=DEST)
    assert type(found) is error or (error is PushWorkerError and isinstance(found, error))
    assert words in found.message
    assert PASSWORD not in str(found) and "other-secret" not in str(found)


def test_a_source_refusal_is_never_a_destination_refusal() -> None:
    """The fallback chain keys on AuthenticationError: a promotion whose source refuses must
    not move the image to another destination."""
    found = classify_failure(fatal(SRC_UNAUTHORIZED), source=PROMOTION, dest=DEST)
    assert not isinstance(found, AuthenticationError)
    assert found.retryable is False


def test_a_ping_of_the_source_host_is_the_source() -> None:
    pinged = (
        'initializing x: pinging container registry 127.0.0.1:38999: Get "http://127.0.0.1:38999'
        '/v2/": dial tcp 127.0.0.1:38999: connect: connection refused'
    )
    found = classify_failure(fatal(pinged), source=PROMOTION, dest=DEST)
    assert isinstance(found, RegistryUnavailable) and "registry 4" in found.message


def test_fatal_message_unquotes_and_falls_back_to_the_last_line() -> None:
    assert fatal_message(fatal('a "quoted" \\ word')) == 'a "quoted" \\ word'
    assert fatal_message("Getting image source signatures\nboom\n") == "boom"
    assert fatal_message("") == "skopeo failed without a message"


def test_auth_file_holds_one_registry() -> None:
    assert auth_file(DEST) == (
        b'{"auths": {"127.0.0.1:59837": {"auth": "'
        + __import__("base64").b64encode(f"pushuser:{PASSWORD}".encode())
        + b'"}}}'
    )
    anonymous = RegistryAccess(DEST.endpoint, None)
    assert auth_file(anonymous) == b'{"auths": {}}'


class Recorder:
    """Stands in for the process: records what skopeo would get, and what its files were."""

    def __init__(self, code: int = 0, stderr: bytes = b"", digest: str | None = None) -> None:
        self.code, self.stderr, self.digest = code, stderr, digest
        self.argv: list[str] = []
        self.env: dict[str, str] = {}
        self.files: dict[str, tuple[int, bytes]] = {}
        self.call_dir: Path | None = None

    def __call__(
        self, argv: Sequence[str], env: dict[str, str], timeout: float
    ) -> tuple[int, bytes, bytes]:
        self.argv, self.env = list(argv), env
        self.call_dir = Path(env["HOME"]).parent
        for path in self.call_dir.rglob("*"):
            data = path.read_bytes() if path.is_file() else b""
            self.files[str(path.relative_to(self.call_dir))] = (path.stat().st_mode, data)
        self.files["."] = (self.call_dir.stat().st_mode, b"")
        if self.digest is not None:
            (self.call_dir / "digest").write_text(self.digest)
        return self.code, b"", self.stderr


def test_a_copy_passes_credentials_in_private_files_only() -> None:
    runner = Recorder(digest="sha256:" + "b" * 64)
    copied = Skopeo("/usr/bin/skopeo", timeout=60, runner=runner).copy(
        PROMOTION, "127.0.0.1:59837/team/app:1", DEST
    )
    assert copied == "sha256:" + "b" * 64
    argv = " ".join(runner.argv)
    assert PASSWORD not in argv and "other-secret" not in argv
    assert "--src-creds" not in argv and "--dest-creds" not in argv
    for flag in ("--all", "--preserve-digests", "--retry-times 0", "--dest-tls-verify=true",
                 "--src-tls-verify=false", "--policy", "--registries.d"):  # fmt: skip
        assert flag in argv
    assert runner.argv[-2:] == [str(PROMOTION), "docker://127.0.0.1:59837/team/app:1"]
    assert stat.S_IMODE(runner.files["."][0]) == 0o700
    for name in ("dest-auth.json", "src-auth.json"):
        mode, data = runner.files[name]
        assert stat.S_IMODE(mode) == 0o600
        assert b"auths" in data
    assert runner.files["dest-certs/ca.crt"][1] == b"PEM CA"
    assert "src-certs/ca.crt" not in runner.files  # no CA: system roots, not /etc/docker/certs.d
    # Nothing of the worker's environment: an empty home, our registries.conf, no proxy.
    assert set(runner.env) == {"HOME", "XDG_RUNTIME_DIR", "XDG_CONFIG_HOME",
                               "CONTAINERS_REGISTRIES_CONF", "TMPDIR", "PATH"}  # fmt: skip
    assert runner.files["home"][1] == b"" and not any(
        name.startswith("home/") and name != "home/.config" for name in runner.files
    )
    assert runner.call_dir is not None and not runner.call_dir.exists()  # removed afterwards


def test_the_call_directory_is_removed_when_skopeo_fails() -> None:
    runner = Recorder(code=1, stderr=fatal(DEST_UNAUTHORIZED).encode())
    with pytest.raises(AuthenticationError):
        Skopeo(runner=runner).copy(LAYOUT, "127.0.0.1:59837/team/app:1", DEST)
    assert runner.call_dir is not None and not runner.call_dir.exists()


def test_a_copy_without_a_digest_is_an_error() -> None:
    with pytest.raises(CopierError, match="reported no digest"):
        Skopeo(runner=Recorder(digest="")).copy(LAYOUT, "h:1/a:1", DEST)


def test_a_missing_binary_and_a_timeout() -> None:
    with pytest.raises(CopierError, match="not installed at /nonexistent/skopeo"):
        Skopeo("/nonexistent/skopeo").manifest_digest(LAYOUT)

    def slow(argv: Sequence[str], env: dict[str, str], timeout: float) -> tuple[int, bytes, bytes]:
        raise subprocess.TimeoutExpired(list(argv), timeout)

    with pytest.raises(RegistryUnavailable, match="did not finish within 5 s") as late:
        Skopeo(timeout=5, runner=slow).copy(LAYOUT, "h:1/a:1", DEST)
    assert late.value.retryable


# --- the real binary, on local files only (no registry) -----------------------------------------


@pytest.fixture
def _skopeo_installed() -> None:
    """These tests run the real binary: a missing skopeo fails them (scripts/bootstrap
    installs it as root on Debian), it never skips them."""
    if not os.path.exists("/usr/bin/skopeo"):
        pytest.fail("skopeo is missing: apt-get install skopeo (scripts/bootstrap does, as root)")


needs_skopeo = pytest.mark.usefixtures("_skopeo_installed")


@needs_skopeo
def test_the_pin_of_a_layout_is_its_index_digest(tmp_path: Path) -> None:
    image = write_oci_layout(tmp_path / "app", seed=b"pin")
    found = Skopeo().manifest_digest(CopySource("oci", str(image.path)))
    assert found == image.index_digest
    assert set(image.manifests) == {"linux/amd64", "linux/arm64"}


@needs_skopeo
def test_the_pin_of_an_archive_is_stable(tmp_path: Path) -> None:
    archive = write_docker_archive(tmp_path / "app.tar", seed=b"pin")
    source = CopySource("docker-archive", str(archive.path))
    first = Skopeo().manifest_digest(source)
    assert first == Skopeo().manifest_digest(source)
    assert first.startswith("sha256:")


@needs_skopeo
def test_a_missing_layout_is_source_image_not_found(tmp_path: Path) -> None:
    with pytest.raises(SourceImageNotFound, match="cannot be read"):
        Skopeo().manifest_digest(CopySource("oci", str(tmp_path / "nothing")))
