"""The one seam in front of skopeo, the copier of every source that is not the Docker Engine
(another registry, an OCI layout, a docker-archive tarball). Nothing else runs it.

Each call runs in a fresh private directory (0700), removed afterwards, holding everything
skopeo may read:

* ``src-auth.json`` / ``dest-auth.json`` (0600): the one credential of each side, passed with
  ``--src-authfile``/``--dest-authfile``. Never on the command line, where ``ps`` shows it.
* ``src-certs`` / ``dest-certs``: the registry record's CA bundle, or nothing (system roots).
  Always given, so ``/etc/docker/certs.d`` and ``/etc/containers/certs.d`` are never read.
* an empty ``HOME`` (also ``XDG_RUNTIME_DIR`` and ``XDG_CONFIG_HOME``): no
  ``~/.docker/config.json`` or ``auth.json`` of the host can add or change a credential;
* an empty ``registries.conf`` (``CONTAINERS_REGISTRIES_CONF``) and ``registries.d``: no mirror
  or search list of the host can redirect a read; an accept-all ``policy.json`` of our own;
* nothing else of the worker's environment (no proxy variable, no secret key).

``--retry-times 0``: the project's retry policy decides about retries, with its backoff and its
event log. skopeo's stderr (``level=fatal msg="..."``) is turned into the error tree
(``worker.seams.classify``), with the side (source or destination) that failed.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from worker.core import tracing
from worker.core.credentials import Credential
from worker.core.errors import (
    AuthenticationError,
    CopierError,
    PushWorkerError,
    RegistryError,
    RegistryUnavailable,
    SourceAuthenticationFailed,
    SourceChanged,
    SourceImageNotFound,
)
from worker.seams.classify import classify_registry_message
from worker.seams.registry_http import RegistryEndpoint

Side = Literal["source", "destination"]
#: What runs a command: (argv, env, timeout) -> (exit code, stdout, stderr). ``subprocess.run``
#: by default; unit tests replay skopeo's captured answers.
Runner = Callable[[Sequence[str], dict[str, str], float], tuple[int, bytes, bytes]]

_FATAL = re.compile(r'level=fatal msg="((?:[^"\\]|\\.)*)"')
_NOT_FOUND = re.compile(
    r"manifest unknown|name unknown|no such file or directory|not found|is a directory"
    r"|no such image",
    re.IGNORECASE,
)
_DIGEST_MISMATCH = "would not match destination reference"
_SOURCE_WORDS = ("initializing source", "reading blob", "reading manifest")


@dataclass(frozen=True)
class RegistryAccess:
    """One registry side of a copy: where it is and the credential to use (None: anonymous)."""

    endpoint: RegistryEndpoint
    credential: Credential | None


@dataclass(frozen=True)
class CopySource:
    """What to copy from, as skopeo names it: ``docker`` (a registry, with ``registry`` set;
    ``reference`` is ``host/repository@digest`` or ``:tag``), ``oci`` (a layout directory) or
    ``docker-archive`` (a tarball); for the last two ``reference`` is the resolved path."""

    transport: Literal["docker", "oci", "docker-archive"]
    reference: str
    registry: RegistryAccess | None = None

    def __str__(self) -> str:
        return f"{self.transport}:{'//' if self.transport == 'docker' else ''}{self.reference}"


class Skopeo:
    """skopeo 1.9, one process per call."""

    def __init__(
        self,
        binary: str = "/usr/bin/skopeo",
        *,
        timeout: float = 1800,
        runner: Runner | None = None,
    ) -> None:
        self.binary = binary
        self.timeout = timeout
        self._run = runner or _subprocess_runner

    def manifest_digest(self, source: CopySource) -> str:
        """The digest of the top manifest ``source`` holds (an image index for a multi-arch
        image): the bytes skopeo reads, hashed here, so what is pinned is what is copied."""
        with _span("skopeo inspect", source, source.registry), _call_dir() as call:
            args = ["inspect", "--raw", "--retry-times", "0"]
            if source.registry is not None:
                args += _access_flags(call, "", source.registry, side="src")
            raw = self._invoke(call, [*args, str(source)], source=source)
        return "sha256:" + hashlib.sha256(raw).hexdigest()

    def copy(self, source: CopySource, destination: str, access: RegistryAccess) -> str:
        """Copy ``source`` whole (every platform of an index, digests preserved) to
        ``docker://destination`` (``host/repository:tag`` or ``@digest``); the digest the
        destination now serves, as skopeo wrote it."""
        with _span("skopeo copy", source, access) as span, _call_dir() as call:
            args = ["copy", "--quiet", "--all", "--preserve-digests", "--retry-times", "0"]
            args += ["--digestfile", str(call / "digest")]
            if source.registry is not None:
                args += _access_flags(call, "src-", source.registry, side="src")
            args += _access_flags(call, "dest-", access, side="dest")
            self._invoke(
                call, [*args, str(source), f"docker://{destination}"], source=source, dest=access
            )
            digest = (call / "digest").read_text().strip()
            if not re.fullmatch(r"sha256:[0-9a-f]{64}", digest):
                raise CopierError(f"skopeo copied to {destination} but reported no digest")
            tracing.set_attributes({tracing.DIGEST: digest}, span)
        return digest

    def _invoke(
        self,
        call: Path,
        args: list[str],
        *,
        source: CopySource,
        dest: RegistryAccess | None = None,
    ) -> bytes:
        # skopeo stops itself a little before we would kill it, so its own words say why.
        argv = [self.binary, "--policy", str(call / "policy.json"), "--registries.d",
                str(call / "registries.d"), "--tmpdir", str(call / "tmp"),
                "--command-timeout", f"{max(1, int(self.timeout) - 1)}s", *args]  # fmt: skip
        try:
            code, out, err = self._run(argv, _environment(call), self.timeout)
        except FileNotFoundError:
            raise CopierError(
                f"skopeo is not installed at {self.binary}",
                hint="install Debian's skopeo (scripts/bootstrap), or set PUSHWORKER_SKOPEO",
            ) from None
        except subprocess.TimeoutExpired:
            raise RegistryUnavailable(
                f"copying {source} did not finish within {self.timeout:.0f} s",
                hint="the step retries; raise PUSHWORKER_PUSH_TIMEOUT for very large images",
            ) from None
        tracing.set_attributes({"process.exit.code": code})
        if code != 0:
            raise classify_failure(err.decode(errors="replace"), source=source, dest=dest)
        return out


def _span(name: str, source: CopySource, registry: RegistryAccess | None) -> Any:
    """A span of one skopeo run: the source's transport, the registry written to (or read
    from), never the command line (its paths are private, its flags name the auth files)."""
    return tracing.span(
        name,
        attributes={
            "process.executable.name": "skopeo",
            "pushworker.source.transport": source.transport,
            tracing.REGISTRY_HOST: registry.endpoint.host if registry else None,
            tracing.REGISTRY_ID: registry.endpoint.id if registry else None,
        },
    )


def _subprocess_runner(
    argv: Sequence[str], env: dict[str, str], timeout: float
) -> tuple[int, bytes, bytes]:
    done = subprocess.run(  # a fixed binary, arguments built here, no shell
        list(argv),
        env=env,
        capture_output=True,
        timeout=timeout,
        check=False,
        stdin=subprocess.DEVNULL,
    )
    return done.returncode, done.stdout, done.stderr


# --- the per-call directory ---------------------------------------------------------------------


@contextmanager
def _call_dir() -> Iterator[Path]:
    """A private directory for one skopeo run, removed whatever happens (secrets included)."""
    call = Path(tempfile.mkdtemp(prefix="pushworker-skopeo-"))  # 0700
    try:
        for name in ("home", "home/.config", "registries.d", "tmp"):
            (call / name).mkdir(mode=0o700)
        (call / "registries.conf").write_text("")
        (call / "policy.json").write_text('{"default":[{"type":"insecureAcceptAnything"}]}')
        yield call
    finally:
        shutil.rmtree(call, ignore_errors=True)


def _environment(call: Path) -> dict[str, str]:
    home = str(call / "home")
    return {
        "HOME": home,
        "XDG_RUNTIME_DIR": home,
        "XDG_CONFIG_HOME": str(call / "home" / ".config"),
        "CONTAINERS_REGISTRIES_CONF": str(call / "registries.conf"),
        "TMPDIR": str(call / "tmp"),
        "PATH": "/usr/bin:/bin",
    }


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def auth_file(access: RegistryAccess) -> bytes:
    """The containers-auth.json(5) document for one registry: its credential, or none."""
    auths: dict[str, dict[str, str]] = {}
    if access.credential is not None:
        pair = f"{access.credential.username}:{access.credential.password.reveal()}"
        auths[access.endpoint.host] = {"auth": base64.b64encode(pair.encode()).decode()}
    return json.dumps({"auths": auths}).encode()


def _access_flags(call: Path, prefix: str, access: RegistryAccess, *, side: str) -> list[str]:
    """``--{prefix}authfile``, ``--{prefix}cert-dir`` and ``--{prefix}tls-verify`` for one side
    (``prefix`` is ``src-``, ``dest-``, or empty for ``inspect``)."""
    authfile = call / f"{side}-auth.json"
    _write_private(authfile, auth_file(access))
    certs = call / f"{side}-certs"
    certs.mkdir(mode=0o700)
    endpoint = access.endpoint
    if endpoint.ca_cert:
        (certs / "ca.crt").write_text(endpoint.ca_cert)
    verify = endpoint.url.startswith("https://") and not endpoint.insecure
    return [
        f"--{prefix}authfile", str(authfile),
        f"--{prefix}cert-dir", str(certs),
        f"--{prefix}tls-verify={'true' if verify else 'false'}",
    ]  # fmt: skip


# --- skopeo's words -> the error tree -----------------------------------------------------------


def fatal_message(stderr: str) -> str:
    """The last ``level=fatal msg="..."`` of skopeo's stderr, unquoted; else its last line."""
    found = _FATAL.findall(stderr)
    if found:
        return re.sub(r"\\(.)", r"\1", found[-1])
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else "skopeo failed without a message"


