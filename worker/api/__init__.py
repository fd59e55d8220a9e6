"""The HTTP API: the web platform's way in (docs/api.md).

A front door beside ``pushctl`` (rank 4): routes parse (pydantic), authorise (``auth``), call the
same services the CLI calls, and render. ``pushctl api serve`` runs it with uvicorn by import
string (``worker.api:create_app``, a factory), so the CLI never imports this package.
"""

from worker.api.app import create_app

__all__ = ["create_app"]
