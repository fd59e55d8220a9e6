"""What a broker message must be before Celery may touch it: the worker's message guard, without
Celery.

Celery's consumer decodes a message and pickles its arguments for the pool in the worker's main
process, and treats an exception there as unrecoverable: one small hostile message (a list nested
900 deep, a body that is a JSON string) stopped every worker, on every restart, because the
message went back to the queue each time. So every message is checked here first, iteratively
(no recursion, no ``json.loads`` before its nesting is bounded), and refused when it is not:

- JSON (``application/json``, UTF-8, uncompressed), at most ``MAX_BODY_BYTES``;
- Celery protocol 2: a ``task`` header naming one of this worker's tasks, an ``id``, and a body
  ``[args, kwargs, embed]`` of types ``[list, dict, dict]``;
- nested at most ``MAX_DEPTH`` levels, body, headers and properties alike;
- shaped as its task takes arguments (``task_arguments``: this layer does not know which steps
  there are, so the worker hands in the step names of ``worker.engine.steps.STEPS``).

The verdict is a ``Refusal`` naming the reason (never a value of the message) or an ``Accepted``
with the decoded call. Nothing here raises on any input.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Final

from worker.core import queues
from worker.core.text import printable

#: Largest body accepted, in bytes. A push request is under 2 KiB; a step's arguments and its
#: chain under 4 KiB.
MAX_BODY_BYTES: Final = 256 * 1024
#: Deepest nesting accepted (lists and objects), in the body, the headers and the properties. A
#: legitimate message nests at most 6 levels (a chain's embedded signatures); Python's pickle and
#: JSON decoder fail near 1000.
MAX_DEPTH: Final = 32
#: Longest task name or message id shown in a rejection.
MAX_SHOWN: Final = 100
CONTENT_TYPE: Final = "application/json"
ENCODINGS: Final = frozenset({"utf-8", "utf8"})
#: The error code of every refused message.
ERROR_CODE: Final = "invalid_message"

#: Reasons (stable, for operators' queries): what was wrong, never what was sent.
REASONS: Final = (
    "content_type", "encoding", "compressed", "too_large", "protocol", "headers", "not_json",
    "too_deep", "shape", "unknown_task", "arguments", "envelope", "crashed",
)  # fmt: skip


# --- what each task takes -------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    # A bool is not an id (issue 13, item 8).
    return isinstance(value, int) and not isinstance(value, bool)


def _is_uuid(value: Any) -> bool:
    if not isinstance(value, str) or len(value) != 36:
        return False
    try:
        return str(uuid.UUID(value)) == value.lower()
    except ValueError:
        return False


ArgumentCheck = Callable[[list[Any], dict[str, Any]], str | None]


def _step_arguments(args: list[Any], kwargs: dict[str, Any]) -> str | None:
    if kwargs or len(args) != 2:
        return "takes exactly two positional arguments (job id, registry id) and no keywords"
    if not _is_uuid(args[0]):
        return "takes a job id (a UUID string) as its first argument"
    if not _is_int(args[1]) or not 0 <= args[1] < 2**63:
        return "takes a registry id (a non-negative integer) as its second argument"
    return None


def _no_arguments(args: list[Any], kwargs: dict[str, Any]) -> str | None:
    return "takes no arguments" if args or kwargs else None


def _submit_arguments(args: list[Any], kwargs: dict[str, Any]) -> str | None:
    # The request's own fields are the contract's business (worker.contract), not the guard's.
    if kwargs or len(args) != 1 or not isinstance(args[0], dict):
        return (
            "takes exactly one positional argument, the push request object, and no keyword "
            f"arguments; it got {len(args)} positional argument(s) and {len(kwargs)} keyword "
            "argument(s)"
        )
    return None


SUBMIT_TASK: Final = queues.SUBMIT_TASK
#: Every task this worker runs, by name, and what its arguments must be.
TaskArguments = Mapping[str, ArgumentCheck]


def task_arguments(step_names: Iterable[str]) -> TaskArguments:
    """The tasks of a worker whose steps are ``step_names``: each step's task, the submission and
    the periodic tasks. A name not here is refused, so a new task must be added
    (tests/unit/test_message_guard.py compares the table with the app)."""
    return {
        SUBMIT_TASK: _submit_arguments,
        **{queues.step_task(name): _step_arguments for name in step_names},
        queues.RECONCILE_TASK: _no_arguments,
        queues.HEALTH_TASK: _no_arguments,
        queues.SEAL_TASK: _no_arguments,
        queues.WEBHOOK_TASK: _no_arguments,
    }


# --- verdicts -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Refusal:
    """Why a message is refused, with what may be recorded of it (metadata, never the body)."""

    reason: str
    message: str
    task_name: str | None = None
    message_id: str = field(default_factory=lambda: str(uuid.uuid4()))
    content_type: str | None = None
    body_bytes: int | None = None
    #: The push request of a ``pushworker.submit`` whose shape was decoded, for its rejection.
    request: dict[str, Any] | None = None

    @property
    def is_submission(self) -> bool:
        return self.task_name == SUBMIT_TASK

    def to_payload(self) -> dict[str, Any]:
        """The ``message.rejected`` event's payload (keys allowed by ``worker.store.events``)."""
        payload: dict[str, Any] = {
            "reason": self.reason,
            "error_code": ERROR_CODE,
            "error_message": self.message,
            "message_id": self.message_id,
        }
        for key in ("task_name", "content_type", "body_bytes"):
            value = getattr(self, key)
            if value is not None:
                payload[key] = value
        return payload


