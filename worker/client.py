"""The producer API's former module name, kept so that producers written against
``worker.client`` go on working; new code imports ``worker.producer``."""

from worker.producer import enqueue_push, publish

__all__ = ["enqueue_push", "publish"]
