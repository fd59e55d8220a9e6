"""The Celery application. Configuration lives in ``celeryconfig.py``."""

from celery import Celery
from celery.signals import setup_logging

from worker.config import get_settings
from worker.logs import configure_logging

app = Celery("pushworker")
app.config_from_object("celeryconfig")
# Every task module, imported when the worker starts (and when a producer publishes).
app.conf.include = ["tasks.push", "tasks.submit", "tasks.maintenance", "tasks.health"]


@setup_logging.connect
def _use_structlog(**_kwargs: object) -> None:
    # Celery's own logging setup is replaced so every line (ours and Celery's) is structured.
    configure_logging(get_settings().log_format)