def failed_side(message: str, source: CopySource, dest: RegistryAccess | None) -> Side:
    """Which side ``message`` is about: skopeo words source failures "initializing source",
    "reading manifest/blob"; a ping names its host; everything else is the destination."""
    if dest is None or any(words in message for words in _SOURCE_WORDS):
        return "source"
    pinged = re.search(r"pinging container registry (\S+?):? ", message)
    if pinged and source.registry is not None:
        host = pinged.group(1)
        if host == source.registry.endpoint.host and host != dest.endpoint.host:
            return "source"
    return "destination"


def classify_failure(
    stderr: str, *, source: CopySource, dest: RegistryAccess | None
) -> PushWorkerError:
    """The project's error for a failed skopeo run, from its stderr."""
    message = fatal_message(stderr)
    if _DIGEST_MISMATCH in message:
        return SourceChanged(
            f"{source} no longer holds the image its job pinned: nothing was tagged",
            hint="enqueue a new job to push what it holds now",
        )
    side = failed_side(message, source, dest)
    if side == "source" and source.registry is None:
        # A layout or an archive: the file, not a registry.
        if _NOT_FOUND.search(message):
            return SourceImageNotFound(
                f"{source} cannot be read: {message}",
                hint="put the image at that path on the worker's host, then retry the job",
            )
        return CopierError(f"skopeo cannot read {source}: {message}")
    access = source.registry if side == "source" else dest
    assert access is not None  # a registry side: the source's registry, or the destination
    label = f"{access.endpoint.id} ({access.endpoint.host})"
    if side == "source" and _NOT_FOUND.search(message) and "unauthorized" not in message:
        return SourceImageNotFound(
            f"registry {label} has no image {source.reference}: {message}",
            hint="check the source's repository and tag or digest",
        )
    error: RegistryError = classify_registry_message(message, registry=label)
    if side == "source" and isinstance(error, AuthenticationError):
        # Not an AuthenticationError: a source that refuses is never a reason to fall back.
        return SourceAuthenticationFailed(
            f"source registry {label} rejected the credentials: {message}",
            hint=f"check registry {access.endpoint.id}'s credential "
            f"(pushctl registry set-credential {access.endpoint.id}), then retry the job",
        )
    return error
