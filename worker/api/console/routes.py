"""Console routes: sign-in, pages, actions. See the package docstring."""

from __future__ import annotations

import io
import re
import secrets
import time
from collections import Counter
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlencode

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, FileSystemLoader, select_autoescape
from markupsafe import Markup
from sqlalchemy import func, select
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from worker import producer
from worker.api.auth import ACTIONS, allowed
from worker.api.console.sessions import COOKIE, Session, SessionStore
from worker.api.errors import status_for
from worker.api.routes import _moment as _api_moment
from worker.core.errors import PushWorkerError, ValidationError
from worker.core.summaries import summarize
from worker.core.text import printable
from worker.jobs import cancel_job, check_text, get_job, list_jobs, retry_job
from worker.probe import check_registry, record_test
from worker.registries import (
    RegistrySpec,
    credential_description,
    get_registry,
    list_registries,
    parse_max_concurrent,
    parse_rate,
    update_registry,
)
from worker.store import events, export, queries
from worker.store.chain import OUTCOMES
from worker.store.db import read_scope, session_scope
from worker.store.models import JobStatus, PushJob
from worker.store.verify import verify
from worker.tokens import token_usable, verify_token

HERE = Path(__file__).parent
PREFIX = "/console"
PRE_COOKIE = "pushworker_console_signin"
CSP = (
    "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "connect-src 'self'; form-action 'self'; base-uri 'none'; frame-ancestors 'none'"
)
PAGE = 50
#: The vendored htmx (static/, 0BSD, see static/htmx-LICENSE.txt): the live parts of the pages.
HTMX = "htmx-2.0.11.min.js"
#: The roles that may sign in (a producer reads only its own jobs, through the API).
CONSOLE_ROLES = frozenset({"operator", "auditor", "admin"})

router = APIRouter(prefix=PREFIX, include_in_schema=False)
#: The console's script and style sheet (mounted on the app by ``worker.api.app``).
static = StaticFiles(directory=HERE / "static")
sessions = SessionStore()


def _shown(value: Any) -> Any:
    """Every string a template prints: control characters (terminal escapes) as ``\\x1b``."""
    if isinstance(value, str) and not isinstance(value, Markup):
        return printable(value)
    return value


templates = Environment(
    loader=FileSystemLoader(HERE / "templates"),
    autoescape=select_autoescape(default=True, default_for_string=True),
    finalize=_shown,
)
templates.filters["summary"] = lambda event: summarize(event.type, event.payload or {})


class SecurityHeaders:
    """A strict Content-Security-Policy (no inline script or style) and friends on every
    console answer, and ``Server-Timing: app;dur=MS``: the server's time to the answer."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not str(scope.get("path", "")).startswith(PREFIX):
            await self.app(scope, receive, send)
            return

        started = time.perf_counter()

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                spent = (time.perf_counter() - started) * 1000
                headers = list(message.get("headers", []))
                headers += [
                    # The server's time to the answer's first byte, for the browser's tools.
                    (b"server-timing", f"app;dur={spent:.1f}".encode()),
                    (b"content-security-policy", CSP.encode()),
                    (b"x-content-type-options", b"nosniff"),
                    (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer"),
                    (b"cache-control", b"no-store"),
                ]
                message["headers"] = headers
            await send(message)

        await self.app(scope, receive, with_headers)


# --- helpers ---------------------------------------------------------------------------------


class Refused(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


async def _session(request: Request) -> Session | None:
    """The request's session, while it lasts and its token is neither revoked nor expired."""
    session = sessions.get(request.cookies.get(COOKIE))
    if session is not None and not await run_in_threadpool(
        token_usable, session.principal.token_id
    ):
        sessions.close(session.id)
        return None
    return session


def _render(
    request: Request, name: str, session: Session | None, status: int = 200, **context: Any
) -> HTMLResponse:
    html = templates.get_template(name).render(
        session=session, prefix=PREFIX, htmx=HTMX, may=lambda action: session is not None
        and allowed(session.principal.role, action), **context,
    )  # fmt: skip
    return HTMLResponse(html, status_code=status)