@dataclass(frozen=True)
class Accepted:
    """A well-formed call of one of this worker's tasks."""

    task_name: str
    message_id: str
    args: list[Any]
    kwargs: dict[str, Any]


Verdict = Accepted | Refusal


def shown(value: Any) -> str:
    """A name or id as it may be recorded: text, truncated, control characters escaped."""
    text = value if isinstance(value, str) else f"<{type(value).__name__}>"
    return printable(text[:MAX_SHOWN]) + ("..." if len(text) > MAX_SHOWN else "")


def message_id_of(headers: Any) -> str:
    """The message's id when it is a UUID (Celery's are): the stream of its rejection."""
    candidate = headers.get("id") if isinstance(headers, dict) else None
    return (
        candidate.lower()
        if isinstance(candidate, str) and _is_uuid(candidate)
        else str(uuid.uuid4())
    )


def check_message(
    *,
    tasks: TaskArguments,
    headers: Any,
    properties: Any,
    content_type: Any,
    content_encoding: Any,
    body: Any,
) -> Verdict:
    """The guard's verdict on one message, as the transport delivered it, for a worker that runs
    ``tasks`` (``task_arguments``). Never raises."""
    name = headers.get("task") if isinstance(headers, dict) else None
    refuse = _Refuser(
        task_name=shown(name) if name is not None else None,
        message_id=message_id_of(headers),
        content_type=shown(content_type) if content_type is not None else None,
        body_bytes=len(body) if isinstance(body, bytes | str) else None,
    )
    envelope_problem = _envelope_problem(headers, properties, content_type, content_encoding)
    if envelope_problem is not None:
        return refuse(*envelope_problem)
    assert isinstance(headers, dict)  # checked by _envelope_problem
    if not isinstance(body, bytes | str):
        return refuse("not_json", "the message has no body")
    if len(body) > MAX_BODY_BYTES:
        return refuse("too_large", f"the body is larger than {MAX_BODY_BYTES} bytes")
    decoded = _decode(body)
    if isinstance(decoded, tuple):
        return refuse(*decoded)
    if not (
        isinstance(decoded, list)
        and len(decoded) == 3
        and isinstance(decoded[0], list)
        and isinstance(decoded[1], dict)
        and isinstance(decoded[2], dict)
    ):
        return refuse("shape", "the body is not Celery protocol 2 [args, kwargs, embed]")
    args, kwargs, _embed = decoded
    task_name: str = headers["task"]
    check = tasks.get(task_name)
    if check is None:
        return refuse("unknown_task", "no such task on this worker")
    problem = check(args, kwargs)
    if problem is not None:
        request = (
            args[0] if task_name == SUBMIT_TASK and args and isinstance(args[0], dict) else None
        )
        return refuse("arguments", f"{task_name} {problem}", request=request)
    return Accepted(task_name, refuse.message_id, args, kwargs)


