"""The web console: server-rendered pages on the HTTP API's app, for operators and auditors.

Thin handlers: read the session, check the role on the server, call the services the API
routes and ``pushctl`` call, render a Jinja2 template (autoescaped; every string shown with
control characters as escapes). Every action is an event with actor ``console:<token name>``.
"""

from worker.api.console.routes import PREFIX, SecurityHeaders, router, static

__all__ = ["PREFIX", "SecurityHeaders", "router", "static"]