async def _page(request: Request, action: str) -> Session | Response:
    """The session of a page's reader, if its role may ``action``; else where to go."""
    session = await _session(request)
    if session is None:
        if request.headers.get("hx-request"):
            # A refreshing part of a page: a redirect would be followed and the sign-in form
            # swapped into the part; htmx sends the whole page there instead.
            return Response(status_code=401, headers={"HX-Redirect": f"{PREFIX}/signin"})
        return RedirectResponse(f"{PREFIX}/signin", status_code=303)
    if not allowed(session.principal.role, action):
        return _forbidden(request, session, action)
    return session


def _forbidden(request: Request, session: Session, action: str) -> HTMLResponse:
    return _render(
        request, "error.html", session, status=403,
        message=f"token {session.principal.name!r} has the role {session.principal.role}, "
        f"which may not {ACTIONS[action]}",
    )  # fmt: skip


async def _form(request: Request) -> dict[str, str]:
    body = (await request.body()).decode("utf-8", errors="replace")
    return {key: values[-1] for key, values in parse_qs(body, keep_blank_values=True).items()}


async def _action(request: Request, action: str) -> tuple[Session, dict[str, str]] | Response:
    """A form's session and fields: signed in, a valid CSRF token, a role that may ``action``
    (each checked here, on the server, whatever the page showed)."""
    session = await _session(request)
    if session is None:
        return _render(request, "error.html", None, status=401, message="sign in first")
    form = await _form(request)
    if not session.csrf_ok(form.get("csrf")):
        return _render(
            request, "error.html", session, status=403,
            message="the form's CSRF token is missing or wrong; reload the page and try again",
        )  # fmt: skip
    if not allowed(session.principal.role, action):
        return _forbidden(request, session, action)
    return session, form


def _error(request: Request, session: Session, exc: PushWorkerError) -> HTMLResponse:
    return _render(
        request, "error.html", session, status=status_for(exc), message=exc.message, hint=exc.hint
    )


def _since(value: str | None) -> datetime | None:
    return _api_moment("since", value or None)  # the API's reading of since/until


def _optional(field: str, value: str | None, limit: int = 200) -> str | None:
    """A filter's text: None when empty, else checked as the API checks it."""
    return check_text(field, value, limit) if value else None


def _reason(form: dict[str, str]) -> str:
    reason = form.get("reason", "").strip()
    if not reason:
        raise ValidationError("a reason is required", hint="say why, for the event log")
    return check_text("reason", reason, 500)


# --- sign-in ---------------------------------------------------------------------------------


@router.get("/signin")
def signin_form(request: Request) -> Response:
    nonce = secrets.token_urlsafe(24)
    response = _render(request, "signin.html", None, csrf=nonce)
    response.set_cookie(
        PRE_COOKIE, nonce, max_age=600, httponly=True, samesite="strict", secure=_secure(request),
        path=f"{PREFIX}/signin",
    )  # fmt: skip
    return response


@router.post("/signin")
async def signin(request: Request) -> Response:
    form = await _form(request)
    nonce = request.cookies.get(PRE_COOKIE)
    sent = form.get("csrf", "")
    if not nonce or not secrets.compare_digest(nonce.encode(), sent.encode()):
        return _render(request, "error.html", None, status=403,
                       message="the sign-in form expired; open it again")  # fmt: skip
    principal = await run_in_threadpool(verify_token, form.get("token", "").strip())
    if principal is None:
        return _render(request, "signin.html", None, status=401, csrf=nonce,
                       message="the token is unknown, revoked or expired")  # fmt: skip
    if principal.role not in CONSOLE_ROLES:
        # A producer token reads only its own jobs through the API; the console shows all.
        return _render(request, "signin.html", None, status=403, csrf=nonce,
                       message=f"a {principal.role} token cannot sign in to the console; "
                       "use an operator, auditor or admin token")  # fmt: skip
    session = sessions.open(principal)
    await run_in_threadpool(_record, session, "console.signed_in")
    response = RedirectResponse(f"{PREFIX}/", status_code=303)
    response.set_cookie(
        COOKIE, session.id, max_age=int(sessions.lifetime.total_seconds()), httponly=True,
        samesite="strict", secure=_secure(request), path=PREFIX,
    )  # fmt: skip
    response.delete_cookie(
        PRE_COOKIE, path=f"{PREFIX}/signin", httponly=True, samesite="strict",
        secure=_secure(request),
    )  # fmt: skip
    return response


