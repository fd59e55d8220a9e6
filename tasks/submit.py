"""Celery tasks: submit (filled in by its issue's work)."""
