"""Celery tasks: thin wrappers that take ids and call plain functions in ``worker``."""