def _record(session: Session, kind: str) -> None:
    with session_scope() as db:
        events.append(
            db, stream=f"tokens/{session.principal.token_id}", type=kind, actor=session.actor,
            payload={"name": session.principal.name, "role": session.principal.role},
        )  # fmt: skip


@router.post("/signout")
async def signout(request: Request) -> Response:
    checked = await _action(request, "read_registries")
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    sessions.close(session.id)
    await run_in_threadpool(_record, session, "console.signed_out")
    response = RedirectResponse(f"{PREFIX}/signin", status_code=303)
    response.delete_cookie(
        COOKIE, path=PREFIX, httponly=True, samesite="strict", secure=_secure(request)
    )
    return response


# --- overview --------------------------------------------------------------------------------


def _overview() -> dict[str, Any]:
    since = datetime.now(UTC) - timedelta(hours=24)
    with read_scope() as db:
        by_status: dict[str, int] = {
            status: count
            for status, count in db.execute(
                select(PushJob.status, func.count())
                .where(PushJob.created_at >= since)
                .group_by(PushJob.status)
            ).all()
        }
        failures: dict[str, int] = {
            str(code): count
            for code, count in db.execute(
                select(PushJob.error_code, func.count())
                .where(PushJob.created_at >= since, PushJob.status == JobStatus.FAILED.value)
                .group_by(PushJob.error_code)
            ).all()
        }
        oldest = {
            status: db.scalars(
                select(PushJob).where(PushJob.status == status)
                .order_by(PushJob.created_at).limit(5)
            ).all()
            for status in (JobStatus.QUEUED.value, JobStatus.RUNNING.value)
        }  # fmt: skip
        registries = _with_states(db)
    return {
        "by_status": [(s.value, by_status.get(s.value, 0)) for s in JobStatus],
        "failures": Counter(failures).most_common(),
        "oldest": oldest,
        "registries": registries,
    }


#: What a registry's row shows, each the newest of its type in the registry's stream.
_STATE_TYPES = ("registry.health", "registry.tested", "registry.throttled", "registry.unthrottled")


def _states(db: Any, registry_ids: list[int]) -> dict[int, dict[str, Any]]:
    """Each registry's latest health, connection test and throttling (one query for all)."""
    streams = {registry_id: events.registry_stream(registry_id) for registry_id in registry_ids}
    latest = queries.latest_of_types(db, list(streams.values()), _STATE_TYPES)
    states = {}
    for registry_id, stream in streams.items():
        health = latest.get((stream, "registry.health"))
        throttled = latest.get((stream, "registry.throttled"))
        unthrottled = latest.get((stream, "registry.unthrottled"))
        states[registry_id] = {
            "status": health.payload.get("status") if health else None,
            "since": health.time if health else None,
            "tested": latest.get((stream, "registry.tested")),
            # Throttled now: the latest change of the limit lowered it.
            "throttled": throttled
            if throttled and (unthrottled is None or unthrottled.seq < throttled.seq)
            else None,
        }
    return states


def _health(db: Any, registry_id: int) -> dict[str, Any]:
    return _states(db, [registry_id])[registry_id]


