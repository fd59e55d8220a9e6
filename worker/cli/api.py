"""``pushctl api serve``: run the HTTP API (worker.api) with uvicorn, by import string, so the
command line never imports the API."""

from __future__ import annotations

import click

from worker.cli.common import cli
from worker.core.settings import get_settings


@cli.group("api")
def api() -> None:
    """The HTTP API (docs/api.md).

    \b
    Example:
      pushctl api serve --port 8080
    """


@api.command("serve")
@click.option("--host", help="Address to listen on [PUSHWORKER_API_HOST, 127.0.0.1].")
@click.option(
    "--port", type=click.IntRange(1, 65535), help="Port to listen on [PUSHWORKER_API_PORT, 8080]."
)
@click.option(
    "--workers", type=click.IntRange(1, 64), default=1, show_default=True, help="Processes."
)
def serve(host: str | None, port: int | None, workers: int) -> None:
    """Serve the HTTP API until stopped (Ctrl-C or SIGTERM).

    \b
    Example:
      PUSHWORKER_API_HOST=0.0.0.0 pushctl api serve --workers 2
    """
    import uvicorn

    settings = get_settings()
    uvicorn.run(
        "worker.api:create_app",
        factory=True,
        host=host or settings.api_host,
        port=port or settings.api_port,
        workers=workers,
        # The project's logging (pushctl configured it: JSON lines, secrets masked) for
        # uvicorn's own lines too; no access log: request lines would carry query strings.
        log_config=None,
        log_level="info",
        access_log=False,
        proxy_headers=False,
    )
