"""Celery tasks: health (filled in by its issue's work)."""