def _with_states(db: Any) -> list[tuple[Any, dict[str, Any]]]:
    registries = list_registries(db)
    states = _states(db, [r.id for r in registries])
    return [(r, states[r.id]) for r in registries]


@router.get("/")
async def overview(request: Request) -> Response:
    return await _overview_view(request, "overview.html")


@router.get("/fragments/overview")
async def overview_fragment(request: Request) -> Response:
    # The part of the page that refreshes itself (htmx polls it).
    return await _overview_view(request, "overview_body.html")


async def _overview_view(request: Request, template: str) -> Response:
    session = await _page(request, "read_jobs")
    if isinstance(session, Response):
        return session
    data = await run_in_threadpool(_overview)
    return _render(request, template, session, **data)


# --- jobs ------------------------------------------------------------------------------------


def _job_filter(params: Any) -> dict[str, Any]:
    status = params.get("status") or None
    if status is not None and status not in {s.value for s in JobStatus}:
        raise ValidationError(f"unknown status {status!r}")
    registry = params.get("registry") or None
    if registry is not None and not registry.isdigit():
        raise ValidationError("registry is a registry id")
    return {
        "status": status,
        "registry": int(registry) if registry else None,
        "repository": _optional("repository", params.get("repository"), 255),
        "requester": _optional("requester", params.get("requester")),
        "since": params.get("since") or None,
    }


def _select_jobs(flt: dict[str, Any], limit: int) -> list[PushJob]:
    with read_scope() as db:
        rows = list_jobs(
            db, status=flt["status"], registry_id=flt["registry"], since=_since(flt["since"]),
            limit=limit, repository=flt["repository"], requested_by=flt["requester"],
        )  # fmt: skip
        db.expunge_all()
        return rows


@router.get("/jobs")
async def jobs_page(request: Request) -> Response:
    session = await _page(request, "read_jobs")
    if isinstance(session, Response):
        return session
    try:
        flt = _job_filter(request.query_params)
        rows = await run_in_threadpool(_select_jobs, flt, PAGE)
    except PushWorkerError as exc:
        return _error(request, session, exc)
    query = urlencode({k: v for k, v in flt.items() if v is not None})
    return _render(request, "jobs.html", session, jobs=rows, flt=flt, query=query,
                   statuses=[s.value for s in JobStatus])  # fmt: skip


def _job_and_events(job_id: str) -> tuple[PushJob, list[Any]]:
    with read_scope() as db:
        job = get_job(db, check_text("job id", job_id, 36))
        rows = queries.select_events(db, job_id=job_id)
        db.expunge_all()
        return job, rows


@router.get("/jobs/{job_id}")
async def job_page(request: Request, job_id: str) -> Response:
    return await _job_view(request, job_id, "job.html")


@router.get("/fragments/jobs/{job_id}")
async def job_fragment(request: Request, job_id: str) -> Response:
    # The timeline that refreshes itself while the job runs (htmx polls it).
    return await _job_view(request, job_id, "job_body.html")


async def _job_view(request: Request, job_id: str, template: str) -> Response:
    session = await _page(request, "read_jobs")
    if isinstance(session, Response):
        return session
    try:
        job, rows = await run_in_threadpool(_job_and_events, job_id)
    except PushWorkerError as exc:
        return _error(request, session, exc)
    final = JobStatus(job.status).is_final
    response = _render(request, template, session, job=job, events=rows, final=final,
                       progress=None if final else _progress(rows))  # fmt: skip
    if final and template == "job_body.html":
        # The job just ended: the whole page again, with the actions of an ended job.
        response.headers["HX-Refresh"] = "true"
    return response


def _progress(rows: list[Any]) -> dict[str, Any] | None:
    """The running push's latest progress: its last ``step.progress`` event, unless the step
    ended (or began again) after it."""
    latest = None
    for event in rows:
        if event.type == "step.progress":
            latest = event
        elif event.step == "push" and event.type != "step.waiting":
            latest = None  # started again, succeeded or failed: no push is under way
    if latest is None:
        return None
    payload = latest.payload or {}
    done, total = payload.get("bytes_pushed"), payload.get("bytes_total")
    measurable = isinstance(done, int) and isinstance(total, int) and total > 0
    return {
        "text": summarize(latest.type, payload), "time": latest.time,
        "done": done if measurable else None, "total": total if measurable else None,
    }  # fmt: skip


