"""The Celery app of the search service (Redis broker), configured from :class:`SearchSettings`.

Delivery is at-least-once and every task is idempotent (it resumes the stored snapshot under a lease):
``task_acks_late`` (a task is acknowledged when it returns, so a lost worker's task comes back),
``task_reject_on_worker_lost``, prefetch 1, and one ``visibility_timeout`` (the broker redelivers a task not
acknowledged within it) that :class:`SearchSettings` checks is longer than two slices. No result backend: the
Redis store's records are the source of truth for a search's status.
"""

from __future__ import annotations

from celery import Celery

from services.search.keys import Keys
from services.search.settings import SearchSettings

TASK_RUN = "cpl.search.run"


def broker_options(settings: SearchSettings) -> dict[str, object]:
    return {
        "visibility_timeout": settings.visibility_timeout_s,
        # Every broker key under our prefix: deployments (and test sessions) sharing a Redis never meet.
        "global_keyprefix": f"{settings.key_prefix}:celery:",
        # How often a worker looks for tasks whose worker died (older than the visibility timeout).
        "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
        "unacked_restore_throttle": 1,
    }


def create_celery(settings: SearchSettings) -> Celery:
    app = Celery("cpl-search", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        task_ignore_result=True,
        result_backend=None,
        broker_transport_options=broker_options(settings),
        task_default_queue=Keys(settings.key_prefix).queue,
        task_serializer="json",
        accept_content=["json"],
        broker_connection_retry_on_startup=True,
        worker_hijack_root_logger=False,
        worker_pool="threads",
        worker_concurrency=settings.worker_concurrency,
        worker_send_task_events=False,
        task_send_sent_event=False,
    )
    return app
