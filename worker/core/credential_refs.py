"""Credential references (``env:NAME``, ``file:PATH``), confined to a namespace the deployment
chooses: environment variables starting with ``PUSHWORKER_CREDENTIAL_ENV_PREFIX`` and regular
files inside ``PUSHWORKER_CREDENTIALS_DIR``.

A reference is checked twice: when it is saved (``check_env_name`` / ``check_file_path``: a clear
error for the operator) and when the worker reads it (``read_env`` / ``read_file``: the
authoritative check, since a record may predate the confinement or come from a machine with other
settings). Nothing outside the namespace is ever read, so nothing outside it can be sent to a
registry. Error texts name the reference and the setting, never a value.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Mapping

from worker.core.errors import CredentialError
from worker.core.paths import strictly_inside
from worker.core.settings import SETTINGS_ENV_NAMES, Settings

PREFIX_SETTING = "PUSHWORKER_CREDENTIAL_ENV_PREFIX"
DIR_SETTING = "PUSHWORKER_CREDENTIALS_DIR"

#: Prefixes never readable through ``env:``, whatever PUSHWORKER_CREDENTIAL_ENV_PREFIX is: the
#: worker's own settings and engine access, Celery and metrics, the database and broker clients'
#: password variables, and the cloud and CI credentials a worker's environment commonly holds.
REFUSED_ENV_PREFIXES = (
    "PUSHWORKER_",
    "DOCKER_",
    "CELERY_",
    "PROMETHEUS_",
    "PG",  # libpq: PGPASSWORD, PGPASSFILE, PGSERVICEFILE
    "POSTGRES_",
    "REDIS_",
    "AWS_",
    "AZURE_",
    "GOOGLE_",
    "VAULT_",
)
#: Exact names refused likewise (compared ignoring case, like the prefixes).
REFUSED_ENV_NAMES = frozenset(
    {
        *SETTINGS_ENV_NAMES,
        "REDISCLI_AUTH",
        "DATABASE_URL",
        "BROKER_URL",
        "SECRET_KEY",
        "GITHUB_TOKEN",
        "GH_TOKEN",
        "CI_JOB_TOKEN",
        "SSH_AUTH_SOCK",
    }
)

#: A portable environment variable name: no NUL, ``=``, space or other surprise.
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
#: A credential file larger than this is not a password (and is not read whole).
MAX_FILE_BYTES = 64 * 1024


def _refused_env(name: str) -> bool:
    upper = name.upper()  # case tricks: pushworker_secret_key is refused like the real one
    return upper in REFUSED_ENV_NAMES or upper.startswith(REFUSED_ENV_PREFIXES)


def check_env_name(name: str, settings: Settings) -> None:
    """Refuse an ``env:`` reference outside the namespace; the variable need not exist here."""
    prefix = settings.credential_env_prefix
    if not _ENV_NAME.fullmatch(name):
        raise CredentialError(
            f"credential reference env:{name!r} is not an environment variable name",
            hint=f"use env:{prefix}NAME (letters, digits and _)",
        )
    if _refused_env(name):
        raise CredentialError(
            f"credential reference env:{name} names a variable of the worker's own "
            "configuration or process secrets, which a registry credential may never read",
            hint=f"put the password in a variable named {prefix}NAME ({PREFIX_SETTING})",
        )
    if not name.startswith(prefix) or len(name) == len(prefix):
        raise CredentialError(
            f"credential reference env:{name} is outside the credential namespace: "
            f"variables must be named {prefix}NAME",
            hint=f"rename the variable, or set {PREFIX_SETTING} for the deployment",
        )


def read_env(name: str, settings: Settings, environ: Mapping[str, str] | None = None) -> str:
    """The value of an allowed variable; ``CredentialError`` if refused or unset."""
    check_env_name(name, settings)
    value = (os.environ if environ is None else environ).get(name)
    if value is None:
        raise CredentialError(
            f"environment variable {name} is not set in the worker's environment",
            hint=f"export {name} for the worker",
        )
    return value


def _credentials_dir(settings: Settings) -> str:
    directory = settings.credentials_dir
    if "\0" in directory or not os.path.isabs(directory):
        # A relative directory would depend on the working directory of each process.
        raise CredentialError(
            f"{DIR_SETTING} is {directory!r}, not an absolute directory, so no file reference "
            "can be read",
            hint=f"set {DIR_SETTING} to an absolute path such as /run/secrets",
        )
    return os.path.normpath(directory)


def _outside(path: str, settings: Settings) -> CredentialError:
    return CredentialError(
        f"credential reference file:{path!r} is outside the credentials directory "
        f"{settings.credentials_dir}",
        hint=f"put the file in that directory, or set {DIR_SETTING} for the deployment",
    )


def confined_path(path: str, settings: Settings) -> str:
    """The reference's path, lexically inside the directory (relative paths are taken in it)."""
    directory = _credentials_dir(settings)
    if not path or "\0" in path:
        raise CredentialError(
            f"credential reference file:{path!r} is not a file path",
            hint=f"use file:NAME for a file in {directory} ({DIR_SETTING})",
        )
    candidate = os.path.normpath(os.path.join(directory, path))  # an absolute path replaces it
    if not strictly_inside(candidate, directory):
        raise _outside(path, settings)
    return candidate


def check_file_path(path: str, settings: Settings) -> None:
    """Refuse a ``file:`` reference outside the directory when it is saved.

    The file may exist only on the worker's host; where it exists here too, its symlinks are
    followed and must stay inside the directory.
    """
    candidate = confined_path(path, settings)
    if os.path.lexists(candidate):
        resolved = os.path.realpath(candidate)
        if not strictly_inside(resolved, os.path.realpath(_credentials_dir(settings))):
            raise _outside(path, settings)


def read_file(path: str, settings: Settings) -> str:
    """The content of an allowed file (trailing newlines stripped), read without following a
    link out of the directory; ``CredentialError`` if refused or unreadable."""
    candidate = confined_path(path, settings)
    root = os.path.realpath(_credentials_dir(settings))
    resolved = os.path.realpath(candidate)
    if not strictly_inside(resolved, root):
        raise _outside(path, settings)
    try:
        data = _read_regular(resolved, root, path, settings)
    except OSError as exc:
        raise CredentialError(
            f"credential file {path!r} cannot be read ({exc.strerror or type(exc).__name__})",
            hint="create the file, readable by the worker's user",
        ) from None
    try:
        return data.decode().strip("\r\n")
    except UnicodeDecodeError:
        raise CredentialError(f"credential file {path!r} is not UTF-8 text") from None


def _read_regular(resolved: str, root: str, path: str, settings: Settings) -> bytes:
    # O_NOFOLLOW: a link swapped in after realpath is not followed; O_NONBLOCK: a FIFO does not
    # hang the step before fstat refuses it.
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    fd = os.open(resolved, flags)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise CredentialError(f"credential reference file:{path!r} is not a regular file")
        # What was opened, not what was checked: a directory on the way swapped for a link
        # between the two would show here (Linux; elsewhere the checks above stand alone).
        opened = _opened_path(fd)
        if opened is not None and not strictly_inside(opened, root):
            raise _outside(path, settings)
        data = b""
        while len(data) <= MAX_FILE_BYTES:
            chunk = os.read(fd, MAX_FILE_BYTES + 1 - len(data))
            if not chunk:
                break
            data += chunk
    finally:
        os.close(fd)
    if len(data) > MAX_FILE_BYTES:
        raise CredentialError(
            f"credential file {path!r} is larger than {MAX_FILE_BYTES} bytes: not a password"
        )
    return data


def _opened_path(fd: int) -> str | None:
    try:
        return os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return None