def _retry(job_id: str, actor: str, reason: str) -> None:
    with session_scope() as db:
        job = retry_job(db, job_id, actor=actor, reason=reason)
        registry_id = job.requested_registry_id
    producer.publish(job_id, registry_id)  # after the commit, as the CLI and the API do


def _cancel(job_id: str, actor: str, reason: str) -> None:
    with session_scope() as db:
        cancel_job(db, job_id, actor=actor, reason=reason)


@router.post("/jobs/{job_id}/retry")
async def retry(request: Request, job_id: str) -> Response:
    return await _job_action(request, job_id, _retry)


@router.post("/jobs/{job_id}/cancel")
async def cancel(request: Request, job_id: str) -> Response:
    return await _job_action(request, job_id, _cancel)


async def _job_action(request: Request, job_id: str, act: Any) -> Response:
    checked = await _action(request, "operate_jobs")
    if isinstance(checked, Response):
        return checked
    session, form = checked
    try:
        check_text("job id", job_id, 36)
        await run_in_threadpool(act, job_id, session.actor, _reason(form))
    except PushWorkerError as exc:
        return _error(request, session, exc)
    return RedirectResponse(f"{PREFIX}/jobs/{job_id}", status_code=303)


#: The most jobs one bulk retry takes.
BULK_LIMIT = 200


@router.post("/jobs/bulk-retry")
async def bulk_retry(request: Request) -> Response:
    """Without ``confirm``: a preview of the failed jobs the filter selects. With it: retry
    exactly the previewed ids (each still checked by the service)."""
    checked = await _action(request, "operate_jobs")
    if isinstance(checked, Response):
        return checked
    session, form = checked
    try:
        flt = _job_filter({**form, "status": "failed"})
        if form.get("confirm") != "1":
            rows = await run_in_threadpool(_select_jobs, flt, BULK_LIMIT)
            return _render(request, "bulk.html", session, jobs=rows, flt=flt,
                           ids=" ".join(job.id for job in rows))  # fmt: skip
        reason = _reason(form)
        done, refused = [], []
        for job_id in form.get("ids", "").split()[:BULK_LIMIT]:
            try:
                await run_in_threadpool(_retry, check_text("job id", job_id, 36), session.actor,
                                        reason)  # fmt: skip
                done.append(job_id)
            except PushWorkerError as exc:
                refused.append((job_id, exc.message))
    except PushWorkerError as exc:
        return _error(request, session, exc)
    return _render(request, "bulk_done.html", session, done=done, refused=refused)


# --- registries ------------------------------------------------------------------------------


def _registries() -> list[tuple[Any, dict[str, Any]]]:
    with read_scope() as db:
        rows = _with_states(db)
        db.expunge_all()
        return rows


@router.get("/registries")
async def registries_page(request: Request) -> Response:
    session = await _page(request, "read_registries")
    if isinstance(session, Response):
        return session
    rows = await run_in_threadpool(_registries)
    return _render(request, "registries.html", session, registries=rows)


def _test(registry_id: int, actor: str) -> None:
    with read_scope() as db:
        registry = get_registry(db, registry_id)
        db.expunge(registry)
    report = check_registry(registry)
    with session_scope() as db:
        record_test(db, registry_id, report, actor)


@router.post("/registries/{registry_id}/test")
async def test_registry(request: Request, registry_id: int) -> Response:
    back = f"{PREFIX}/registries/{registry_id}" if _form_from_detail(request) else None
    return await _registry_action(
        request, "test_registries", lambda actor, _form: _test(registry_id, actor),
        back or f"{PREFIX}/registries",
    )  # fmt: skip


