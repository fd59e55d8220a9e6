"""A producer that knows only the message contract: Celery, a broker URL and a task name.

It imports nothing from pushworker, and refuses to run where pushworker could be imported: the
end-to-end test copies this file to an empty directory and runs it with a ``sys.path`` that holds
only the standard library, Celery and that directory. Two ways to send:

    celery -A producer_app call pushworker.submit --queue pushworker --args '[{...}]'
    python producer_app.py '[{"args": [{...}]}, {"kwargs": {...}}]'   # prints the task ids
"""

import importlib.util
import json
import os
import sys

from celery import Celery

for _name in ("worker", "tasks", "celeryconfig"):
    if importlib.util.find_spec(_name) is not None:
        sys.exit(f"producer_app: {_name!r} is importable here; this producer must not see it")

app = Celery("producer", broker=os.environ["PRODUCER_BROKER_URL"])
app.conf.update(
    task_serializer="json",
    accept_content=["json"],
    task_routes={"pushworker.*": {"queue": "pushworker"}},
)


def main(messages: list[dict[str, object]]) -> list[str]:
    ids = []
    for message in messages:
        result = app.send_task(
            "pushworker.submit", args=message.get("args", []), kwargs=message.get("kwargs", {})
        )
        ids.append(result.id)
    return ids


if __name__ == "__main__":
    print(json.dumps(main(json.loads(sys.argv[1]))))