@dataclass(frozen=True)
class _Refuser:
    task_name: str | None
    message_id: str
    content_type: str | None
    body_bytes: int | None

    def __call__(self, reason: str, message: str, request: dict[str, Any] | None = None) -> Refusal:
        return Refusal(
            reason, message, task_name=self.task_name, message_id=self.message_id,
            content_type=self.content_type, body_bytes=self.body_bytes, request=request,
        )  # fmt: skip


# --- the checks -----------------------------------------------------------------------------------


def _envelope_problem(
    headers: Any, properties: Any, content_type: Any, content_encoding: Any
) -> tuple[str, str] | None:
    if content_type != CONTENT_TYPE:
        return "content_type", f"the content type is not {CONTENT_TYPE}"
    if not isinstance(content_encoding, str) or content_encoding.lower() not in ENCODINGS:
        return "encoding", "the content encoding is not utf-8"
    if not isinstance(headers, dict) or "task" not in headers:
        return "protocol", "the message has no task header (only Celery protocol 2 is accepted)"
    if not all(isinstance(key, str) for key in headers):
        return "headers", "a header name is not text"
    if headers.get("compression") is not None:
        return "compressed", "compressed messages are not accepted"
    if nesting_depth(headers) > MAX_DEPTH or nesting_depth(properties) > MAX_DEPTH:
        return "too_deep", f"the headers nest deeper than {MAX_DEPTH} levels"
    return _header_problem(headers)


def _header_problem(headers: dict[str, Any]) -> tuple[str, str] | None:
    # The headers Celery's consumer reads before the task runs, each of the type it expects.
    if not isinstance(headers["task"], str):
        return "headers", "the task header is not text"
    if not isinstance(headers.get("id"), str) or not headers["id"]:
        return "headers", "the id header is missing or not text"
    for key in ("shadow", "root_id", "parent_id", "group", "argsrepr", "kwargsrepr", "origin"):
        if headers.get(key) is not None and not isinstance(headers[key], str):
            return "headers", f"the {key} header is not text"
    for key in ("eta", "expires"):
        if headers.get(key) is not None and not _is_timestamp(headers[key]):
            return "headers", f"the {key} header is not an ISO 8601 time"
    retries = headers.get("retries")
    if retries is not None and not (_is_int(retries) and 0 <= retries < 2**31):
        return "headers", "the retries header is not a small non-negative integer"
    limits = headers.get("timelimit")
    if limits is not None and not _is_time_limits(limits):
        return "headers", "the timelimit header is not [soft, hard] seconds"
    return None


def _is_timestamp(value: Any) -> bool:
    if not isinstance(value, str) or len(value) > 64:
        return False
    try:
        datetime.fromisoformat(value)
    except ValueError:
        return False
    return True


def _is_time_limits(value: Any) -> bool:
    def seconds(item: Any) -> bool:
        return item is None or (
            isinstance(item, int | float) and not isinstance(item, bool) and 0 <= item < 2**31
        )

    return isinstance(value, list) and len(value) == 2 and all(seconds(item) for item in value)


#: A JSON string literal (escapes included), so that brackets inside strings are not counted.
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.S)
_BRACKET = re.compile(r"[\[\]{}]")


def _decode(body: bytes | str) -> Any:
    """The body as JSON, or ``(reason, message)``; nesting is bounded before decoding."""
    try:
        text = body.decode("utf-8") if isinstance(body, bytes) else body
    except UnicodeDecodeError:
        return "not_json", "the body is not UTF-8 text"
    if text_depth(text) > MAX_DEPTH:
        return "too_deep", f"the body nests deeper than {MAX_DEPTH} levels"
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return "not_json", "the body is not valid JSON"


def text_depth(text: str) -> int:
    """The deepest bracket nesting of JSON text, strings skipped; an upper bound for bad JSON."""
    depth = deepest = 0
    for bracket in _BRACKET.finditer(_STRING.sub("", text)):
        if bracket.group() in "[{":
            depth += 1
            deepest = max(deepest, depth)
        else:
            depth = max(depth - 1, 0)
    return deepest


def nesting_depth(value: Any) -> int:
    """How deep lists, tuples and dicts nest in ``value`` (0 for a scalar), without recursion.

    Stops counting once past ``MAX_DEPTH``: the answer is then only known to exceed it.
    """
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list | tuple):
            children = item
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        if deepest > MAX_DEPTH:
            return deepest
        stack.extend((child, depth) for child in children)
    return deepest
