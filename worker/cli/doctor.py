"""``pushctl doctor``: check the deployment and say what to fix (``worker.doctor``)."""

from __future__ import annotations

import click
from rich.text import Text

from worker import doctor
from worker.cli.common import _JSON, FiniteFloatType, _echo_json, _out, cli
from worker.core.text import printable

_MARKS = {doctor.OK: ("✓", "green"), doctor.WARN: ("!", "yellow"), doctor.FAIL: ("✗", "red")}


@cli.command("doctor", epilog="""\b
Exit codes (by the worst finding, not the error codes of the other commands):
  0    every check ok
  1    a warning (something late, unknown or not checked)
  2    a failure (something that stops or will stop pushes)""")  # fmt: skip
@click.option(
    "--timeout",
    type=FiniteFloatType("SECONDS", 60),
    default=doctor.DEFAULT_TIMEOUT,
    show_default=True,
    help="Seconds the database, the broker and the workers' replies may take.",
)
@_JSON
def doctor_command(timeout: float, as_json: bool) -> None:
    """Check the database, migrations, broker, workers on each queue, beat, the secret key and
    stored credentials, and each registry's last health; say what to do about each problem.

    \b
    Example:
      pushctl doctor || echo "something needs attention"
    """
    if timeout < 0.1:
        raise click.BadParameter("must be at least 0.1 seconds", param_hint="'--timeout'")
    findings = doctor.run(timeout=timeout)
    status = doctor.worst(findings)
    if as_json:
        _echo_json({"status": status, "findings": [f.to_dict() for f in findings]})
    else:
        console = _out()
        width = max(len(f.name) for f in findings)
        for finding in findings:
            mark = _MARKS[finding.status]
            line = Text.assemble(
                mark, f" {printable(finding.name):<{width}}  ", printable(finding.detail)
            )
            console.print(line, soft_wrap=True)
            if finding.fix and finding.status != doctor.OK:
                console.print(
                    Text(f"  fix: {printable(finding.fix)}", style="yellow"), soft_wrap=True
                )
        counts = {s: sum(f.status == s for f in findings) for s in _MARKS}
        summary = ", ".join(f"{n} {s}" for s, n in counts.items() if n)
        click.echo(f"{status}: {summary}", err=True)
    raise click.exceptions.Exit(doctor.EXIT_CODES[status])