async def _registry_action(
    request: Request, action: str, act: Callable[[str, dict[str, str]], None], back: str
) -> Response:
    """A registry form: checked by ``_action`` (session, CSRF, role), then ``act(actor, form)``
    in a thread; its error (never holding a secret) as a page, else back to ``back``."""
    checked = await _action(request, action)
    if isinstance(checked, Response):
        return checked
    session, form = checked
    try:
        await run_in_threadpool(act, session.actor, form)
    except PushWorkerError as exc:
        return _error(request, session, exc)
    return RedirectResponse(back, status_code=303)


def _form_from_detail(request: Request) -> bool:
    # "Test now" on a registry's own page returns there; on the list, to the list.
    return request.query_params.get("back") == "detail"


#: Events of a registry shown on its page, newest first.
REGISTRY_EVENTS = 20


def _registry_detail(registry_id: int) -> dict[str, Any]:
    with read_scope() as db:
        registry = get_registry(db, registry_id)
        health = _health(db, registry_id)
        recent = queries.select_events(
            db, stream=events.registry_stream(registry_id), newest_first=True,
            limit=REGISTRY_EVENTS,
        )  # fmt: skip
        credential = credential_description(registry)
        db.expunge_all()
    return {"registry": registry, "health": health, "recent": recent, "credential": credential}


@router.get("/registries/{registry_id}")
async def registry_page(request: Request, registry_id: int) -> Response:
    session = await _page(request, "read_registries")
    if isinstance(session, Response):
        return session
    try:
        data = await run_in_threadpool(_registry_detail, registry_id)
    except PushWorkerError as exc:
        return _error(request, session, exc)
    return _render(request, "registry.html", session, **data)


def _chain(text: str) -> list[int]:
    """A fallback chain as written in the form: registry ids separated by commas or spaces."""
    parts = [part for part in re.split(r"[\s,]+", text.strip()) if part]
    if not all(part.isdigit() and len(part) <= 10 for part in parts):
        raise ValidationError(
            "the fallback chain is registry ids separated by commas, e.g. 4, 7 (empty: none)"
        )
    return [int(part) for part in parts]


def _edit_spec(form: dict[str, str]) -> RegistrySpec:
    """What the edit form changes: every field it carries (the form shows the current values);
    an empty limit or chain clears it. The credential has a form of its own."""
    return RegistrySpec(
        name=check_text("name", form.get("name", ""), 100),
        url=check_text("URL", form.get("url", ""), 500),
        username=_optional("username", form.get("username", "").strip()),
        fallback_chain=_chain(form.get("fallback", "")),
        max_concurrent=parse_max_concurrent(form.get("max_concurrent", "").strip() or "none"),
        rate_per_second=parse_rate(form.get("rate", "").strip() or "none"),
    )


def _edit(registry_id: int, spec: RegistrySpec, actor: str) -> None:
    with session_scope() as db:
        update_registry(db, registry_id, spec, actor=actor)


def _replace_credential(registry_id: int, form: dict[str, str], actor: str) -> None:
    """A new password (or reference) for the registry, then a connection test with it, so the
    page shows at once whether the registry takes it (a ``registry.tested`` event)."""
    secret, reference = form.get("password", ""), form.get("credential_ref", "").strip()
    if bool(secret) == bool(reference):
        raise ValidationError(
            "give either a new password or a credential reference (env:NAME or file:PATH)"
        )
    username = form.get("username", "").strip()
    spec = RegistrySpec(
        username=check_text("username", username, 200) if username else None,
        secret=secret or None,
        credential_ref=check_text("credential reference", reference, 500) if reference else None,
    )
    with session_scope() as db:
        update_registry(db, registry_id, spec, actor=actor)
    _test(registry_id, actor)


