"""``pushctl registry``: add, change, test, show, list and remove registries.

Secrets are read from stdin or a hidden prompt only, and never printed.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, TypeVar

import click
from rich.text import Text

from worker.cli.common import (
    _JSON,
    FALLBACK,
    ID,
    _echo_json,
    _fail,
    _iso,
    _key_values,
    _out,
    _table,
    cli,
    exit_code_for,
)
from worker.core.credentials import CredentialKind
from worker.core.errors import InvalidRegistry, ValidationError
from worker.core.settings import get_settings
from worker.core.summaries import summarize_test
from worker.probe import ConnectionReport, check_registry, record_test
from worker.registries import (
    RegistrySpec,
    chains_naming,
    create_registry,
    get_registry,
    list_registries,
    parse_max_concurrent,
    parse_rate,
    remove_registry,
    update_registry,
)
from worker.store import events, queries
from worker.store.db import read_scope, session_scope
from worker.store.models import Registry, RegistryKind

F = TypeVar("F", bound=Callable[..., Any])


@cli.group()
def registry() -> None:
    """Registries: add, change, test, remove.

    \b
    Example:
      pushctl registry list
    """


@dataclass(frozen=True)
class RegistryOptions:
    """The options ``registry add`` and ``registry update`` share."""

    kind: str | None = None
    username: str | None = None
    password_stdin: bool = False
    credential_ref: str | None = None
    ca_file: Path | None = None
    insecure: bool | None = None
    anonymous: bool | None = None
    fallback: list[int] | None = None
    no_test: bool = False
    as_json: bool = False
    timeout: float | None = None
    #: Flow control; 0 clears (``--max-concurrent none``, ``--rate none``).
    max_concurrent: int | None = None
    rate: float | None = None

    def spec(self, secret: str | None, **fields: Any) -> RegistrySpec:
        anonymous = self.anonymous
        return RegistrySpec(
            max_concurrent=self.max_concurrent,
            rate_per_second=self.rate,
            kind=self.kind,
            username=self.username,
            secret=secret,
            credential_ref=self.credential_ref,
            ca_cert=self.ca_file.read_text() if self.ca_file else None,
            insecure=self.insecure,
            auth_required=None if anonymous is None else not anonymous,
            fallback_chain=self.fallback,
            **fields,
        )


_KINDS = click.Choice([kind.value for kind in RegistryKind])
_PASSWORD_STDIN = click.option(
    "--password-stdin", is_flag=True, help="Read the password from the first line of stdin."
)
_CREDENTIAL_REF = click.option(
    "--credential-ref",
    metavar="env:NAME|file:PATH",
    help="Read the password from the worker's environment or a file, when used.",
)


class MaxConcurrentType(click.ParamType[int]):
    """``--max-concurrent N``: pushes at once to the registry, across every worker; ``none`` or
    0 clears the cap."""

    name = "N|none"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        try:
            return parse_max_concurrent(str(value))
        except InvalidRegistry as exc:
            self.fail(exc.message, param, ctx)


class RateType(click.ParamType[float]):
    """``--rate 10/s`` (also ``/m``, ``/h``; a bare number is per second), in requests per
    second; ``none`` or 0 clears it."""

    name = "N/s|N/m|N/h|none"

    def convert(
        self, value: Any, param: click.Parameter | None, ctx: click.Context | None
    ) -> float:
        try:
            return parse_rate(str(value))
        except InvalidRegistry as exc:
            self.fail(exc.message, param, ctx)


_NO_TEST = click.option("--no-test", is_flag=True, help="Do not run the connection test.")
_TEST_TIMEOUT = click.option(
    "--timeout", type=float, help="Seconds per connection-test request [PUSHWORKER_HTTP_TIMEOUT]."
)


def _registry_options(func: F) -> F:
    options = [
        click.option("--kind", type=_KINDS, help="Registry kind [add: generic]."),
        click.option("--username", help="User (or robot account) to push as."),
        _PASSWORD_STDIN,
        _CREDENTIAL_REF,
        click.option(
            "--ca-file",
            type=click.Path(exists=True, dir_okay=False, path_type=Path),
            help="PEM bundle of the CA that signed the registry's certificate.",
        ),
        click.option(
            "--insecure/--verify-tls",
            default=None,
            help="Allow http:// or skip TLS verification (explicitly unsafe).",
        ),
        click.option(
            "--anonymous/--auth-required",
            default=None,
            help="The registry takes pushes without credentials.",
        ),
        click.option("--fallback", type=FALLBACK, help="Registry ids to fall back to, in order."),
        click.option(
            "--max-concurrent",
            type=MaxConcurrentType(),
            help="At most N pushes to it at once, across every worker ('none' clears).",
        ),
        click.option(
            "--rate",
            type=RateType(),
            help="At most this many logins and pushes per second, e.g. 10/s ('none' clears).",
        ),
        _NO_TEST,
        _JSON,
        _TEST_TIMEOUT,
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _stdin_is_tty() -> bool:
    # sys.stdin, read when called: click's test runner replaces it (get_text_stream is deprecated).
    return sys.stdin.isatty()


def _read_secret(
    password_stdin: bool, credential_ref: str | None, prompt: str | None
) -> str | None:
    """The password from stdin or a hidden prompt; None when a reference (or nothing) is given."""
    if password_stdin and credential_ref is not None:
        raise click.UsageError("give --password-stdin or --credential-ref, not both")
    if password_stdin:
        # One line, so `echo pw | pushctl ...` and a password file without newline both work.
        secret = sys.stdin.readline().rstrip("\r\n")
        if not secret:
            raise ValidationError(
                "the password read from stdin is empty",
                hint="pipe the password in, e.g. `--password-stdin < password-file`",
            )
        return secret
    if credential_ref is None and prompt is not None and _stdin_is_tty():
        # On stderr, like every prompt here: stdout stays clean for --json.
        return click.prompt(prompt, hide_input=True, err=True)
    return None


def _require_credential(name: str, options: RegistryOptions) -> None:
    """Refuse, before anything is stored, a new registry that could not authenticate."""
    given = options.username or options.password_stdin or options.credential_ref
    if options.anonymous:
        if given:
            raise click.UsageError("--anonymous takes no --username or password")
        return
    hint = "or pass --anonymous if the registry takes pushes without credentials"
    if not options.username:
        raise ValidationError(
            f"registry {name!r} needs a username", hint=f"give --username, {hint}"
        )
    if not (options.password_stdin or options.credential_ref or _stdin_is_tty()):
        raise ValidationError(
            f"registry {name!r} needs a password",
            hint="give --password-stdin (password on stdin), --credential-ref env:NAME|file:PATH, "
            f"or run on a terminal to be prompted; {hint}",
        )


def credential_label(registry: Registry) -> str:
    """How the registry authenticates, as may be shown: references yes, secrets never."""
    if not registry.auth_required:
        return "anonymous"
    if registry.credential_kind == CredentialKind.SECRET:
        return "secret"
    if registry.credential_kind in (CredentialKind.ENV, CredentialKind.FILE):
        return f"{registry.credential_kind}:{registry.credential_ref}"
    return "none"


def registry_fields(registry: Registry) -> dict[str, Any]:
    return {
        "id": registry.id,
        "name": registry.name,
        "url": registry.url,
        "host": registry.host,
        "kind": registry.kind,
        "username": registry.username,
        "credential": credential_label(registry),
        "ca_cert": "set" if registry.ca_cert else None,
        "insecure": registry.insecure,
        "fallback_chain": list(registry.fallback_chain or []),
        "max_concurrent": registry.max_concurrent,
        "rate_per_second": registry.rate_per_second,
        "created_at": _iso(registry.created_at),
        "updated_at": _iso(registry.updated_at),
        "removed_at": _iso(registry.removed_at),
    }


def _test_and_record(registry_id: int, timeout: float | None) -> ConnectionReport:
    with read_scope() as session:
        registry = get_registry(session, registry_id)
    # The network part runs outside any transaction: SQLite's write lock is not held meanwhile.
    report = check_registry(registry, timeout=timeout or get_settings().http_timeout)
    with session_scope() as session:
        record_test(session, registry_id, report, events.operator_actor())
    return report


def _print_report(report: ConnectionReport) -> None:
    console = _out()
    for check in report.checks:
        mark = ("-", "dim") if check.skipped else ("✓", "green") if check.ok else ("✗", "red")
        latency = f"{check.latency_ms:.1f} ms" if check.latency_ms is not None else "-"
        console.print(
            Text.assemble(mark, f" {check.name:<12}{latency:>10}  ", check.detail), soft_wrap=True
        )
        if check.fix:
            console.print(Text(f"  fix: {check.fix}", style="yellow"), soft_wrap=True)


def _after_save(verb: str, shown: dict[str, Any], options: RegistryOptions) -> None:
    """Print the saved registry, then test it unless told not to; a failed test exits non-zero."""
    report = None if options.no_test else _test_and_record(shown["id"], options.timeout)
    if options.as_json:
        _echo_json({"registry": shown, "test": report.to_dict() if report else None})
    else:
        click.echo(f"registry {shown['id']} ({shown['name']}) {verb}: {shown['url']}")
        if report:
            _print_report(report)
    if report and not report.ok:
        _fail(
            f"registry {shown['id']} is saved, but its connection test failed; "
            f"fix it, then run `pushctl registry test {shown['id']}`",
            exit_code_for(report.error_code),
        )


@registry.command("add")
@click.argument("name")
@click.argument("url")
@click.option("--id", "registry_id", type=ID, help="Use this id (default: the next free one).")
@_registry_options
def registry_add(name: str, url: str, registry_id: int | None, **raw: Any) -> None:
    """Add a registry, then test the connection to it.

    The password is read from stdin (--password-stdin), from a hidden prompt on a terminal, or
    at push time from a reference (--credential-ref). It is never printed.

    \b
    Example:
      pushctl registry add harbor https://harbor.example.com --username ci --password-stdin < pw
    """
    options = RegistryOptions(**raw)
    _require_credential(name, options)
    prompt = f"Password for {options.username} at {url}" if not options.anonymous else None
    secret = _read_secret(options.password_stdin, options.credential_ref, prompt)
    spec = replace(
        options.spec(secret, name=name, url=url),
        kind=options.kind or RegistryKind.GENERIC.value,
        insecure=bool(options.insecure),
        auth_required=not options.anonymous,
    )
    with session_scope() as session:
        shown = registry_fields(create_registry(session, spec, registry_id=registry_id))
    _after_save("created", shown, options)


@registry.command("update")
@click.argument("registry_id", metavar="ID", type=ID)
@click.option("--name", help="New name.")
@click.option("--url", help="New URL (scheme://host[:port]).")
@_registry_options
def registry_update(registry_id: int, name: str | None, url: str | None, **raw: Any) -> None:
    """Change a registry, then test the connection to it.

    \b
    Example:
      pushctl registry update 3 --ca-file /etc/ssl/harbor-ca.pem
    """
    options = RegistryOptions(**raw)
    secret = _read_secret(options.password_stdin, options.credential_ref, prompt=None)
    spec = options.spec(secret, name=name, url=url)
    with session_scope() as session:
        shown = registry_fields(update_registry(session, registry_id, spec))
    _after_save("updated", shown, options)


@registry.command("set-credential")
@click.argument("registry_id", metavar="ID", type=ID)
@click.option("--username", help="New user; the stored one is kept when not given.")
@_PASSWORD_STDIN
@_CREDENTIAL_REF
@_NO_TEST
@_JSON
@_TEST_TIMEOUT
def registry_set_credential(
    registry_id: int,
    username: str | None,
    password_stdin: bool,
    credential_ref: str | None,
    **raw: Any,
) -> None:
    """Replace a registry's password (or reference), then test it.

    \b
    Example:
      pushctl registry set-credential 3 --password-stdin < new-password
    """
    if not (password_stdin or credential_ref or _stdin_is_tty()):
        raise click.UsageError("give --password-stdin or --credential-ref env:NAME|file:PATH")
    options = RegistryOptions(username=username, credential_ref=credential_ref, **raw)
    secret = _read_secret(
        password_stdin, credential_ref, f"New password for registry {registry_id}"
    )
    spec = RegistrySpec(
        username=username, secret=secret, credential_ref=credential_ref, auth_required=True
    )
    with session_scope() as session:
        shown = registry_fields(update_registry(session, registry_id, spec))
    _after_save("credential set", shown, options)


@registry.command("test")
@click.argument("registry_id", metavar="ID", type=ID)
@_JSON
@_TEST_TIMEOUT
def registry_test(registry_id: int, as_json: bool, timeout: float | None) -> None:
    """Test the connection: dns, tcp, tls, /v2/, credentials. Exit 0 only if all pass.

    \b
    Example:
      pushctl registry test 3
    """
    report = _test_and_record(registry_id, timeout)
    if as_json:
        _echo_json(report.to_dict())
    else:
        _print_report(report)
    if not report.ok:
        raise click.exceptions.Exit(exit_code_for(report.error_code))


@registry.command("list")
@click.option("--all", "include_removed", is_flag=True, help="Include removed registries.")
@_JSON
def registry_list(include_removed: bool, as_json: bool) -> None:
    """List registries.

    \b
    Example:
      pushctl registry list --json
    """
    with read_scope() as session:
        rows = [
            registry_fields(r) for r in list_registries(session, include_removed=include_removed)
        ]
    if as_json:
        _echo_json(rows)
        return
    columns = ["id", "name", "url", "kind", "username", "credential", "ca", "fallback"]
    columns += ["removed_at"] if include_removed else []
    _out().print(_table(columns, (_registry_row(r, include_removed) for r in rows)))


def _registry_row(shown: dict[str, Any], with_removed: bool) -> list[object]:
    keys = ("id", "name", "url", "kind", "username", "credential", "ca_cert")
    row: list[object] = [*(shown[key] for key in keys), _ids(shown["fallback_chain"])]
    return [*row, shown["removed_at"]] if with_removed else row


def _ids(ids: list[int]) -> str:
    return ",".join(str(i) for i in ids) or "-"


@registry.command("show")
@click.argument("registry_id", metavar="ID", type=ID)
@_JSON
def registry_show(registry_id: int, as_json: bool) -> None:
    """Show a registry and its last connection test.

    \b
    Example:
      pushctl registry show 3
    """
    with read_scope() as session:
        shown = registry_fields(get_registry(session, registry_id, include_removed=True))
        stream = events.registry_stream(registry_id)
        tests = queries.select_events(session, stream=stream, types=["registry.tested"])
        last = queries.event_fields(tests[-1]) if tests else None
    if as_json:
        _echo_json({**shown, "last_test": last})
        return
    console = _out()
    console.print(_key_values(shown))
    if last is None:
        console.print(f"never tested; run `pushctl registry test {registry_id}`")
        return
    console.print(Text(f"last test {last['time']} by {last['actor']}: "), end="")
    console.print(Text(summarize_test(last["payload"])), soft_wrap=True)


@registry.command("remove")
@click.argument("registry_id", metavar="ID", type=ID)
def registry_remove(registry_id: int) -> None:
    """Remove a registry: no new pushes to it; its jobs and events stay readable.

    It also leaves every other registry's fallback chain (each change is a registry.updated
    event), and queued jobs that would move to it skip it.

    \b
    Example:
      pushctl registry remove 3
    """
    with session_scope() as session:
        holders = chains_naming(session, registry_id)
        removed = remove_registry(session, registry_id)
        name = removed.name
    click.echo(
        f"registry {registry_id} ({name}) removed; `pushctl registry show {registry_id}` "
        "still shows it"
    )
    if holders:
        click.echo(f"taken out of the fallback chain of registries {_ids(holders)}")
