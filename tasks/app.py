"""The Celery application. Configuration lives in ``celeryconfig.py``."""

from celery import Celery
from celery.signals import setup_logging

from worker.config import get_settings
from worker.logs import configure_logging

app = Celery("pushworker")
app.config_from_object("celeryconfig")
app.autodiscover_tasks(["tasks"], related_name="push", force=True)


@setup_logging.connect
def _use_structlog(**_kwargs: object) -> None:
    # Celery's own logging setup is replaced so every line (ours and Celery's) is structured.
    configure_logging(get_settings().log_format)