@router.post("/registries/{registry_id}/edit")
async def edit_registry(request: Request, registry_id: int) -> Response:
    return await _registry_action(
        request, "manage_registries",
        lambda actor, form: _edit(registry_id, _edit_spec(form), actor),
        f"{PREFIX}/registries/{registry_id}",
    )  # fmt: skip


@router.post("/registries/{registry_id}/credential")
async def replace_credential(request: Request, registry_id: int) -> Response:
    return await _registry_action(
        request, "manage_registries",
        lambda actor, form: _replace_credential(registry_id, form, actor),
        f"{PREFIX}/registries/{registry_id}",
    )  # fmt: skip


# --- event log -------------------------------------------------------------------------------


def _event_query(params: Any) -> tuple[queries.EventQuery, dict[str, str]]:
    def text(name: str, limit: int = 200) -> str | None:
        return _optional(name, params.get(name), limit)

    registry = params.get("registry") or None
    if registry is not None and not registry.isdigit():
        raise ValidationError("registry is a registry id")
    cursor = params.get("cursor") or "0"
    if not cursor.isdigit() or int(cursor) > 2**63 - 1:
        raise ValidationError("cursor is not a cursor of this listing")
    types = [t.strip() for t in (text("type") or "").split(",") if t.strip()]
    outcomes = [o.strip() for o in (text("outcome") or "").split(",") if o.strip()]
    unknown = sorted(set(outcomes) - set(OUTCOMES))
    if unknown:
        raise ValidationError(
            f"unknown outcome {unknown[0]!r}; an event's outcome is one of {', '.join(OUTCOMES)}"
        )
    query = queries.EventQuery(
        job_id=text("job", 36), registry_id=int(registry) if registry else None,
        repository=text("repository", 255), types=types or None, outcomes=outcomes or None,
        actor=text("actor"), since=_api_moment("since", params.get("since") or None),
        until=_api_moment("until", params.get("until") or None), after_id=int(cursor),
    )  # fmt: skip
    names = ("job", "registry", "repository", "type", "outcome", "actor", "since", "until")
    shown = {name: params.get(name) for name in names if params.get(name)}
    return query, shown


def _select(query: queries.EventQuery) -> list[Any]:
    with read_scope() as db:
        rows = list(db.scalars(query.select(limit=PAGE + 1)))
        db.expunge_all()
        return rows


@router.get("/events")
async def events_page(request: Request) -> Response:
    session = await _page(request, "read_events")
    if isinstance(session, Response):
        return session
    try:
        query, shown = _event_query(request.query_params)
        rows = await run_in_threadpool(_select, query)
    except PushWorkerError as exc:
        return _error(request, session, exc)
    more = len(rows) > PAGE
    rows = rows[:PAGE]
    filter_query = urlencode(shown)
    next_query = urlencode({**shown, "cursor": rows[-1].id}) if more else None
    return _render(request, "events.html", session, events=rows, shown=shown,
                   filter_query=filter_query, next_query=next_query)  # fmt: skip


@router.get("/events/export")
async def events_export(request: Request) -> Response:
    session = await _page(request, "read_events")
    if isinstance(session, Response):
        return session
    fmt = request.query_params.get("format", "jsonl")
    try:
        query, _ = _event_query(request.query_params)

        def write() -> str:
            out = io.StringIO()
            export.export(out, fmt, query)
            return out.getvalue()

        text = await run_in_threadpool(write)
    except PushWorkerError as exc:
        return _error(request, session, exc)
    media = "text/csv" if fmt == "csv" else "application/x-ndjson"
    name = "events.csv" if fmt == "csv" else "events.jsonl"
    return Response(text, media_type=media,
                    headers={"content-disposition": f'attachment; filename="{name}"'})  # fmt: skip


@router.post("/events/verify")
async def events_verify(request: Request) -> Response:
    checked = await _action(request, "read_events")
    if isinstance(checked, Response):
        return checked
    session, _ = checked
    report = await run_in_threadpool(verify)
    return _render(request, "verify.html", session, report=report)
